"""The shortcuts that keep result building cheap write the same outputs as the long way round.

No timing here (speed is measured by bench/e2e.py): each test fails if a shortcut changes what is written or sent.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

# tests/ is not a package: pytest puts it on sys.path
from test_enc_common import BOXES, RSNA, prediction, synthetic_xray

from triage_node import config, dicom_io, pipeline
from triage_node.config import Destination
from triage_node.encoding.sanitize import clean_source
from triage_node.encoding.sr import build_sr
from triage_node.transport.pool import POOL
from triage_node.transport.senders import CStoreSender

#: Set at construction time (highdicom stamps "now"; also each Contribution DateTime): not part of what a shortcut
#: may change.
_CLOCK = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "DateOfSecondaryCapture",
          "TimeOfSecondaryCapture")


def _bytes(ds: pydicom.Dataset) -> bytes:
    for kw in _CLOCK:
        if kw in ds:
            setattr(ds, kw, "")
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = ""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("boxes", [BOXES, ()], ids=["boxes", "nothing-found"])
@pytest.mark.parametrize("source", [pytest.param("rsna", id="rsna"), pytest.param("cr", id="cr-16bit")])
def test_sr_without_tree_checks_writes_the_same_bytes(source, boxes):
    ds = pydicom.dcmread(RSNA[0]) if source == "rsna" else synthetic_xray("cr")
    pred = prediction(boxes=boxes)
    fast = build_sr(ds, pred)
    checked = build_sr(ds, pred, check_tree=True)
    assert len(fast.ContentSequence) >= 4  # the tree is there, not just the shell
    assert _bytes(fast) == _bytes(checked)


def test_clean_source_returns_its_own_result_unchanged_and_copies_anything_else():
    ds = pydicom.dcmread(RSNA[0], stop_before_pixels=True)
    cleaned, changed = clean_source(ds)
    assert changed and cleaned is not ds
    again, changed_again = clean_source(cleaned)
    assert again is cleaned and changed_again == []
    copy_of_clean = pydicom.Dataset(cleaned)  # another object with the same content is cleaned (copied) again
    assert clean_source(copy_of_clean)[0] is not copy_of_clean


def _cfg(tmp: Path, archive: bool = True) -> config.Config:
    cfg = config.Config()
    outputs = dataclasses.replace(cfg.outputs, archive_dir=str(tmp / "archive") if archive else "")
    return dataclasses.replace(cfg, outputs=outputs)


def test_the_display_cache_is_kept_only_when_the_overlay_is_built(tmp_path):
    cfg = _cfg(tmp_path)
    pred = prediction(boxes=BOXES)
    got = pipeline.analyze(RSNA[1], cfg, predict=lambda _img, _age: pred, display_to=tmp_path / pipeline.DISPLAY_CACHE)
    assert (tmp_path / pipeline.DISPLAY_CACHE).exists() and "display" in got.timings_ms
    for outputs in (dataclasses.replace(cfg.outputs, sc=False), dataclasses.replace(cfg.outputs, sc=False, gsps=True)):
        no_sc = dataclasses.replace(cfg, outputs=outputs)
        box = tmp_path / f"gsps-{outputs.gsps}"
        got = pipeline.analyze(RSNA[1], no_sc, predict=lambda _img, _age: pred, display_to=box / pipeline.DISPLAY_CACHE)
        # SR and GSPS need no pixels: nothing rendered, nothing written
        assert not (box / pipeline.DISPLAY_CACHE).exists() and "display" not in got.timings_ms
        files = pipeline.build(RSNA[1], pred, no_sc, box)
        assert not (box / pipeline.DISPLAY_CACHE).exists()
        assert [f.name.split("-")[0] for f in files] == ["sr"] + (["gsps"] if outputs.gsps else [])


def test_sc_for_flagged_builds_no_overlay_for_a_film_below_the_threshold(tmp_path):
    cfg = _cfg(tmp_path)
    flagged_only = dataclasses.replace(cfg, outputs=dataclasses.replace(cfg.outputs, sc_for="flagged"))
    with pytest.raises(ValueError, match="sc_for"):
        dataclasses.replace(cfg.outputs, sc_for="negatives")
    for pred in (prediction(boxes=BOXES), prediction(boxes=(), probability=0.1)):
        assert pipeline.output_names(cfg, pred) == ("sr", "sc")  # the default: every film
        assert pipeline.output_names(flagged_only, pred) == (("sr", "sc") if pred.positive else ("sr",))
        assert pipeline.output_names(flagged_only) == ("sr", "sc")  # what is configured, before any prediction
        box = tmp_path / f"film-{pred.positive}"
        got = pipeline.analyze(RSNA[1], flagged_only, predict=lambda _img, _age, pred=pred: pred,
                               display_to=box / pipeline.DISPLAY_CACHE)
        assert (box / pipeline.DISPLAY_CACHE).exists() is pred.positive  # rendered only when the overlay comes
        assert ("display" in got.timings_ms) is pred.positive
        files = pipeline.build(RSNA[1], pred, flagged_only, box)
        assert [f.name.split("-")[0] for f in files] == (["sr", "sc"] if pred.positive else ["sr"])
        assert (box / "preview.png").exists() is pred.positive and not (box / pipeline.DISPLAY_CACHE).exists()


def test_build_from_the_cached_display_equals_build_from_the_source(tmp_path):
    cfg = _cfg(tmp_path)
    pred = prediction(boxes=BOXES)
    plain = pipeline.build(RSNA[1], pred, cfg, tmp_path / "plain")
    box = tmp_path / "cached"
    pipeline.analyze(RSNA[1], cfg, predict=lambda _img, _age: pred, display_to=box / pipeline.DISPLAY_CACHE)
    cached_display = np.load(box / pipeline.DISPLAY_CACHE)
    ds = pydicom.dcmread(RSNA[1])
    np.testing.assert_array_equal(cached_display, dicom_io.display(dicom_io.pixels(ds)))
    cached = pipeline.build(RSNA[1], pred, cfg, box)
    assert not (box / pipeline.DISPLAY_CACHE).exists()  # consumed: never archived nor sent
    assert [f.name for f in plain] == [f.name for f in cached]
    for a, b in zip(plain, cached):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert _bytes(da) == _bytes(db)
    assert (box / "preview.png").exists() and (tmp_path / "plain" / "preview.png").exists()
    assert json.loads((box / "prediction.json").read_text()) == pred.to_json()


def test_a_stale_or_broken_display_cache_is_ignored(tmp_path):
    cfg = _cfg(tmp_path, archive=False)
    pred = prediction(boxes=BOXES)
    reference = pipeline.build(RSNA[2], pred, cfg, tmp_path / "ref")
    for name, content in (("wrong-size", np.zeros((10, 10), np.uint8)), ("garbage", b"not a numpy file")):
        box = tmp_path / name
        box.mkdir()
        if isinstance(content, bytes):
            (box / pipeline.DISPLAY_CACHE).write_bytes(content)
        else:
            np.save(box / pipeline.DISPLAY_CACHE, content)
        files = pipeline.build(RSNA[2], pred, cfg, box)
        sc = next(f for f in files if f.name.startswith("sc-"))
        ref_sc = next(f for f in reference if f.name.startswith("sc-"))
        np.testing.assert_array_equal(pydicom.dcmread(sc).pixel_array, pydicom.dcmread(ref_sc).pixel_array)
        assert not (box / "preview.png").exists()  # no archive: no preview to keep


def _counting_scp():
    """A real pynetdicom Storage SCP that counts associations and keeps what it stored."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    got: list[str] = []
    raw: dict[str, bytes] = {}
    opened: list[int] = []
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    from pydicom.uid import JPEGLSLossless
    for cx in ae.supported_contexts:
        cx.transfer_syntax = list(cx.transfer_syntax) + [JPEGLSLossless]

    def on_store(event):
        got.append(str(event.request.AffectedSOPInstanceUID))
        raw[got[-1]] = event.request.DataSet.getvalue()
        return 0x0000

    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, lambda event: opened.append(1))]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    return server, got, raw, opened


