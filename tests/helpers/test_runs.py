"""Run records: typed, atomic, readable by everyone; load_runs never mixes unfinished runs in; checkpoint checks."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from helpers.errors import UserError
from helpers.plotting import comparison_rows, write_comparison
from helpers.run import folder as runs
from helpers.run.folder import last_complete_checkpoint
from helpers.run.record import RunRecord, load_runs


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_record_round_trips_and_is_written_0644(tmp_path):
    record = RunRecord(tmp_path / "r", name="r", method="lora", task="ie", model="tiny", global_step=3,
                       recipe={"steps": 3}).save()
    assert mode(record.path) == 0o644
    again = RunRecord.load(tmp_path / "r")
    assert again == record and again.status == "running" and again.setting("steps") == 3
    record.finish({"f1": 0.5})
    assert mode(tmp_path / "r" / "metrics.json") == 0o644 and RunRecord.load(tmp_path / "r").status == "finished"
    assert again.metrics() == {"f1": 0.5}
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["metrics.json", "run.json"]  # no temporary files


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous run.json whole (temporary file + rename)."""
    record = RunRecord(tmp_path, name="x", status="running").save()
    before = record.path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        record.update(status="finished", global_step=9)
    assert record.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # the temporary file was removed


def test_unknown_keys_are_kept_and_bad_records_are_named(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"name": "old", "status": "finished", "note": "kept"}))
    record = RunRecord.load(tmp_path)
    assert record.extra == {"note": "kept"} and record.to_dict()["note"] == "kept"
    (tmp_path / "run.json").write_text('{"name": "cut off", "sta')
    with pytest.raises(UserError, match="run.json: not valid JSON"):
        RunRecord.load(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"status": "exploded"}))
    with pytest.raises(UserError, match="unknown status 'exploded'"):
        RunRecord.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no run.json"):
        RunRecord.load(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        RunRecord.load(tmp_path / "nowhere")


def test_a_finished_record_of_an_older_version_counts_as_trained(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"name": "old", "status": "finished", "global_step": 5}))
    assert RunRecord.load(tmp_path).trained
    (tmp_path / "run.json").write_text(json.dumps({"name": "old", "status": "running", "global_step": 5}))
    assert not RunRecord.load(tmp_path).trained


