"""Bundles of runs: ``export-runs`` zips the finished runs' records, histories, metrics and predictions (nothing else,
never over an existing file), and the notebooks read them straight from the zip, with one clear line when damaged."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from helpers.cli import main
from helpers.course import other_runs
from helpers.errors import UserError
from helpers.run import bundle as bundle_module
from helpers.run.bundle import load_bundle
from helpers.run.record import RunRecord, load_runs

A100 = "NVIDIA A100-SXM4-40GB"
BUNDLED = {"run.json", "loss_history.jsonl", "metrics.json", "predictions.jsonl"}


def write_run(root: Path, name: str, method: str, task: str = "ie", status: str = "finished",
              hardware: str | None = A100) -> Path:
    """A run folder as training leaves it, with the weights and logs a bundle must leave behind."""
    folder = root / name
    RunRecord(folder, name=name, status=status, method=method, task=task, model="THUDM/chatglm-6b-int4",
              hardware=hardware, global_step=3, final_loss=1.0, error="OutOfMemoryError" if status == "failed" else None
              ).save()
    losses = [{"step": step, "loss": 3.0 - step / 2} for step in (1, 2, 3)]
    (folder / "loss_history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in losses), encoding="utf-8")
    (folder / "loss_history.csv").write_text("step,loss\n1,2.5\n", encoding="utf-8")
    for sub, size in (("artifact/adapter_model.safetensors", 200_000), ("checkpoints/checkpoint-3/optimizer.pt", 5000),
                      ("tb/events.out.tfevents.1", 100)):
        (folder / sub).parent.mkdir(parents=True, exist_ok=True)
        (folder / sub).write_bytes(bytes(range(256)) * (size // 256))
    if status == "finished":
        (folder / "metrics.json").write_text(json.dumps({"task": task, "main_metric": "f1", "f1": 0.5}))
        (folder / "predictions.jsonl").write_text(json.dumps({"text": "t", "prediction": "p", "references": ["r"]}))
    return folder


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "compare-ie-6b"
    write_run(root, "freeze", "freeze")
    write_run(root, "lora", "lora")
    write_run(root, "ptuning_v2", "ptuning_v2", status="running")
    write_run(root, "embedding", "embedding", status="failed")
    return root


@pytest.fixture
def bundle(runs_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ie-6b.zip"
    bundle_module.export_runs(runs_dir, out)
    return out


def error_line(capsys) -> str:
    """stderr, which must be one line ``error: ...``."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def rewrite(bundle: Path, changes: dict[str, bytes | None]) -> Path:
    """A copy of ``bundle`` with members replaced (bytes) or removed (``None``)."""
    out = bundle.with_name("changed.zip")
    with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            content = changes.get(name, source.read(name))
            if content is not None:
                target.writestr(name, content)
    return out


