"""Where the course runs: Colab or not, a person watching or not, GPU and memory, and which model to use.

The notebooks print :func:`runtime_report` first and pick the model with :func:`choose_model`: the real
ChatGLM-6B-INT4 on a GPU, the embedded tiny model (with a banner saying so) without one.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models import default_dtype, is_small_model
from ..run.memory import GIB

REAL_MODEL = "THUDM/chatglm-6b-int4"
TOY_BANNER = """\
+------------------------------------------------------------------------------------------+
|  TOY MODE: no GPU here, so this notebook uses the embedded TINY ChatGLM.                 |
|  Same architecture, special tokens and INT4 format as ChatGLM-6B, so every cell runs the |
|  same code; but the model is thousands of times smaller and far weaker: it learns the    |
|  tasks a little, so losses, metrics and answers below are toy-sized. For real results    |
|  use a GPU runtime (Colab: Runtime > Change runtime type > GPU).                         |
+------------------------------------------------------------------------------------------+"""
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_bool(key: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in TRUE | FALSE:
        return value in TRUE
    raise UserError(f"{key}={raw!r}: expected one of {', '.join(sorted(TRUE | FALSE))}")


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def interactive_frontend() -> bool:
    """True when a person is looking at the notebook (Colab, a Jupyter server); False when run headless.

    ``COURSE_TENSORBOARD=1`` or ``=0`` forces the answer; ``CI`` set means headless. Used to start servers
    (TensorBoard) only where someone can see them.
    """
    forced = os.environ.get("COURSE_TENSORBOARD", "").strip()
    if forced:
        return parse_bool("COURSE_TENSORBOARD", forced)
    if os.environ.get("CI"):
        return False
    return in_colab() or bool(os.environ.get("JPY_SESSION_NAME"))


def repository_root() -> Path | None:
    """The course's checkout (the folder holding ``pyproject.toml`` next to ``helpers/``), if installed from one."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def default_runs_dir() -> Path:
    """``runs/notebooks`` in the checkout (else in the current folder): where every notebook writes its runs."""
    return (repository_root() or Path.cwd()) / "runs" / "notebooks"


def native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer, e.g. A100); a T4 only emulates it, slowly."""
    return torch.cuda.is_available() and default_dtype("cuda") == torch.bfloat16


def runtime_info() -> dict[str, Any]:
    """Device, GPU name and memory, bf16 support, and versions, as a dict."""
    info: dict[str, Any] = {"device": "cpu", "gpu": None, "gpu_memory_gib": None, "bf16": False,
                            "cpu_cores": os.cpu_count(), "ram_gib": None, "colab": in_colab(),
                            "python": platform.python_version(), "torch": torch.__version__}
    try:
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (AttributeError, ValueError, OSError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                    bf16=native_bf16())
    return info


def runtime_report() -> dict[str, Any]:
    """Print what this runtime offers (device, GPU, memory, bf16) and return it as a dict."""
    info = runtime_info()
    where = "Google Colab" if info["colab"] else "this machine"
    if info["device"] == "cuda":
        bf16 = "yes" if info["bf16"] else "no (emulated only; the course uses fp16 here)"
        print(f"GPU on {where}: {info['gpu']}, {info['gpu_memory_gib']} GiB, bf16 in hardware: {bf16}")
    else:
        print(f"No GPU on {where}: {info['cpu_cores']} CPU cores, {info['ram_gib'] or '?'} GiB RAM")
    print(f"python {info['python']}, torch {info['torch']}")
    return info


def is_toy(model: Any) -> bool:
    """Whether a model (name, folder or loaded model) is a tiny stand-in rather than ChatGLM-6B."""
    return is_small_model(model)


def choose_model(requested: str | None = None, default_gpu: str = REAL_MODEL) -> tuple[str, str]:
    """(model name, banner): ``requested`` if given, else the real model on a GPU and the tiny model without."""
    name = requested or (default_gpu if torch.cuda.is_available() else "tiny")
    if is_toy(name):
        return name, TOY_BANNER + f"\nModel: {name}"
    banner = f"Model: {name}"
    if not torch.cuda.is_available():
        banner += ("\nWARNING: no GPU: ChatGLM-6B runs on the CPU, fine for evaluating and chatting (bf16 fast "
                   "path where the CPU has native bf16; README), slow to train: shorten STEPS, or set MODEL = 'tiny'")
    return name, banner
