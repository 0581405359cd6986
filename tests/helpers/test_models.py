"""What ``--model`` may name, checked before anything loads: typos, incomplete folders, broken files."""

import json
import re
import shutil

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load_file, save_file

from chatglm import ChatGLMTokenizer
from helpers.errors import UserError
from helpers.models import check_model_source, load_model, model_config
from tests.conftest import model_for


@pytest.fixture(scope="module")
def saved(small_tokenizer, tmp_path_factory):
    """A tiny INT4 checkpoint folder in each weights format: {"safetensors": folder, "bin": folder}."""
    folders = {}
    for kind in ("safetensors", "bin"):
        folder = tmp_path_factory.mktemp(kind) / "model"
        model_for(small_tokenizer, bits=4).save_pretrained(folder, safe_serialization=kind == "safetensors")
        small_tokenizer.save_pretrained(folder)
        folders[kind] = folder
    return folders


@pytest.fixture
def copy_of(saved, tmp_path):
    def copy(kind: str = "safetensors"):
        return shutil.copytree(saved[kind], tmp_path / kind)

    return copy


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the hub for a download."""

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked for a download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_complete_folder_is_accepted_and_loads(saved, kind):
    folder = saved[kind]
    assert check_model_source(str(folder)) == str(folder.resolve())
    assert model_config(str(folder)).num_layers == 3
    model, tokenizer = load_model(str(folder), device="cpu")
    assert model.config.quantization_bit == 4 and tokenizer.gmask_token_id == model.config.gmask_token_id


def test_a_typo_says_no_such_folder_without_trying_to_download(monkeypatch, no_hub):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"^no such folder: some/typo \(and not a known hub name: .*HF_HUB_OFFLINE"):
        check_model_source("some/typo")
    with pytest.raises(UserError, match="no such folder: some/typo"):
        load_model("some/typo", device="cpu")
    with pytest.raises(UserError, match=r"^no such folder: \./nowhere/model; give 'tiny', a checkpoint folder"):
        check_model_source("./nowhere/model")


def test_the_hub_is_asked_once_with_a_timeout_and_its_answer_is_reported(monkeypatch, no_hub):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    def missing(name, timeout=None):
        asked.append((name, timeout))
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # what the hub answers for a 404
        Exception.__init__(error, "404 Client Error: Repository Not Found")
        raise error

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    with pytest.raises(UserError, match=r"no such folder: some/typo \(and not a known hub name: no model of that"):
        check_model_source("some/typo")
    assert asked == [("some/typo", 10)]

    def unreachable(name, timeout=None):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(UserError, match=r"the hub could not be reached to look it up \(ConnectionError\)"):
        check_model_source("some/typo")
    monkeypatch.setattr(huggingface_hub, "model_info", lambda name, timeout=None: object())
    assert check_model_source("someone/chatglm-finetune") == "someone/chatglm-finetune"


def test_known_hub_names_need_no_network(monkeypatch, no_hub):
    monkeypatch.setattr(huggingface_hub, "model_info", pytest.fail)
    assert check_model_source("THUDM/chatglm-6b-int4") == "THUDM/chatglm-6b-int4"
    assert model_config("zai-org/chatglm-6b").num_layers == 28


@pytest.mark.parametrize(
    "missing,message",
    [
        ("config.json", r"no config\.json; a ChatGLM checkpoint folder holds config\.json, the weights"),
        ("model.safetensors", r"no weights file \(expected model\.safetensors or pytorch_model\.bin"),
        ("ice_text.model", r"no ice_text\.model \(a tokenizer file\)"),
        ("tokenizer_config.json", r"no tokenizer_config\.json \(a tokenizer file\)"),
    ],
)
def test_a_folder_missing_a_file_names_it(copy_of, missing, message):
    folder = copy_of()
    (folder / missing).unlink()
    with pytest.raises(UserError, match=message):
        check_model_source(str(folder))
    with pytest.raises(UserError, match=message):
        load_model(str(folder), device="cpu")


@pytest.mark.parametrize("kind,name", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_a_truncated_weights_file_says_so(copy_of, kind, name):
    folder = copy_of(kind)
    weights = folder / name
    content = weights.read_bytes()
    weights.write_bytes(content[: len(content) * 2 // 3])  # an interrupted download
    message = rf"{name}: truncated or corrupt \(.*\); download it again"
    with pytest.raises(UserError, match=message):
        check_model_source(str(folder))
    with pytest.raises(UserError, match=message):
        load_model(str(folder), device="cpu")


def test_a_missing_shard_is_named(small_tokenizer, tmp_path):
    folder = tmp_path / "sharded"
    model_for(small_tokenizer).save_pretrained(folder, safe_serialization=False, max_shard_size="100KB")
    small_tokenizer.save_pretrained(folder)
    shards = sorted(folder.glob("pytorch_model-*.bin"))
    assert len(shards) > 1 and check_model_source(str(folder))
    shards[1].unlink()
    with pytest.raises(UserError, match=rf"{shards[1].name}: missing \(1 of the {len(shards)} files listed in"):
        check_model_source(str(folder))


def test_a_corrupt_tokenizer_file_is_named(copy_of):
    folder = copy_of()
    vocabulary = folder / "ice_text.model"
    vocabulary.write_bytes(vocabulary.read_bytes()[:1000])
    message = r"ice_text\.model: not a valid sentencepiece model, truncated or corrupt .*download it again"
    with pytest.raises(UserError, match=message):
        check_model_source(str(folder))
    with pytest.raises(ValueError, match=message):  # the model package itself names the file too
        ChatGLMTokenizer.from_pretrained(folder)
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder / 'ice_text.model'))}: not a valid sentencepiece"):
        load_model(str(folder), device="cpu")  # the same one line however it is loaded


def test_a_corrupt_config_is_named(copy_of):
    folder = copy_of()
    (folder / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(UserError, match=r"config\.json: not readable JSON"):
        check_model_source(str(folder))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="model_type is 'llama', not 'chatglm'"):
        check_model_source(str(folder))


def test_a_corrupt_tokenizer_config_is_named(copy_of):
    folder = copy_of()
    (folder / "tokenizer_config.json").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match=r"tokenizer_config\.json: not readable JSON"):
        check_model_source(str(folder))


def test_a_failed_download_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match=r"^THUDM/chatglm-6b-int4: could not be downloaded from the hub "
                                        r"\(ConnectionError: .*\); check the connection"):
        load_model("THUDM/chatglm-6b-int4", device="cpu")


def test_a_file_instead_of_a_folder_and_bad_load_options(saved):
    weights = saved["safetensors"] / "model.safetensors"
    with pytest.raises(UserError, match="is a file; give the checkpoint folder that holds it"):
        check_model_source(str(weights))
    with pytest.raises(UserError, match=r"dtype \(--dtype\) 'fp64' is unknown"):
        load_model(str(saved["safetensors"]), device="cpu", dtype="fp64")
    with pytest.raises(UserError, match=r"device \(--device\) 'gpu' is not a device"):
        load_model(str(saved["safetensors"]), device="gpu")
    with pytest.raises(UserError, match="quantization_bit must be 4 or 8"):
        load_model(str(saved["safetensors"]), device="cpu", quantization_bit=3)


def test_weights_that_do_not_fit_the_config_or_lack_tensors_are_refused(copy_of):
    folder = copy_of()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "inner_hidden_size": config["inner_hidden_size"] // 2}))
    with pytest.raises(UserError, match=r"config\.json does not match the weights \(tensor shapes differ"):
        load_model(str(folder), device="cpu")
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(folder / "model.safetensors")
    dropped = sorted(k for k in state if ".layers.1.mlp." in k)
    save_file({k: v for k, v in state.items() if k not in dropped}, folder / "model.safetensors", {"format": "pt"})
    message = rf"the weights lack {len(dropped)} of the model's tensors \(e\.g\. {dropped[0]}"
    with pytest.raises(UserError, match=message):
        load_model(str(folder), device="cpu")


def test_a_damaged_tiny_cache_says_how_to_rebuild_it(copy_of, monkeypatch):
    import helpers.tiny

    folder = copy_of()
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(helpers.tiny, "ensure_tiny", lambda *args, **kwargs: folder)
    message = rf"tiny model's cache is damaged .*; delete {re.escape(str(folder))} and it is rebuilt"
    with pytest.raises(UserError, match=message):
        load_model("tiny", device="cpu")


def test_the_tiny_config_never_builds_the_tiny_model(monkeypatch, tmp_path, saved):
    import helpers.tiny

    monkeypatch.setattr(helpers.tiny, "ensure_tiny", pytest.fail)
    monkeypatch.setattr(helpers.tiny, "shipped_tiny", lambda *args: None)
    monkeypatch.setattr(helpers.tiny, "tiny_dir", lambda *args: tmp_path / "not-built")
    recipe = helpers.tiny.TinyRecipe()
    config = model_config("tiny")  # not built yet: the recipe's sizes, enough to check method options
    assert (config.num_layers, config.hidden_size) == (recipe.num_layers, recipe.hidden_size)
    monkeypatch.setattr(helpers.tiny, "tiny_dir", lambda *args: saved["safetensors"])
    assert model_config("tiny").num_layers == 3  # built: its own config.json
