"""The INT4 model on the CPU, pure path against fast path (``python -m bench cpu``).

Configurations (each in its own processes, so that every peak RSS is its own):

- ``pure-fp32``: an fp32 model, the exact default path (the pure path, streaming each weight in blocks);
- ``pure-bf16``: a bf16 model with ``CHATGLM_INT4_KERNEL=torch`` (the same path in bf16);
- ``fast-bf16``: a bf16 model, automatic: PyTorch's int4pack kernel for decoding and prompts of up to 64 tokens;
- ``whole-fp32`` (only when asked for): the pure fp32 path unpacking each whole matrix for every product, as before
  the streaming (``STREAM_ELEMENTS`` raised past every matrix).

For each: load time (``from_pretrained`` of a random checkpoint in the public INT4 layout, written once), the first
forward pass (where the fast path repacks every weight), prefill time of each prompt (best pass), decode tokens/s
for 1 and 8 sequences after a 32-token prompt (the median step of a greedy ``generate``), the peak RSS and the RSS at
the end split into anonymous and file-backed pages (``from_pretrained`` memory-maps the safetensors file, so pages of
the checkpoint it read count as resident though the system can drop them); then, in a fresh process, one LoRA r=8
training step (time, peak RSS, CPU MFU: the step's model FLOPs per second over this CPU's measured ``torch.mm``
FLOP/s in the same dtype).

The decode bound: a decoding step reads every weight once, whatever the number of sequences, so it takes at least
(bytes of the weights) / (read bandwidth). Counted: the quantized matrices as stored (4 bits a weight; the fast path's
repacked copy has the same size) with their scales and biases, the output layer (the tied word embedding) in the
model's dtype, and the LayerNorms. Not counted: the key/value cache (2 x 28 layers x 4096 values a token of context:
under 1 % of the weights for these prompts) and the one embedding row looked up. The bandwidth is measured in the same
run as ``torch.sum`` over a buffer much larger than the caches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from chatglm.quantization import KERNEL_ENV, QuantizedLinear

from .common import gib

CONFIGS = {
    "pure-fp32": {"dtype": "fp32", "env": {}},
    "pure-bf16": {"dtype": "bf16", "env": {KERNEL_ENV: "torch"}},
    "fast-bf16": {"dtype": "bf16", "env": {}},
    "whole-fp32": {"dtype": "fp32", "env": {KERNEL_ENV: "torch"}, "stream_elements": 1 << 60},
}
DEFAULT_CONFIGS = ("pure-fp32", "pure-bf16", "fast-bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _best_seconds(step, repeat: int) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(megabytes: int = 2048, repeat: int = 5) -> float:
    """Bytes per second that ``torch.sum`` reads from a fp32 buffer of ``megabytes`` (keep it far above the caches)."""
    buffer = torch.ones(megabytes * (1 << 20) // 4)
    seconds = _best_seconds(lambda: buffer.sum(), repeat)
    return buffer.numel() * 4 / seconds


def matmul_flops(dtype: torch.dtype, rows: int = 1024, size: int = 4096, repeat: int = 3) -> float:
    """FLOP/s of ``torch.mm`` [rows, size] x [size, size] in ``dtype``: this CPU's matrix peak as PyTorch reaches it."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    return 2 * rows * size * size / _best_seconds(lambda: torch.mm(a, b), repeat)


def decode_bytes(model: nn.Module) -> int:
    """Bytes one decoding step reads (see the module docstring for what is counted)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, nn.LayerNorm)):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    head = model.get_output_embeddings().weight
    return total + head.numel() * head.element_size()


def _rss_parts() -> dict[str, int]:
    """Resident memory now, split into anonymous pages and file-backed ones (a memory-mapped checkpoint's pages, which
    the system can drop again)."""
    fields = {"RssAnon:": "rss_anon", "RssFile:": "rss_file"}
    lines = Path("/proc/self/status").read_text().splitlines()
    return {fields[line.split()[0]]: int(line.split()[1]) * 1024 for line in lines if line.split()[0] in fields}


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------- children


class _StepClock(BaseStreamer):
    """Notes the time ``generate`` hands over each new token; the first call brings the prompt, the second the token
    after the prompt's forward pass, each later one the token of one decoding step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_seconds(self) -> float:
        """The median decoding step (the prompt's forward pass not counted)."""
        steps = [later - earlier for earlier, later in zip(self.times[1:], self.times[2:])]
        return statistics.median(steps)


