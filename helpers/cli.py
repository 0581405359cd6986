"""Command line: ``python -m helpers compare|train|evaluate|params|estimate|download``.

Every option is checked before a model loads. A mistake the user can fix (a bad option, a missing or malformed
file, a run folder of another recipe) prints one line ``error: ...`` and exits with status 2; ``--debug`` shows
the traceback instead. Anything else is a bug and keeps its traceback (status 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path

from .data import TASKS
from .errors import UserError
from .methods import METHOD_DEFAULTS, METHODS, OPTION_FLAGS
from .recipe import (
    BIG_GPU_GIB,
    LEARNING_RATES,
    REAL_LEARNING_RATES,
    REAL_TRAINING,
    SMALL_GPU_SIZING,
    TINY_LENGTHS,
    TINY_STEPS,
    TINY_TRAINING,
)

EXIT_USER_ERROR = 2


def _defaults(name: str) -> str:
    """``tiny model: 8; ChatGLM-6B: 4`` for a training setting, from the recipe tables (steps: per task and method)."""
    tiny = TINY_TRAINING.get(name, "-")
    if name == "max_steps":
        tiny = "; ".join(f"{task}: {_rates(steps)}" for task, steps in TINY_STEPS.items())
    return f"tiny model: {tiny}; ChatGLM-6B: {REAL_TRAINING.get(name, '-')}"


def _rates(table: dict) -> str:
    return ", ".join(f"{method} {rate:g}" for method, rate in table.items())


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (defaults: the original course's)")
    freeze, ptuning, lora = METHOD_DEFAULTS["freeze"], METHOD_DEFAULTS["ptuning_v2"], METHOD_DEFAULTS["lora"]
    group.add_argument("--layers", type=int,
                       help=f"freeze: train the last N layers (default {freeze['layers']}, or all of a smaller model)")
    group.add_argument("--dequantize", action="store_true",
                       help="freeze: turn those layers' INT4 matrices into trainable fp32 Linear layers")
    group.add_argument("--pre-seq-len", type=int, help=f"ptuning_v2: prefix length (default {ptuning['pre_seq_len']})")
    group.add_argument("--no-projection", action="store_true", help="ptuning_v2: no MLP reparametrisation")
    group.add_argument("--r", type=int, help=f"lora: rank (default {lora['r']})")
    group.add_argument("--alpha", type=float, help=f"lora: scaling numerator (default {lora['alpha']})")
    group.add_argument("--lora-dropout", type=float, help=f"lora: dropout (default {lora['dropout']})")
    group.add_argument("--target-modules",
                       help=f"lora: comma-separated layer names (default {','.join(lora['target_modules'])})")


def _method_overrides(args: argparse.Namespace, method: str) -> dict:
    alpha = args.alpha
    if alpha is not None and float(alpha).is_integer():
        alpha = int(alpha)
    chosen = {
        "freeze": {"layers": args.layers, "dequantize": args.dequantize or None},
        "ptuning_v2": {"pre_seq_len": args.pre_seq_len, "prefix_projection": False if args.no_projection else None},
        "lora": {"r": args.r, "alpha": alpha, "dropout": args.lora_dropout,
                 "target_modules": args.target_modules.split(",") if args.target_modules else None},
    }
    for other, options in chosen.items():
        given = [OPTION_FLAGS[name] for name, value in options.items() if value is not None]
        if other != method and given:
            raise UserError(f"{given[0]} is an option of {other}, but this command uses --method {method}; "
                            f"drop {given[0]} or use --method {other}")
    return {k: v for k, v in chosen.get(method, {}).items() if v is not None}


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="'tiny' (embedded), a folder, or a hub name")
    parser.add_argument("--task", default="ie", choices=sorted(TASKS))
    parser.add_argument("--train-file", help="a JSON-lines training file (default: the bundled sample)")
    parser.add_argument("--test-file", help="a JSON-lines test file (default: the bundled sample)")
    parser.add_argument("--steps", type=int, help=f"training steps ({_defaults('max_steps')})")
    small_gpu = f"on a GPU under {BIG_GPU_GIB} GiB"
    parser.add_argument("--batch-size", type=int, help=f"rows per step and device ({_defaults('batch_size')}; "
                                                       f"{SMALL_GPU_SIZING['batch_size']} {small_gpu})")
    tiny_rates = "; ".join(f"{task}: {_rates(rates)}" for task, rates in LEARNING_RATES.items())
    parser.add_argument("--lr", type=float, help=f"learning rate (tiny model, {tiny_rates}; "
                                                 f"ChatGLM-6B: {_rates(REAL_LEARNING_RATES)})")
    accumulation = SMALL_GPU_SIZING["gradient_accumulation_steps"]
    parser.add_argument("--grad-accum", type=int, help=f"gradient accumulation steps (tiny model: 1, ChatGLM-6B: "
                                                       f"{REAL_TRAINING['gradient_accumulation_steps']}, or "
                                                       f"{accumulation} {small_gpu})")
    parser.add_argument("--warmup-steps", type=int, help=f"learning-rate warm-up ({_defaults('warmup_steps')}, "
                                                         "at most a fifth of --steps)")
    parser.add_argument("--save-steps", type=int, help=f"steps between checkpoints ({_defaults('save_steps')})")
    parser.add_argument("--generated-rows", type=int,
                        help="ie: also train on N rows recombined from the train file's triples (default 0; "
                             "helpers/augment.py)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help=f"recompute activations in the backward pass (on by default {small_gpu})")
    parser.add_argument("--deepspeed", help="a DeepSpeed config (configs/deepspeed_zero2.json or _zero3.json)")
    parser.add_argument("--max-source-length", type=int, help="tokens of prompt and text (default: the task's; "
                                                              f"{TINY_LENGTHS['max_source_length']} for the tiny "
                                                              "model)")
    parser.add_argument("--max-target-length", type=int, help="tokens of the answer in training (default: the "
                                                              f"task's; {TINY_LENGTHS['max_target_length']} for the "
                                                              "tiny model)")
    parser.add_argument("--eval-limit", type=int, help="evaluate on the first N test examples only")
    parser.add_argument("--max-new-tokens", type=int, help="longest generated answer in evaluation")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="fp32, fp16 or bf16 (default: fp32 on CPU, bf16/fp16 on GPU)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fresh", action="store_true",
                        help="start over: remove the earlier run in --out instead of resuming or reusing it")
    parser.add_argument("--reevaluate", action="store_true",
                        help="a finished run is evaluated again into a new eval-<time>/ subfolder")


def _training(args) -> dict:
    chosen = {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
              "gradient_accumulation_steps": args.grad_accum, "warmup_steps": args.warmup_steps,
              "save_steps": args.save_steps, "gradient_checkpointing": args.gradient_checkpointing or None,
              "deepspeed": args.deepspeed, "generated_rows": args.generated_rows}
    return {k: v for k, v in chosen.items() if v is not None}


def _lengths(args) -> dict:
    return {"max_source_length": args.max_source_length, "max_target_length": args.max_target_length,
            "max_new_tokens": args.max_new_tokens}


def cmd_compare(args) -> int:
    from .pipeline import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    summary = compare(
        model=args.model, task=args.task, methods=methods, out=args.out, training=_training(args),
        lengths=_lengths(args), train_file=args.train_file, test_file=args.test_file, eval_limit=args.eval_limit,
        device=args.device, dtype=args.dtype, seed=args.seed, resume=not args.fresh, reevaluate=args.reevaluate,
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
    from .pipeline import run_recipe
    from .recipe import resolve_recipe

    recipe = resolve_recipe(
        args.model, args.method, args.task, method_options=_method_overrides(args, args.method),
        training={**_training(args), "seed": args.seed}, lengths=_lengths(args), eval_limit=args.eval_limit,
        train_file=args.train_file, test_file=args.test_file, device=args.device, dtype=args.dtype,
    )
    metrics = run_recipe(recipe, args.out, resume=not args.fresh, reevaluate=args.reevaluate)
    if metrics:  # empty on the helper processes of a distributed run
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


def cmd_evaluate(args) -> int:
    from .recipe import resolve_recipe

    if args.run:
        return _evaluate_run(args)
    if args.out:
        from .runs import check_out_folder

        check_out_folder(args.out, purpose="evaluation")
    recipe = resolve_recipe(args.model or "tiny", None, args.task or "ie",
                            lengths={"max_new_tokens": args.max_new_tokens}, eval_limit=args.eval_limit,
                            test_file=args.test_file, device=args.device, dtype=args.dtype)
    from .data import load_split
    from .evaluation import evaluate
    from .models import load_model

    model, tokenizer = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    examples = load_split(recipe.task, "test", recipe.test_file, limit=recipe.eval_limit)
    metrics = evaluate(model, tokenizer, recipe.task_spec(), examples, out_dir=args.out, **recipe.evaluation_options())
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


def _evaluate_run(args) -> int:
    """``evaluate --run R``: check the run's record and artifact, then evaluate into R/eval-<time>/ or --out."""
    from .pipeline import recipe_for_evaluation, reevaluate_run
    from .runs import ARTIFACT, RunRecord, artifact_problem

    record = RunRecord.load(args.run)
    if not record.trained:
        raise UserError(f"{record.summary()}: its training did not finish, so there is nothing to evaluate; run its "
                        "train command again to resume it")
    problem = artifact_problem(record.folder / ARTIFACT)
    if problem:
        raise UserError(f"{problem}; the run's artifact is incomplete: train it again with --fresh")
    recipe = recipe_for_evaluation(record, task=args.task, test_file=args.test_file, eval_limit=args.eval_limit,
                                   max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
                                   model=args.model)
    metrics = reevaluate_run(record, recipe, out_dir=args.out)
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


