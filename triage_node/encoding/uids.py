"""Deterministic UIDs for everything the node writes.

Output UIDs are a pure function of the source SOP Instance UID, the model version and the kind of output, so a
redelivered task produces byte-for-byte the same identifiers and the PACS *replaces* the earlier copy instead of
storing a duplicate. UIDs use the ``2.25.<int>`` form of ISO/IEC 9834-8 (no registered root needed) with a name-based
(version 5) UUID of the inputs. ``pydicom.uid.generate_uid(prefix=None, ...)`` is *not* used: with no prefix it
ignores ``entropy_srcs`` and returns a random UUID.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, TypedDict

from pydicom.uid import UID

from triage_node.own_outputs import OUTPUT_MANUFACTURER, SERIES_DESCRIPTION_PREFIX

if TYPE_CHECKING:
    from highdicom import ContributingEquipment

    from triage_node.inference.types import ModelInfo

#: UUID namespace of this project, so our name-based UUIDs never collide with other users of the scheme.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-triage-node:encoding:v1")

KINDS = frozenset({"sr", "sc", "gsps", "sr-series", "sc-series", "gsps-series"})


def _derive(*parts: str) -> str:
    name = "\x1f".join(parts)  # unit separator: ("a.b", "c") and ("a", "b.c") differ
    uid = f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
    if not UID(uid).is_valid:  # pragma: no cover - 2.25.<128-bit int> is at most 44 characters
        raise ValueError(f"derived an invalid UID {uid!r}")
    return uid


def derive_uid(source_sop_instance_uid: str, model_version: str, kind: str) -> str:
    """Return the UID of one output of one source image for one model version.

    Parameters
    ----------
    source_sop_instance_uid
        SOP Instance UID of the analysed image.
    model_version
        Version of the model that produced the result; a new version yields new UIDs.
    kind
        One of ``sr``, ``sc``, ``gsps`` (instances) or ``sr-series``, ``sc-series``, ``gsps-series``.

    Returns
    -------
    str
        A valid DICOM UID of at most 64 characters, identical for identical inputs.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown UID kind {kind!r}; expected one of {sorted(KINDS)}")
    if not source_sop_instance_uid:
        raise ValueError("source SOP Instance UID is empty")
    return _derive("output", str(source_sop_instance_uid), str(model_version), kind)


def tracking_uid(source_sop_instance_uid: str, model_version: str, index: int | str) -> str:
    """Tracking Unique Identifier (TID 4108) of one finding (``index``) in the SR; deterministic like the rest."""
    return _derive("tracking", str(source_sop_instance_uid), str(model_version), str(index))


def model_device_uid(model_name: str, model_version: str) -> str:
    """Device UID of one trained model (IHE AI Results: one device UID per trained model)."""
    if not model_name:
        raise ValueError("model name is empty")
    return _derive("device", str(model_name), str(model_version))


# --- identity of what we write (shared by sr/sc/pr; the constants live in triage_node.own_outputs) -------------

DEMO_SUFFIX = "DEMO MODEL NOT FOR CLINICAL USE"


def lo(text: str) -> str:
    """Truncate to the 64 characters a LO value may hold (backslash is not allowed in LO)."""
    return text.replace("\\", "/")[:64]


def series_description(kind_label: str, demo: bool) -> str:
    """``AI CXR triage SR`` / ``... - DEMO MODEL NOT FOR CLINICAL USE``, cut to 64 characters."""
    text = f"{SERIES_DESCRIPTION_PREFIX} {kind_label}"
    if demo:
        text += f" - {DEMO_SUFFIX}"
    return lo(text)


def device_uid_of(model: ModelInfo) -> str:
    """The model's configured device UID, or the one derived from its name and version."""
    configured = model.device_uid or ""
    if configured and UID(configured).is_valid:
        return configured
    return model_device_uid(model.name, model.version)


class EquipmentAttributes(TypedDict):
    """General Equipment keyword arguments of highdicom's SOP class constructors."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: list[str]


def equipment_attributes(model: ModelInfo) -> EquipmentAttributes:
    """General Equipment attributes for an output: our node, running this model."""
    from triage_node import __version__

    return {
        "manufacturer": OUTPUT_MANUFACTURER,
        "manufacturer_model_name": lo(model.name),
        "software_versions": [lo(f"triage-node {__version__}"), lo(f"model {model.version}")],
    }


def algorithm_equipment(model: ModelInfo) -> ContributingEquipment:
    """Contributing Equipment item for the algorithm, as IHE AI Results (AIR) asks.

    Purpose of Reference is (Newcode1, 99IHE, "Processing Algorithm"), which highdicom's constructor does not
    accept, so the item is built with a DCM purpose and the code replaced afterwards.
    """
    from highdicom import ContributingEquipment
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    item = ContributingEquipment(
        manufacturer=lo(model.manufacturer or OUTPUT_MANUFACTURER),
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=lo(model.name),
        software_versions=lo(model.version),
        contribution_description=(
            f"AI inference: {model.label}; {model.intended_use}"
        )[:1024],
    )
    item.PurposeOfReferenceCodeSequence = [CodedConcept("Newcode1", "99IHE", "Processing Algorithm")]
    item.DeviceUID = device_uid_of(model)
    return item
