#!/usr/bin/env bash
# The held-out figures of MODEL_CARD.md, for a package (default models/demo) and, film for film, for 0.4.0-demo
# (the package shipped before, taken from git), on the test side of the package's own split.json:
#
#   bash scripts/evaluate_demo.sh [PACKAGE]        # a few minutes on 2 cores; reports under var/eval/
#
# Every report also carries the shortcut probe on the same films and AUC by source and view x source.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${SHARED:-../shared}/data
PKG=${1:-models/demo}
SPLIT=$PKG/split.json
OLD=var/pkg-0.4.0
if [ ! -f "$OLD/model.json" ]; then  # 0.4.0-demo as shipped until 0.5.0 (commit 1ac6f98)
  mkdir -p "$OLD"
  for f in model.json gate.safetensors gate_pediatric.safetensors prior.safetensors atlas.safetensors; do
    git show "1ac6f98:models/demo/$f" > "$OLD/$f"
  done
fi
ev() {  # NAME PACKAGE ARGS...: one evaluation into var/eval/NAME
  local name=$1 pkg=$2
  shift 2
  $PY -m triage_node.cli evaluate --model "$pkg" --threads 2 --out "var/eval/$name" "$@"
}
for tag in old new; do  # old first: new compares with it film for film
  pkg=$PKG; [ $tag = old ] && pkg=$OLD
  cmp=(); [ $tag = new ] && cmp=(--compare var/eval/old-nih_clean-test)
  # clean adult films (other source than nih_adult's confounded selection), by view and source
  ev "$tag-nih_clean-test" "$pkg" --image-labels "$DATA/nih_clean/labels.csv" --split "$SPLIT:test" \
    ${cmp[@]+"${cmp[@]}"}
  # the 10 RSNA challenge samples with their boxes (Kaggle's metric)
  ev "$tag-rsna10" "$pkg" --rsna-labels "$DATA/cxr_samples/rsna_dicom/labels.csv" --images "$DATA/cxr_samples/rsna_dicom"
  # 0.4.0 trained on most of nih_adult and on other Kermany groups: only nih_clean and RSNA are unseen by both
  [ $tag = old ] && continue
  # same-source films (nih_adult's selection), with NIH's expert boxes (localisation)
  ev "$tag-nih_adult-test" "$pkg" --image-labels "$DATA/nih_adult/labels.csv" --boxes "$DATA/nih_adult/boxes.csv" \
    --split "$SPLIT:test"
  # Kermany's held-out groups of its training folder, judged as children (<6 y)
  ev "$tag-kermany-test" "$pkg" --image-labels "$DATA/kermany_224/labels.csv" --split "$SPLIT:test" \
    --population pediatric
done
# same-source films within NIH patients 1280-3970 (where every No Finding film of nih_adult comes from)
$PY scripts/stratum_auc.py --labels "$DATA/nih_adult/labels.csv" --patients 1280:3970 \
  var/eval/new-nih_adult-test
.venv/bin/python scripts/kermany_batches.py var/eval/new-kermany-test
