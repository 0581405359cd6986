"""The prepared GPU check: the 6B benchmarks of every method, the INT4 kernel and generation, one table.

Each line is printed as soon as it is measured (and a failed configuration, e.g. out of memory, is reported and
skipped), so a run cut short by its time limit still leaves every finished number behind.
"""

from __future__ import annotations

import json
import platform
import time

import torch

from .common import gib
from .generation import bench_eval, format_eval
from .kernels import bench_int4, format_int4
from .train import bench_train, format_train

GIB = 1 << 30
# (method, batch, gradient checkpointing, options, target peak GiB or None, target MFU or None)
CONFIGS = [
    ("lora", 4, False, {"r": 8}, 8, 0.35),
    ("lora", 4, True, {"r": 8}, 8, None),
    ("lora", 1, False, {"r": 8}, None, None),
    ("ptuning_v2", 1, False, {"pre_seq_len": 128, "prefix_projection": False}, 6, None),
    ("ptuning_v2", 4, False, {"pre_seq_len": 16, "prefix_projection": True}, 22, None),
    ("ptuning_v2", 4, True, {"pre_seq_len": 16, "prefix_projection": True}, 22, None),
    ("ptuning_v2", 1, False, {"pre_seq_len": 16, "prefix_projection": True}, None, None),
    ("freeze", 4, False, {"layers": 5}, 7, None),
    ("freeze", 1, False, {"layers": 5}, None, None),
    ("embedding", 4, False, {}, 14, None),
    ("embedding", 4, True, {}, 14, None),
    ("embedding", 1, False, {}, None, None),
]


def _verdict(value: float, target: float, smaller_is_better: bool) -> str:
    ok = value <= target if smaller_is_better else value >= target
    return "meets" if ok else "misses"


def run_suite(args, dtype: torch.dtype) -> int:
    started = time.time()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# bench suite: {args.model} on {device_name}, {dtype}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    for method, batch, checkpointing, options, target_gib, target_mfu in CONFIGS:
        try:
            result = bench_train(args.model, method, args.seq, batch, args.steps, args.device, dtype,
                                 gradient_checkpointing=checkpointing, options=options)
        except torch.OutOfMemoryError:
            print(f"{method} bs {batch}{' ckpt' if checkpointing else ''} {options}: out of memory", flush=True)
            torch.cuda.empty_cache()
            continue
        notes = []
        if target_gib is not None:
            notes.append(f"target <= {target_gib} GiB: {_verdict(result['peak_bytes'] / GIB, target_gib, True)}")
        if target_mfu is not None and "mfu" in result:
            notes.append(f"target MFU >= {100 * target_mfu:.0f}%: {_verdict(result['mfu'], target_mfu, False)}")
        line = format_train(result) + f"  {options}" + (f"  [{'; '.join(notes)}]" if notes else "")
        print(json.dumps(result) if args.json else line, flush=True)
    for row in bench_int4(args.tokens, args.device, dtype):
        print(json.dumps(row) if args.json else format_int4(row), flush=True)
    result = bench_eval(args.model, args.prompts, args.new_tokens, min(args.prompts, 16), args.device, dtype)
    verdict = _verdict(result["speedup"], 5, False)
    print(json.dumps(result) if args.json else format_eval(result) + f"  [target >= 5x: {verdict}]", flush=True)
    print(f"# done in {time.time() - started:.0f} s; peak so far {gib(torch.cuda.max_memory_allocated())}"
          if args.device.startswith("cuda") else f"# done in {time.time() - started:.0f} s", flush=True)
    return 0
