"""The embedded default model: a tiny ChatGLM pretrained on the bundled corpus, so the course runs without a GPU.

Recipe: train a small sentencepiece vocabulary with ChatGLM's special pieces on the bundled texts, build a small
GLM (same architecture, 4 layers, hidden 256), pretrain it with ChatGLM's own layout (``[gMASK] <sop>`` then
the answer) on plain continuation and instruction-style exercises made from the general corpus
(:mod:`helpers.pretraining`), quantize it to INT4 and write it in exactly the layout of the public
THUDM/chatglm-6b-int4 folder (``config.json`` with its ``auto_map``, ``pytorch_model.bin``, ``ice_text.model``,
``tokenizer_config.json``). ``load_model("tiny")`` then reads it through the same ``from_pretrained`` path as
the real checkpoint.

Pretraining takes longer than a first use should wait, so the result of the default recipe is committed in
``data/tiny/`` and used as long as its recorded key matches the recipe (recipe fields, build version, corpus).
Any other recipe is built on first use (deterministic on one device) and cached by its key;
``python -m helpers build-tiny`` (:func:`main`) rebuilds the committed weights or builds variants.
"""

from __future__ import annotations

import argparse
import copy as copy_module
import dataclasses
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer
from chatglm.configuration import MODEL_AUTO_MAP, vocabulary_fields
from chatglm.vocab import train_compatible_vocab, write_tokenizer_files

from ..errors import UserError
from ..files import DATA_DIR, cache_root
from ..tasks import IGNORE_INDEX, TASKS, Collator, bundled_path
from ..tasks.rows import read_examples
from .pretraining import Exercise, exercises

BUILD_VERSION = 4  # bump when the build code changes in a way that changes the result


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that decides the tiny model; its hash (with the files the build reads) names the cache folder."""

    seed: int = 0
    vocab_size: int = 3000  # learned pieces, before ChatGLM's 344 fixed ones
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 8
    inner_hidden_size: int = 1024
    max_sequence_length: int = 1024
    steps: int = 10000
    batch_size: int = 16
    max_tokens: int = 192  # per pretraining row
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    quantization_bit: int = 4

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        digest.update(str(BUILD_VERSION).encode())
        for path in source_files():
            digest.update(path.read_bytes())
        return digest.hexdigest()[:12]


def corpus_files() -> list[Path]:
    return [DATA_DIR / "corpus" / "pretrain.txt"]


def task_files(task: str) -> list[Path]:
    """The bundled files of ``task`` whose texts the vocabulary is trained on (never pretrained on)."""
    return [bundled_path(task, split) for split in ("train", "test")]


def source_files() -> list[Path]:
    """Every file the build reads, so that the recipe's key changes when any of them does."""
    return corpus_files() + [path for task in TASKS for path in task_files(task)]


def _corpus_lines() -> list[str]:
    lines = []
    for path in corpus_files():
        lines.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return lines


def _vocab_texts() -> list[str]:
    """The corpus plus the bundled task texts and prompts, so the vocabulary covers what the course feeds in."""
    texts = _corpus_lines()
    for task in TASKS.values():
        texts.append(task.prompt)
        for path in task_files(task.name):
            for example in read_examples(path, task.name, group_references=True):
                texts.append(example.text)
                texts.extend(example.targets)
    return texts


def _config(recipe: TinyRecipe, tokenizer: ChatGLMTokenizer) -> ChatGLMConfig:
    return ChatGLMConfig(
        hidden_size=recipe.hidden_size,
        num_layers=recipe.num_layers,
        num_attention_heads=recipe.num_attention_heads,
        inner_hidden_size=recipe.inner_hidden_size,
        max_sequence_length=recipe.max_sequence_length,
        **vocabulary_fields(tokenizer),
    )


def _ids(tokenizer: ChatGLMTokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) if text else []


