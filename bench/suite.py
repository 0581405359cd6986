"""The GPU check (``python -m bench suite``): every method at full size, the pure and the Triton INT4 paths side by
side, model FLOPs utilisation, peak memory against the estimate, decode tokens/s, one table.

Each INT4 kernel runs in its own process (``CHATGLM_INT4_KERNEL=torch`` or ``triton``; on a CPU the Triton one
runs in Triton's interpreter), which prints one JSON line per measurement as soon as it has it; a configuration
that fails (out of memory, a kernel error) is reported and the next one runs. The parent stops a kernel's process
when its share of ``--budget-s`` is spent, so a run cut short still prints every finished number.
``--device cpu`` is the dry mode: the same code paths on a toy model in seconds.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch

from helpers.estimate import estimate

from .common import gib

KERNELS = ("torch", "triton")
MODEL = "THUDM/chatglm-6b-int4"
# (method, batch, gradient checkpointing, options, target peak GiB or None); batch "big" is --bs (4 on GPU).
CONFIGS = [
    ("lora", "big", False, {"r": 8}, 8),
    ("lora", "big", True, {"r": 8}, 8),
    ("lora", 1, False, {"r": 8}, None),
    ("ptuning_v2", 1, False, {"pre_seq_len": 128, "prefix_projection": False}, 6),
    ("ptuning_v2", "big", False, {"pre_seq_len": 16, "prefix_projection": True}, 22),
    ("ptuning_v2", "big", True, {"pre_seq_len": 16, "prefix_projection": True}, 22),
    ("ptuning_v2", 1, False, {"pre_seq_len": 16, "prefix_projection": True}, None),
    ("freeze", "big", False, {"layers": 5}, 7),
    ("freeze", 1, False, {"layers": 5}, None),
    ("embedding", "big", False, {}, 14),
    ("embedding", "big", True, {}, 14),
    ("embedding", 1, False, {}, None),
]
DECODE_BATCHES = (1, 16)


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _device_used(device: str) -> int:
    """Bytes of the GPU in use outside PyTorch's reserved pool right now (CUDA context, libraries)."""
    if not device.startswith("cuda"):
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def run_rows(args, dtype: torch.dtype) -> int:
    """The child: every training configuration, then decoding, with the kernel set by the environment."""
    from .generation import bench_decode
    from .train import bench_train

    kernel = os.environ.get("CHATGLM_INT4_KERNEL", "auto")
    for index, (method, batch, checkpointing, options, _) in enumerate(CONFIGS):
        batch = args.bs if batch == "big" else batch
        record = {"kind": "train", "index": index, "kernel": kernel}
        try:
            result = bench_train(args.model, method, args.seq, batch, args.steps, args.device, dtype,
                                 gradient_checkpointing=checkpointing, options=options, warmup=args.warmup)
            record.update(result, status="ok")
            if args.device.startswith("cuda"):
                record["max_reserved"] = torch.cuda.max_memory_reserved()
                record["outside_torch"] = _device_used(args.device)
        except Exception as error:  # out of memory or a kernel failure: report it, go on with the next
            record.update(status=f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        _emit(record)
    for batch in args.decode_batches:
        record = {"kind": "decode", "kernel": kernel, "batch": batch}
        try:
            record.update(bench_decode(args.model, batch, args.prompt, args.new_tokens, args.device, dtype),
                          status="ok")
        except Exception as error:
            record.update(status=f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        _emit(record)
    return 0


def _child_command(args, kernel: str) -> tuple[list[str], dict]:
    command = [sys.executable, "-m", "bench", "suite", "--rows", "--model", args.model, "--seq", str(args.seq),
               "--bs", str(args.bs), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device",
               args.device, "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
               "--decode-batches", ",".join(map(str, args.decode_batches))]
    if args.dtype:
        command += ["--dtype", args.dtype]
    env = {**os.environ, "CHATGLM_INT4_KERNEL": kernel, "PYTHONUNBUFFERED": "1"}
    if kernel == "triton" and not args.device.startswith("cuda"):
        env["TRITON_INTERPRET"] = "1"  # the CPU dry run: Triton's interpreter, set before triton is imported
    return command, env


def _run_kernel(args, kernel: str, budget_s: float) -> list[dict]:
    command, env = _child_command(args, kernel)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + budget_s
    records: list[dict] = []
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    while True:
        remaining = deadline - time.time()
        if remaining <= 0:
            process.kill()
            records.append({"kind": "note", "kernel": kernel, "status": f"stopped after {budget_s:.0f} s"})
            break
        if not selector.select(timeout=min(remaining, 1.0)):
            if process.poll() is not None:
                break
            continue
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            record = json.loads(line)
            records.append(record)
            print(_progress_line(record), flush=True)
    process.wait()
    errors = process.stderr.read()
    if process.returncode not in (0, None) and process.returncode > 0:
        tail = errors.strip().splitlines()[-1] if errors.strip() else ""
        records.append({"kind": "note", "kernel": kernel, "status": f"exit {process.returncode}: {tail}"})
    return records


def _progress_line(record: dict) -> str:
    if record["kind"] == "train":
        method, batch, checkpointing, options, _ = CONFIGS[record["index"]]
        checkpoint = " ckpt" if checkpointing else ""
        head = f"[{record['kernel']}] {method} {options} bs {record.get('batch', batch)}{checkpoint}"
        if record["status"] != "ok":
            return f"{head}: {record['status']}"
        return f"{head}: {record['step_s'] * 1000:.0f} ms/step, peak {gib(record['peak_bytes'])}"
    if record["kind"] == "decode":
        if record["status"] != "ok":
            return f"[{record['kernel']}] decode bs {record['batch']}: {record['status']}"
        return f"[{record['kernel']}] decode bs {record['batch']}: {record['decode_tokens_per_s']:.1f} tokens/s"
    return f"[{record['kernel']}] {record['status']}"


def _predicted(args, index: int) -> int:
    """The estimate for the full-size model at this configuration (also in the dry run, so its path is run)."""
    method, batch, checkpointing, options, _ = CONFIGS[index]
    batch = args.bs if batch == "big" else batch
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    return estimate(MODEL, method, seq=args.seq, batch=batch, gradient_checkpointing=checkpointing, device=device,
                    **options).total


def _cell(record: dict | None, what: str) -> str:
    if record is None:
        return "not run"
    if record["status"] != "ok":
        return record["status"].split(":")[0]
    if what == "step":
        return f"{record['step_s'] * 1000:.0f} ms ({record['tokens_per_s']:.0f} tok/s)"
    if what == "mfu":
        return f"{100 * record['mfu']:.1f}%" if "mfu" in record else "-"
    if what == "memory":
        peak = record["peak_bytes"] - record.get("baseline_rss", 0)
        reserved = record.get("max_reserved")
        return gib(peak) + (f" / {gib(reserved + record['outside_torch'])}" if reserved is not None else "")
    raise ValueError(what)


def table(args, records: list[dict]) -> str:
    """One Markdown table: a row per configuration, the two kernels side by side; then decoding."""
    by_key = {(r["kernel"], r["kind"], r.get("index", r.get("batch"))): r for r in records if r["kind"] != "note"}
    on_gpu = args.device.startswith("cuda")
    memory = "peak allocated / reserved + outside torch" if on_gpu else "peak RSS above start"
    lines = [f"| configuration (seq {args.seq}) | step, torch | step, triton | MFU torch | MFU triton | "
             f"{memory}, torch | {memory}, triton | predicted{'' if args.model == '6b' else ' (6B)'} | target |",
             "|---" * 9 + "|"]
    for index, (method, batch, checkpointing, options, target) in enumerate(CONFIGS):
        batch = args.bs if batch == "big" else batch
        torch_row, triton_row = (by_key.get((k, "train", index)) for k in KERNELS)
        predicted = _predicted(args, index)
        opts = ", ".join(f"{k}={v}" for k, v in options.items())
        lines.append(f"| {method} ({opts}) bs {batch}{' ckpt' if checkpointing else ''} | "
                     f"{_cell(torch_row, 'step')} | {_cell(triton_row, 'step')} | {_cell(torch_row, 'mfu')} | "
                     f"{_cell(triton_row, 'mfu')} | {_cell(torch_row, 'memory')} | {_cell(triton_row, 'memory')} | "
                     f"{gib(predicted)} | {f'<= {target} GiB' if target else '-'} |")
    lines += ["", "| decode | torch tokens/s | triton tokens/s |", "|---|---|---|"]
    for batch in args.decode_batches:
        cells = []
        for kernel in KERNELS:
            row = by_key.get((kernel, "decode", batch))
            cells.append("not run" if row is None else row["status"].split(":")[0] if row["status"] != "ok"
                         else f"{row['decode_tokens_per_s']:.1f}")
        lines.append(f"| {batch} sequence{'s' if batch > 1 else ''}, {args.prompt}-token prompt | {cells[0]} | "
                     f"{cells[1]} |")
    notes = [r for r in records if r["kind"] == "note"]
    lines += [""] + [f"- {r['kernel']}: {r['status']}" for r in notes]
    return "\n".join(lines)


def run_suite(args, dtype: torch.dtype) -> int:
    """The parent: each kernel's process in turn, then the table (and every record with ``--json-out``)."""
    started = time.time()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# bench suite: {args.model} on {name}, {dtype}, torch {torch.__version__}, seq {args.seq}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    records: list[dict] = []
    for position, kernel in enumerate(KERNELS):
        left = args.budget_s - (time.time() - started)
        records += _run_kernel(args, kernel, left / (len(KERNELS) - position))
    print(table(args, records), flush=True)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
    print(f"# done in {time.time() - started:.0f} s", flush=True)
    # A dry run (CPU) has no memory to run out of: any failure there is a bug.
    failed = [r for r in records if r["status"] != "ok"]
    return 1 if failed and not args.device.startswith("cuda") else 0
