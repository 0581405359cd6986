#!/usr/bin/env bash
# Download, on a machine with network, the wheels the offline GPU machine needs beyond its image, into .wheels/
# (ignored by git); bench/gpu_check.sh installs them there into a private folder first.
#
# The GPU image (Python 3.12, torch 2.11, transformers 5.17, peft, accelerate 1.15, huggingface_hub 1.33,
# tokenizers 0.23.2, safetensors 0.8.0, sentencepiece 0.2.2, regex, typer) lacks what the project pins
# (pyproject.toml): transformers >= 5.24 and peft 0.21. transformers 5.24 itself needs huggingface-hub >= 1.31,
# tokenizers >= 0.23.1, < 0.24, safetensors >= 0.8, regex >= 2025.10.22, typer: the image meets all but regex
# (whose version there is not known), so regex travels too. Versions are those tested here (this environment's),
# unless given as arguments (e.g. transformers==5.24.0).
#   bash bench/fetch_wheels.sh [NAME==VERSION ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${CHATGLM_WHEELS:-.wheels}
TARGET_PYTHON=3.12
if [[ $# -gt 0 ]]; then
  specs=("$@")
else
  mapfile -t specs < <($PY -c '
import importlib.metadata as m
for name in ("transformers", "peft", "regex"):
    print(f"{name}=={m.version(name)}")')
fi
rm -rf "$DEST"
mkdir -p "$DEST"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version $TARGET_PYTHON --implementation cp \
  --abi cp${TARGET_PYTHON/./} --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${specs[@]}"
echo "$TARGET_PYTHON" > "$DEST/python-version"
ls -l "$DEST"
du -sh "$DEST"
