#!/usr/bin/env bash
# The exact commands that produced models/demo (CPU, 1 torch thread, nice; ~35 min on 2 cores).
# Gate: real Kermany pediatric CXRs (+ the synthetic detector images); detector: synthetic RSNA-format DICOMs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared}

# 1. synthetic RSNA-format data (DICOM SC/CR/JPEG Baseline 1024x1024 + stage_2_train_labels.csv)
nice $PY -m triage_node.synth --n 1000 --seed 1 --out .data/synth_train
nice $PY -m triage_node.synth --n 300 --seed 2 --out .data/synth_test   # held out, never seen in training

# 2. train gate + detector, choose thresholds on the patient-level validation split, write the package
nice $PY -m triage_node.inference.train \
  --labels .data/synth_train/stage_2_train_labels.csv --images .data/synth_train/images --val-frac 0.2 \
  --gate-data "$SHARED/data/kermany_224" --gate-epochs 6 --gate-with-detection-data \
  --arch fcos_mnv3l_fpn64 --input-size 512 --epochs 5 --batch-size 4 --lr 1e-3 --patience 3 --max-minutes 21 --positive-fraction 0.5 \
  --threads 1 --seed 0 --name cxr-triage-demo --version 0.1.0-demo --out models/demo \
  --checkpoint-dir .data/demo.ckpt

# 3. evaluate: held-out synthetic set and the 10 real RSNA samples
nice $PY -m triage_node.inference.evaluate --model models/demo --threads 1 \
  --labels .data/synth_test/stage_2_train_labels.csv --images .data/synth_test/images --out .data/eval_synth_test
nice $PY -m triage_node.inference.evaluate --model models/demo --threads 1 \
  --labels "$SHARED/data/cxr_samples/rsna_dicom/labels.csv" --images "$SHARED/data/cxr_samples/rsna_dicom" \
  --out .data/eval_rsna10
nice $PY -m triage_node.inference.evaluate --model models/demo --threads 1 \
  --image-labels "$SHARED/data/cxr_samples/kermany_pediatric/labels.csv" --out .data/eval_kermany12
