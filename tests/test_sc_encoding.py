"""SC overlay transfer syntaxes (outputs.sc_transfer_syntax): DCMTK decodes each one, dciodvfy accepts each, the
lossless ones give back exactly the rendered pixels, the lossy one says so; and a C-STORE peer without the codec gets
the overlay decompressed on the same association (real pynetdicom SCP on loopback)."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

# tests/ is not a package: pytest puts it on sys.path
from test_enc_common import RSNA, dciodvfy, display_of, prediction, synthetic_xray, write

from triage_node.config import Destination, OutputConfig
from triage_node.encoding.sc import SC_ENCODINGS, build_overlay, render_overlay
from triage_node.transport.senders import CStoreSender

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
DCMTK_DECODER = {"jpeg-ls-palette": "dcmdjpls", "jpeg-ls": "dcmdjpls", "rle-palette": "dcmdrle", "rle": "dcmdrle",
                 "jpeg": "dcmdjpeg"}


@pytest.mark.parametrize("encoding", list(SC_ENCODINGS))
def test_each_encoding_decodes_with_dcmtk_and_validates(encoding, tmp_path):
    source = synthetic_xray("dx")
    display = display_of(source)
    palette = SC_ENCODINGS[encoding][1] == "PALETTE COLOR"
    expected = render_overlay(display, prediction(), palette=palette)  # palette: the indices
    path = write(build_overlay(source, display, prediction(), encoding=encoding), tmp_path / "sc.dcm")
    errors, _ = dciodvfy(path)
    assert errors == []
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == SC_ENCODINGS[encoding][0]
    if encoding in DCMTK_DECODER:  # a third-party decoder, not the one that encoded it
        plain = tmp_path / "plain.dcm"
        proc = subprocess.run([DCMTK_DECODER[encoding], str(path), str(plain)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        decoded = pydicom.dcmread(plain)
        assert decoded.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        pixels = decoded.pixel_array
        if palette:
            assert decoded.PhotometricInterpretation == "PALETTE COLOR"
        elif decoded.PhotometricInterpretation != "RGB":  # dcmdjpeg keeps YBR_FULL(_422) unless told otherwise
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, str(decoded.PhotometricInterpretation), "RGB")
    else:
        pixels = back.pixel_array
    diff = np.abs(pixels.astype(int) - expected.astype(int))
    if encoding == "jpeg":
        assert back.LossyImageCompression == "01"
        assert back.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(back.LossyImageCompressionRatio) > 5
        # lossy and chroma-subsampled (4:2:2, so colour edges of the boxes smear), but the picture is the same
        luma = np.abs((pixels.astype(float) - expected.astype(float)) @ np.array([0.299, 0.587, 0.114]))
        assert diff.mean() < 2.0 and np.percentile(luma, 99) <= 6
    else:
        assert diff.max() == 0, f"{encoding} must be lossless"
        assert "LossyImageCompression" not in back  # the synthetic source was never lossy


def test_sizes_in_the_order_the_config_documents(tmp_path):
    """jpeg-ls-palette < jpeg-ls < rle <= explicit and jpeg < jpeg-ls for a real 1024 x 1024 RSNA overlay (the
    docstring's figures)."""
    source = pydicom.dcmread(RSNA[0])
    display = display_of(source)
    size = {e: write(build_overlay(source, display, prediction(), encoding=e), tmp_path / f"{e}.dcm").stat().st_size
            for e in SC_ENCODINGS}
    assert size["jpeg"] < size["jpeg-ls"] < size["rle"] <= size["explicit"]
    assert size["jpeg-ls-palette"] < 0.5 * size["jpeg-ls"] and size["jpeg-ls"] < 0.5 * size["explicit"]


def test_palette_overlay_shows_the_rgb_overlay(tmp_path):
    """The PALETTE COLOR overlay, coloured through its own palette (by pydicom, from the file), is the RGB overlay
    up to the 252-level gray quantisation and the text drawn without anti-aliasing; the boxes keep their colour."""
    from pydicom.pixels import apply_color_lut

    source = pydicom.dcmread(RSNA[0])
    display = display_of(source)
    back = pydicom.dcmread(write(build_overlay(source, display, prediction(), encoding="jpeg-ls-palette"),
                                 tmp_path / "sc.dcm"))
    assert back.PhotometricInterpretation == "PALETTE COLOR" and back.SamplesPerPixel == 1
    assert list(back.RedPaletteColorLookupTableDescriptor) == [256, 0, 16]
    rgb = (apply_color_lut(back.pixel_array, back) >> 8).astype(np.uint8)
    reference = render_overlay(display, prediction())
    diff = np.abs(rgb.astype(int) - reference.astype(int)).max(axis=2)
    assert np.percentile(diff, 99) <= 1, "grays within one level of the RGB overlay"
    box = (reference == (255, 215, 0)).all(axis=2)
    assert box.sum() > 1000 and (rgb[box] == (255, 215, 0)).all(), "the boxes are amber in both"


def test_lossy_history_of_the_source_is_kept_and_extended(tmp_path):
    source = pydicom.dcmread(RSNA[0])
    assert source.LossyImageCompression == "01"  # RSNA images are JPEG Baseline
    assert source.LossyImageCompressionMethod == "ISO_10918_1" and "LossyImageCompressionRatio" not in source
    for encoding, methods in (("jpeg-ls", ["ISO_10918_1"]), ("jpeg", ["ISO_10918_1", "ISO_10918_1"])):
        sc = pydicom.dcmread(write(build_overlay(source, display_of(source), prediction(), encoding=encoding),
                                   tmp_path / f"{encoding}.dcm"))
        assert sc.LossyImageCompression == "01"  # once lossy, always lossy
        got = sc.LossyImageCompressionMethod
        assert (list(got) if sc["LossyImageCompressionMethod"].VM > 1 else [got]) == methods
        # the source's ratio is unknown, so no ratio list that would pair values with the wrong methods
        assert "LossyImageCompressionRatio" not in sc
    source.LossyImageCompressionRatio = "12.5"  # a complete history gets our step appended to both lists
    sc = pydicom.dcmread(write(build_overlay(source, display_of(source), prediction(), encoding="jpeg"),
                               tmp_path / "full.dcm"))
    assert list(sc.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_10918_1"]
    assert len(sc.LossyImageCompressionRatio) == 2 and float(sc.LossyImageCompressionRatio[0]) == 12.5


def test_unknown_encoding_is_a_config_error():
    from triage_node.config import SC_TRANSFER_SYNTAXES

    assert set(SC_TRANSFER_SYNTAXES) == set(SC_ENCODINGS)  # the config's choices are exactly what sc.py encodes
    with pytest.raises(ValueError, match="sc_transfer_syntax"):
        OutputConfig(sc_transfer_syntax="jpeg2000")
    with pytest.raises(ValueError, match="unknown SC encoding"):
        build_overlay(synthetic_xray("dx"), display_of(synthetic_xray("dx")), prediction(), encoding="j2k")


def _scp(transfer_syntaxes: list[str]):
    """A real pynetdicom Storage SCP on loopback accepting SC only in ``transfer_syntaxes``; returns what it got."""
    from pynetdicom import AE, evt

    got: list[pydicom.Dataset] = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.append(ds)
        return 0x0000

    ae = AE(ae_title="NOCODEC")
    ae.add_supported_context(SC_CLASS, transfer_syntaxes)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, got


@pytest.mark.parametrize("peer_syntaxes, expect_syntax", [
    ([ExplicitVRLittleEndian, ImplicitVRLittleEndian], None),  # no JPEG-LS codec at the peer: decompressed for it
    ([JPEGLSLossless, ExplicitVRLittleEndian], JPEGLSLossless),  # the peer takes it: sent as built
], ids=["peer-without-codec", "peer-with-codec"])
@pytest.mark.parametrize("encoding", ["jpeg-ls", "jpeg-ls-palette"])
def test_cstore_falls_back_to_uncompressed_for_a_peer_without_the_codec(peer_syntaxes, expect_syntax, encoding,
                                                                        tmp_path):
    source = synthetic_xray("dx")
    display = display_of(source)
    palette = encoding == "jpeg-ls-palette"
    path = write(build_overlay(source, display, prediction(), encoding=encoding), tmp_path / "sc.dcm")
    server, got = _scp(peer_syntaxes)
    try:
        port = server.socket.getsockname()[1]
        dest = Destination(name="peer", kind="dicom", host="127.0.0.1", port=port, ae_title="NOCODEC",
                           calling_ae_title="TRIAGE", timeout=30.0)
        sent = CStoreSender(dest).send([path])
    finally:
        server.shutdown()
    assert len(got) == 1 and sent == [str(got[0].SOPInstanceUID)]
    ts = got[0].file_meta.TransferSyntaxUID
    if expect_syntax is None:
        assert not ts.is_compressed
        assert got[0].PhotometricInterpretation == ("PALETTE COLOR" if palette else "RGB")
    else:
        assert ts == expect_syntax
    expected = render_overlay(display, prediction(), palette=palette)
    np.testing.assert_array_equal(got[0].pixel_array, expected)  # lossless either way


def test_palette_rendering_maps_every_gray_level_as_the_numpy_lut_does():
    """render_overlay maps gray levels to palette indices with Pillow's point(); outside the drawn banner and
    boxes every pixel is _TO_INDEX[gray], for all 256 levels."""
    from triage_node.encoding.sc import _TO_INDEX, render_overlay

    display = np.tile(np.arange(256, dtype=np.uint8), (512, 2))  # every level in every row: 512 x 512
    overlay = render_overlay(display, prediction(boxes=()), palette=True)
    below_banner = slice(300, 512)
    np.testing.assert_array_equal(overlay[below_banner], _TO_INDEX[display[below_banner]])
