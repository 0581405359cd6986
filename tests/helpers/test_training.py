"""Training runs: run folder, loss history, small artifacts, reload, resume (also from a half-written checkpoint)."""

import json
import os
import stat

import pytest
import torch
from transformers import TrainerCallback

from helpers.errors import UserError
from helpers.files import read_json_lines as read_history
from helpers.methods import apply_method
from helpers.models import load_model
from helpers.run.artifacts import load_finetuned
from helpers.run.record import RunRecord, load_runs
from helpers.run.training import train
from helpers.tasks import EncodedDataset, load_split

OPTIONS = {"freeze": {"layers": 1}, "embedding": {}, "ptuning_v2": {"pre_seq_len": 4}, "lora": {"r": 4}}


def small_dataset(tokenizer, n=12):
    return EncodedDataset(tokenizer, "ie", load_split("ie", "train", limit=n), max_source_length=96,
                          max_target_length=32)


@pytest.mark.parametrize("method", ["freeze", "embedding", "ptuning_v2", "lora"])
def test_train_writes_run_folder_and_reloads_identically(tiny_checkpoint, tmp_path, method):
    model, tokenizer = load_model(str(tiny_checkpoint))
    setup = apply_method(model, method, **OPTIONS[method])
    result = train(setup, tokenizer, small_dataset(tokenizer), tmp_path / method, task="ie", steps=3,
                   batch_size=4, learning_rate=1e-2, save_steps=2, progress=False)
    run = json.loads((tmp_path / method / "run.json").read_text())
    assert run["status"] == "finished" and run["method"] == method and run["global_step"] == 3
    assert run["trainable_params"] == setup.trainable_params and run["model"] == str(tiny_checkpoint)
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert (tmp_path / method / "loss_history.csv").read_text().count("\n") == 4
    assert any((tmp_path / method / "tb").iterdir())
    artifact = tmp_path / method / "artifact"
    files = {p.name for p in artifact.iterdir()}
    assert "method.json" in files
    assert ("adapter_model.safetensors" in files) if method == "lora" else ("trainable.safetensors" in files)
    saved = [*artifact.iterdir(), *(tmp_path / method / "checkpoints").glob("checkpoint-*/*.safetensors")]
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in saved} == {str(p): 0o644 for p in saved}  # not 0600
    # small: only the trained part, never the base model
    size = sum(p.stat().st_size for p in artifact.iterdir())
    assert size < 4.5 * setup.trainable_params + 10_000

    reloaded, _ = load_finetuned(tmp_path / method)
    batch = small_dataset(tokenizer, 2)[0]
    ids = torch.tensor([batch["input_ids"]])
    with torch.no_grad():
        assert torch.equal(setup.model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_one_step_lowers_the_loss_for_every_method(tiny_checkpoint):
    for method in ("freeze", "embedding", "ptuning_v2", "lora"):
        model, tokenizer = load_model(str(tiny_checkpoint))
        setup = apply_method(model, method, **OPTIONS[method])
        from helpers.tasks import Collator

        batch = Collator(tokenizer.pad_token_id)([small_dataset(tokenizer, 4)[i] for i in range(4)])
        model = setup.model.train()
        if method == "ptuning_v2":
            model.transformer.prefix_dropout.p = 0.0
        if method == "lora":
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        before = model(**batch).loss
        before.backward()
        optimizer.step()
        with torch.no_grad():
            after = model(**batch).loss
        assert after < before, method


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_with_the_same_losses(tiny_checkpoint, tmp_path):
    def run(folder, callbacks=None):
        model, tokenizer = load_model(str(tiny_checkpoint))
        torch.manual_seed(0)  # same LoRA initialisation in both runs
        setup = apply_method(model, "lora", r=4, dropout=0.1)  # dropout: the RNG state must resume too
        return train(setup, tokenizer, small_dataset(tokenizer), folder, task="ie", steps=6, batch_size=4,
                     learning_rate=1e-2, save_steps=2, progress=False, callbacks=callbacks)

    straight = run(tmp_path / "straight").history
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", [StopAt(5)])  # stops after step 5 ran, before it was logged
    assert [r["step"] for r in read_history(tmp_path / "resumed" / "loss_history.jsonl")] == [1, 2, 3, 4]
    record = RunRecord.load(tmp_path / "resumed")
    assert record.status == "failed" and "interrupted at step 5" in record.error and not record.trained
    resumed = run(tmp_path / "resumed").history
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-6)
    assert tensorboard_steps(tmp_path / "resumed") == [1, 2, 3, 4, 5, 6]
    assert RunRecord.load(tmp_path / "resumed").status == "finished"


