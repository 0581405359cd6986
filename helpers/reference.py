"""The original courses' published results (``data/reference/``, described in its README.md): the INT4 course's
loss curves and the published four-method comparison on ChatGLM-6B, each with its source.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import DATA_DIR


def _reference_file(name: str) -> Path:
    return DATA_DIR / "reference" / name


def reference_info() -> dict[str, Any]:
    """``data/reference/curves.json``: the source of the original INT4 course's loss curves and their settings."""
    return json.loads(_reference_file("curves.json").read_text(encoding="utf-8"))


def load_reference_curves(methods: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The original INT4 course's loss curves: ``{method: {"steps", "losses", "wall_times", "label", "info"}}``.

    ``methods`` picks some of ``freeze``, ``embedding``, ``ptuning_v2`` (default: all three, in that order).
    ``label`` names the runs ("original course, real model (Colab A100-40G)"); ``info`` is the method's entry of
    ``curves.json`` (file, source file, what trained).
    """
    info = reference_info()
    available = list(info["curves"])
    wanted = available if methods is None else [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise UserError(f"no reference curve for {', '.join(unknown)} (methods=...): the original course published "
                        f"curves for {', '.join(available)} only")
    curves = {}
    for method in wanted:
        entry = info["curves"][method]
        with _reference_file(entry["file"]).open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        curves[method] = {
            "steps": [int(float(row["Step"])) for row in rows],
            "losses": [float(row["Value"]) for row in rows],
            "wall_times": [float(row["Wall time"]) for row in rows],
            "label": info["label"],
            "info": entry,
        }
    return curves


def published_results() -> dict[str, Any]:
    """``data/reference/published.json``: the published comparison of four methods on ChatGLM-6B, with its source."""
    return json.loads(_reference_file("published.json").read_text(encoding="utf-8"))


def published_markdown(methods: Sequence[str] | str | None = None) -> str:
    """The published comparison as a Markdown table, with its source and how far to trust small differences.

    ``methods`` keeps the rows whose ``course_method`` is one of them (e.g. ``"ptuning_v2"``: both prefix rows).
    """
    table = published_results()
    wanted = [methods] if isinstance(methods, str) else methods
    lines = ["| method (their name) | what trains | trainable share | GPU memory | train time | IE F1 | "
             f"D2Q score (base {table['d2q_base_model_score']}) |", "|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        if wanted is not None and row["course_method"] not in wanted:
            continue
        share = row["trainable_share_pct"]
        lines.append(f"| {row['method']} | {row['what_trains']} | {share:g}% | {row['gpu_memory_gb']} GB | "
                     f"{row['train_minutes']} min | {row['ie_f1']:.4f} | {row['d2q_score']} |")
    lines.append("")
    lines.append(f"Source: [{table['repository']} README]({table['source']}) ({table['revision']}); "
                 f"{table['model']}; {table['training']}. {table['noise']}.")
    return "\n".join(lines) + "\n"
