"""TriageModel (gate + detector + lung prior), model packages (safetensors + model.json + card), loading."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from triage_node.errors import ModelError
from triage_node.inference.classifier import CAM_ARCHS, CamClassifier, boxes_from_cam, build_classifier
from triage_node.inference.detector import DEFAULT_ARCH, LABEL, build_detector
from triage_node.inference.gate import GATE_ARCH, GATE_SIZE, build_gate
from triage_node.inference.preprocess import BLUR_SIGMA, check_harmonise, harmonise, resize_batch, to_batch
from triage_node.inference.prior import DensityAtlas, LungPrior
from triage_node.inference.types import Detection, ModelInfo, Prediction

log = logging.getLogger(__name__)
FORMAT = 1
WEIGHT_FILES = ("detector.safetensors", "gate.safetensors", "prior.safetensors")
ATLAS_FILE = "atlas.safetensors"  # optional: the density atlas of the CAM localiser's side prior
PEDIATRIC_GATE_FILE = "gate_pediatric.safetensors"  # optional: the gate of an age-specific operating point
WEIGHT_FORMATS = ("fp16", "int8")  # model.json "weights": how the networks' tensors are stored
CAM = "cam"  # detector architecture name: boxes from the gate's class-activation map, no detector weights


def weight_files(detector_arch: str) -> tuple[str, ...]:
    return tuple(f for f in WEIGHT_FILES if not (detector_arch == CAM and f == "detector.safetensors"))


@dataclass
class RawOutput:
    """Everything before gating/prior: boxes (xyxy, source pixels), scores, prior means, gate probability."""

    boxes: np.ndarray
    scores: np.ndarray
    prior_means: np.ndarray
    probability: float
    rows: int
    columns: int


@dataclass(frozen=True)
class AgeOperatingPoint:
    """A second operating point for young patients: films whose Patient's Age is below ``max_age_years`` are
    called positive at ``threshold`` instead of the package's (adult) gate threshold. One threshold cannot serve
    both populations when the scores are calibrated differently (a model trained on adults flagged most normal
    pediatric films at its adult point). Chosen by ``triage-node calibrate`` on data named in ``calibration``."""

    name: str
    threshold: float
    max_age_years: float
    rule: str = ""
    calibration: dict | None = None
    #: a gate of its own for these films (a CAM classifier trained for that population), or None: the main gate's
    #: score at another threshold. ``gate_arch`` names its architecture in model.json.
    gate: torch.nn.Module | None = field(default=None, compare=False, repr=False)
    gate_arch: str = ""

    def settings(self) -> dict:
        return {"threshold": self.threshold, "max_age_years": self.max_age_years, "rule": self.rule,
                "calibration": self.calibration or {}} | (
            {"gate": {"file": PEDIATRIC_GATE_FILE, "arch": self.gate_arch}} if self.gate is not None else {})

    @classmethod
    def from_settings(cls, name: str, d: dict, gate: torch.nn.Module | None = None) -> AgeOperatingPoint:
        t, a = float(d["threshold"]), float(d["max_age_years"])
        if not (0.0 <= t <= 1.0) or a <= 0:
            raise ValueError(f"operating point {name}: threshold {t} or max_age_years {a} out of range")
        return cls(name, t, a, str(d.get("rule", "")), dict(d.get("calibration") or {}), gate,
                   str((d.get("gate") or {}).get("arch", "")))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TriageModel:
    """Gate (image-level probability) + detector (boxes) + lung prior (suppress boxes outside the lungs).

    With ``detector=None`` (architecture ``cam``) the boxes come from the gate's own class-activation map
    (``classifier.boxes_from_cam``), weighted by the lung prior; ``tta`` averages the image and its mirror.
    """

    def __init__(self, detector: torch.nn.Module | None, gate: torch.nn.Module, prior: LungPrior, info: ModelInfo,
                 threshold: float = 0.5, box_threshold: float = 0.2, input_size: int = 512,
                 gate_size: int = GATE_SIZE, detector_arch: str = DEFAULT_ARCH, gate_arch: str = GATE_ARCH,
                 device: str = "auto", batch_size: int | None = None, meta: dict | None = None,
                 tta: bool = False, cam_threshold: float = 0.5, max_boxes: int = 3,
                 atlas: DensityAtlas | None = None, pediatric: AgeOperatingPoint | None = None,
                 harmonise: str = "none", blur_sigma: float = BLUR_SIGMA) -> None:
        self.device = resolve_device(device)
        #: the network input's harmonisation (``preprocess.harmonise``), as in training; the CAM localiser only
        self.harmonise, self.blur_sigma = check_harmonise(harmonise), float(blur_sigma)
        self.pediatric = pediatric
        self.detector, self.gate, self.prior, self.info = detector, gate, prior, info
        self.threshold, self.box_threshold = float(threshold), float(box_threshold)
        self.input_size, self.gate_size = int(input_size), int(gate_size)
        self.detector_arch, self.gate_arch = detector_arch, gate_arch
        # On CPU: the FCOS detector measured slower per image batched (0.10 s at 4 vs 0.045 s at 1, 2 threads), so
        # batch 1 there; the CAM classifier at 192 px measured faster batched (1 thread, channels_last: 18.9 ms per
        # image at 1, 14.8 at 2, 14.1 at 4), so up to 8 there (the worker's micro-batcher sets the real size).
        self.batch_size = batch_size or (32 if self.device.type == "cuda" else 1 if detector is not None else 8)
        # channels_last: on CUDA for both networks; on CPU for the CAM classifier (oneDNN, 1 thread: 18.9 vs 23.6
        # ms per image at batch 1), not measured for the detector there
        self.channels_last = self.device.type == "cuda" or detector is None
        self.meta = meta or {}
        self.tta, self.cam_threshold, self.max_boxes = bool(tta), float(cam_threshold), int(max_boxes)
        if atlas is not None and (detector is not None or atlas.size != self.gate_size):
            raise ModelError("a density atlas needs the CAM localiser and the classifier's input size "
                             f"({self.gate_size} px; the atlas is {atlas.size} px)")
        self.atlas = atlas
        if detector is None and not isinstance(gate, CamClassifier):
            raise ModelError("a model without a detector needs a class-activation-map classifier as its gate")
        if pediatric is not None and pediatric.gate is not None:
            if detector is not None or not isinstance(pediatric.gate, CamClassifier):
                raise ModelError("an age-specific gate needs the CAM localiser and a class-activation-map classifier")
            pediatric.gate.eval().to(self.device)
            if self.channels_last:
                pediatric.gate.to(memory_format=torch.channels_last)
        # fp16 rather than bf16 by default: FCOS decodes boxes inside the autocast region, and bf16's 8-bit
        # mantissa would cost several pixels of box precision at 512 px.
        self.amp_dtype = torch.float16
        self.gate.eval().to(self.device)
        if self.detector is not None:
            self.detector.eval().to(self.device)
        if self.channels_last:
            self.gate.to(memory_format=torch.channels_last)
            if self.detector is not None:
                self.detector.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------------------------- inference
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def analyze_tensor(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]], timings: dict | None = None,
                       run_detector: Sequence[bool] | None = None,
                       ages: Sequence[float | None] | None = None) -> list[RawOutput]:
        """Run gate and detector on a preprocessed N x 1 x S x S batch (S = input_size) on the model's device.
        ``ages`` (years, None = unknown): films below the age of an operating point with its own gate get that
        gate's score and map."""
        timings = timings if timings is not None else {}
        if self.detector is None:
            return self._analyze_cam(x, shapes, timings, run_detector, ages)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        with self._autocast():
            g = resize_batch(x, self.gate_size)
            if self.channels_last:
                g = g.contiguous(memory_format=torch.channels_last)
            probs = torch.sigmoid(self.gate(g).float()).cpu().numpy()
        sync()
        t1 = time.perf_counter()
        todo = [i for i in range(len(x)) if run_detector is None or run_detector[i] or probs[i] >= self.min_threshold]
        dets: dict[int, dict] = {}
        if todo:
            with self._autocast():
                outs = self.detector(list(x[todo]))
            dets = {i: o for i, o in zip(todo, outs)}
        sync()
        t2 = time.perf_counter()
        res = []
        for i, (rows, cols) in enumerate(shapes):
            o = dets.get(i)
            if o is None:
                b, s = np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
            else:
                keep = o["labels"] == LABEL
                b = o["boxes"][keep].float().cpu().numpy().reshape(-1, 4)
                s = o["scores"][keep].float().cpu().numpy()
                b = b * np.array([cols, rows, cols, rows], np.float32) / self.input_size
            res.append(RawOutput(b, s, self.prior.box_means(b, cols, rows), float(probs[i]), rows, cols))
        t3 = time.perf_counter()
        for k, v in (("gate", t1 - t0), ("detector", t2 - t1), ("postprocess", t3 - t2)):
            timings[k] = timings.get(k, 0.0) + 1000 * v
        return res

    def _cam(self, gate: torch.nn.Module, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(gate, CamClassifier)
        logits, cams = gate.forward_cam(g)
        if self.tta:
            lf, cf = gate.forward_cam(g.flip(-1))
            logits, cams = (logits + lf) / 2, (cams + cf.flip(-1)) / 2
        return logits, cams

    def _analyze_cam(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]], timings: dict,
                     run_detector: Sequence[bool] | None, ages: Sequence[float | None] | None) -> list[RawOutput]:
        """One classifier pass gives the probability and the activation map; boxes are read from the map."""
        t0 = time.perf_counter()
        ped = self.pediatric if self.pediatric is not None and self.pediatric.gate is not None else None
        young = [i for i, a in enumerate(ages or ()) if ped is not None and a is not None and a < ped.max_age_years]
        with self._autocast():
            g = resize_batch(x, self.gate_size)
            n = harmonise(g, self.harmonise, sigma=self.blur_sigma)  # the side prior's atlas reads g as it was
            if self.channels_last:
                n = n.contiguous(memory_format=torch.channels_last)
            if not young:
                logits, cams = self._cam(self.gate, n)
            else:  # each film through its own population's gate only
                assert ped is not None and ped.gate is not None
                rest = sorted(set(range(len(x))) - set(young))
                parts = [(idx, self._cam(net, n[idx])) for idx, net in ((young, ped.gate), (rest, self.gate)) if idx]
                logits = torch.empty((len(x),) + parts[0][1][0].shape[1:], dtype=parts[0][1][0].dtype,
                                     device=n.device)
                cams = torch.empty((len(x),) + parts[0][1][1].shape[1:], dtype=parts[0][1][1].dtype, device=n.device)
                for idx, (lg, cm) in parts:
                    logits[idx], cams[idx] = lg, cm
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        cams_np = cams.float().cpu().numpy()
        t1 = time.perf_counter()
        sides = self.atlas.sides(g) if self.atlas is not None else None
        res = []
        for i, (rows, cols) in enumerate(shapes):
            b, s = np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
            if (run_detector is None or run_detector[i]) or probs[i] >= self.min_threshold:
                half = None if sides is None else "left" if sides[i, 0] > sides[i, 1] else "right"
                b, s = boxes_from_cam(cams_np[i], self.prior.heat, self.cam_threshold, self.max_boxes, half=half)
                b = b * np.array([cols, rows, cols, rows], np.float32)
                s = s * float(probs[i])
            res.append(RawOutput(b, s, self.prior.box_means(b, cols, rows), float(probs[i]), rows, cols))
        t2 = time.perf_counter()
        for k, v in (("gate", t1 - t0), ("detector", 0.0), ("postprocess", t2 - t1)):
            timings[k] = timings.get(k, 0.0) + 1000 * v
        return res

    def analyze(self, images: Sequence[np.ndarray], run_detector: bool = True,
                timings: list[dict] | None = None, ages: Sequence[float | None] | None = None) -> list[RawOutput]:
        """Raw outputs for 2-D float images in [0,1] of any size, batched. ``run_detector=False`` skips the
        detector where the gate says negative (what ``predict`` does). ``ages``: see ``analyze_tensor``."""
        if ages is not None and len(ages) != len(images):
            raise ValueError(f"{len(images)} images but {len(ages)} ages")
        res: list[RawOutput] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            t = {}
            t0 = time.perf_counter()
            x = to_batch(chunk, self.input_size, self.device)
            t["preprocess"] = 1000 * (time.perf_counter() - t0)
            res += self.analyze_tensor(x, [im.shape for im in chunk], t, [run_detector] * len(chunk),
                                       None if ages is None else ages[start:start + self.batch_size])
            if timings is not None:
                n = len(chunk)
                timings += [{k: v / n for k, v in t.items()} | {"batch": float(n)}] * n
        return res

    @property
    def min_threshold(self) -> float:
        """The lowest gate threshold of any operating point: below it no film is positive, so no boxes are needed."""
        return min(self.threshold, self.pediatric.threshold) if self.pediatric is not None else self.threshold

    def threshold_for(self, age_years: float | None) -> tuple[float, str]:
        """(gate threshold, operating point name) for a patient of this age (None = unknown: the adult point)."""
        if self.pediatric is None:
            return self.threshold, ""
        if age_years is None:
            return self.threshold, "age unknown"
        if age_years < self.pediatric.max_age_years:
            return self.pediatric.threshold, self.pediatric.name
        return self.threshold, "adult"

    def postprocess(self, raw: RawOutput, use_gate: bool = True, use_prior: bool = True,
                    timings_ms: dict | None = None, age_years: float | None = None) -> Prediction:
        """Apply the gate (at the operating point of the patient's age), the lung prior and the box score
        threshold to a raw output."""
        threshold, point = self.threshold_for(age_years)
        boxes, scores = raw.boxes, raw.scores
        if use_prior and len(boxes):
            keep, scores = self.prior.apply(raw.prior_means, scores)
            boxes, scores = boxes[keep], scores[keep]
        keep = scores >= self.box_threshold
        boxes, scores = boxes[keep], scores[keep]
        if use_gate and raw.probability < threshold:
            boxes, scores = boxes[:0], scores[:0]
        order = np.argsort(-scores, kind="stable")
        dets = tuple(Detection(float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1]), float(s))
                     for b, s in zip(boxes[order], scores[order]))
        return Prediction(probability=raw.probability, threshold=threshold, detections=dets, model=self.info,
                          rows=raw.rows, columns=raw.columns, timings_ms=dict(timings_ms or {}),
                          operating_point=point)

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray], use_gate: bool = True, use_prior: bool = True,
                ages: Sequence[float | None] | None = None) -> list[Prediction]:
        """Predictions for 2-D float32 images in [0,1] (MONOCHROME2), boxes in source pixel coordinates.
        ``ages`` (years, None = unknown) picks each film's operating point (``threshold_for``)."""
        t0 = time.perf_counter()
        timings: list[dict] = []
        ages = list(ages) if ages is not None else [None] * len(images)
        raws = self.analyze(list(images), run_detector=not use_gate, timings=timings, ages=ages)
        total = 1000 * (time.perf_counter() - t0) / max(len(raws), 1)
        return [self.postprocess(r, use_gate, use_prior, t | {"total": total}, a)
                for r, t, a in zip(raws, timings, ages)]

    # ------------------------------------------------------------------------------------------- packaging
    def config(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.info.name,
            "version": self.info.version,
            "manufacturer": self.info.manufacturer,
            "demo": self.info.demo,
            "intended_use": self.info.intended_use,
            "device_uid": self.info.device_uid,
            "architecture": {"detector": self.detector_arch, "gate": self.gate_arch,
                             "summary": self.info.architecture},
            "input_size": self.input_size,
            "gate_input_size": self.gate_size,
            "thresholds": {"gate": self.threshold, "box_score": self.box_threshold, "prior": self.prior.settings()}
            | ({"gate_pediatric": self.pediatric.settings()} if self.pediatric is not None else {}),
            "localiser": {"cam_threshold": self.cam_threshold, "max_boxes": self.max_boxes}
            | ({"side": "density", "atlas": self.atlas.settings()} if self.atlas is not None else {}),
            "tta": ["hflip"] if self.tta else [],
        } | ({"preprocess": {"harmonise": self.harmonise, "blur_sigma": self.blur_sigma}}
             if self.harmonise != "none" else {})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _half(sd: dict) -> dict:
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().cpu()
            for k, v in sd.items()}