def write(folder, status, method="lora", error=None, **values):
    record = RunRecord(folder, name=folder.name, status=status, method=method, task="ie", error=error,
                       trainable_params=10, all_params=100, **values).save()
    (folder / "loss_history.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return record


def test_load_runs_leaves_unfinished_and_failed_runs_out_with_a_note(tmp_path, capsys):
    write(tmp_path / "done", "finished", trained_at="t")
    write(tmp_path / "going", "running", method="freeze", global_step=2)
    write(tmp_path / "broke", "failed", method="embedding", error="RuntimeError: boom")
    assert [r.name for r in load_runs(tmp_path)] == ["done"]
    out = capsys.readouterr().out
    assert "going: not finished at step 2" in out and "broke: failed (RuntimeError: boom)" in out
    everything = load_runs(tmp_path, unfinished=True)
    assert [(r.name, r.status) for r in everything] == [("going", "running"), ("broke", "failed"),
                                                        ("done", "finished")]


def test_tables_and_figures_skip_unfinished_runs(tmp_path, capsys):
    write(tmp_path / "done", "finished")
    write(tmp_path / "broke", "failed", error="ValueError: x")
    every = load_runs(tmp_path, unfinished=True)
    capsys.readouterr()
    assert [row["name"] for row in comparison_rows(every)] == ["done"]
    assert "broke: failed" in capsys.readouterr().out
    paths = write_comparison(every, tmp_path / "out")
    assert [row["name"] for row in json.loads(paths["json"].read_text())] == ["done"]
    assert mode(paths["md"]) == mode(paths["json"]) == 0o644


def test_start_over_removes_only_the_runs_own_files(tmp_path):
    write(tmp_path, "failed", error="x")
    for name in ("checkpoints/checkpoint-2", "tb", "artifact", "eval-1"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "eval-1" / "metrics.json").write_text("{}")
    (tmp_path / "my_notes.txt").write_text("mine")
    runs.start_over(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["my_notes.txt"]


def make_checkpoint(root, step: int, method: str = "freeze"):
    folder = root / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, folder / runs.TRAINABLE_FILE)
    (folder / runs.METHOD_FILE).write_text(json.dumps({"method": method, "options": {}}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"step": step}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_complete_checkpoint_passes_every_check(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    assert runs.checkpoint_problem(folder) is None
    assert last_complete_checkpoint(tmp_path) == folder


@pytest.mark.parametrize("damage, problem", [
    (lambda f: (f / "trainer_state.json").unlink(), "trainer_state.json missing"),
    (lambda f: (f / "trainer_state.json").write_text('{"global_'), "trainer_state.json is not valid JSON"),
    (lambda f: (f / "trainer_state.json").write_text('{"global_step": 2}'), "at step 2"),
    (lambda f: (f / "optimizer.pt").write_bytes((f / "optimizer.pt").read_bytes()[:50]), "optimizer.pt is cut off"),
    (lambda f: (f / "rng_state.pth").unlink(), "rng_state.pth missing"),
    (lambda f: (f / runs.TRAINABLE_FILE).write_bytes((f / runs.TRAINABLE_FILE).read_bytes()[:-4]), "cut off"),
    (lambda f: (f / runs.METHOD_FILE).unlink(), "method.json missing"),
])
def test_half_written_checkpoint_is_skipped_and_removed(tmp_path, capsys, damage, problem):
    """A kill while ``checkpoint-4/`` was being saved: resume from ``checkpoint-2/`` and remove the broken one."""
    earlier = make_checkpoint(tmp_path, 2)
    broken = make_checkpoint(tmp_path, 4)
    damage(broken)
    assert problem in runs.checkpoint_problem(broken)
    assert last_complete_checkpoint(tmp_path) == earlier
    assert not broken.exists()
    assert "checkpoint-4: incomplete checkpoint" in capsys.readouterr().out


def test_lora_artifact_checks_its_adapter_files(tmp_path):
    (tmp_path / runs.METHOD_FILE).write_text(json.dumps({"method": "lora", "options": {}}))
    assert "adapter_config.json missing" in runs.artifact_problem(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert "adapter_model.safetensors: missing" in runs.artifact_problem(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10")
    assert "not a safetensors file" in runs.artifact_problem(tmp_path)
    save_file({"a": torch.zeros(2)}, tmp_path / "adapter_model.safetensors")
    assert runs.artifact_problem(tmp_path) is None


def test_evaluation_folders_never_collide(tmp_path):
    first = runs.evaluation_folder(tmp_path)
    first.mkdir()
    second = runs.evaluation_folder(tmp_path)
    assert first.name.startswith("eval-") and second != first and second.parent == tmp_path


def test_out_folder_checks_name_the_option_and_write_nothing(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(UserError, match=r"^--out .*notes.txt: is a file, not a folder"):
        runs.check_out_folder(a_file)
    with pytest.raises(UserError, match="notes.txt is a file, so no folder can be made there"):
        runs.check_out_folder(a_file / "run")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("")
    with pytest.raises(UserError, match=r"already holds other files \(pyproject.toml\) and no run.json"):
        runs.check_out_folder(project)
    assert runs.check_out_folder(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    RunRecord(project / "lora", name="lora").save()
    assert runs.check_out_folder(project / "lora") == project / "lora"  # an existing run: reruns decide
    with pytest.raises(UserError, match="is the run folder of one method"):
        runs.check_out_folder(project / "lora", purpose="comparison")
    with pytest.raises(UserError, match="is a training run folder; evaluating into it would overwrite"):
        runs.check_out_folder(project / "lora", purpose="evaluation")
    earlier = tmp_path / "eval"
    earlier.mkdir()
    (earlier / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match=r"already holds an earlier evaluation \(metrics.json\)"):
        runs.check_out_folder(earlier, purpose="evaluation")
    assert runs.check_out_folder(project, purpose="folder") == project
    assert not (tmp_path / "new").exists()


def test_out_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(runs.os, "access", lambda path, mode: str(path) != str(locked))  # as for a read-only place
    with pytest.raises(UserError, match=r"locked is not writable; choose a folder you can write"):
        runs.check_out_folder(locked / "run")


def test_load_runs_names_a_missing_path_and_skips_a_damaged_record_with_a_note(tmp_path, capsys):
    with pytest.raises(UserError, match="rnus: no such folder"):
        load_runs(tmp_path / "rnus")
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(UserError, match="file.txt: is a file"):
        load_runs(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_runs(empty) == [] and "no run folders found" in capsys.readouterr().out
    RunRecord(tmp_path / "runs" / "good", name="good", method="lora", status="finished").save()
    (tmp_path / "runs" / "bad").mkdir()
    (tmp_path / "runs" / "bad" / "run.json").write_text('{"status": "fin')
    assert [run.name for run in load_runs(tmp_path / "runs")] == ["good"]
    assert "bad/run.json: not valid JSON" in capsys.readouterr().out
    with pytest.raises(UserError, match="not valid JSON"):  # asked for by name: not skipped
        load_runs(tmp_path / "runs" / "bad")


def test_base_model_of_a_run_names_a_folder_that_is_gone(tmp_path):
    assert RunRecord(tmp_path / "r", model="tiny").base_model() == "tiny"
    assert RunRecord(tmp_path / "r", model=str(tmp_path)).base_model() == str(tmp_path)
    moved = RunRecord(tmp_path / "r", model=str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"the run's base model .*gone is not there any more .* --model <folder>"):
        moved.base_model()
    assert moved.base_model("elsewhere") == "elsewhere"
    with pytest.raises(UserError, match="does not name its base model"):
        RunRecord(tmp_path / "r").base_model()


def _record(folder, recipe, **fields):
    return RunRecord(folder, name=folder.name, method=recipe.method, task=recipe.task, recipe=recipe.to_dict(),
                     **fields).save()


def test_one_policy_decides_what_a_folder_means_for_each_mode(tiny_checkpoint, tmp_path, capsys):
    from helpers.run.folder import decide
    from helpers.run.recipe import resolve_recipe

    recipe = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", steps=4)
    other = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", steps=5)
    folder = tmp_path / "lora-ie"
    assert decide(folder, recipe).action == "train" and decide(folder, recipe).record is None
    _record(folder, recipe, status="failed", error="KeyboardInterrupt")  # interrupted: every mode but fresh resumes
    for mode in ("keep", "replace"):
        decision = decide(folder, recipe, mode)
        assert (decision.action, decision.replace, decision.record.status) == ("train", False, "failed")
    assert decide(folder, recipe, "fresh").replace and decide(folder, recipe, "fresh").record is None
    replaced = decide(folder, other)  # another recipe that never saved a checkpoint: nothing to lose
    assert replaced.replace and "another recipe that saved no checkpoint" in replaced.note
    _record(folder, recipe, status="finished", trained_at="2026-01-01T00:00:00Z")
    (folder / "metrics.json").write_text('{"f1": 0.5}')
    (folder / "my_notes.txt").write_text("mine")
    assert decide(folder, recipe).action == "done"  # the command line keeps a finished run
    with pytest.raises(UserError, match=r"exists with steps=4, .*this command asks steps=5, .*; use --fresh"):
        decide(folder, other)
    for asked in (recipe, other):  # a notebook executed again trains again, whatever the settings
        decision = decide(folder, asked, "replace")
        assert (decision.action, decision.replace, decision.record) == ("train", True, None)
    decision.begin(other)
    assert "replacing the earlier run" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["my_notes.txt", "run.json"]  # only the run's files went
    assert RunRecord.load(folder).recipe["steps"] == 5
    (folder / "metrics.json").unlink(missing_ok=True)
    _record(folder, recipe, status="failed", trained_at="2026-01-01T00:00:00Z")  # trained, evaluation crashed
    assert decide(folder, recipe).action == "evaluate"
