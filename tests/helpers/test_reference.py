"""The bundled reference results (data/reference/): the original INT4 course's curves and the published table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import matplotlib
import pytest
import torch

from chatglm import ChatGLMForConditionalGeneration, known_config
from chatglm.modeling import PrefixEncoder
from helpers import plotting, reference
from helpers.errors import UserError
from helpers.files import DATA_DIR
from helpers.run.record import Run, RunRecord

matplotlib.use("Agg")

REFERENCE_LABEL = "original course, real model (Colab A100-40G)"
# liucongg/ChatGLM-Finetuning v0.1 counted the early ChatGLM-6B release, whose vocabulary had 150,528 tokens.
EARLY_VOCAB = 150528


def test_the_three_curves_load_with_720_points_from_step_10_to_7200():
    curves = reference.load_reference_curves()
    assert list(curves) == ["freeze", "embedding", "ptuning_v2"]
    for method, curve in curves.items():
        assert curve["steps"] == list(range(10, 7201, 10)), method
        assert len(curve["losses"]) == len(curve["wall_times"]) == 720
        assert all(0 < loss < 10 for loss in curve["losses"]), method
        assert curve["wall_times"] == sorted(curve["wall_times"]), f"{method}: wall times must increase"
        assert curve["label"] == REFERENCE_LABEL


def test_bundled_files_are_the_sources_bytes():
    info = reference.reference_info()
    assert info["repository"] == "shanggangli/ChatGLM-6B-int4-finetuning"
    for method, entry in info["curves"].items():
        data = (DATA_DIR / "reference" / entry["file"]).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        assert digest == entry["sha256"], f"{entry['file']} differs from the source's {entry['source_file']}"
        assert data.splitlines()[0] == b"Wall time,Step,Value", method


def test_unknown_reference_method_is_a_user_error():
    assert list(reference.load_reference_curves("embedding")) == ["embedding"]
    with pytest.raises(UserError, match="no reference curve for lora"):
        reference.load_reference_curves(["freeze", "lora"])


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_published_table_rows_and_parameter_arithmetic():
    table = reference.published_results()
    assert table["source"].startswith("https://github.com/liucongg/ChatGLM-Finetuning/")
    assert table["ie_test_rows"] == 50
    rows = {row["method"]: row for row in table["rows"]}
    assert list(rows) == ["PT-Only-Embedding", "PT", "Freeze", "Lora"]
    assert rows["PT-Only-Embedding"]["ie_f1"] == 0.0 and rows["PT-Only-Embedding"]["course_method"] == "ptuning_v2"
    assert rows["PT-Only-Embedding"]["options"]["prefix_projection"] is False

    config = known_config("THUDM/chatglm-6b", vocab_size=EARLY_VOCAB)
    prefix_without_projection = 16 * 2 * config.num_layers * config.hidden_size
    lora_r8 = 8 * (config.hidden_size + 3 * config.hidden_size) * config.num_layers  # A: r x in, B: 3·hidden x r
    assert prefix_without_projection == lora_r8 == 3_670_016
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
        prefixes = {flag: PrefixEncoder(known_config("THUDM/chatglm-6b", pre_seq_len=16, prefix_projection=flag))
                    for flag in (False, True)}
        block = model.transformer.layers[0]
    assert _count(prefixes[False]) == prefix_without_projection
    base = _count(model)
    derived = {"PT-Only-Embedding": _count(prefixes[False]), "PT": _count(prefixes[True]), "Freeze": 5 * _count(block),
               "Lora": lora_r8}
    for method, trainable in derived.items():
        row = rows[method]
        assert row["trainable_params"] == trainable, method
        total = base + (0 if method == "Freeze" else trainable)
        # Published to three decimals, rounded (6.259) or cut (7.211 for 7.2118): within one unit of the last digit.
        assert abs(total / 1e9 - row["all_params_b"]) < 1e-3, f"{method}: total {total:,}"
        assert abs(100 * trainable / total - row["trainable_share_pct"]) < 0.01, method


def test_published_markdown_renders_every_row_with_its_source():
    text = reference.published_markdown()
    for name in ("PT-Only-Embedding", "PT", "Freeze", "Lora"):
        assert f"| {name} |" in text
    assert "0.0586%" in text and "0.6283" in text and "liucongg/ChatGLM-Finetuning" in text


def test_published_markdown_keeps_the_rows_of_the_methods_asked_for():
    prefix = reference.published_markdown("ptuning_v2")
    assert "| PT-Only-Embedding |" in prefix and "| PT |" in prefix
    assert "| Lora |" not in prefix and "| Freeze |" not in prefix and "liucongg/ChatGLM-Finetuning" in prefix
    both = reference.published_markdown(["lora", "freeze"])
    assert "| Lora |" in both and "| Freeze |" in both and "| PT |" not in both


def _labels(ax):
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_plot_draws_reference_and_your_run_with_labels(tmp_path):
    steps = list(range(1, 151))
    losses = [3.0 - step / 100 for step in steps]
    fig = plotting.plot_reference_curves([("freeze", steps, losses)])
    ax = fig.axes[0]
    labels = _labels(ax)
    assert labels == [f"{REFERENCE_LABEL}: freeze, 7,200 steps", "your run: freeze, 150 steps"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    reference, yours = (next(line for line in ax.get_lines() if line.get_label() == label) for label in labels)
    assert reference.get_xdata()[-1] == yours.get_xdata()[-1] == 1.0, "both runs end at fraction 1"
    assert reference.get_linestyle() == "--" and yours.get_linestyle() == "-"
    assert "fraction" in ax.get_xlabel()
    fig.savefig(tmp_path / "reference.png")


def test_plot_takes_runs_and_falls_back_to_all_references():
    def run(name, method, losses):
        history = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)] + [{"step": 9, "eval": 1.0}]
        return Run(RunRecord(Path(name), name=name, method=method, status="finished"), history=history)

    runs = [run("pt-ie", "ptuning_v2", (2.5, 2.0)), run("lora-ie", "lora", (2.0, 1.5, 1.0))]
    only_pt = _labels(plotting.plot_reference_curves(runs).axes[0])
    assert only_pt == [f"{REFERENCE_LABEL}: ptuning_v2, 7,200 steps", "your run: ptuning_v2, 2 steps",
                       "your run: lora, 3 steps"]
    lora = [r for r in runs if r.method == "lora"]
    ax = plotting.plot_reference_curves(lora, x="step").axes[0]
    assert len([label for label in _labels(ax) if label.startswith(REFERENCE_LABEL)]) == 3
    assert ax.get_xscale() == "log"
    with pytest.raises(UserError, match="x='epoch'"):
        plotting.plot_reference_curves(x="epoch")