def encode_exercise(tokenizer: ChatGLMTokenizer, exercise: Exercise, max_tokens: int) -> dict[str, list[int]]:
    """``instruction + text [gMASK] <sop> answer <eop>`` (each part tokenized on its own, as the tasks do).

    The text is cut so that the row fits ``max_tokens``, then the answer; the labels start at ``<sop>``.
    """
    instruction, answer = _ids(tokenizer, exercise.instruction), _ids(tokenizer, exercise.answer)
    answer = answer[: max(1, max_tokens // 2)]
    room = max(0, max_tokens - len(instruction) - len(answer) - 3)
    source = instruction + _ids(tokenizer, exercise.text)[:room] + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    input_ids = source + answer + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * (len(source) - 1) + input_ids[len(source) - 1 :]
    return {"input_ids": input_ids, "labels": labels}


def span_pieces(tokenizer: ChatGLMTokenizer) -> list[str]:
    """The vocabulary's learned pieces (in id order, without the word-start mark), of which novel spans are made."""
    specials = set(tokenizer.all_special_tokens)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return list(dict.fromkeys(p.replace("\u2581", "") for p, _ in vocab if p not in specials and not p.startswith("<")))


def _pretraining_rows(tokenizer: ChatGLMTokenizer, recipe: TinyRecipe, rng: random.Random, lines: list[str],
                      pieces: list[str]) -> list[dict]:
    """One pass of exercises over the corpus ``lines`` (:mod:`helpers.pretraining`), tokenized."""
    return [encode_exercise(tokenizer, e, recipe.max_tokens) for e in exercises(lines, rng, pieces)]


def _batches(rows: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffled batches of rows of similar length (less padding): sort chunks of 8 batches by length, then split."""
    rng.shuffle(rows)
    chunk = 8 * batch_size
    batches = []
    for start in range(0, len(rows) - batch_size + 1, chunk):
        part = sorted(rows[start : start + chunk], key=lambda r: len(r["input_ids"]))
        batches.extend(part[i : i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size))
    rng.shuffle(batches)
    return batches


def pretrain(model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer, recipe: TinyRecipe,
             progress: bool = True, on_step: Callable[[int, list[float]], None] | None = None) -> list[float]:
    """Deterministic pretraining on fresh exercises each pass over the corpus; returns the loss per step.

    ``on_step(step, losses)`` is called after every optimizer step (1-based), e.g. to save snapshots.
    """
    from tqdm.auto import tqdm

    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    collate = Collator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))

    warmup = max(1, min(recipe.warmup_steps, recipe.steps // 10))  # short test builds warm up for a tenth

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, recipe.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses, batches = [], []
    lines, pieces = _corpus_lines(), span_pieces(tokenizer)  # read once, not once per pass
    bar = tqdm(range(recipe.steps), desc="pretraining the tiny model", disable=not progress)
    for step in bar:
        if not batches:
            rows = _pretraining_rows(tokenizer, recipe, rng, lines, pieces)  # fresh exercises each pass
            batches = _batches(rows, recipe.batch_size, rng)
        batch = {k: v.to(device) for k, v in collate(batches.pop()).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if on_step is not None:
            on_step(step + 1, losses)
    model.eval()
    return losses


def write_public_layout(model: ChatGLMForConditionalGeneration, folder: Path, model_file: Path) -> None:
    """Write ``model`` (fp16) like the public THUDM folders: config.json, pytorch_model.bin, tokenizer files."""
    model = model.half()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("dtype", "transformers_version")}
    config.update(architectures=["ChatGLMModel"], auto_map=MODEL_AUTO_MAP, torch_dtype="float16")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    torch.save(model.public_state_dict(), folder / "pytorch_model.bin")
    write_tokenizer_files(model_file, folder, auto_map=True)


def _summary(recipe: TinyRecipe, losses: list[float], started: float, **extra) -> dict:
    return {
        "recipe": dataclasses.asdict(recipe),
        "key": recipe.key(),
        "first_loss": losses[0],
        "last_loss": sum(losses[-20:]) / len(losses[-20:]),
        "build_seconds": round(time.time() - started, 1),
        **extra,
    }


def _write_quantized(model: ChatGLMForConditionalGeneration, recipe: TinyRecipe, folder: Path, model_file: Path,
                     summary: dict) -> None:
    model.quantize(recipe.quantization_bit)
    write_public_layout(model, folder, model_file)
    (folder / "tiny_recipe.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def build_tiny(folder: Path, recipe: TinyRecipe = TinyRecipe(), progress: bool = True, snapshot_every: int = 0,
               device: str = "cpu") -> dict:
    """Build the tiny model into ``folder`` (which must not exist yet); returns a summary.

    With ``snapshot_every`` N, an INT4 copy of the model after every N steps is also written next to ``folder``
    as ``<folder>-step<N>`` (to pick the length of pretraining). Results are reproducible on the same device.
    """
    started = time.time()
    folder.mkdir(parents=True)
    torch.manual_seed(recipe.seed)
    with tempfile.TemporaryDirectory() as scratch:
        model_file = train_compatible_vocab(
            _vocab_texts(), Path(scratch) / "ice_text.model", vocab_size=recipe.vocab_size, seed=recipe.seed,
            character_coverage=1.0,
        )
        write_tokenizer_files(model_file, scratch)
        tokenizer = ChatGLMTokenizer.from_pretrained(scratch)
        model = ChatGLMForConditionalGeneration(_config(recipe, tokenizer)).to(device)

        def snapshot(step: int, losses: list[float]) -> None:
            if snapshot_every and step % snapshot_every == 0 and step < recipe.steps:
                target = folder.parent / f"{folder.name}-step{step}"
                target.mkdir(parents=True, exist_ok=True)
                copy = copy_module.deepcopy(model).cpu().eval()  # deepcopy draws no random numbers
                _write_quantized(copy, recipe, target, model_file, _summary(recipe, losses, started, steps_done=step))

        losses = pretrain(model, tokenizer, recipe, progress=progress, on_step=snapshot)
        summary = _summary(recipe, losses, started, device=device)
        _write_quantized(model.cpu(), recipe, folder, model_file, summary)
    return summary


SHIPPED_DIR = DATA_DIR / "tiny"  # the pretrained default, committed with the course (see ``main``)


def tiny_dir(recipe: TinyRecipe = TinyRecipe()) -> Path:
    return cache_root() / "tiny" / recipe.key()


def shipped_tiny(recipe: TinyRecipe = TinyRecipe()) -> Path | None:
    """The committed checkpoint if it was built from exactly ``recipe`` (same key), else None."""
    summary = SHIPPED_DIR / "tiny_recipe.json"
    if not summary.exists():
        return None
    return SHIPPED_DIR if json.loads(summary.read_text(encoding="utf-8")).get("key") == recipe.key() else None


def ensure_tiny(recipe: TinyRecipe = TinyRecipe(), progress: bool = True) -> Path:
    """The tiny model folder for ``recipe``: the committed one if it matches, else the cache, built on first use.

    Builds are atomic: a folder is never half-written.
    """
    shipped = shipped_tiny(recipe)
    if shipped is not None:
        return shipped
    target = tiny_dir(recipe)
    if (target / "tiny_recipe.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        if progress:
            print(f"Building the embedded tiny ChatGLM ({recipe.steps} pretraining steps; the committed weights "
                  f"in {SHIPPED_DIR} do not match this recipe, or a file they were built from changed: "
                  f"{', '.join(p.relative_to(DATA_DIR).as_posix() for p in source_files())}; to train on other "
                  f"data, pass --train-file instead of editing those) into {target}")
        build_tiny(staging / "model", recipe, progress=progress)
        try:
            (staging / "model").rename(target)
        except OSError:
            if not (target / "tiny_recipe.json").exists():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


BUILD_DESCRIPTION = "Pretrain the embedded tiny ChatGLM (deterministic) and write it in the public INT4 layout."


def parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Options of ``python -m helpers build-tiny``: one per recipe field, plus where to write and snapshots."""
    parser = argparse.ArgumentParser(prog="python -m helpers build-tiny", description=BUILD_DESCRIPTION,
                                     add_help=add_help)
    defaults = TinyRecipe()
    for field in dataclasses.fields(TinyRecipe):
        value = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(value), default=value,
                            help=f"recipe field (default {value})")
    parser.add_argument("--out", default=None,
                        help=f"folder to create (default: the cache folder of the recipe; use {SHIPPED_DIR.name} "
                             f"under data/ to replace the committed weights)")
    parser.add_argument("--snapshot-every", type=int, default=0, help="also write a copy every N steps")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (results are reproducible per device)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m helpers build-tiny``: build the recipe given by the options; prints and returns the summary."""
    return build_from_options(parser().parse_args(argv))


def build_from_options(args: argparse.Namespace) -> dict:
    """Build the recipe that the parsed ``build-tiny`` options describe."""
    recipe = TinyRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinyRecipe)})
    for field in ("steps", "batch_size", "hidden_size", "num_layers", "num_attention_heads", "vocab_size"):
        if getattr(recipe, field) < 1:
            raise UserError(f"--{field.replace('_', '-')} must be at least 1, got {getattr(recipe, field)}")
    out = Path(args.out) if args.out else tiny_dir(recipe)
    if out.exists():
        if not args.force:
            raise UserError(f"--out {out} already exists; pass --force to replace it or choose another folder")
        if any(out.iterdir()) and not (out / "tiny_recipe.json").exists():
            raise UserError(f"--out {out} holds other files, not a tiny model (no tiny_recipe.json); --force only "
                            "replaces a tiny model folder: choose a new folder")
        shutil.rmtree(out)
    summary = build_tiny(out, recipe, progress=True, snapshot_every=args.snapshot_every, device=args.device)
    print(json.dumps(summary, indent=2))
    print(f"written to {out}")
    return summary
