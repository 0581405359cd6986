"""Train a few steps with ``helpers.train`` (run alone, or under ``torchrun`` for the data-parallel test)."""

import argparse
import random

import torch

from helpers.methods import lora
from helpers.models import load_model
from helpers.run.training import train


def rows(tokenizer, count: int = 16, length: int = 12) -> list[dict]:
    """Rows of equal length and equal number of labels, so per-process means average to the global mean."""
    rng = random.Random(0)
    vocab = range(10, 2000)
    out = []
    for _ in range(count):
        source = [rng.choice(vocab) for _ in range(length)] + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
        ids = source + [rng.choice(vocab) for _ in range(length)] + [tokenizer.eos_token_id]
        out.append({"input_ids": ids, "labels": [-100] * (len(source) - 1) + ids[len(source) - 1:]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    setup = lora(model, r=4, dropout=0.0)
    train(setup, tokenizer, rows(tokenizer), args.out, steps=args.steps, batch_size=args.batch_size,
          learning_rate=1e-2, save_steps=100, progress=False)


if __name__ == "__main__":
    main()