def cmd_params(args) -> int:
    from .methods import apply_method
    from .models import meta_model
    from .recipe import resolve_recipe

    recipe = resolve_recipe(args.model, args.method, method_options=_method_overrides(args, args.method),
                            device="cpu", check_data=False)
    setup = apply_method(meta_model(recipe.model), recipe.method, **recipe.method_options)
    print(setup)
    return 0


def cmd_estimate(args) -> int:
    from .estimate import estimate
    from .recipe import resolve_recipe

    if args.bs is not None and args.bs < 1:
        raise UserError(f"--bs must be at least 1 (rows per batch), got {args.bs}")
    recipe = resolve_recipe(
        args.model, args.method, args.task, method_options=_method_overrides(args, args.method),
        training={"batch_size": args.bs, "gradient_checkpointing": args.gradient_checkpointing or None},
        device="cpu", gpu_memory_gib=args.gpu_memory, check_data=False,
    )
    seq = args.seq if args.seq is not None else recipe.lengths.max_source_length + recipe.lengths.max_target_length
    if args.seq is not None:
        from .models import model_config

        longest = model_config(recipe.model).max_sequence_length
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= longest:
            raise UserError(f"--seq must be a whole number of tokens between 1 and {longest} (the model's "
                            f"max_sequence_length), got {seq}")
    result = estimate(recipe.model, recipe.method, seq=seq, batch=recipe.training.batch_size,
                      gradient_checkpointing=recipe.training.gradient_checkpointing, device=args.device,
                      **recipe.method_options)
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


