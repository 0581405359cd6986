"""Command line: ``python -m helpers compare|train|evaluate|chat|params|estimate|download|export-runs|build-tiny``.

The run options are the recipe's settings (:mod:`helpers.run.recipe`) and the methods' options
(:data:`helpers.methods.METHOD_OPTIONS`), built from their declarations: one ``--flag`` per setting, its help and its
default from the same place the run reads. Every option is checked before a model loads. A mistake the user can fix
(a bad option, a missing or malformed file, a run folder of another recipe) prints one line ``error: ...`` and exits
with status 2; ``--debug`` shows the traceback instead. Anything else is a bug and keeps its traceback (status 1).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import traceback
import warnings
from pathlib import Path

from .errors import UserError
from .methods import METHOD_DEFAULTS, METHOD_OPTIONS, METHODS
from .run.recipe import EVALUATION_SETTINGS, FIELDS, add_options, default_help, given_settings
from .tasks import TASKS

EXIT_USER_ERROR = 2


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (defaults: the original course's)")
    defaults = {name: value for options in METHOD_DEFAULTS.values() for name, value in options.items()}
    for name, spec in METHOD_OPTIONS.items():
        default = defaults[name]
        shown = ",".join(default) if isinstance(default, (list, tuple)) else default
        if spec["type"] is bool:  # a switch that turns the default around
            group.add_argument(spec["flag"], dest=name, action="store_const", const=not default, help=spec["help"])
        else:
            group.add_argument(spec["flag"], *spec.get("aliases", ()), dest=name, type=spec["type"],
                               help=f"{spec['help']} (default {shown})")


def method_options(args: argparse.Namespace) -> dict:
    """The method options given on the command line (one of another method is refused when the recipe resolves)."""
    given = {name: getattr(args, name) for name in METHOD_OPTIONS if getattr(args, name, None) is not None}
    if isinstance(given.get("alpha"), float) and given["alpha"].is_integer():
        given["alpha"] = int(given["alpha"])
    return given


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help=FIELDS["model"].metadata["help"])
    parser.add_argument("--task", default="ie", choices=sorted(TASKS))
    add_options(parser, defaults_help=default_help())


def cmd_compare(args) -> int:
    from .run.pipeline import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    summary = compare(args.model, args.task, methods, args.out, fresh=args.fresh, reevaluate=args.reevaluate,
                      **given_settings(args))
    out = Path(summary["out"])
    if "files" not in summary:  # a helper process of a distributed run
        return 0
    print()
    print((out / "comparison.md").read_text(encoding="utf-8"))
    print(f"Finished in {summary['wall_time_s'] / 60:.1f} min. Outputs in {out}/: comparison.png, comparison.md, "
          f"comparison.json, and one run folder per method (loss history, metrics, predictions, artifact, tb/).")
    return 0


def cmd_train(args) -> int:
    from .run.folder import check_out_folder
    from .run.pipeline import run_recipe
    from .run.recipe import resolve_recipe

    check_out_folder(args.out)
    recipe = resolve_recipe(args.model, args.method, args.task, method_options=method_options(args),
                            **given_settings(args))
    metrics = run_recipe(recipe, args.out, fresh=args.fresh, reevaluate=args.reevaluate)
    if metrics:  # empty on the helper processes of a distributed run
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


def cmd_evaluate(args) -> int:
    from .run.folder import check_out_folder

    settings = given_settings(args)
    if args.out:
        check_out_folder(args.out, purpose="evaluation")
    if settings.get("device", "cpu") == "cpu":
        _expect(args.model, args.run, "evaluate", settings.get("dtype"))
    if args.run:
        from .run.artifacts import check_artifact
        from .run.pipeline import recipe_for_evaluation, reevaluate_run
        from .run.record import ARTIFACT, RunRecord

        record = RunRecord.load(args.run)
        if not record.trained:
            raise UserError(f"{record.summary()}: its training did not finish, so there is nothing to evaluate; run "
                            "its train command again to resume it")
        check_artifact(record.folder / ARTIFACT)
        recipe = recipe_for_evaluation(record, model=args.model, task=args.task, **settings)
        metrics = reevaluate_run(record, recipe, out_dir=args.out)
    else:
        from .models import load_model
        from .run.evaluation import evaluate_recipe
        from .run.recipe import resolve_recipe

        recipe = resolve_recipe(args.model or "tiny", None, args.task or "ie", **settings)
        model, tokenizer = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
        metrics = evaluate_recipe(model, tokenizer, recipe, args.out, save_metrics=bool(args.out))
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


def cmd_params(args) -> int:
    from .methods import apply_method
    from .models import meta_model
    from .run.recipe import resolve_recipe

    recipe = resolve_recipe(args.model, args.method, method_options=method_options(args), device="cpu",
                            check_data=False)
    print(apply_method(meta_model(recipe.model), recipe.method, **recipe.method_options))
    return 0


def cmd_estimate(args) -> int:
    from .estimate import estimate
    from .models import model_config
    from .run.recipe import resolve_recipe

    if args.bs is not None and args.bs < 1:
        raise UserError(f"--bs must be at least 1 (rows per batch), got {args.bs}")
    recipe = resolve_recipe(args.model, args.method, args.task, method_options=method_options(args),
                            batch_size=args.bs, gradient_checkpointing=args.gradient_checkpointing, device="cpu",
                            gpu_memory_gib=args.gpu_memory, check_data=False)
    seq = args.seq if args.seq is not None else recipe.max_source_length + recipe.max_target_length
    longest = model_config(recipe.model).max_sequence_length
    if not 1 <= seq <= longest:
        raise UserError(f"--seq must be a whole number of tokens between 1 and {longest} (the model's "
                        f"max_sequence_length), got {seq}")
    result = estimate(recipe.model, recipe.method, seq=seq, batch=recipe.batch_size,
                      gradient_checkpointing=recipe.gradient_checkpointing, device=args.device, **recipe.method_options)
    print(result.table())
    return 0


def cmd_download(args) -> int:
    from .tasks.download import download, registry

    if args.list or not args.name:
        for name, entry in registry().items():
            print(f"{name:8s} task={entry['task']:4s} {entry['description']}")
        return 0
    for split, path in download(args.name, args.dir, verify=not args.no_verify).items():
        print(f"{split}: {path}")
    return 0


def cmd_chat(args) -> int:
    from .chat import converse, messages, open_session

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if (args.device or "cpu") == "cpu":
        _expect(args.model, args.run, "chat", args.dtype)
    session = open_session(args.model, args.run, args.task, args.device, args.dtype, args.max_new_tokens,
                           args.side_by_side)
    _report_kernel(session.model)
    converse(session, messages(args.prompt), side_by_side=args.side_by_side)
    return 0


def _expect(model: str | None, run: str | None, what: str, dtype: str | None = None) -> None:
    """One line before a full-size model loads on a CPU: the memory it will take and how its speed is reported."""
    from .models import DTYPES, default_dtype, dtype_name, is_small_model
    from .run.record import RunRecord

    name = model or (RunRecord.load(run).base_model() if run else "tiny")
    if is_small_model(name):
        return
    from .estimate import estimate_generation

    chosen = DTYPES[dtype_name(dtype)] if dtype else default_dtype("cpu", small=False)
    memory = estimate_generation(name, device="cpu", compute_bytes=chosen.itemsize).total / (1 << 30)
    print(f"{what}: loading {name} in {dtype_name(chosen)}, about {memory:.1f} GiB of memory (estimate; more for "
          "long prompts or batches); the speed is shown as it goes")


def _report_kernel(model) -> None:
    from chatglm.quantization import kernel_report

    print(f"matmul: {kernel_report(model)}; computing in {str(next(model.parameters()).dtype).replace('torch.', '')}")


def cmd_export_runs(args) -> int:
    from .run.bundle import export_runs

    runs = export_runs(args.runs_dir, args.out)
    for run in runs:
        print(f"  {run.path.name}: {run.method} on task {run.task}, {run.origin()}")
    size = Path(args.out).stat().st_size
    print(f"Wrote {args.out}: {len(runs)} run{'s' if len(runs) != 1 else ''}, {size / 1024:.1f} KiB (records, loss "
          "histories, metrics and predictions; no weights)")
    return 0


def cmd_build_tiny(args) -> int:
    from .tiny import build_from_options

    build_from_options(args)
    return 0


# ----------------------------------------------------------------------------------------------------------
# The commands: one function each adds its sub-parser; add a command by adding a function to COMMANDS
# ----------------------------------------------------------------------------------------------------------


def add_compare(commands) -> None:
    compare = commands.add_parser("compare", help="train and evaluate several methods, write the comparison")
    _add_run_options(compare)
    compare.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    compare.add_argument("--out", default="runs/compare", help="output folder (one sub-folder per method)")
    _add_rerun_options(compare)
    compare.set_defaults(func=cmd_compare)


def _add_rerun_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fresh", action="store_true",
                        help="start over: remove the earlier run in --out instead of resuming or reusing it")
    parser.add_argument("--reevaluate", action="store_true",
                        help="a finished run is evaluated again into a new eval-<time>/ subfolder")


def add_train(commands) -> None:
    train = commands.add_parser("train", help="train and evaluate one method")
    _add_run_options(train)
    train.add_argument("--method", required=True, choices=METHODS)
    train.add_argument("--out", required=True, help="run folder")
    _add_rerun_options(train)
    _add_method_options(train)
    train.set_defaults(func=cmd_train)


def add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="evaluate a run folder (or a base model) on a task's test split")
    evaluate.add_argument("--run", help="a finished run folder written by train/compare")
    evaluate.add_argument("--model", help="the base model to evaluate when no --run is given (default: tiny); with "
                                          "--run: where the run's base model is now, if it moved")
    evaluate.add_argument("--task", choices=sorted(TASKS))
    evaluate.add_argument("--out", help="where to write metrics.json and predictions.jsonl (with --run: default "
                                        "a new eval-<time>/ in the run; never the run folder itself)")
    add_options(evaluate, (*EVALUATION_SETTINGS, "device", "dtype"), default_help())
    evaluate.set_defaults(func=cmd_evaluate)


def add_chat(commands) -> None:
    chat = commands.add_parser("chat", help="talk to a model, streamed: the base model, a run, or both side by side")
    chat.add_argument("--model", help="the base model (default: tiny; with --run: where its base model is now)")
    chat.add_argument("--run", help="a finished run folder: chat with the fine-tuned model")
    chat.add_argument("--side-by-side", action="store_true", help="with --run: the base model's answer first, then "
                                                                  "the fine-tuned one's")
    chat.add_argument("--task", choices=sorted(TASKS), help="answer in the task's layout (default: the run's task; "
                                                            "without a run, ChatGLM's chat layout)")
    chat.add_argument("--prompt", help="one message to answer (default: read messages line by line until EOF)")
    add_options(chat, ("max_new_tokens", "device", "dtype"))
    chat.set_defaults(func=cmd_chat)


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
    estimate.add_argument("--gradient-checkpointing", action="store_const", const=True)
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


def add_export_runs(commands) -> None:
    export = commands.add_parser("export-runs", help="bundle finished runs into a small zip to share (no weights)")
    export.add_argument("runs_dir", metavar="RUNS_DIR", help="a folder of run folders (runs/compare-ie), or one run "
                                                             "folder")
    export.add_argument("--out", required=True, help="the new bundle, NAME.zip (never overwritten)")
    export.set_defaults(func=cmd_export_runs)


def add_build_tiny(commands) -> None:
    from .tiny import BUILD_DESCRIPTION, parser

    build = commands.add_parser("build-tiny", parents=[parser(add_help=False)], help="pretrain the embedded tiny "
                                "model (the committed one is data/tiny)", description=BUILD_DESCRIPTION)
    build.set_defaults(func=cmd_build_tiny)


COMMANDS = [add_compare, add_train, add_evaluate, add_chat, add_params, add_estimate, add_download, add_export_runs,
            add_build_tiny]


class OneLineParser(argparse.ArgumentParser):
    """argparse with its mistakes in one line (what, which command, where the options are listed), status 2."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {' '.join(message.split())} ({self.prog}); see {self.prog} --help\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option is reported by the command it was given to, with the nearest name."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(parsed, "command", None), self)
            known = [flag for flag in command._option_string_actions if flag.startswith("--")]
            unknown = [arg.split("=")[0] for arg in extras if arg.startswith("-")]
            near = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.75) if unknown else []
            hint = f"; did you mean {near[0]}?" if near else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed


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
    parser.commands = dict(commands.choices)
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
