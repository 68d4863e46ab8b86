"""Write a DX-sized copy of a real RSNA sample for the stage benchmark: upscaled (bilinear) to ROWS x COLUMNS,
12 bits stored in 16, uncompressed Explicit VR Little Endian, a new SOP Instance UID. The RSNA and NIH films are
1024 x 1024 8-bit JPEG (downsampled for the challenge); what a PACS routes from a DR detector is often 2500-3000
pixels a side with 12-16 bits, and the node's per-CXR CPU grows with the pixels.

    .venv/bin/python bench/big_film.py /tmp/big/big.dcm                       # 2832 x 2328, from the first sample
    PYTHONPATH=<checkout> .venv/bin/python bench/e2e_stages.py --model models/demo --out /tmp/st --repeat 3 \\
        /tmp/big/big.dcm
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
RSNA = ROOT.parent / "shared" / "data" / "cxr_samples" / "rsna_dicom"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", type=Path, help="an 8-bit DICOM film (default: the first shared RSNA sample)")
    ap.add_argument("--rows", type=int, default=2832)
    ap.add_argument("--columns", type=int, default=2328)
    ap.add_argument("--dx-header", action="store_true",
                    help="also a rescale and a window in the header, as DR/CR vendors write them (the decode then "
                         "applies the Modality and VOI LUTs)")
    args = ap.parse_args()
    src = args.source or sorted(RSNA.glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    big = np.asarray(Image.fromarray(ds.pixel_array.astype(np.float32)).resize((args.columns, args.rows),
                                                                                Image.Resampling.BILINEAR))
    big = np.clip(big / 255 * 4095, 0, 4095).astype(np.uint16)
    ds.PixelData = big.tobytes()
    ds.Rows, ds.Columns = big.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if args.dx_header:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
        ds.WindowCenter, ds.WindowWidth = 2047, 4096
        ds.VOILUTFunction = "LINEAR"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(args.out, enforce_file_format=True)
    print(f"wrote {args.out}: {args.rows} x {args.columns}, 12 bits{', rescale + window' if args.dx_header else ''}, "
          f"from {src.name}")


if __name__ == "__main__":
    main()