# ----------------------------------------------------------------------------------------------------------
# The commands: one function each adds its sub-parser; add a command by adding a function to COMMANDS
# ----------------------------------------------------------------------------------------------------------


def add_compare(commands) -> None:
    compare = commands.add_parser("compare", help="train and evaluate several methods, write the comparison")
    _add_run_options(compare)
    compare.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    compare.add_argument("--out", default="runs/compare", help="output folder (one sub-folder per method)")
    compare.set_defaults(func=cmd_compare)


def add_train(commands) -> None:
    train = commands.add_parser("train", help="train and evaluate one method")
    _add_run_options(train)
    train.add_argument("--method", required=True, choices=METHODS)
    train.add_argument("--out", required=True, help="run folder")
    _add_method_options(train)
    train.set_defaults(func=cmd_train)


def add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="evaluate a run folder (or a base model) on a task's test split")
    evaluate.add_argument("--run", help="a finished run folder written by train/compare")
    evaluate.add_argument("--model", help="the base model to evaluate when no --run is given (default: tiny); with "
                                          "--run: where the run's base model is now, if it moved")
    evaluate.add_argument("--task", choices=sorted(TASKS))
    evaluate.add_argument("--test-file")
    evaluate.add_argument("--eval-limit", type=int)
    evaluate.add_argument("--max-new-tokens", type=int)
    evaluate.add_argument("--out", help="where to write metrics.json and predictions.jsonl (with --run: default "
                                        "a new eval-<time>/ in the run; never the run folder itself)")
    evaluate.add_argument("--device")
    evaluate.add_argument("--dtype")
    evaluate.set_defaults(func=cmd_evaluate)


