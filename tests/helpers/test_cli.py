"""The command line on a fast tiny model: compare and train end to end, reruns, evaluate --run, one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli
from helpers.cli import main
from helpers.run.recipe import LEARNING_RATES
from helpers.run.record import RunRecord

REPO = Path(__file__).resolve().parents[2]


def train_args(checkpoint, out, *extra):
    return ["train", "--model", str(checkpoint), "--task", "ie", "--method", "lora", "--r", "2", "--steps", "2",
            "--batch-size", "2", "--eval-limit", "2", "--max-new-tokens", "2", "--device", "cpu", "--out", str(out),
            *extra]


def error_line(capsys) -> str:
    """The whole of stderr, which must be exactly one ``error: ...`` line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):
    """A finished two-step LoRA run written by ``train``, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("cli") / "lora"
    assert main(train_args(tiny_checkpoint, out)) == 0
    return out


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_compare_end_to_end(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "compare"
    code = main(["compare", "--model", str(tiny_checkpoint), "--task", "cls", "--methods", "freeze,lora",
                 "--steps", "3", "--batch-size", "4", "--eval-limit", "4", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    for name in ("comparison.png", "comparison.md", "comparison.json", "summary.json"):
        assert (out / name).stat().st_size > 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["freeze", "lora"]
    assert all(r["accuracy"] is not None and r["trainable_params"] > 0 for r in rows)
    for method in ("freeze", "lora"):
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert {"accuracy", "rank_accuracy", "perplexity_before", "perplexity_after"} <= set(metrics)
        assert (out / method / "predictions.jsonl").read_text().count("\n") == 4
    printed = capsys.readouterr().out
    assert "| method |" in printed and "comparison.png" in printed


@pytest.mark.slow
def test_train_then_evaluate_a_run_folder(tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "pt"
    assert main(["train", "--model", str(tiny_checkpoint), "--task", "gen", "--method", "ptuning_v2",
                 "--pre-seq-len", "4", "--no-projection", "--steps", "2", "--batch-size", "2", "--eval-limit", "2",
                 "--max-new-tokens", "4", "--out", str(run)]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["recipe"]["method_options"] == {"pre_seq_len": 4, "prefix_projection": False}
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--eval-limit", "2", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    first = json.loads((run / "metrics.json").read_text())
    assert again["rouge_l"] == pytest.approx(first["rouge_l"])  # the reloaded run answers the same


def test_rerun_of_a_finished_run_prints_its_result_without_training(trained, tiny_checkpoint, capsys):
    before = snapshot(trained)
    capsys.readouterr()
    assert main(train_args(tiny_checkpoint, trained)) == 0
    out = capsys.readouterr().out
    assert "Already finished: not training again" in out
    assert json.loads(out[out.index("{"):]) == json.loads((trained / "metrics.json").read_text())
    assert snapshot(trained) == before and RunRecord.load(trained).global_step == 2


def test_another_lr_on_an_existing_run_is_refused_with_one_line(trained, tiny_checkpoint, capsys):
    before = snapshot(trained)
    capsys.readouterr()
    assert main(train_args(tiny_checkpoint, trained, "--lr", "0.01")) == 2
    default = LEARNING_RATES["ie"]["lora"]
    assert error_line(capsys) == (f"error: {trained}: exists with lr={default:g}, this command asks lr=0.01; use "
                                  "--fresh to start over or another --out")
    assert snapshot(trained) == before


def test_evaluate_run_writes_its_own_subfolder(trained, capsys):
    before = snapshot(trained)
    assert main(["evaluate", "--run", str(trained), "--eval-limit", "1", "--max-new-tokens", "2"]) == 0
    new = [p for p in trained.glob("eval-*")]
    assert len(new) == 1 and json.loads((new[0] / "metrics.json").read_text())["n"] == 1
    assert json.loads((new[0] / "evaluation.json").read_text())["eval_limit"] == 1
    assert {k: v for k, v in snapshot(trained).items() if not str(k).startswith("eval-")} == before
    shutil.rmtree(new[0])
    capsys.readouterr()
    assert main(["evaluate", "--run", str(trained), "--out", str(trained)]) == 2
    assert "would overwrite its results" in error_line(capsys)


def test_evaluate_run_checks_status_and_artifact_first(trained, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    adapter = copy / "artifact" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    assert main(["evaluate", "--run", str(copy)]) == 2
    assert f"{adapter}: cut off" in error_line(capsys)
    RunRecord.load(copy).update(status="running", trained_at=None)
    assert main(["evaluate", "--run", str(copy)]) == 2
    assert "its training did not finish" in error_line(capsys)
    (copy / "run.json").write_text("{")
    assert main(["evaluate", "--run", str(copy)]) == 2
    assert "run.json: not valid JSON" in error_line(capsys)
    assert main(["evaluate", "--run", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: does not exist" in error_line(capsys)
    assert not list(copy.glob("eval-*"))


@pytest.mark.parametrize("extra, named", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--eval-limit", "0"], "--eval-limit"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--r", "0"], "--r"),
    (["--alpha", "0"], "--alpha"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--target-modules", "nothing"], "--target-modules"),
    (["--train-file", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--test-file", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "fp8"], "--dtype"),
    (["--layers", "3"], "--layers is an option of freeze"),  # the method trained here is lora
    (["--no-projection"], "--no-projection is an option of ptuning_v2"),
])
def test_bad_options_exit_2_with_one_line_before_anything_loads(tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                                extra, named):
    import helpers.run.pipeline

    monkeypatch.setattr(helpers.run.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    assert main(train_args(tiny_checkpoint, tmp_path / "run", *extra)) == 2
    assert named in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_no_model_is_one_line(tmp_path, capsys):
    assert main(train_args(tmp_path, tmp_path / "run")) == 2
    assert "config.json" in error_line(capsys)


@pytest.mark.parametrize("argv, named", [
    (["train", "--method", "lora", "--out", "x", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["train", "--method", "lorra", "--out", "x"], "argument --method: invalid choice: 'lorra'"),
    (["train", "--method", "lora", "--task", "qa", "--out", "x"], "argument --task: invalid choice: 'qa'"),
    ([], "the following arguments are required: command"),
    (["train", "--method", "lora", "--out", "x", "--steeps", "3"],
     "unrecognized arguments: --steeps 3; did you mean --steps? (python -m helpers train)"),
    (["train", "--method", "lora", "--out", "x", "--max-target-lenght=9"], "did you mean --max-target-length?"),
    (["compare", "--bogus"], "unrecognized arguments: --bogus (python -m helpers compare); see python -m helpers "
                             "compare --help"),
])
def test_argparse_errors_exit_2_with_one_line_and_the_help_to_read(capsys, argv, named):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    line = error_line(capsys)  # no usage block: one line
    assert named in line and line.endswith("--help")


@pytest.mark.parametrize("spelling", ["--r", "--rank", "--lora-r"])
def test_lora_rank_and_alpha_take_the_usual_spellings(capsys, spelling):
    assert main(["params", "--method", "lora", spelling, "2", "--lora-alpha", "8"]) == 0
    rank2 = capsys.readouterr().out
    assert main(["params", "--method", "lora"]) == 0
    assert rank2 != capsys.readouterr().out and "trainable params: 917,504" in rank2


def test_warnings_print_as_one_line_and_the_format_is_restored(monkeypatch):
    import warnings

    before = warnings.formatwarning
    assert cli._one_line_warning("cut 3 texts\n  to 192 tokens", UserWarning, "x.py", 1) == (
        "warning: cut 3 texts to 192 tokens\n")
    seen = []
    monkeypatch.setattr(cli, "cmd_download", lambda args: seen.append(warnings.formatwarning) or 0)
    assert main(["download", "--list"]) == 0
    assert seen == [cli._one_line_warning] and warnings.formatwarning is before


@pytest.mark.parametrize("place", ["a_file", "a_project"])
def test_out_that_is_a_file_or_another_folder_is_refused_before_anything_loads(tiny_checkpoint, tmp_path,
                                                                               monkeypatch, capsys, place):
    import helpers.run.pipeline

    monkeypatch.setattr(helpers.run.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "a_project").mkdir()
    (tmp_path / "a_project" / "pyproject.toml").write_text("keep me")
    before = snapshot(tmp_path)
    assert main(train_args(tiny_checkpoint, tmp_path / place)) == 2
    assert error_line(capsys).startswith(f"error: --out {tmp_path / place}: ")
    assert main(["compare", "--model", str(tiny_checkpoint), "--methods", "lora", "--out", str(tmp_path / "a_file")]) \
        == 2
    assert "is a file, not a folder" in error_line(capsys)
    assert main(["evaluate", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in error_line(capsys)
    assert snapshot(tmp_path) == before


def test_compare_into_a_run_folder_and_evaluate_over_an_earlier_evaluation_are_refused(trained, tiny_checkpoint,
                                                                                       tmp_path, capsys):
    before = snapshot(trained)
    capsys.readouterr()
    assert main(["compare", "--model", str(tiny_checkpoint), "--methods", "lora", "--out", str(trained)]) == 2
    assert "is the run folder of one method" in error_line(capsys)
    earlier = tmp_path / "eval"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"f1": 0.5}')
    for argv in (["--run", str(trained)], ["--model", str(tiny_checkpoint)]):
        assert main(["evaluate", *argv, "--out", str(earlier)]) == 2
        assert "already holds an earlier evaluation (metrics.json)" in error_line(capsys)
    assert (earlier / "metrics.json").read_text() == '{"f1": 0.5}' and snapshot(trained) == before


def test_another_method_or_eval_limit_on_a_run_names_only_that_and_the_way_out(trained, tiny_checkpoint, capsys):
    capsys.readouterr()
    args = train_args(tiny_checkpoint, trained)
    args[args.index("lora")] = "freeze"
    args = [a for i, a in enumerate(args) if a != "--r" and (i == 0 or args[i - 1] != "--r")]
    assert main(args) == 2
    assert error_line(capsys) == (f"error: {trained}: exists with method=lora, this command asks method=freeze; "
                                  "use --fresh to start over or another --out")
    assert main(train_args(tiny_checkpoint, trained, "--eval-limit", "3")) == 2
    assert error_line(capsys).endswith(f"or evaluate it with these settings: python -m helpers evaluate --run "
                                       f"{trained} --eval-limit 3")


@pytest.mark.parametrize("extra, named", [
    (["--seq", "-100000"], "--seq must be a whole number of tokens between 1 and 2048"),
    (["--seq", "0"], "--seq must be"),
    (["--seq", "1000000"], "--seq must be"),
    (["--bs", "0"], "--bs must be at least 1"),
    (["--gpu-memory", "-5"], "--gpu-memory"),
    (["--gpu-memory", "nan"], "--gpu-memory"),
])
def test_estimate_refuses_sizes_that_cannot_be(capsys, extra, named):
    assert main(["estimate", "--method", "lora", *extra]) == 2
    assert named in error_line(capsys)


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "nowhere"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("error: ")


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_download", bug)
    with pytest.raises(ZeroDivisionError):
        main(["download", "--list"])


@pytest.mark.slow
def test_the_process_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "helpers", "evaluate", "--run", str(tmp_path / "nowhere")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: does not exist; give a run folder "
                                                  "written by train or compare (runs/<name>/)"]


def test_download_lists_the_registry(capsys):
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "spo" in out and "d2q" in out and "tnews" in out


def test_a_run_whose_base_model_moved_names_it_and_takes_model(trained, tiny_checkpoint, tmp_path, capsys):
    copy = tmp_path / "copied"
    shutil.copytree(trained, copy)
    gone = str(tmp_path / "moved-away")
    record = RunRecord.load(copy)
    record.update(model=gone, recipe={**record.recipe, "model": gone})
    capsys.readouterr()
    assert main(["evaluate", "--run", str(copy), "--eval-limit", "1"]) == 2
    assert error_line(capsys) == (f"error: {copy / 'run.json'}: the run's base model {gone} is not there any more (no "
                                  f"such folder); put it back, or say where it is now: python -m helpers evaluate "
                                  f"--run {copy} --model <folder> (API: load_finetuned(run, model=...))")
    assert main(["evaluate", "--run", str(copy), "--model", str(tiny_checkpoint), "--eval-limit", "1",
                 "--max-new-tokens", "2"]) == 0
    assert json.loads(next(copy.glob("eval-*/metrics.json")).read_text())["n"] == 1


def test_estimate_on_cpu_counts_process_memory(capsys):
    assert main(["estimate", "--method", "lora", "--seq", "64", "--bs", "1", "--device", "cpu"]) == 0
    cpu = capsys.readouterr().out
    assert main(["estimate", "--method", "lora", "--seq", "64", "--bs", "1"]) == 0
    gpu = capsys.readouterr().out
    assert "(CPU, fp32)" in cpu and "INT4 unpack" in cpu and "CUDA context" not in cpu
    assert "CUDA context" in gpu and "(CPU, fp32)" not in gpu


def test_build_tiny_never_replaces_a_folder_that_is_no_tiny_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["build-tiny", "--out", str(tmp_path), "--force"]) == 2
    assert "not a tiny model" in error_line(capsys)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert main(["build-tiny", "--steps", "0", "--out", str(tmp_path / "new")]) == 2
    assert "--steps" in error_line(capsys) and not (tmp_path / "new").exists()


def test_lr_and_out_are_checked_before_the_model_folder(tmp_path, capsys):
    """A bad --lr or --out is named even when --model is broken too: no model lookup is needed to see it."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (tmp_path / "a_file").write_text("keep me")
    assert main(train_args(broken, tmp_path / "run", "--lr", "-1")) == 2
    assert "learning_rate (--lr) must be a finite number above 0" in error_line(capsys)
    assert main(train_args(broken, tmp_path / "a_file")) == 2
    assert error_line(capsys).startswith(f"error: --out {tmp_path / 'a_file'}: is a file")
    assert main(["compare", "--model", str(broken), "--lr", "7", "--out", str(tmp_path / "c")]) == 2
    assert "--lr" in error_line(capsys)


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--steps", "--lr", "--batch-size", "--grad-accum", "--eval-batch-size", "--max-new-tokens",
                 "--r", "--no-projection", "--layers"):
        assert flag in text
    assert "ChatGLM-6B: 200" in text and "tiny model: 8" in text  # the defaults, from the recipe's tables
