"""Small, JSON-serialisable result types that cross the queue."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Detection:
    """One box in source-image pixel coordinates (column x, row y, top-left origin)."""

    x: float
    y: float
    width: float
    height: float
    score: float

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.x + self.width, self.y + self.height)


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that produced a prediction (goes into SR, overlay, Contributing Equipment)."""

    name: str
    version: str
    architecture: str = ""
    manufacturer: str = "CXR Triage Node project"
    demo: bool = True
    intended_use: str = "demo model, not for clinical use"
    device_uid: str = ""

    @property
    def label(self) -> str:
        """Human-readable identity, always carrying the demo warning when applicable."""
        tag = " (DEMO MODEL, NOT FOR CLINICAL USE)" if self.demo else ""
        return f"{self.name} {self.version}{tag}"


@dataclass(frozen=True)
class Prediction:
    """What the worker hands to the reporting stage: image-level probability plus boxes."""

    probability: float
    threshold: float
    detections: tuple[Detection, ...]
    model: ModelInfo
    rows: int = 0
    columns: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: which of the package's operating points set ``threshold``: "" (the package has one), "adult", "pediatric",
    #: or "age unknown" (the adult point, for a film without a readable Patient's Age)
    operating_point: str = ""
    #: the rule that gave the patient's age (``triage_node.age``): "PatientAge", "PatientBirthDate and StudyDate",
    #: "unknown (<reason>)", with a note after "; " where one applies; "" when not read (an older node's payload)
    age_rule: str = ""

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold

    @property
    def age_unknown(self) -> bool:
        """The film was judged without a known age (by the adult point where the package has a pediatric one)."""
        return self.operating_point == "age unknown" or self.age_rule.startswith("unknown")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["detections"] = [asdict(x) for x in self.detections]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Prediction:
        return cls(
            probability=float(d["probability"]),
            threshold=float(d["threshold"]),
            detections=tuple(Detection(**x) for x in d["detections"]),
            model=ModelInfo(**d["model"]),
            rows=int(d.get("rows", 0)),
            columns=int(d.get("columns", 0)),
            timings_ms=dict(d.get("timings_ms", {})),
            operating_point=str(d.get("operating_point", "")),  # absent in payloads queued by an older node
            age_rule=str(d.get("age_rule", "")),  # likewise
        )