def test_cstore_reuses_one_association_and_replaces_one_the_peer_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(POOL, "idle_s", 60.0)  # reuse itself is under test, not how long an idle one is kept
    files = pipeline.build(RSNA[0], prediction(boxes=BOXES), _cfg(tmp_path, archive=False), tmp_path / "out")
    server, got, raw, opened = _counting_scp()
    try:
        dest = Destination(name="pool-test", kind="dicom", host="127.0.0.1", port=server.socket.getsockname()[1],
                           ae_title="PACS", timeout=20.0)
        uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        assert CStoreSender(dest).send(files) == uids
        assert CStoreSender(dest).send(files) == uids
        assert len(opened) == 1 and got == uids + uids  # one association, reused by the second result
        for assoc in server.active_associations:  # the peer drops the idle association
            assoc.abort()
        assert CStoreSender(dest).send(files) == uids
        assert len(opened) == 2 and got == uids * 3  # replaced by a fresh one; nothing lost
    finally:
        POOL.close_all()
        server.shutdown()
    from pynetdicom.dsutils import split_dataset

    for f, uid in zip(files, uids):  # the files went out as stored, byte for byte (no decode and re-encode)
        _meta, offset = split_dataset(f)
        assert raw[uid] == f.read_bytes()[offset:]


@pytest.mark.parametrize("shape", [(1024, 1024), (1000, 750), (200, 180)], ids=["1024", "odd", "small"])
def test_palette_preview_shows_the_colours_of_the_rgb_preview(tmp_path, shape):
    """The preview of a palette overlay is a palette PNG: decoded to RGB it is, pixel for pixel, the subsampled
    overlay coloured through the SC's palette (what the RGB preview was)."""
    from PIL import Image

    from triage_node.encoding.sc import overlay_rgb, render_overlay

    rng = np.random.default_rng(7)
    display = rng.integers(0, 256, shape, dtype=np.uint8)
    overlay = render_overlay(display, prediction(boxes=BOXES), palette=True)
    png = tmp_path / "preview.png"
    pipeline.write_preview(overlay, png)
    factor = -(-max(shape) // pipeline.PREVIEW_PX)
    expected = overlay_rgb(overlay[::factor, ::factor])
    with Image.open(png) as im:
        assert im.mode == "P" and max(im.size) <= pipeline.PREVIEW_PX
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), expected)