def tensorboard_steps(run_dir) -> list[int]:
    """Steps of every ``train/loss`` event in the run's TensorBoard files (duplicates kept, in file order)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*"), key=os.path.getmtime):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == "train/loss"]
    return steps


def lora_run(checkpoint, folder, callbacks=None, steps=6, **options):
    model, tokenizer = load_model(str(checkpoint))
    torch.manual_seed(0)
    setup = apply_method(model, "lora", r=4, dropout=0.1)
    return train(setup, tokenizer, small_dataset(tokenizer), folder, task="ie", steps=steps, batch_size=4,
                 learning_rate=options.pop("learning_rate", 1e-2), save_steps=2, progress=False,
                 callbacks=callbacks, **options)


def test_kill_while_saving_a_checkpoint_resumes_from_the_one_before(tiny_checkpoint, tmp_path, capsys):
    """A kill during the save of checkpoint-4 leaves it half-made; the rerun takes checkpoint-2 and no step repeats."""
    straight = lora_run(tiny_checkpoint, tmp_path / "straight").history
    with pytest.raises(KeyboardInterrupt):
        lora_run(tiny_checkpoint, tmp_path / "killed", [StopAt(5)])
    half = tmp_path / "killed" / "checkpoints" / "checkpoint-4"
    (half / "trainer_state.json").unlink()  # Trainer writes it last: a kill before it leaves this
    adapter = half / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    capsys.readouterr()
    resumed = lora_run(tiny_checkpoint, tmp_path / "killed")
    assert "checkpoint-4: incomplete checkpoint (trainer_state.json missing)" in capsys.readouterr().out
    assert resumed.record.resumed_from_step == 2
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight], rel=1e-6)
    csv_steps = [line.split(",")[0] for line in (tmp_path / "killed" / "loss_history.csv").read_text().splitlines()]
    assert csv_steps == ["step", "1", "2", "3", "4", "5", "6"]
    assert tensorboard_steps(tmp_path / "killed") == [1, 2, 3, 4, 5, 6]


def test_finished_run_is_not_trained_again(tiny_checkpoint, tmp_path, capsys):
    first = lora_run(tiny_checkpoint, tmp_path / "run", steps=2)
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    again = lora_run(tiny_checkpoint, tmp_path / "run", steps=2)
    assert "already trained; not training again" in capsys.readouterr().out
    assert again.record.global_step == first.record.global_step == 2
    assert [r["loss"] for r in again.history] == [r["loss"] for r in first.history]
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == files


def test_other_settings_on_a_trained_folder_are_refused(tiny_checkpoint, tmp_path):
    lora_run(tiny_checkpoint, tmp_path / "run", steps=2)
    with pytest.raises(UserError, match=r"run: exists with lr=0.01, this command asks lr=0.02; .*fresh=True"):
        lora_run(tiny_checkpoint, tmp_path / "run", steps=2, learning_rate=0.02)
    fresh = lora_run(tiny_checkpoint, tmp_path / "run", steps=2, learning_rate=0.02, fresh=True)
    assert fresh.record.recipe["learning_rate"] == 0.02 and fresh.record.global_step == 2
    assert [r["step"] for r in fresh.history] == [1, 2]


class Explode(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("simulated failure")


def test_failed_run_is_recorded_as_failed_and_left_out_of_load_runs(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(RuntimeError, match="simulated failure"):
        lora_run(tiny_checkpoint, tmp_path / "bad", [Explode()], steps=2)
    record = RunRecord.load(tmp_path / "bad")
    assert record.status == "failed" and record.error == "RuntimeError: simulated failure"
    assert stat.S_IMODE(os.stat(record.path).st_mode) == 0o644
    assert load_runs(tmp_path) == []
    assert "bad: failed" in capsys.readouterr().out


def test_bad_hyperparameters_are_refused_before_training(tiny_checkpoint, tmp_path):
    model, tokenizer = load_model(str(tiny_checkpoint))
    setup = apply_method(model, "embedding")
    for bad, option in (({"steps": 0}, "--steps"), ({"learning_rate": 0.0}, "--lr"), ({"batch_size": 0}, "--batch"),
                        ({"max_steps": 5}, r"unknown setting 'max_steps' \(did you mean steps\?\)")):
        with pytest.raises(UserError, match=option):
            train(setup, tokenizer, small_dataset(tokenizer, 4), tmp_path / "x", **{"steps": 1, **bad})
    assert not (tmp_path / "x").exists()


def test_train_refuses_a_model_with_nothing_trainable(tiny_checkpoint, tmp_path):
    model, tokenizer = load_model(str(tiny_checkpoint))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="nothing to train: no parameter of the model requires a gradient; apply a "
                                        "method first"):
        train(model, tokenizer, small_dataset(tokenizer), tmp_path, steps=1)


def test_bf16_base_with_fp32_trainable_tensors_trains_and_evaluates(tiny_checkpoint, tmp_path):
    """A bf16 model whose trained tensors are fp32 runs under autocast in training and in evaluation."""
    from helpers.run.evaluation import evaluate

    model, tokenizer = load_model(str(tiny_checkpoint), dtype="bf16")
    setup = apply_method(model, "freeze", layers=1)  # fp32 LayerNorms inside bf16 layers
    assert model.transformer.layers[1].input_layernorm.weight.dtype == torch.float32
    assert model.transformer.layers[1].attention.query_key_value.bias.dtype == torch.bfloat16
    result = train(setup, tokenizer, small_dataset(tokenizer, 4), tmp_path / "bf16", task="ie", steps=2,
                   batch_size=2, progress=False)
    assert result.record.global_step == 2
    metrics = evaluate(setup.model, tokenizer, "ie", load_split("ie", "test", limit=2), max_new_tokens=3,
                       progress=False)
    assert metrics["n"] == 2


def test_reloaded_bf16_run_chats_without_autocast(tiny_checkpoint, tmp_path):
    model, tokenizer = load_model(str(tiny_checkpoint), dtype="bf16")
    setup = apply_method(model, "embedding")
    train(setup, tokenizer, small_dataset(tokenizer, 4), tmp_path / "emb", task="ie", steps=1, batch_size=2,
          progress=False)
    reloaded, tok = load_finetuned(tmp_path / "emb", dtype="bf16")
    assert {p.dtype for p in reloaded.parameters() if p.dtype.is_floating_point} == {torch.bfloat16}
    answer, history = reloaded.chat(tok, "你好", max_length=40, do_sample=False)
    assert isinstance(answer, str) and history[-1][0] == "你好"


def test_an_out_dir_that_is_a_file_is_a_user_error(tiny_checkpoint, tmp_path):
    model, tokenizer = load_model(str(tiny_checkpoint))
    (tmp_path / "a_file").write_text("keep me")
    setup = apply_method(model, "embedding")
    with pytest.raises(UserError, match=r"^out_dir .*a_file: is a file, not a folder"):
        train(setup, tokenizer, small_dataset(tokenizer, 2), tmp_path / "a_file", steps=1)
    assert (tmp_path / "a_file").read_text() == "keep me"
