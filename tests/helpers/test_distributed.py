"""helpers.train under torchrun (2 CPU processes, gloo) follows the same loss curve as one process, batch x2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.files import read_json_lines as read_history

SCRIPT = Path(__file__).with_name("ddp_train.py")
REPO = Path(__file__).resolve().parents[2]


def launch(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_with_the_doubled_batch(tiny_checkpoint, tmp_path):
    common = [str(SCRIPT), "--model", str(tiny_checkpoint), "--steps", "4"]
    launch([sys.executable, *common, "--out", str(tmp_path / "single"), "--batch-size", "4"], tmp_path)
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            *common, "--out", str(tmp_path / "ddp"), "--batch-size", "2"], tmp_path)
    single = read_history(tmp_path / "single" / "loss_history.jsonl")
    ddp = read_history(tmp_path / "ddp" / "loss_history.jsonl")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2, 3, 4]
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    assert (tmp_path / "ddp" / "artifact" / "adapter_model.safetensors").exists()
