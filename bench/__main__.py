"""``python -m bench train|int4|eval|load`` — each prints one line per configuration (``--json`` for records)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

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
    train.add_argument("--model", default="small", choices=["small", "6b"])
    train.add_argument("--method", default="lora", choices=["freeze", "embedding", "ptuning_v2", "lora"])
    train.add_argument("--seq", type=int, default=512)
    train.add_argument("--bs", type=int, default=4)
    train.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--dtype", choices=sorted(DTYPES))
    train.add_argument("--attention", default="sdpa", choices=["sdpa", "eager", "both"],
                       help="'both' runs eager and SDPA and prints their ratio")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--pre-seq-len", type=int)
    train.add_argument("--no-projection", action="store_true")

    int4 = commands.add_parser("int4", help="quantized linear vs a dense one, at the 6B layer shapes")
    int4.add_argument("--tokens", type=int, default=2048, help="rows of the input (batch x sequence)")
    int4.add_argument("--bits", type=int, default=4, choices=[4, 8])
    int4.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    int4.add_argument("--dtype", choices=sorted(DTYPES))
    int4.add_argument("--repeat", type=int, default=10)

    gen = commands.add_parser("eval", help="batched KV-cached generation vs one by one")
    gen.add_argument("--model", default="small", choices=["small", "6b"])
    gen.add_argument("--prompts", type=int, default=16)
    gen.add_argument("--new-tokens", type=int, default=32)
    gen.add_argument("--bs", type=int, default=16)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES))

    load = commands.add_parser("load", help="write a random full-size INT4 checkpoint, load it, measure RSS")
    load.add_argument("--dir", help="where to write the temporary checkpoint (about 4 GB)")
    load.add_argument("--safetensors", action="store_true", help="model.safetensors instead of pytorch_model.bin")
    load.add_argument("--model", default="6b", choices=["small", "6b"])

    suite = commands.add_parser("suite", help="the GPU check: every method at full size, int4, eval, one table")
    suite.add_argument("--model", default="6b", choices=["small", "6b"])
    suite.add_argument("--seq", type=int, default=512)
    suite.add_argument("--steps", type=int, default=5)
    suite.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    suite.add_argument("--dtype", choices=sorted(DTYPES))
    suite.add_argument("--tokens", type=int, default=2048, help="rows for the int4 benchmark")
    suite.add_argument("--prompts", type=int, default=32)
    suite.add_argument("--new-tokens", type=int, default=64)

    args = parser.parse_args(argv)
    records: list[tuple[dict, str]] = []
    if args.command == "train":
        from .train import bench_train, format_train

        options = {}
        if args.pre_seq_len:
            options["pre_seq_len"] = args.pre_seq_len
        if args.no_projection:
            options["prefix_projection"] = False
        kinds = ["eager", "sdpa"] if args.attention == "both" else [args.attention]
        for kind in kinds:
            result = bench_train(args.model, args.method, args.seq, args.bs, args.steps, args.device, _dtype(args),
                                 kind, args.gradient_checkpointing, options)
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
    elif args.command == "load":
        from .loading import bench_load, format_load

        result = bench_load(args.dir, args.safetensors, args.model)
        records.append((result, format_load(result)))
    elif args.command == "suite":
        from .suite import run_suite

        return run_suite(args, _dtype(args))
    for record, line in records:
        print(json.dumps(record) if args.json else line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
