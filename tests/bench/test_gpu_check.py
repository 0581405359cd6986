"""The GPU check runs end to end in its CPU dry mode: both INT4 kernels, every configuration, decoding, one table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite import CONFIGS, KERNELS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    records_file = tmp_path / "records.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--json-out",
                           str(records_file)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = json.loads(records_file.read_text())
    for kernel in KERNELS:
        trained = [r for r in records if r["kind"] == "train" and r["kernel"] == kernel]
        assert [r["index"] for r in trained] == list(range(len(CONFIGS)))
        assert all(r["status"] == "ok" and r["step_s"] > 0 and r["flops"] > 0 for r in trained)
        decoded = [r for r in records if r["kind"] == "decode" and r["kernel"] == kernel]
        assert [r["batch"] for r in decoded] == [1, 4] and all(r["decode_tokens_per_s"] > 0 for r in decoded)
    table = done.stdout
    assert table.count("| lora (r=8) bs 2") == 2 and "| 4 sequences, 8-token prompt |" in table
    assert "predicted (6B)" in table and "GiB |" in table