def add_params(commands) -> None:
    params = commands.add_parser("params", help="trainable-parameter line of a method at full size (offline)")
    params.add_argument("--model", default="THUDM/chatglm-6b-int4")
    params.add_argument("--method", required=True, choices=METHODS)
    _add_method_options(params)
    params.set_defaults(func=cmd_params)


def add_estimate(commands) -> None:
    estimate = commands.add_parser("estimate", help="predicted peak memory (GPU or CPU) of a method at full size "
                                                    "(offline)")
    estimate.add_argument("--model", default="THUDM/chatglm-6b-int4")
    estimate.add_argument("--method", required=True, choices=METHODS)
    estimate.add_argument("--task", default="ie", choices=sorted(TASKS), help="gives the default --seq")
    estimate.add_argument("--seq", type=int, help="tokens per row (default: the task's source + target lengths)")
    estimate.add_argument("--bs", type=int, help="rows per batch (default: what training uses for that GPU)")
    estimate.add_argument("--gpu-memory", type=float, help="size the batch as training would for a GPU of this "
                                                           "many GiB (e.g. 15 for a T4)")
    estimate.add_argument("--gradient-checkpointing", action="store_true")
    estimate.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                          help="cuda: GPU memory (fp16 compute, CUDA context); cpu: process memory (fp32 compute)")
    _add_method_options(estimate)
    estimate.set_defaults(func=cmd_estimate)


def add_download(commands) -> None:
    download = commands.add_parser("download", help="fetch a full public dataset (spo, d2q, tnews)")
    download.add_argument("name", nargs="?")
    download.add_argument("--dir", help="target folder (default: the course cache)")
    download.add_argument("--list", action="store_true")
    download.add_argument("--no-verify", action="store_true")
    download.set_defaults(func=cmd_download)


def cmd_build_tiny(args) -> int:
    from .tiny import build_from_options

    build_from_options(args)
    return 0


def add_build_tiny(commands) -> None:
    from .tiny import BUILD_DESCRIPTION, parser

    build = commands.add_parser("build-tiny", parents=[parser(add_help=False)], help="pretrain the embedded tiny "
                                "model (the committed one is data/tiny)", description=BUILD_DESCRIPTION)
    build.set_defaults(func=cmd_build_tiny)


COMMANDS = [add_compare, add_train, add_evaluate, add_params, add_estimate, add_download, add_build_tiny]


class OneLineParser(argparse.ArgumentParser):
    """argparse with its mistakes in one line (what, which command, where the options are listed), status 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {' '.join(message.split())} ({self.prog}); see {self.prog} --help\n")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line, ``warning: ...``, without the source line that Python prints by default."""
    return f"warning: {' '.join(str(message).split())}\n"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also accepted "
                                                             "after the command)")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def one_line(error: BaseException) -> str:
    """The error as one line: ``error: what, where, what to do`` (newlines in the message become spaces)."""
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"  # as raised by open(): the file and what the system said
    return "error: " + " ".join(text.split())


def _is_user_error(error: BaseException) -> bool:
    """Errors a user can fix: ours, missing or unreadable files, and a GPU that is out of memory."""
    if isinstance(error, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    args = build_parser().parse_args(argv)
    shown = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nInterrupted. Run the same command again to resume from the last checkpoint.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into the user's mistakes and bugs just below
        if not _is_user_error(error):
            raise
        if debug:
            traceback.print_exc()
        message = one_line(error)
        import torch

        if isinstance(error, torch.cuda.OutOfMemoryError):
            message = ("error: the GPU ran out of memory; try --batch-size 1 --grad-accum 8 --gradient-checkpointing, "
                       "or a shorter --max-source-length")
        print(message, file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
