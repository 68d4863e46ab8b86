"""CPU time of reading and decoding + windowing one film (``dicom_io.read`` + ``dicom_io.pixels``), this checkout
beside a baseline checkout in the same run, alternated. ``time.process_time`` per call, median of ``--n`` after one
warm-up; each side runs in its own process with ``PYTHONPATH`` set to its checkout.

    git archive be63058 | tar -x -C /tmp/base
    .venv/bin/python bench/big_film.py --dx-header /tmp/big/dx.dcm
    .venv/bin/python bench/decode.py --baseline /tmp/base --n 20 /tmp/big/dx.dcm sample_dicom/*.dcm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, statistics, sys, time
from triage_node import dicom_io
assert dicom_io.__file__.startswith(sys.argv[1]), dicom_io.__file__
out = {}
for path in sys.argv[3:]:
    ts = []
    for _ in range(int(sys.argv[2]) + 1):
        c = time.process_time()
        dicom_io.pixels(dicom_io.read(path))
        ts.append(time.process_time() - c)
    out[path] = round(statistics.median(ts[1:]) * 1000, 2)
print(json.dumps(out))
"""


def measure(checkout: Path, n: int, files: list[str]) -> dict[str, float]:
    env = os.environ | {"PYTHONPATH": str(checkout)}
    # cwd = the checkout: ``python -c`` puts the working directory first on sys.path
    r = subprocess.run([sys.executable, "-c", _CHILD, str(checkout), str(n), *(str(Path(f).resolve()) for f in files)],
                       env=env, cwd=checkout, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="another checkout (e.g. from git archive)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of baseline and this checkout")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    rows: dict[str, dict[str, list[float]]] = {f: {"baseline": [], "now": []} for f in args.files}
    for _ in range(args.rounds):
        for side, checkout in (("baseline", args.baseline.resolve()), ("now", ROOT)):
            for f, ms in zip(args.files, measure(checkout, args.n, args.files).values()):
                rows[f][side].append(ms)
    for f, r in rows.items():
        ratio = min(r["now"]) / max(min(r["baseline"]), 1e-9)
        print(f"{Path(f).name}: read + pixels, median ms of CPU: baseline {' / '.join(map(str, r['baseline']))}, "
              f"now {' / '.join(map(str, r['now']))} -> {ratio:.2f}x")


if __name__ == "__main__":
    main()
