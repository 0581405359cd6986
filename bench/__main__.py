"""``python -m bench train|int4|eval|load|...`` — each prints one line per configuration (``--json`` for records)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .common import SIZES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _dtype(args) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON records instead of text lines")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="tokens/s, peak memory and MFU of one method")
    train.add_argument("--model", default="small", choices=list(SIZES))
    train.add_argument("--method", default="lora", choices=["freeze", "embedding", "ptuning_v2", "lora"])
    train.add_argument("--seq", type=int, default=512)
    train.add_argument("--bs", type=int, default=4)
    train.add_argument("--steps", type=int, default=5, help="timed steps (after the warm-up steps)")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps first (the peak memory includes them)")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--dtype", choices=sorted(DTYPES))
    train.add_argument("--attention", default="sdpa", choices=["sdpa", "eager", "both"],
                       help="'both' runs eager and SDPA and prints their ratio")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--pre-seq-len", type=int)
    train.add_argument("--no-projection", action="store_true")
    train.add_argument("--layers", type=int, help="freeze: how many of the last layers train (default 5)")
    train.add_argument("--dequantize", action="store_true", help="freeze: train those layers' matrices in fp32")
    train.add_argument("--roofline", action="store_true", help="CPU: also time torch.mm at the layer shapes (MFU)")

    int4 = commands.add_parser("int4", help="quantized linear vs a dense one, at the 6B layer shapes")
    int4.add_argument("--tokens", type=int, default=2048, help="rows of the input (batch x sequence)")
    int4.add_argument("--bits", type=int, default=4, choices=[4, 8])
    int4.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    int4.add_argument("--dtype", choices=sorted(DTYPES))
    int4.add_argument("--repeat", type=int, default=10)

    gen = commands.add_parser("eval", help="batched KV-cached generation vs one by one")
    gen.add_argument("--model", default="small", choices=list(SIZES))
    gen.add_argument("--prompts", type=int, default=16)
    gen.add_argument("--new-tokens", type=int, default=32)
    gen.add_argument("--bs", type=int, default=16)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES))

    generate = commands.add_parser("generate", help="peak memory and time of one greedy generate")
    generate.add_argument("--model", default="small", choices=list(SIZES))
    generate.add_argument("--prompt", type=int, default=32, help="prompt tokens (ending in [gMASK] <sop>)")
    generate.add_argument("--new-tokens", type=int, default=4)
    generate.add_argument("--bs", type=int, default=1)
    generate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    generate.add_argument("--dtype", choices=sorted(DTYPES))

    fullsize = commands.add_parser("fullsize", help="the 6B model on the CPU: every method, measured vs estimated")
    fullsize.add_argument("--seq", type=int, default=64)
    fullsize.add_argument("--bs", type=int, default=1)
    fullsize.add_argument("--steps", type=int, default=2)
    fullsize.add_argument("--warmup", type=int, default=1)
    fullsize.add_argument("--limit-gb", type=float, default=19.0, help="kill a configuration above this RSS (GB)")
    fullsize.add_argument("--attempt-all", action="store_true", help="also start configurations predicted above it")
    fullsize.add_argument("--only", help="comma-separated indices of bench.fullsize.CONFIGS")
    fullsize.add_argument("--new-tokens", type=int, default=4, help="of the closing generate (0: none)")
    fullsize.add_argument("--prompt", type=int, default=32)
    fullsize.add_argument("--out", help="write every record to this JSON file")
    fullsize.add_argument("--table-from", help="print the table of an earlier --out file with today's estimate")

    load = commands.add_parser("load", help="write a random full-size INT4 checkpoint, load it, measure RSS")
    load.add_argument("--dir", help="where to write the temporary checkpoint (about 4 GB)")
    load.add_argument("--safetensors", action="store_true", help="model.safetensors instead of pytorch_model.bin")
    load.add_argument("--model", default="6b", choices=list(SIZES))

    suite = commands.add_parser("suite", help="the GPU check: every method, torch and Triton INT4, decoding, one table")
    suite.add_argument("--model", default="6b", choices=list(SIZES))
    suite.add_argument("--seq", type=int, default=512)
    suite.add_argument("--bs", type=int, default=4, help="the larger batch (the other is 1)")
    suite.add_argument("--steps", type=int, default=3)
    suite.add_argument("--warmup", type=int, default=2, help="untimed steps (Triton compiles its kernels here)")
    suite.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    suite.add_argument("--dtype", choices=sorted(DTYPES))
    suite.add_argument("--prompt", type=int, default=64, help="prompt tokens for decoding")
    suite.add_argument("--new-tokens", type=int, default=32)
    suite.add_argument("--decode-batches", default="1,16", type=lambda s: [int(b) for b in s.split(",")])
    suite.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all kernels together")
    suite.add_argument("--json-out", help="write every record to this JSON file")
    suite.add_argument("--rows", action="store_true", help=argparse.SUPPRESS)  # the per-kernel child process

    from .cpu import add_arguments as add_cpu_arguments

    add_cpu_arguments(commands.add_parser("cpu", help="the INT4 model on the CPU: pure vs fast path, decode bound, "
                                                      "LoRA step"))

    from .quality import add_arguments

    add_arguments(commands.add_parser("tune", help="tiny model: learning rates chosen on a validation split of train"),
                  commands.add_parser("quality", help="tiny model: every method on every task's test file"))

    args = parser.parse_args(argv)
    records: list[tuple[dict, str]] = []
    if args.command == "train":
        from .train import bench_train, format_train

        options = {}
        if args.pre_seq_len:
            options["pre_seq_len"] = args.pre_seq_len
        if args.no_projection:
            options["prefix_projection"] = False
        if args.layers:
            options["layers"] = args.layers
        if args.dequantize:
            options["dequantize"] = True
        kinds = ["eager", "sdpa"] if args.attention == "both" else [args.attention]
        for kind in kinds:
            result = bench_train(args.model, args.method, args.seq, args.bs, args.steps, args.device, _dtype(args),
                                 kind, args.gradient_checkpointing, options, warmup=args.warmup,
                                 roofline=args.roofline)
            records.append((result, format_train(result)))
        if len(kinds) == 2:
            ratio = records[1][0]["tokens_per_s"] / records[0][0]["tokens_per_s"]
            records.append(({"sdpa_over_eager": ratio}, f"SDPA / eager throughput: {ratio:.2f}x"))
    elif args.command == "int4":
        from .kernels import bench_int4, format_int4

        for row in bench_int4(args.tokens, args.device, _dtype(args), args.bits, args.repeat):
            records.append((row, format_int4(row)))
    elif args.command == "eval":
        from .generation import bench_eval, format_eval

        result = bench_eval(args.model, args.prompts, args.new_tokens, args.bs, args.device, _dtype(args))
        records.append((result, format_eval(result)))
    elif args.command == "generate":
        from .generation import bench_generate, format_generate

        result = bench_generate(args.model, args.prompt, args.new_tokens, args.bs, args.device, _dtype(args))
        records.append((result, format_generate(result)))
    elif args.command == "fullsize":
        from .fullsize import run_fullsize

        if args.table_from:
            from .fullsize import markdown_table, repredict

            print(markdown_table(repredict(json.loads(open(args.table_from, encoding="utf-8").read()))))
            return 0
        only = [int(i) for i in args.only.split(",")] if args.only else None
        run_fullsize(args.seq, args.bs, args.steps, args.warmup, args.limit_gb, args.attempt_all, only,
                     args.new_tokens, args.prompt, args.out)
        return 0
    elif args.command == "load":
        from .loading import bench_load, format_load

        result = bench_load(args.dir, args.safetensors, args.model)
        records.append((result, format_load(result)))
    elif args.command in ("tune", "quality"):
        from .quality import run

        run(args)
        return 0
    elif args.command == "cpu":
        from .cpu import child_main, fill_defaults, run_cpu

        fill_defaults(args)
        if args.child:
            return child_main(args)
        for record in run_cpu(args):
            if args.json:
                print(json.dumps(record), flush=True)
        return 0
    elif args.command == "suite":
        from .suite import run_rows, run_suite

        return run_rows(args, _dtype(args)) if args.rows else run_suite(args, _dtype(args))
    for record, line in records:
        print(json.dumps(record) if args.json else line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
