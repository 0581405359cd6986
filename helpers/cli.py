"""Command line: ``python -m helpers compare|train|evaluate|params|estimate|download``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import TASKS
from .methods import METHODS


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (defaults: the original course's)")
    group.add_argument("--layers", type=int, help="freeze: train the last N layers (default 5)")
    group.add_argument("--dequantize", action="store_true",
                       help="freeze: turn those layers' INT4 matrices into trainable fp32 Linear layers")
    group.add_argument("--pre-seq-len", type=int, help="ptuning_v2: prefix length (default 16)")
    group.add_argument("--no-projection", action="store_true", help="ptuning_v2: no MLP reparametrisation")
    group.add_argument("--r", type=int, help="lora: rank (default 8)")
    group.add_argument("--alpha", type=int, help="lora: scaling numerator (default 32)")
    group.add_argument("--lora-dropout", type=float, help="lora: dropout (default 0.1)")
    group.add_argument("--target-modules", help="lora: comma-separated module names (default query_key_value)")


def _method_overrides(args: argparse.Namespace, method: str) -> dict:
    chosen = {
        "freeze": {"layers": args.layers, "dequantize": args.dequantize or None},
        "ptuning_v2": {"pre_seq_len": args.pre_seq_len, "prefix_projection": False if args.no_projection else None},
        "lora": {"r": args.r, "alpha": args.alpha, "dropout": args.lora_dropout,
                 "target_modules": tuple(args.target_modules.split(",")) if args.target_modules else None},
    }.get(method, {})
    return {k: v for k, v in chosen.items() if v is not None}


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="'tiny' (embedded), a folder, or a hub name")
    parser.add_argument("--task", default="ie", choices=sorted(TASKS))
    parser.add_argument("--train-file", help="a JSON-lines training file (default: the bundled sample)")
    parser.add_argument("--test-file", help="a JSON-lines test file (default: the bundled sample)")
    parser.add_argument("--steps", type=int, help="training steps")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="learning rate (default: per method)")
    parser.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--deepspeed", help="a DeepSpeed config (configs/deepspeed_zero2.json or _zero3.json)")
    parser.add_argument("--eval-limit", type=int, help="evaluate on the first N test examples only")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="fp32, fp16 or bf16 (default: fp32 on CPU, bf16/fp16 on GPU)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming an interrupted run")


def _training(args) -> dict:
    chosen = {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
              "gradient_accumulation_steps": args.grad_accum,
              "gradient_checkpointing": args.gradient_checkpointing or None, "deepspeed": args.deepspeed}
    return {k: v for k, v in chosen.items() if v is not None}


def _evaluation(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}


def cmd_compare(args) -> int:
    from .pipeline import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    summary = compare(
        model=args.model, task=args.task, methods=methods, out=args.out, training=_training(args),
        evaluation=_evaluation(args), train_file=args.train_file, test_file=args.test_file,
        eval_limit=args.eval_limit, device=args.device, dtype=args.dtype, seed=args.seed, resume=not args.fresh,
    )
    out = Path(summary["out"])
    if "files" not in summary:  # a helper process of a distributed run
        return 0
    print()
    print((out / "comparison.md").read_text(encoding="utf-8"))
    print(f"Finished in {summary['wall_time_s'] / 60:.1f} min. Outputs in {out}/: comparison.png, comparison.md, "
          f"comparison.json, and one run folder per method (loss history, metrics, predictions, artifact, tb/).")
    return 0


def cmd_train(args) -> int:
    from .pipeline import run_method

    metrics = run_method(
        args.model, args.task, args.method, args.out, method_overrides=_method_overrides(args, args.method),
        training=_training(args), evaluation=_evaluation(args), train_file=args.train_file,
        test_file=args.test_file, eval_limit=args.eval_limit, device=args.device, dtype=args.dtype,
        seed=args.seed, resume=not args.fresh,
    )
    if metrics:  # empty on the helper processes of a distributed run
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


def cmd_evaluate(args) -> int:
    from .data import load_split
    from .evaluation import evaluate
    from .models import load_model
    from .training import load_finetuned

    if args.run:
        model, tokenizer = load_finetuned(args.run, device=args.device, dtype=args.dtype)
        task = args.task or json.loads((Path(args.run) / "run.json").read_text(encoding="utf-8"))["task"]
        out = args.out or args.run
    else:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        task, out = args.task or "ie", args.out
    examples = load_split(task, "test", args.test_file, limit=args.eval_limit)
    metrics = evaluate(model, tokenizer, task, examples, out_dir=out, **_evaluation(args))
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


def cmd_params(args) -> int:
    from .methods import apply_method
    from .models import meta_model

    model = meta_model(args.model)
    setup = apply_method(model, args.method, **_method_overrides(args, args.method))
    print(setup)
    return 0


def cmd_estimate(args) -> int:
    from .estimate import estimate

    result = estimate(args.model, args.method, seq=args.seq, batch=args.bs,
                      gradient_checkpointing=args.gradient_checkpointing, **_method_overrides(args, args.method))
    print(result.table())
    return 0


def cmd_download(args) -> int:
    from .data import download, registry

    if args.list or not args.name:
        for name, entry in registry().items():
            print(f"{name:8s} task={entry['task']:4s} {entry['description']}")
        return 0
    for split, path in download(args.name, args.dir, verify=not args.no_verify).items():
        print(f"{split}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser("compare", help="train and evaluate several methods, write the comparison")
    _add_run_options(compare)
    compare.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    compare.add_argument("--out", default="runs/compare", help="output folder (one sub-folder per method)")
    compare.set_defaults(func=cmd_compare)

    train = commands.add_parser("train", help="train and evaluate one method")
    _add_run_options(train)
    train.add_argument("--method", required=True, choices=METHODS)
    train.add_argument("--out", required=True, help="run folder")
    _add_method_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a run folder (or a base model) on a task's test split")
    evaluate.add_argument("--run", help="a run folder written by train/compare")
    evaluate.add_argument("--model", default="tiny", help="base model to evaluate when no --run is given")
    evaluate.add_argument("--task", choices=sorted(TASKS))
    evaluate.add_argument("--test-file")
    evaluate.add_argument("--eval-limit", type=int)
    evaluate.add_argument("--max-new-tokens", type=int)
    evaluate.add_argument("--out", help="where to write metrics.json and predictions.jsonl")
    evaluate.add_argument("--device")
    evaluate.add_argument("--dtype")
    evaluate.set_defaults(func=cmd_evaluate)

    params = commands.add_parser("params", help="trainable-parameter line of a method at full size (offline)")
    params.add_argument("--model", default="THUDM/chatglm-6b-int4")
    params.add_argument("--method", required=True, choices=METHODS)
    _add_method_options(params)
    params.set_defaults(func=cmd_params)

    estimate = commands.add_parser("estimate", help="predicted peak GPU memory of a method at full size (offline)")
    estimate.add_argument("--model", default="THUDM/chatglm-6b-int4")
    estimate.add_argument("--method", required=True, choices=METHODS)
    estimate.add_argument("--seq", type=int, default=512, help="tokens per row")
    estimate.add_argument("--bs", type=int, default=4, help="rows per batch")
    estimate.add_argument("--gradient-checkpointing", action="store_true")
    _add_method_options(estimate)
    estimate.set_defaults(func=cmd_estimate)

    download = commands.add_parser("download", help="fetch a full public dataset (spo, d2q, tnews)")
    download.add_argument("name", nargs="?")
    download.add_argument("--dir", help="target folder (default: the course cache)")
    download.add_argument("--list", action="store_true")
    download.add_argument("--no-verify", action="store_true")
    download.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nInterrupted. Run the same command again to resume from the last checkpoint.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