def run_inference(checkpoint: str, dtype: torch.dtype, prompts: list[int], batches: list[int], new_tokens: int,
                  repeat: int) -> dict:
    """Load, first forward, prefill and decode of one configuration (in this process)."""
    from chatglm import ChatGLMForConditionalGeneration
    from chatglm.quantization import kernel_report

    from .generation import prompt_ids

    start = time.perf_counter()
    model = ChatGLMForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).eval()
    result = {"load_s": time.perf_counter() - start, "kernels": kernel_report(model),
              "decode_bytes": decode_bytes(model), "ready_rss": _peak_rss()}
    config = model.config
    with torch.no_grad():
        start = time.perf_counter()
        model(prompt_ids(config, 1, 2), use_cache=True, logits_to_keep=1)  # the first forward repacks, if anything
        result["first_forward_s"] = time.perf_counter() - start
        for prompt in prompts:
            ids = prompt_ids(config, 1, prompt)
            seconds = _best_seconds(lambda: model(ids, use_cache=True, logits_to_keep=1), repeat)
            result[f"prefill_{prompt}_s"] = seconds
    for batch in batches:
        ids = prompt_ids(config, batch, 32)
        clock = _StepClock()
        for streamer in (None, clock):  # a warm-up, then the timed run
            model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=config.pad_token_id, streamer=streamer)
        result[f"decode_{batch}_tokens_per_s"] = batch / clock.step_seconds()
    result.update(peak_rss=_peak_rss(), **_rss_parts())
    return result


def run_training(size: str, dtype: torch.dtype, seq: int, steps: int) -> dict:
    """One LoRA r=8 configuration of ``bench train`` (random weights, fused AdamW), in this process."""
    from .train import bench_train

    record = bench_train(size, "lora", seq, 1, steps, "cpu", dtype, warmup=1)
    return {key: record[key] for key in ("step_s", "flops", "flops_per_s", "peak_bytes", "baseline_rss",
                                         "trainable_params")}


def child_main(args) -> int:
    """``python -m bench cpu --child infer|train``: one measurement, printed as one JSON line."""
    from chatglm import quantization

    if args.stream_elements:
        quantization.STREAM_ELEMENTS = args.stream_elements
    dtype = DTYPES[args.dtype]
    if args.child == "infer":
        record = run_inference(args.checkpoint, dtype, args.prompts, args.batches, args.new_tokens, args.repeat)
    else:
        record = run_training(args.model, dtype, args.train_seq, args.train_steps)
    print(json.dumps(record), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------- the run


def _child(args, config_name: str, kind: str, checkpoint: str) -> dict:
    config = CONFIGS[config_name]
    command = [sys.executable, "-m", "bench", "cpu", "--child", kind, "--model", args.model, "--dtype", config["dtype"],
               "--checkpoint", checkpoint, "--prompts", ",".join(map(str, args.prompts)),
               "--batches", ",".join(map(str, args.batches)), "--new-tokens", str(args.new_tokens),
               "--repeat", str(args.repeat), "--train-seq", str(args.train_seq),
               "--train-steps", str(args.train_steps), "--stream-elements", str(config.get("stream_elements", 0))]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **config["env"]}
    if KERNEL_ENV not in config["env"]:
        env.pop(KERNEL_ENV, None)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"config": config_name, "kind": kind, "status": f"failed: {error}"}
    return {"config": config_name, "kind": kind, "status": "ok", **json.loads(lines[-1])}


