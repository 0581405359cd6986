"""Loading a full-size INT4 checkpoint on the CPU: time and peak memory (``python -m bench load``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from chatglm.checkpoint import save_bin_checkpoint
from chatglm.configuration import MODEL_AUTO_MAP

from .common import random_model

LOADER = """
import json, sys, time
from pathlib import Path
import torch
start = time.perf_counter()
import chatglm
from transformers import AutoModelForCausalLM
imported = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16)
loaded = time.perf_counter()


def peak():
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


after_load = peak()
with torch.no_grad():
    for param in model.parameters():  # touch every weight (memory-mapped pages become resident)
        param.max()
print(json.dumps({"load_s": loaded - imported, "import_s": imported - start, "peak_rss": after_load,
                  "peak_rss_touched": peak(), "params": sum(p.numel() for p in model.parameters())}))
"""

BASELINE = """
import json
from pathlib import Path
import torch, chatglm, transformers
status = Path("/proc/self/status").read_text().splitlines()
hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
print(json.dumps({"peak_rss": hwm}))
"""


def write_checkpoint(folder: Path, safetensors: bool, size: str = "6b") -> int:
    """A random INT4 checkpoint (full size by default) in the public layout; returns the weight bytes on disk."""
    model = random_model(size, "cpu", torch.float16)
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("dtype", "transformers_version")}
    config.update(auto_map=MODEL_AUTO_MAP, torch_dtype="float16", architectures=["ChatGLMModel"])
    (folder / "config.json").write_text(json.dumps(config))
    if safetensors:
        model.save_pretrained(folder)
        files = list(folder.glob("*.safetensors"))
    else:
        save_bin_checkpoint(model.public_state_dict(), folder)
        files = list(folder.glob("pytorch_model*.bin"))
    del model
    return sum(f.stat().st_size for f in files)


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(folder: str | None = None, safetensors: bool = False, size: str = "6b") -> dict:
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        scratch = Path(scratch)
        start = time.perf_counter()
        size = write_checkpoint(scratch, safetensors, size)
        written = time.perf_counter() - start
        baseline = _child(BASELINE)["peak_rss"]
        result = _child(LOADER, str(scratch))
    result.update(format="model.safetensors" if safetensors else "pytorch_model.bin", checkpoint_bytes=size,
                  write_s=written, baseline_rss=baseline, ratio=result["peak_rss"] / size,
                  ratio_touched=result["peak_rss_touched"] / size,
                  ratio_above_baseline=(result["peak_rss"] - baseline) / size)
    return result


def format_load(result: dict) -> str:
    return (f"{result['format']}: {result['checkpoint_bytes'] / 2**30:.2f} GiB, {result['params']:,} parameters, "
            f"load {result['load_s']:.1f} s, peak RSS {result['peak_rss'] / 2**30:.2f} GiB = "
            f"{result['ratio']:.2f} x checkpoint ({result['ratio_above_baseline']:.2f} x above the "
            f"{result['baseline_rss'] / 2**30:.2f} GiB of an idle interpreter with torch and transformers); "
            f"{result['ratio_touched']:.2f} x once every weight has been read")