def test_fast_coded_concept_hash_equals_highdicoms():
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept

    fast = CodedConcept.__hash__
    original = fast.original
    long_value = "x" * 20  # > 16 characters: LongCodeValue
    urn = "urn:oid:1.2.3.4"
    concepts = [hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"), hd.sr.CodedConcept(long_value, "99X", "Long"),
                hd.sr.CodedConcept(urn, "99X", "URN"), hd.sr.CodedConcept("%", "UCUM", "percent")]
    read = pydicom.dcmread(io.BytesIO(_file_with(concepts[0])))  # raw elements: highdicom's own hash
    concepts.append(CodedConcept.from_dataset(read.ConceptNameCodeSequence[0]))
    for c in concepts:
        assert fast(c) == original(c) == hash(c)
    assert len({*concepts}) == 4  # the read copy of concept 0 is equal to it


def _file_with(code) -> bytes:
    ds = pydicom.Dataset()
    ds.ConceptNameCodeSequence = [code]
    return _file_with_items(ds)


def test_sr_built_with_highdicoms_own_code_hash_is_the_same(monkeypatch):
    from highdicom.sr.coding import CodedConcept

    ds = synthetic_xray("cr")
    fast = _bytes(build_sr(ds, prediction(boxes=BOXES)))
    monkeypatch.setattr(CodedConcept, "__hash__", CodedConcept.__hash__.original)
    assert _bytes(build_sr(ds, prediction(boxes=BOXES))) == fast


def test_every_group_carries_the_algorithm_identification_a_fresh_build_gives():
    """build_sr builds TID 4019 once and puts the same items in every measurement group: each group, as written,
    holds exactly the items a fresh AlgorithmIdentification gives (nothing altered them on the way)."""
    from triage_node.encoding.sr import _algorithm_id

    pred = prediction(boxes=BOXES)
    sr = pydicom.dcmread(io.BytesIO(_bytes(build_sr(synthetic_xray("cr"), pred))))
    fresh = pydicom.Dataset()
    fresh.ContentSequence = list(_algorithm_id(pred))
    fresh = pydicom.dcmread(io.BytesIO(_file_with_items(fresh)))
    expected = [_item_bytes(i) for i in fresh.ContentSequence]
    names = {i.ConceptNameCodeSequence[0].CodeValue for i in fresh.ContentSequence}
    imaging = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    groups = [g for g in imaging.ContentSequence if g.ValueType == "CONTAINER"]
    assert len(groups) == 1 + len(BOXES)
    for group in groups:
        got = [_item_bytes(i) for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue in names]
        assert got == expected


def _file_with_items(ds) -> bytes:
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.3"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _item_bytes(item) -> bytes:
    holder = pydicom.Dataset()
    holder.ContentSequence = [item]
    return _file_with_items(holder)
