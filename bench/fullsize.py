"""The full-size model on the CPU (``python -m bench fullsize``): every method, measured against the estimate.

Each configuration trains in its own process (``python -m bench train --model 6b --device cpu ...``), watched from
here: a process whose resident memory passes ``--limit-gb`` is killed and reported as such, so one configuration
that does not fit cannot take the machine down. Next to each row: the memory the estimate predicts
(``helpers.estimate.estimate(device="cpu")``), the model FLOP/s and their share of this machine's measured fp32
matrix-multiply throughput at the model's layer shapes (CPU MFU). A greedy ``generate`` of a few tokens closes
the run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers.estimate import estimate, estimate_generation
from helpers.run.memory import GIB

from .common import gemm_throughput

# (method, options, gradient checkpointing). Configurations predicted above the limit are not started; with
# ``--attempt-all`` they are, and the watchdog stops them.
CONFIGS = [
    ("freeze", {}, False),
    ("freeze", {"dequantize": True}, False),
    ("freeze", {"dequantize": True}, True),
    ("freeze", {"dequantize": True, "layers": 1}, False),
    ("embedding", {}, False),
    ("embedding", {}, True),
    ("ptuning_v2", {"prefix_projection": False}, False),
    ("ptuning_v2", {"prefix_projection": False}, True),
    ("ptuning_v2", {"prefix_projection": True}, False),
    ("ptuning_v2", {"prefix_projection": True}, True),
    ("lora", {}, False),
    ("lora", {}, True),
]
MODEL = "THUDM/chatglm-6b-int4"


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_watched(command: list[str], limit: int, poll_s: float = 0.1) -> dict:
    """Run ``command``, killing it if its resident memory passes ``limit`` bytes; its last JSON line and status."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    started, load = time.time(), os.getloadavg()[0]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    highest, killed = 0, False
    while process.poll() is None:
        rss = _rss(process.pid)
        highest = max(highest, rss)
        if rss > limit:
            process.kill()
            killed = True
            break
        time.sleep(poll_s)
    out, err = process.communicate()
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    status = "killed" if killed else "ok" if process.returncode == 0 and records else "failed"
    error = err.strip().splitlines()[-1] if status == "failed" and err.strip() else ""
    return {"status": status, "record": records[-1] if records else None, "watched_peak": highest,
            "wall_s": time.time() - started, "load_before": load, "load_after": os.getloadavg()[0], "error": error}


def _label(method: str, options: dict, checkpointing: bool) -> str:
    parts = {"freeze": f"freeze, LayerNorms of {options.get('layers', 5)} layers",
             "embedding": "embedding", "lora": "LoRA r=8 (query_key_value)"}
    if method == "freeze" and options.get("dequantize"):
        parts["freeze"] = f"freeze --dequantize, {options.get('layers', 5)} layer(s) in fp32"
    if method == "ptuning_v2":
        parts["ptuning_v2"] = "P-Tuning v2, 16 tokens, " + ("projection" if options.get("prefix_projection")
                                                            else "no projection")
    return parts[method] + (", checkpointing" if checkpointing else "")


def _train_command(method: str, options: dict, checkpointing: bool, seq: int, batch: int, steps: int,
                   warmup: int) -> list[str]:
    command = [sys.executable, "-m", "bench", "--json", "train", "--model", "6b", "--device", "cpu", "--seq",
               str(seq), "--bs", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--method", method,
               "--roofline"]
    if options.get("dequantize"):
        command.append("--dequantize")
    if "layers" in options:
        command += ["--layers", str(options["layers"])]
    if method == "ptuning_v2" and not options.get("prefix_projection", True):
        command.append("--no-projection")
    if checkpointing:
        command.append("--gradient-checkpointing")
    return command


def _estimate_options(method: str, options: dict) -> dict:
    if method == "ptuning_v2":
        return {"pre_seq_len": 16, **options}
    return dict(options)


