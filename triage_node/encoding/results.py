"""Everything the reporting stage writes for one prediction, and how to recognise it when it comes back."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from pydicom.dataset import Dataset

from triage_node.encoding.pr import build_gsps
from triage_node.encoding.sanitize import clean_source
from triage_node.encoding.sc import build_overlay
from triage_node.encoding.sr import build_sr
from triage_node.inference.types import Prediction
from triage_node.own_outputs import OUTPUT_MANUFACTURER, is_display_of, is_own_output

__all__ = ["OUTPUT_MANUFACTURER", "OUTPUTS", "build_results", "is_own_output"]

logger = logging.getLogger(__name__)

OUTPUTS = ("sr", "sc", "gsps")


def build_results(
    source: Dataset,
    display: np.ndarray | None,
    prediction: Prediction,
    outputs: Iterable[str] = ("sr", "sc"),
    predecessor_sr: Dataset | None = None,
    sc_encoding: str = "jpeg-ls-palette",
    overlay: np.ndarray | None = None,
) -> tuple[list[Dataset], list[str]]:
    """Build the requested outputs for one analysed image.

    Parameters
    ----------
    source
        The analysed image as read from the spool.
    display
        2-D uint8 MONOCHROME2 rendering of the source (needed for ``sc`` only; None otherwise).
    prediction
        The model's result; boxes in source pixel coordinates.
    outputs
        Any of ``sr``, ``sc``, ``gsps``, in the order wanted.
    predecessor_sr
        An earlier SR of this image by another model version, referenced by the new SR.
    sc_encoding
        Transfer syntax of the SC overlay (``outputs.sc_transfer_syntax``, see :data:`sc.SC_ENCODINGS`).
    overlay
        The SC's pixels, ``sc.render_overlay(display, prediction, palette=...)`` (palette for a PALETTE COLOR
        encoding), when the caller rendered them already.

    Returns
    -------
    tuple[list[pydicom.dataset.Dataset], list[str]]
        The datasets (each with ``file_meta``, ready for ``dcmwrite`` or C-STORE) and the keywords of the source
        attributes that had to be repaired or dropped (names only).

    Raises
    ------
    ValueError
        On an unknown output name, or when the prediction or display do not match the source's size.
    """
    wanted = list(dict.fromkeys(outputs))
    unknown = [o for o in wanted if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; expected any of {OUTPUTS}")
    rows, columns = int(source.Rows), int(source.Columns)
    if prediction.rows and prediction.columns and (prediction.rows, prediction.columns) != (rows, columns):
        raise ValueError(
            f"prediction is for a {prediction.rows}x{prediction.columns} image, source is {rows}x{columns}"
        )
    if display is not None or "sc" in wanted:
        shape = np.shape(display) if display is not None else None
        if shape is None or not is_display_of(shape, rows, columns):
            raise ValueError(f"display shape {shape} does not match source {rows}x{columns} (nor a reduction of it)")
    cleaned, changed = clean_source(source)
    if changed:
        logger.warning(
            "source %s has non-conformant or incomplete attributes, repaired, completed or dropped in outputs: %s",
            source.get("SOPInstanceUID", "?"), ",".join(changed),
        )
    results: list[Dataset] = []
    for name in wanted:
        if name == "sr":
            results.append(build_sr(cleaned, prediction, predecessor=predecessor_sr))
        elif name == "sc":
            assert display is not None  # checked above
            results.append(build_overlay(cleaned, display, prediction, encoding=sc_encoding, overlay=overlay))
        else:
            results.append(build_gsps(cleaned, prediction))
    return results, changed