_SCALE = ".__int8_scale__"


def _int8(sd: dict) -> dict:
    """Weight-only int8 storage: every floating tensor of 2 or more dimensions (convolution and linear weights) as
    int8 with one fp32 scale per output channel (symmetric, max |w| -> 127); the rest (biases, batch-norm) fp16.
    Half the bytes of fp16 for a ResNet; the network still computes in fp32 after loading."""
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.dim() >= 2:
            w = v.float()
            scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / 127.0
            out[k] = torch.round(w / scale).clamp(-127, 127).to(torch.int8).contiguous()
            out[k + _SCALE] = scale.contiguous()
        else:
            out[k] = (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
    return out


def _dequantize(sd: dict) -> dict:
    """The fp32 state dict of ``_int8``'s (or fp16) tensors."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_SCALE):
            continue
        out[k] = v.float() * sd[k + _SCALE] if k + _SCALE in sd else (v.float() if v.is_floating_point() else v)
    return out


def save_package(model: TriageModel, path: str | os.PathLike, extra: dict | None = None,
                 card: str | None = None, weights: str = "fp16") -> Path:
    """Write a model package: safetensors weights (``weights``: fp16, or int8 weight-only with per-channel
    scales), model.json with checksums, MODEL_CARD.md."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}")
    pack = _half if weights == "fp16" else _int8
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    if model.detector is not None:
        save_file(pack(model.detector.state_dict()), d / "detector.safetensors")
    save_file(pack(model.gate.state_dict()), d / "gate.safetensors")
    save_file({"heat": torch.from_numpy(model.prior.heat.copy())}, d / "prior.safetensors")
    files = list(weight_files(model.detector_arch))
    ped = model.pediatric
    if ped is not None and ped.gate is not None:
        save_file(pack(ped.gate.state_dict()), d / PEDIATRIC_GATE_FILE)
        files.append(PEDIATRIC_GATE_FILE)
    elif (d / PEDIATRIC_GATE_FILE).exists():
        (d / PEDIATRIC_GATE_FILE).unlink()
    if model.atlas is not None:
        save_file({"mean": torch.from_numpy(model.atlas.mean.copy()), "sd": torch.from_numpy(model.atlas.sd.copy())},
                  d / ATLAS_FILE)
        files.append(ATLAS_FILE)
    elif (d / ATLAS_FILE).exists():
        (d / ATLAS_FILE).unlink()  # a package rewritten without its atlas must not keep a stale one
    cfg = model.config() | (extra or {})
    cfg["weights"] = weights
    cfg["files"] = {f: {"sha256": _sha256(d / f), "bytes": (d / f).stat().st_size} for f in files}
    (d / "model.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if card is not None:
        (d / "MODEL_CARD.md").write_text(card)
    return d


def verify_package(path: str | os.PathLike) -> dict:
    """Check model.json and every listed weight file's sha256; return the parsed model.json."""
    d = Path(path)
    if not d.is_dir():
        raise ModelError(f"model package {d} does not exist or is not a directory")
    try:
        cfg = json.loads((d / "model.json").read_text())
    except FileNotFoundError:
        raise ModelError(f"model package {d} has no model.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"model package {d}: model.json is not valid JSON ({e})") from None
    try:
        files = cfg["files"]
        for key in ("name", "version", "architecture", "input_size", "thresholds"):
            cfg[key]
    except (KeyError, TypeError) as e:
        raise ModelError(f"model package {d}: model.json lacks {e}") from None
    if cfg.get("format") != FORMAT:
        raise ModelError(f"model package {d}: unsupported format {cfg.get('format')!r} (expected {FORMAT})")
    for f in weight_files(str((cfg.get("architecture") or {}).get("detector", ""))):
        if f not in files:
            raise ModelError(f"model package {d}: model.json lists no checksum for {f}")
    for f, entry in files.items():
        p = d / f
        if not p.is_file():
            raise ModelError(f"model package {d}: weight file {f} is missing")
        got = _sha256(p)
        if got != entry.get("sha256"):
            raise ModelError(f"model package {d}: checksum mismatch for {f} (expected {entry.get('sha256')}, "
                             f"got {got}); the file is corrupt or was modified")
    return cfg


def _load_state(module: torch.nn.Module, path: Path) -> None:
    try:
        module.load_state_dict(_dequantize(load_file(str(path))), strict=True)
    except Exception as e:  # safetensors header errors, shape mismatches
        raise ModelError(f"cannot load weights {path}: {str(e)[:400]}") from None


def load_model(path: str | os.PathLike, device: str = "auto") -> TriageModel:
    """Load and verify a model package directory. Raises ModelError on any problem."""
    d = Path(path)
    cfg = verify_package(d)
    try:
        arch, th = cfg["architecture"], cfg["thresholds"]
        detector = None if arch["detector"] == CAM else build_detector(arch["detector"], int(cfg["input_size"]))
        gate = build_classifier(arch["gate"]) if arch["gate"] in CAM_ARCHS else build_gate(arch["gate"])
        ps = th["prior"]
        loc = cfg.get("localiser") or {}
        ped = th.get("gate_pediatric")
        ped_gate = None
        if ped is not None and ped.get("gate"):
            if PEDIATRIC_GATE_FILE not in cfg["files"]:
                raise ModelError(f"model package {d}: the pediatric operating point has a gate but model.json lists "
                                 f"no checksum for {PEDIATRIC_GATE_FILE}")
            ped_gate = build_classifier(ped["gate"]["arch"])
        pediatric = AgeOperatingPoint.from_settings("pediatric", ped, ped_gate) if ped is not None else None
        pre = cfg.get("preprocess") or {}
        harm, sigma = check_harmonise(str(pre.get("harmonise", "none"))), float(pre.get("blur_sigma", BLUR_SIGMA))
        if harm != "none" and detector is not None:
            raise ValueError("input harmonisation is implemented for the CAM localiser only")
        if cfg.get("weights", "fp16") not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {cfg.get('weights')!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"model package {d}: incompatible model.json ({e})") from None
    if detector is not None:
        _load_state(detector, d / "detector.safetensors")
    _load_state(gate, d / "gate.safetensors")
    if pediatric is not None and pediatric.gate is not None:
        _load_state(pediatric.gate, d / PEDIATRIC_GATE_FILE)
    try:
        heat = load_file(str(d / "prior.safetensors"))["heat"].numpy()
    except Exception as e:
        raise ModelError(f"cannot load prior {d / 'prior.safetensors'}: {e}") from None
    atlas = None
    if loc.get("side") == "density":
        if ATLAS_FILE not in cfg["files"]:
            raise ModelError(f"model package {d}: the localiser uses a density atlas but model.json lists no "
                             f"checksum for {ATLAS_FILE}")
        try:
            a, at = load_file(str(d / ATLAS_FILE)), loc.get("atlas") or {}
            atlas = DensityAtlas(a["mean"].float().numpy(), a["sd"].float().numpy(), heat,
                                 lung_threshold=float(at.get("lung_threshold", 0.3)),
                                 smooth=int(at.get("smooth", 15)), sd_floor=float(at.get("sd_floor", 0.05)),
                                 n_films=int(at.get("films", 0)), source=str(at.get("source", "")))
        except Exception as e:
            raise ModelError(f"cannot load the density atlas {d / ATLAS_FILE}: {str(e)[:300]}") from None
    elif loc.get("side") not in (None, "none"):
        raise ModelError(f"model package {d}: unknown localiser side prior {loc.get('side')!r}")
    info = ModelInfo(name=cfg["name"], version=cfg["version"], architecture=arch.get("summary", ""),
                     manufacturer=cfg.get("manufacturer", ModelInfo.manufacturer), demo=bool(cfg.get("demo", True)),
                     intended_use=cfg.get("intended_use", ModelInfo.intended_use),
                     device_uid=cfg.get("device_uid", ""))
    return TriageModel(detector, gate, LungPrior(heat, ps.get("min_mean", 0.15), ps.get("power", 0.0)), info,
                       threshold=th["gate"], box_threshold=th["box_score"], input_size=int(cfg["input_size"]),
                       gate_size=int(cfg.get("gate_input_size", GATE_SIZE)), detector_arch=arch["detector"],
                       gate_arch=arch["gate"], device=device, meta=cfg, tta="hflip" in (cfg.get("tta") or []),
                       cam_threshold=float(loc.get("cam_threshold", 0.5)), max_boxes=int(loc.get("max_boxes", 3)),
                       atlas=atlas, pediatric=pediatric, harmonise=harm, blur_sigma=sigma)


def arch_summary(detector_arch: str, gate_arch: str, input_size: int) -> str:
    return (f"gate {gate_arch} ({GATE_SIZE}px) + {detector_arch} ({input_size}px) + RSNA box-coverage lung prior")


def untrained_model(device: str = "cpu", seed: int = 0, input_size: int = 512,
                    detector_arch: str = DEFAULT_ARCH) -> TriageModel:
    """Randomly initialised model (tests, or when no model is configured). Never for real use."""
    torch.manual_seed(seed)
    info = ModelInfo(name="cxr-triage UNTRAINED", version="0.0.0-untrained",
                     architecture=arch_summary(detector_arch, GATE_ARCH, input_size), demo=True,
                     intended_use="untrained random weights, demo/test only, not for clinical use")
    return TriageModel(build_detector(detector_arch, input_size), build_gate(GATE_ARCH), LungPrior.from_box_stats(),
                       info, threshold=0.5, box_threshold=0.2, input_size=input_size, detector_arch=detector_arch,
                       device=device)
