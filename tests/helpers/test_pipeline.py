"""The main job's reruns: a finished run is not trained again, another recipe is refused, --fresh starts over,
re-evaluation goes into a subfolder, metrics are written once, and a failure is recorded."""

from __future__ import annotations

import json

import pytest

from helpers.errors import UserError
from helpers.models import is_small_model, meta_model
from helpers.run import pipeline
from helpers.run.recipe import LEARNING_RATES, resolve_recipe
from helpers.run.record import RunRecord, load_runs


def run(checkpoint, out, fresh=False, reevaluate=False, r=2, **settings):
    """A two-step LoRA run on the fast tiny model, evaluated on two IE examples."""
    settings = {"steps": 2, "batch_size": 2, "max_new_tokens": 2, "eval_limit": 2, "device": "cpu", **settings}
    recipe = resolve_recipe(str(checkpoint), "lora", "ie", method_options={"r": r}, **settings)
    return pipeline.run_recipe(recipe, out, fresh=fresh, reevaluate=reevaluate)


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, tmp_path_factory):
    """(run folder, metrics) of one finished pipeline run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("pipeline") / "lora"
    return out, run(tiny_checkpoint, out)


def test_a_run_writes_a_finished_record_with_its_recipe(finished, tiny_checkpoint):
    out, metrics = finished
    record = RunRecord.load(out)
    assert record.status == "finished" and record.trained and record.error is None
    assert record.recipe["steps"] == 2 and record.method_options["r"] == 2
    assert record.model_path == str(tiny_checkpoint.resolve()) and record.global_step == 2
    assert record.metrics() == json.loads(json.dumps(metrics))
    assert {"perplexity_before", "perplexity_after", "f1"} <= set(metrics)


def test_rerun_of_a_finished_run_does_not_train(finished, tiny_checkpoint, monkeypatch, capsys):
    out, metrics = finished
    before = snapshot(out)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded again"))
    assert run(tiny_checkpoint, out) == metrics
    assert "Already finished: not training again" in capsys.readouterr().out
    assert snapshot(out) == before and RunRecord.load(out).global_step == 2


def test_another_recipe_is_refused_with_one_line(finished, tiny_checkpoint):
    out, _ = finished
    before = snapshot(out)
    with pytest.raises(UserError) as caught:
        run(tiny_checkpoint, out, learning_rate=0.01)
    default = LEARNING_RATES["ie"]["lora"]
    assert str(caught.value) == (f"{out}: exists with lr={default:g}, this command asks lr=0.01; use --fresh to "
                                 "start over or another --out")
    with pytest.raises(UserError, match="exists with r=2, .* asks r=4"):
        run(tiny_checkpoint, out, r=4)
    assert snapshot(out) == before


def test_other_evaluation_settings_point_to_evaluate_run(finished, tiny_checkpoint):
    out, _ = finished
    with pytest.raises(UserError, match=r"exists with eval_limit=2, this command asks eval_limit=3; use --fresh .*, "
                                        r"or evaluate it with these settings: python -m helpers evaluate --run"):
        run(tiny_checkpoint, out, eval_limit=3)


def test_reevaluate_writes_a_subfolder_and_never_touches_the_training_results(finished, tiny_checkpoint):
    out, metrics = finished
    before = snapshot(out)
    again = run(tiny_checkpoint, out, reevaluate=True)
    folders = sorted(out.glob("eval-*"))
    assert len(folders) == 1 and (folders[0] / "metrics.json").exists()
    assert (folders[0] / "predictions.jsonl").read_text().count("\n") == 2
    assert again["f1"] == metrics["f1"]  # the reloaded artifact answers as the trained model did
    assert {k: v for k, v in snapshot(out).items() if not str(k).startswith("eval-")} == before


def test_fresh_starts_over(tiny_checkpoint, tmp_path):
    out = tmp_path / "lora"
    run(tiny_checkpoint, out)
    (out / "eval-old").mkdir()
    (out / "eval-old" / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    first = RunRecord.load(out).history()
    metrics = run(tiny_checkpoint, out, learning_rate=0.01, fresh=True)
    record = RunRecord.load(out)
    assert record.recipe["learning_rate"] == 0.01 and record.status == "finished"
    assert record.resumed_from_step == 0 and [r["step"] for r in record.history()] == [1, 2]
    assert record.history() != first and record.metrics() == json.loads(json.dumps(metrics))
    assert not (out / "eval-old").exists() and (out / "notes.txt").read_text() == "mine"


def test_metrics_are_written_once(tiny_checkpoint, tmp_path, monkeypatch):
    import helpers.files
    import helpers.run.evaluation

    writes = []
    original = helpers.files.write_text

    def counting(path, text):
        writes.append(path.name)
        return original(path, text)

    monkeypatch.setattr(helpers.files, "write_text", counting)
    monkeypatch.setattr(helpers.run.evaluation, "write_text", counting)

    run(tiny_checkpoint, tmp_path / "lora")
    assert writes.count("metrics.json") == 1 and writes.count("predictions.jsonl") == 1


def test_failure_is_recorded_and_the_rerun_only_evaluates(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lora"

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(pipeline, "evaluate_recipe", broken)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run(tiny_checkpoint, out)
    record = RunRecord.load(out)
    assert record.status == "failed" and record.error == "RuntimeError: evaluation crashed" and record.trained
    assert load_runs(tmp_path) == [] and "lora: failed" in capsys.readouterr().out
    history = (out / "loss_history.jsonl").read_bytes()
    monkeypatch.undo()
    metrics = run(tiny_checkpoint, out)
    assert "trained; evaluating it now" in capsys.readouterr().out
    assert (out / "loss_history.jsonl").read_bytes() == history  # not trained again
    assert RunRecord.load(out).status == "finished" and "f1" in metrics


def test_bad_options_fail_before_the_model_loads(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="--steps"):
        run(tiny_checkpoint, tmp_path / "a", steps=0)
    with pytest.raises(UserError, match="--eval-limit"):
        run(tiny_checkpoint, tmp_path / "b", eval_limit=0)
    with pytest.raises(UserError, match="unknown method"):
        pipeline.compare(str(tiny_checkpoint), "ie", ["lora", "bitfit"], tmp_path / "c")
    with pytest.raises(UserError, match="--lr"):  # every method's recipe is checked before the first one trains
        pipeline.compare(str(tiny_checkpoint), "ie", ["freeze", "lora"], tmp_path / "d", learning_rate=-1.0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "d" / "freeze").exists()


def test_model_size_detection(tiny_checkpoint):
    assert is_small_model("tiny") and is_small_model(str(tiny_checkpoint))
    assert not is_small_model("THUDM/chatglm-6b-int4")
    assert not is_small_model(meta_model("THUDM/chatglm-6b-int4"))


def test_compare_refuses_a_changed_rerun_before_any_method_trains(finished, tiny_checkpoint, monkeypatch):
    out, _ = finished
    before = snapshot(out)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("a method trained before the refusal"))
    with pytest.raises(UserError, match=rf"^{out}: exists with .*steps=2.*this command asks .*steps=3"):
        pipeline.compare(str(tiny_checkpoint), "ie", ["freeze", "lora"], out.parent, device="cpu", eval_limit=2,
                         steps=3, batch_size=2)
    assert not (out.parent / "freeze").exists() and snapshot(out) == before
