"""The measurement behind the harmonised input (``preprocess.harmonise``): the shortcut probe on the network's
224 px inputs of both NIH pools, for each candidate. Writes a table (markdown) to stdout.

    .venv/bin/python scripts/harmonise_probe.py > docs/evidence/2026-12-07/harmonise-probe.md

Target (issue 23): the probe on the inputs <= 0.60 on nih_adult, whose No Finding films are smoother and brighter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from triage_node.inference import preprocess as PP
from triage_node.training import images as I
from triage_node.training import probe as P

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CANDIDATES = [("none", 0.0), ("equalise", 0.0), ("equalise-blur", 0.7), ("equalise-blur", 1.0),
              ("equalise-blur", 1.5), ("equalise-blur", 2.0)]


def main() -> int:
    torch.set_num_threads(2)
    print("| input | sigma (px at 224) | nih_adult probe AUC [95 % CI] | nih_clean probe AUC [95 % CI] |")
    print("| --- | --- | --- | --- |")
    pools = {n: I.load_images(I.read_source(str(DATA / n / "labels.csv")), 224, progress=False)
             for n in ("nih_adult", "nih_clean")}
    for method, sigma in CANDIDATES:
        cells = []
        for src in pools.values():
            x = torch.from_numpy(src.images)[:, None].float() / 255
            h = torch.cat([PP.harmonise(x[i:i + 64], method, sigma=sigma or PP.BLUR_SIGMA)
                           for i in range(0, len(x), 64)])
            r = P.input_probe(h[:, 0].numpy(), src.labels, src.groups)
            cells.append(f"{r['auc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
        print(f"| {method} | {sigma or '-'} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