def run_cpu(args) -> list[dict]:
    """Measure the machine, write the checkpoint, then every configuration; prints the tables, returns the records."""
    from .loading import write_checkpoint

    load = os.getloadavg()[0]
    print(f"# {args.model} INT4 model (random weights, public layout) on {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}, load average {load:.1f}", flush=True)
    machine = {"kind": "machine", "read_bytes_per_s": read_bandwidth(args.bandwidth_mb),
               "mm_flops": {name: matmul_flops(dtype, *args.mm_shape) for name, dtype in DTYPES.items()},
               "load_average": load}
    print(f"# read bandwidth (torch.sum over {args.bandwidth_mb} MiB): {machine['read_bytes_per_s'] / 1e9:.1f} GB/s; "
          f"torch.mm: " + ", ".join(f"{name} {flops / 1e9:.0f} GFLOP/s" for name, flops in machine["mm_flops"].items()),
          flush=True)
    records = [machine]
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        start = time.perf_counter()
        written = write_checkpoint(Path(folder), safetensors=True, size=args.model)
        print(f"# checkpoint: {gib(written)} written in {time.perf_counter() - start:.0f} s", flush=True)
        for name in args.configs:
            record = _child(args, name, "infer", folder)
            records.append(record)
            print(format_inference(record, machine), flush=True)
            if args.train_steps:
                record = _child(args, name, "train", folder)
                records.append(record)
                print(format_training(record, machine), flush=True)
    print(markdown_tables(records, args), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return records


def _bound(record: dict, machine: dict) -> float:
    """Decode tokens/s of one sequence if reading the weights were all a step did."""
    return machine["read_bytes_per_s"] / record["decode_bytes"]


def format_inference(record: dict, machine: dict) -> str:
    if record["status"] != "ok":
        return f"{record['config']:11s} inference {record['status']}"
    prefill = "  ".join(f"prefill {key.split('_')[1]} {record[key]:.2f} s" for key in record
                        if key.startswith("prefill_"))
    decode = "  ".join(f"decode x{key.split('_')[1]} {record[key]:.2f} tok/s" for key in record
                       if key.startswith("decode_") and key.endswith("tokens_per_s"))
    share = record["decode_1_tokens_per_s"] / _bound(record, machine) if "decode_1_tokens_per_s" in record else 0
    return (f"{record['config']:11s} [{record['kernels']}] load {record['load_s']:.1f} s  first forward "
            f"{record['first_forward_s']:.1f} s  {prefill}  {decode} ({100 * share:.0f}% of the bound "
            f"{_bound(record, machine):.2f})  peak RSS {gib(record['peak_rss'])}{_rss_now(record)}")


def _rss_now(record: dict) -> str:
    if "rss_anon" not in record:
        return ""
    return f" (at the end {gib(record['rss_anon'])} anonymous + {gib(record['rss_file'])} file-backed)"


def _mfu(record: dict, machine: dict) -> float:
    dtype = CONFIGS[record["config"]]["dtype"]
    return record["flops_per_s"] / machine["mm_flops"][dtype]


def format_training(record: dict, machine: dict) -> str:
    if record["status"] != "ok":
        return f"{record['config']:11s} LoRA step {record['status']}"
    return (f"{record['config']:11s} LoRA r=8 step {record['step_s']:.1f} s  peak RSS {gib(record['peak_bytes'])}  "
            f"{record['flops'] / 1e9:.0f} GFLOP  CPU MFU {100 * _mfu(record, machine):.0f}%")


def markdown_tables(records: list[dict], args) -> str:
    """The RESULTS.md tables: inference per configuration, then the LoRA step."""
    machine = records[0]
    prompts, batches = args.prompts, args.batches
    head = (["configuration", "matmul path", "load", "first forward"] + [f"prefill {p} tok" for p in prompts]
            + [f"decode x{b}" for b in batches] + ["read per step", "decode bound x1", "x1 / bound", "peak RSS",
                                                   "RSS at the end: anonymous + file-backed"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in records[1:]:
        if record["kind"] != "infer" or record["status"] != "ok":
            continue
        bound = _bound(record, machine)
        cells = [record["config"], record["kernels"], f"{record['load_s']:.1f} s", f"{record['first_forward_s']:.1f} s"]
        cells += [f"{record[f'prefill_{p}_s']:.2f} s ({p / record[f'prefill_{p}_s']:.0f} tok/s)" for p in prompts]
        cells += [f"{record[f'decode_{b}_tokens_per_s']:.2f} tok/s" for b in batches]
        one = record.get("decode_1_tokens_per_s")
        cells += [gib(record["decode_bytes"]), f"{bound:.2f} tok/s", f"{100 * one / bound:.0f}%" if one else "",
                  gib(record["peak_rss"]),
                  f"{gib(record['rss_anon'])} + {gib(record['rss_file'])}" if "rss_anon" in record else ""]
        lines.append("| " + " | ".join(cells) + " |")
    trained = [r for r in records[1:] if r["kind"] == "train" and r["status"] == "ok"]
    if trained:
        lines += ["", f"| LoRA r=8, seq {args.train_seq}, batch 1 | step | peak RSS | model GFLOP/step | GFLOP/s | "
                  "torch.mm GFLOP/s (same dtype) | CPU MFU |", "|---|---|---|---|---|---|---|"]
    for record in trained:
        dtype = CONFIGS[record["config"]]["dtype"]
        lines.append(f"| {record['config']} | {record['step_s']:.1f} s | {gib(record['peak_bytes'])} | "
                     f"{record['flops'] / 1e9:.0f} | {record['flops_per_s'] / 1e9:.1f} | "
                     f"{machine['mm_flops'][dtype] / 1e9:.0f} | {100 * _mfu(record, machine):.0f}% |")
    failed = [f"{r['config']} {r['kind']}: {r['status']}" for r in records[1:] if r["status"] != "ok"]
    lines += ["", f"Read bandwidth {machine['read_bytes_per_s'] / 1e9:.1f} GB/s (torch.sum over {args.bandwidth_mb} "
              "MiB). Read per step: the quantized matrices as stored (the fast path's repacked copy has the same "
              "size), their scales and biases, the LayerNorms and the output layer in the model's dtype; decode "
              f"bound = bandwidth / that. Load average at the start: {machine['load_average']:.1f}."]
    return "\n".join(lines + [f"failed: {line}" for line in failed])


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="6b", choices=["tiny", "small", "6b"])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), type=lambda s: s.split(","),
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--quick", action="store_true", help="short prompts, few tokens, small buffers (smoke runs)")
    parser.add_argument("--prompts", type=lambda s: [int(p) for p in s.split(",")])
    parser.add_argument("--batches", default=[1, 8], type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--new-tokens", type=int, help="decode: generate this many tokens (the median step counts)")
    parser.add_argument("--repeat", type=int, help="timed prefill passes (the best counts)")
    parser.add_argument("--train-seq", type=int)
    parser.add_argument("--train-steps", type=int, help="timed LoRA steps after one warm-up (0: no training)")
    parser.add_argument("--dir", help="where to write the temporary checkpoint (about 4 GB at full size)")
    parser.add_argument("--out", help="write every record to this JSON file")
    # the child processes, one measurement each
    parser.add_argument("--child", choices=["infer", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--stream-elements", type=int, default=0, help=argparse.SUPPRESS)


def fill_defaults(args) -> None:
    """Full-size figures by default; ``--quick`` shrinks everything for a smoke run."""
    quick = args.quick
    defaults = {"prompts": [8, 16] if quick else [64, 256], "new_tokens": 4 if quick else 8,
                "repeat": 1 if quick else 2, "train_seq": 16 if quick else 64, "train_steps": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.bandwidth_mb = 128 if quick else 2048
    args.mm_shape = (64, 512) if quick else (1024, 4096)
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