def run_fullsize(seq: int = 64, batch: int = 1, steps: int = 2, warmup: int = 1, limit_gb: float = 19.0,
                 attempt_all: bool = False, only: list[int] | None = None, new_tokens: int = 4,
                 prompt: int = 32, out: str | None = None) -> list[dict]:
    """Measure every configuration of :data:`CONFIGS` (or the indices in ``only``) and the greedy generation."""
    limit = int(limit_gb * 1e9)
    print(f"# full-size ChatGLM-6B INT4 (random packed weights) on {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, seq {seq}, batch {batch}, {warmup} warm-up + "
          f"{steps} timed steps, limit {limit_gb:g} GB, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    gemm = gemm_throughput(seq * batch)
    print(f"# fp32 torch.mm at the layer shapes ({gemm['tokens']} rows, {gemm['threads']} threads): "
          f"{gemm['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    rows: list[dict] = [{"kind": "gemm", **gemm}]
    for index, (method, options, checkpointing) in enumerate(CONFIGS):
        if only is not None and index not in only:
            continue
        predicted = estimate(MODEL, method, seq=seq, batch=batch, gradient_checkpointing=checkpointing,
                             device="cpu", **_estimate_options(method, options))
        row = {"kind": "train", "label": _label(method, options, checkpointing), "method": method, "seq": seq,
               "batch": batch,
               "options": options, "gradient_checkpointing": checkpointing, "predicted_bytes": predicted.total,
               "predicted": predicted.parts()}
        if predicted.total > limit and not attempt_all:
            row["status"] = "not run (predicted above the limit)"
        else:
            result = run_watched(_train_command(method, options, checkpointing, seq, batch, steps, warmup), limit)
            row.update({key: result[key] for key in ("status", "watched_peak", "wall_s", "load_before",
                                                     "load_after", "error")})
            if result["record"]:
                record = result["record"]
                row["measured"] = record
                row["measured_bytes"] = record["peak_bytes"] - record["baseline_rss"]
                # MFU against torch.mm timed in the same process right after the steps (same load), else the
                # run's opening measurement
                row["gemm_flops_per_s"] = record.get("gemm_flops_per_s", gemm["flops_per_s"])
                row["cpu_mfu"] = record["flops_per_s"] / row["gemm_flops_per_s"]
        rows.append(row)
        print(format_row(row), flush=True)
        if out:  # as it goes, so a run cut short keeps its rows
            Path(out).write_text(json.dumps(rows, indent=1))
    if new_tokens <= 0:  # no generation row
        return _finish(rows, out)
    generation = run_watched([sys.executable, "-m", "bench", "--json", "generate", "--model", "6b", "--device",
                              "cpu", "--prompt", str(prompt), "--new-tokens", str(new_tokens)], limit)
    predicted = estimate_generation(MODEL, prompt=prompt, new_tokens=new_tokens, batch=1, device="cpu")
    row = {"kind": "generate", "status": generation["status"], "predicted_bytes": predicted.total,
           "predicted": predicted.parts(), "error": generation["error"]}
    if generation["record"]:
        row["measured"] = generation["record"]
        row["measured_bytes"] = generation["record"]["peak_bytes"] - generation["record"]["baseline_rss"]
    rows.append(row)
    print(format_row(row), flush=True)
    return _finish(rows, out)


def _finish(rows: list[dict], out: str | None) -> list[dict]:
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows), flush=True)
    return rows


def repredict(rows: list[dict], seq: int = 64, batch: int = 1) -> list[dict]:
    """The same records with every prediction recomputed by the current estimate (it needs no measurement)."""
    for row in rows:
        if row["kind"] == "train":
            predicted = estimate(MODEL, row["method"], seq=row.get("seq", seq), batch=row.get("batch", batch),
                                 gradient_checkpointing=row["gradient_checkpointing"], device="cpu",
                                 **_estimate_options(row["method"], row["options"]))
        elif row["kind"] == "generate" and "measured" in row:
            measured = row["measured"]
            predicted = estimate_generation(MODEL, prompt=measured["prompt"], new_tokens=measured["new_tokens"],
                                            batch=measured["batch"], device="cpu")
        else:
            continue
        row["predicted_bytes"], row["predicted"] = predicted.total, predicted.parts()
    return rows


def format_row(row: dict) -> str:
    label = row.get("label", "greedy generate")
    text = f"{label:60s} predicted {row['predicted_bytes'] / GIB:6.2f} GiB"
    if "measured_bytes" in row:
        ratio = row["predicted_bytes"] / row["measured_bytes"]
        text += f"  measured {row['measured_bytes'] / GIB:6.2f} GiB  ({ratio:.2f}x)"
    if "cpu_mfu" in row:
        text += f"  {row['measured']['step_s']:.1f} s/step  CPU MFU {100 * row['cpu_mfu']:.0f}%"
    if row["status"] != "ok":
        text += f"  [{row['status']}{': ' + row['error'] if row.get('error') else ''}]"
    return text


def markdown_table(rows: list[dict]) -> str:
    """The RESULTS.md table: measured vs predicted memory, step time, model FLOP/s and CPU MFU."""
    gemm = next(r for r in rows if r["kind"] == "gemm")
    lines = ["| configuration | trainable params | predicted | measured (peak RSS - baseline) | predicted / measured "
             "| step | model GFLOP/step | GFLOP/s | torch.mm GFLOP/s | CPU MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["kind"] == "gemm":
            continue
        predicted = f"{row['predicted_bytes'] / GIB:.2f} GiB"
        if "measured_bytes" not in row:
            status = {"killed": f"killed at {row.get('watched_peak', 0) / GIB:.1f} GiB"}.get(row["status"],
                                                                                         row["status"])
            lines.append(f"| {row.get('label', 'greedy generate')} | | {predicted} | {status} | | | | | | |")
            continue
        measured = row["measured"]
        ratio = row["predicted_bytes"] / row["measured_bytes"]
        if row["kind"] == "generate":
            lines.append(f"| greedy generate, {measured['prompt']}-token prompt + {measured['new_tokens']} tokens | "
                         f"| {predicted} | {row['measured_bytes'] / GIB:.2f} GiB | {ratio:.2f} | "
                         f"{measured['seconds'] / measured['new_tokens']:.1f} s/token | | | | |")
            continue
        lines.append(f"| {row['label']} | {measured['trainable_params']:,} | {predicted} | "
                     f"{row['measured_bytes'] / GIB:.2f} GiB | {ratio:.2f} | {measured['step_s']:.1f} s | "
                     f"{measured['flops'] / 1e9:.0f} | {measured['flops_per_s'] / 1e9:.1f} | "
                     f"{row.get('gemm_flops_per_s', gemm['flops_per_s']) / 1e9:.1f} | {100 * row['cpu_mfu']:.0f}% |")
    lines.append(f"\nfp32 `torch.mm` at the layer shapes, {gemm['tokens']} rows, {gemm['threads']} threads, "
                 f"at the start of the run: {gemm['flops_per_s'] / 1e9:.1f} GFLOP/s.")
    return "\n".join(lines)
