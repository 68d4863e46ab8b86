"""The shortcut probe finds a nuisance statistic that carries the label, finds nothing where none does, and the
harmonised input (blur floor + equalisation) takes away what it found. Hand-made films, no shared data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triage_node.inference.preprocess import equalise, gaussian_blur, harmonise
from triage_node.training import probe as P

N = 120


def _films(seed: int, n: int = N, size: int = 96) -> np.ndarray:
    """Smooth random 'anatomy': low-frequency noise fields in [0, 1], one per film."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 1, 8, 8), dtype=np.float32))
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.02 * torch.from_numpy(rng.standard_normal((n, 1, size, size)).astype(np.float32))
    return x.clamp(0, 1)[:, 0].numpy()


def _labels(n: int = N) -> np.ndarray:
    return np.arange(n) % 2


def _confounded(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Negatives smoother and brighter than positives (as nih_adult's No Finding films): the label is in the
    nuisance statistics only, the 'anatomy' is the same random field for both classes."""
    x, y = torch.from_numpy(_films(seed))[:, None], _labels()
    neg = torch.from_numpy(y == 0)
    x[neg] = gaussian_blur(x[neg], 0.6)  # smoother, by less than the harmonisation's blur floor (sigma 1)
    x[neg] = x[neg] ** 0.7  # brighter
    return x[:, 0].numpy(), y


def test_probe_finds_the_nuisance_that_carries_the_label() -> None:
    x, y = _confounded()
    res = P.input_probe(x, y, [str(i) for i in range(N)], name="confounded")
    assert res["auc"] > 0.9, res
    assert res["ci95"][0] > 0.8
    assert set(res["top_features"]) & {"sharpness", "noise", "mean", "p50", "p25", "p75"}
    assert "WARNING" in P.format_probe(res)


def test_probe_finds_nothing_where_nothing_carries_the_label() -> None:
    res = P.input_probe(_films(1), _labels(), [str(i) for i in range(N)], name="clean")
    assert 0.3 < res["auc"] < 0.7, res
    assert res["ci95"][0] < 0.5 < res["ci95"][1]
    assert "WARNING" not in P.format_probe(res)


def test_harmonisation_takes_the_shortcut_away() -> None:
    x, y = _confounded()
    before = P.input_probe(x, y, name="as is")["auc"]
    h = harmonise(torch.from_numpy(x)[:, None], "equalise-blur")[:, 0].numpy()
    after = P.input_probe(h, y, name="harmonised")
    assert before > 0.9
    assert after["auc"] < 0.65, after  # the training-time warning line
    assert after["auc"] < before - 0.25


def test_probe_reads_header_categories_and_groups_patients() -> None:
    """A categorical field (the view) that carries the label is found; a patient's films share a fold."""
    y = _labels()
    recs = [{"mean": float(v), "view": "AP" if lab else "PA"}
            for v, lab in zip(np.random.default_rng(2).random(N), y)]
    groups = [str(i // 2) for i in range(N)]  # two films per patient, one of each label
    res = P.shortcut_probe(recs, y, groups, numeric=("mean",), categorical=("view",))
    assert res["auc"] > 0.95 and "view=AP" in res["top_features"] or "view=PA" in res["top_features"]
    assert res["features"] == ["mean", "view"]


def test_probe_says_when_it_cannot_judge() -> None:
    res = P.shortcut_probe([{"mean": 0.5}] * 6, [1, 1, 1, 1, 1, 0], numeric=("mean",), categorical=())
    assert res["auc"] != res["auc"] and "too few" in res["note"]


def test_id_stratum() -> None:
    assert P.id_stratum("1280") == "p0" and P.id_stratum("NIH3970") == "p1" and P.id_stratum("IM-0115") == "p0"
    assert P.id_stratum("abc") == ""


def test_equalise_removes_any_monotone_grey_level_change() -> None:
    x = torch.from_numpy(_films(3, n=4))[:, None]
    a, b = equalise(x), equalise(x ** 2.2 * 0.5 + 0.1)
    assert float((a - b).abs().mean()) < 0.01  # up to the 256 grey levels' ties
    assert float((x - x ** 2.2 * 0.5 - 0.1).abs().mean()) > 0.1
    assert abs(float(a.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown harmonisation"):
        harmonise(x, "clahe")


def _write_pool(tmp_path, n: int = 40):
    """PNG films whose label is in their brightness only (negatives brighter, same random 'anatomy'), as a CSV."""
    from PIL import Image

    x = _films(5, n=n, size=64)
    rows = ["path,label,patient_id"]
    for i, im in enumerate(x):
        y = i % 2
        im = im if y else im ** 0.5  # a gamma change: brighter, a monotone map of the grey levels
        Image.fromarray((im * 255 + 0.5).astype(np.uint8)).save(tmp_path / f"f{i}.png")
        rows.append(f"f{i}.png,{y},p{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "labels.csv"


@pytest.mark.parametrize("method,warns", [("none", True), ("equalise", False)])
def test_a_training_run_warns_loudly_when_its_inputs_carry_the_label(tmp_path, method, warns):
    """A real `triage-node train` run: the probe on the network's inputs is printed and stored, and the run warns
    (SHORTCUT, in the log) when it exceeds 0.65; equalised inputs of the same films do not carry the label."""
    import json
    import subprocess
    import sys

    csv = _write_pool(tmp_path)
    r = subprocess.run([sys.executable, "-m", "triage_node.cli", "train", "--image-labels", str(csv), "--arch",
                        "resnet18", "--size", "64", "--epochs", "1", "--batch-size", "8", "--val-frac", "0.25",
                        "--test-frac", "0.0", "--harmonise", method, "--threads", "1", "--no-progress",
                        "--checkpoint-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = json.loads((tmp_path / "run" / "summary.json").read_text())["shortcut_probe"]
    auc = probe["inputs"][csv.parent.name]["auc"]
    assert probe["harmonise"] == method and "network inputs: AUC" in r.stdout
    assert ("SHORTCUT" in r.stderr) is warns and (auc > P.WARN_AUC) is warns, (auc, r.stderr[-1000:])