def test_export_writes_only_the_finished_runs_result_files_and_they_round_trip(runs_dir, tmp_path, capsys):
    out = tmp_path / "ie-6b.zip"
    assert main(["export-runs", str(runs_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ptuning_v2: not finished" in printed and "embedding: failed" in printed
    assert f"Wrote {out}: 2 runs" in printed and f"lora: lora on task ie, THUDM/chatglm-6b-int4 on {A100}" in printed
    with zipfile.ZipFile(out) as zipped:
        names = set(zipped.namelist())
        manifest = json.loads(zipped.read("bundle.json"))
    assert names == {"bundle.json"} | {f"{run}/{name}" for run in ("freeze", "lora") for name in BUNDLED}
    assert out.stat().st_size < 20_000  # each run folder holds over 200 kB of weights and logs
    assert [(r["folder"], r["task"], r["method"], r["hardware"]) for r in manifest["runs"]] == [
        ("freeze", "ie", "freeze", A100), ("lora", "ie", "lora", A100)]
    bundled, folders = load_runs(out), load_runs(runs_dir)
    assert [run.record.to_dict() for run in bundled] == [run.record.to_dict() for run in folders]
    assert [(run.name, run.history, run.metrics) for run in bundled] == [
        (run.name, run.history, run.metrics) for run in folders]
    assert {run.source for run in bundled} == {"ie-6b.zip"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare-ie-6b", "ie-6b.zip"]  # no temporary file left


def test_one_run_folder_exports_alone(runs_dir, tmp_path):
    out = tmp_path / "lora.zip"
    assert [run.name for run in bundle_module.export_runs(runs_dir / "lora", out)] == ["lora"]
    assert [run.method for run in load_bundle(out)] == ["lora"]


def test_export_never_overwrites_and_refuses_a_folder_without_finished_runs(runs_dir, tmp_path, capsys):
    existing = tmp_path / "ie-6b.zip"
    existing.write_bytes(b"an earlier bundle")
    assert main(["export-runs", str(runs_dir), "--out", str(existing)]) == 2
    line = error_line(capsys)
    assert f"{existing}: already exists" in line and "ie-6b-2.zip" in line
    assert existing.read_bytes() == b"an earlier bundle"
    unfinished = tmp_path / "unfinished"
    write_run(unfinished, "lora", "lora", status="running")
    assert main(["export-runs", str(unfinished), "--out", str(tmp_path / "new.zip")]) == 2
    assert error_line(capsys).startswith(f"error: {unfinished}: no finished run")
    assert main(["export-runs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new.zip")]) == 2
    assert "nowhere: no such folder" in error_line(capsys)
    assert main(["export-runs", str(runs_dir), "--out", str(tmp_path / "new.tar")]) == 2
    assert "a bundle is a .zip file" in error_line(capsys)
    assert not (tmp_path / "new.zip").exists() and not (tmp_path / "new.tar").exists()


def test_an_interrupted_export_leaves_nothing(runs_dir, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "write", full_disk)
    with pytest.raises(OSError):
        bundle_module.export_runs(runs_dir, tmp_path / "ie-6b.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare-ie-6b"]


def manifest_with(bundle: Path, **values) -> bytes:
    with zipfile.ZipFile(bundle) as zipped:
        return json.dumps({**json.loads(zipped.read("bundle.json")), **values}).encode()


def cut_off(bundle: Path) -> Path:
    cut = bundle.with_name("cut.zip")
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    return cut


def not_a_zip(bundle: Path) -> Path:
    other = bundle.with_name("notes.zip")
    other.write_text("hello", encoding="utf-8")
    return other


DAMAGES = {
    "cut off": (cut_off, "not a complete zip file"),
    "not a zip": (not_a_zip, "not a complete zip file"),
    "broken JSON": (lambda b: rewrite(b, {"lora/metrics.json": b'{"f1": 0.'}), "lora/metrics.json is not valid JSON"),
    "broken history": (lambda b: rewrite(b, {"lora/loss_history.jsonl": b'{"step": 1,\n{"step": 2}\n'}),
                       "lora/loss_history.jsonl:1: not valid JSON"),
    "no manifest": (lambda b: rewrite(b, {"bundle.json": None}), "has no bundle.json, so it is not a bundle of runs"),
    "no run.json": (lambda b: rewrite(b, {"lora/run.json": None}), "has no lora/run.json"),
    "newer version": (lambda b: rewrite(b, {"bundle.json": manifest_with(b, version=99)}),
                      "bundle format version 99 is newer than this course reads (1)"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_bundle_is_one_line_naming_the_file_and_what_is_wrong(bundle, damage):
    make, expected = DAMAGES[damage]
    damaged = make(bundle)
    with pytest.raises(UserError) as caught:
        other_runs(damaged, "ie")
    message = str(caught.value)
    assert message.startswith(f"{damaged}") and expected in message and "\n" not in message


def test_a_bundle_of_another_task_says_how_to_choose(bundle):
    with pytest.raises(UserError) as caught:
        other_runs(bundle, "gen")
    message = str(caught.value)
    assert message.startswith("bundle ie-6b.zip holds runs of task ie") and "TASK = 'ie'" in message


def test_other_runs_loads_a_bundle_or_a_folder_and_says_what_it_loaded(bundle, tmp_path, capsys):
    assert other_runs(None, "ie") == []
    runs = other_runs(bundle, "ie")
    assert [run.method for run in runs] == ["freeze", "lora"] and {run.source for run in runs} == {"ie-6b.zip"}
    assert f"Loaded 2 runs of task ie from ie-6b.zip: THUDM/chatglm-6b-int4 on {A100}" in capsys.readouterr().out
    copied = tmp_path / "teacher"
    write_run(copied, "lora-ie", "lora", hardware=None)  # a record from before the hardware was kept
    write_run(copied, "lora-gen", "lora", task="gen")
    runs = other_runs(copied, "ie")
    assert [(run.name, run.source, run.hardware) for run in runs] == [("lora-ie", "teacher", "hardware not recorded")]
    printed = capsys.readouterr().out
    assert "folder teacher: 1 run(s) of task gen left out" in printed
    assert "Loaded 1 run of task ie from teacher: THUDM/chatglm-6b-int4 on hardware not recorded" in printed
