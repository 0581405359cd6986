#!/usr/bin/env bash
# The prepared GPU check (at most 8 minutes on one H100/H200, no network): every method at full size with random
# INT4 weights (seq 512; batch 4 and 1; with and without gradient checkpointing where memory is tight), the pure
# PyTorch and the Triton INT4 paths side by side (CHATGLM_INT4_KERNEL=torch / triton), model FLOPs utilisation,
# peak memory next to the estimate, decode tokens/s for 1 and 16 sequences; one table at the end.
#
#   bash bench/fetch_wheels.sh          # once, on a machine with network: the wheels the GPU image lacks
#   bash bench/gpu_check.sh             # on the GPU machine, from anywhere (installs those wheels privately)
#   bash bench/gpu_check.sh --device cpu   # dry run: the same code paths on a toy model in seconds (CI runs it)
#
# Extra arguments go to `python -m bench suite` (e.g. --budget-s 300, --json-out results.json).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${CHATGLM_WHEELS:-.wheels}
DEVICE=cuda
for arg in "$@"; do [[ $arg == cpu ]] && DEVICE=cpu; done

if [[ $DEVICE == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    wanted=$(cat "$WHEELS/python-version" 2>/dev/null || echo "")
    have=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    if [[ -n $wanted && $wanted != "$have" ]]; then
      echo "# $WHEELS holds wheels for Python $wanted, this is $have: not installed"
    else
      SITE=${TMPDIR:-/tmp}/chatglm-course-site
      # --no-deps: everything else comes from the image; a private target leaves the image untouched.
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "# installing the wheels from $WHEELS failed"; exit 1; }
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
      echo "# installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    fi
  else
    echo "# no wheels in $WHEELS (bash bench/fetch_wheels.sh makes them); using the image's packages"
  fi
  set -- --model 6b "$@"
else
  set -- --model tiny --seq 32 --bs 2 --steps 1 --warmup 0 --prompt 8 --new-tokens 3 --decode-batches 1,4 "$@"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The project's pins must hold before anything is timed.
$PY - <<'EOF' || exit 1
import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement

import torch

import tomllib

problems = []
with open("pyproject.toml", "rb") as handle:
    pins = [Requirement(text) for text in tomllib.load(handle)["project"]["dependencies"]]
for requirement in pins:
    if requirement.name not in ("transformers", "peft", "accelerate", "huggingface_hub", "safetensors"):
        continue  # torch: the image's build; the rest is not used by the check
    version = metadata.version(requirement.name)
    if version not in requirement.specifier:
        problems.append(f"the project pins {requirement}, found {version}")
for package in ("transformers", "peft"):
    for text in metadata.requires(package) or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{package} needs {requirement}, which is missing")
            continue
        if version not in requirement.specifier:
            problems.append(f"{package} needs {requirement}, found {version}")
versions = {name: metadata.version(name) for name in ("transformers", "peft", "accelerate", "huggingface_hub",
                                                        "tokenizers", "safetensors")}
try:
    import triton

    versions["triton"] = triton.__version__
except ImportError:
    versions["triton"] = "missing"
print("# python", sys.version.split()[0], "torch", torch.__version__,
      " ".join(f"{name} {version}" for name, version in versions.items()))
if problems:
    print("\n".join("# " + problem for problem in problems))
    sys.exit(1)
EOF
$PY -m bench suite "$@"
