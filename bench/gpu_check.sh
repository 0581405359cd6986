#!/usr/bin/env bash
# The prepared GPU check (about 5 minutes on one H100): every method at full size with random INT4 weights
# (seq 512; batch 4 and 1; with and without gradient checkpointing where memory is tight), the INT4 kernel at the
# 6B shapes, batched vs one-by-one generation, and the predicted memory for comparison. Needs no network:
# the model is built from the offline configuration with random packed weights, directly on the GPU.
#   bash bench/gpu_check.sh            # from the repository root, with the project installed
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
$PY -m bench suite --model 6b --seq 512 --steps 5
echo "# predicted (python -m helpers estimate):"
for spec in "lora --bs 4" "lora --bs 4 --gradient-checkpointing" "ptuning_v2 --bs 1 --pre-seq-len 128 --no-projection" \
            "ptuning_v2 --bs 4" "ptuning_v2 --bs 4 --gradient-checkpointing" "freeze --bs 4" "embedding --bs 4" \
            "embedding --bs 4 --gradient-checkpointing"; do
  echo "## estimate $spec"
  $PY -m helpers estimate --method $spec | grep -E "total|fits"
done
