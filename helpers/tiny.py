"""The embedded default model: a tiny ChatGLM built from the bundled corpus, so the course runs without a GPU.

Recipe: train a small sentencepiece vocabulary with ChatGLM's special pieces on the bundled texts, build a small
GLM (same architecture, a few layers), pretrain it briefly with ChatGLM's own objective (continue a text after
``[gMASK] <sop>``), quantize it to INT4 and write it in exactly the layout of the public THUDM/chatglm-6b-int4
folder (``config.json`` with its ``auto_map``, ``pytorch_model.bin``, ``ice_text.model``,
``tokenizer_config.json``). ``load_model("tiny")`` then reads it through the same ``from_pretrained`` path as
the real checkpoint. The result is deterministic from its recipe and cached; it is rebuilt only when the recipe,
the corpus or the build code changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer
from chatglm.configuration import MODEL_AUTO_MAP, vocabulary_fields
from chatglm.vocab import train_compatible_vocab, write_tokenizer_files

from .data import IGNORE_INDEX, TASKS, Collator, read_examples
from .paths import DATA_DIR, cache_root

BUILD_VERSION = 2  # bump when the build code changes in a way that changes the result


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that decides the tiny model; its hash names the cache folder."""

    seed: int = 0
    vocab_size: int = 3000  # learned pieces, before ChatGLM's 344 fixed ones
    hidden_size: int = 160
    num_layers: int = 4
    num_attention_heads: int = 5
    inner_hidden_size: int = 640
    max_sequence_length: int = 1024
    steps: int = 450
    batch_size: int = 16
    max_tokens: int = 96
    learning_rate: float = 4e-3
    warmup_steps: int = 30
    quantization_bit: int = 4

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        digest.update(str(BUILD_VERSION).encode())
        for path in corpus_files():
            digest.update(path.read_bytes())
        return digest.hexdigest()[:12]


def corpus_files() -> list[Path]:
    return [DATA_DIR / "corpus" / "pretrain.txt"]


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
        for split in ("train", "test"):
            for example in read_examples(DATA_DIR / task.name / f"{split}.jsonl", task.name, group_references=True):
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


def _pretraining_rows(tokenizer: ChatGLMTokenizer, recipe: TinyRecipe, rng: random.Random) -> list[dict]:
    """Each corpus line split at a random point: ``head [gMASK] <sop> tail <eop>``, loss on the tail.

    The head may be empty (the whole line is the answer), which is also how perplexity is measured.
    """
    rows = []
    for line in _corpus_lines():
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(line))[: recipe.max_tokens - 3]
        if len(ids) < 4:
            continue
        cut = rng.randint(0, len(ids) - 2)
        source = ids[:cut] + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
        input_ids = source + ids[cut:] + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * (len(source) - 1) + input_ids[len(source) - 1:]
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


def pretrain(model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer, recipe: TinyRecipe,
             progress: bool = True) -> list[float]:
    """Brief deterministic pretraining on the corpus; returns the loss per step."""
    from tqdm.auto import tqdm

    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    collate = Collator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress_ = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses, rows = [], []
    bar = tqdm(range(recipe.steps), desc="pretraining the tiny model", disable=not progress)
    for _ in bar:
        if len(rows) < recipe.batch_size:
            rows = _pretraining_rows(tokenizer, recipe, rng)  # a fresh random split each pass
            rng.shuffle(rows)
        batch = collate([rows.pop() for _ in range(recipe.batch_size)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
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


def build_tiny(folder: Path, recipe: TinyRecipe = TinyRecipe(), progress: bool = True) -> dict:
    """Build the tiny model into ``folder`` (which must not exist yet); returns a summary."""
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
        model = ChatGLMForConditionalGeneration(_config(recipe, tokenizer))
        losses = pretrain(model, tokenizer, recipe, progress=progress)
        model.quantize(recipe.quantization_bit)
        write_public_layout(model, folder, model_file)
    summary = {
        "recipe": dataclasses.asdict(recipe),
        "key": recipe.key(),
        "first_loss": losses[0],
        "last_loss": sum(losses[-20:]) / len(losses[-20:]),
        "build_seconds": round(time.time() - started, 1),
    }
    (folder / "tiny_recipe.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def tiny_dir(recipe: TinyRecipe = TinyRecipe()) -> Path:
    return cache_root() / "tiny" / recipe.key()


def ensure_tiny(recipe: TinyRecipe = TinyRecipe(), progress: bool = True) -> Path:
    """The cached tiny model folder for ``recipe``, built on first use (atomically: never half-written)."""
    target = tiny_dir(recipe)
    if (target / "tiny_recipe.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        if progress:
            print(f"Building the embedded tiny ChatGLM (once, about 2 minutes on 2 CPU cores) into {target}")
        build_tiny(staging / "model", recipe, progress=progress)
        try:
            (staging / "model").rename(target)
        except OSError:
            if not (target / "tiny_recipe.json").exists():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
