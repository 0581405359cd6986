"""Writing checkpoints in the public HF layout (``pytorch_model.bin`` or shards plus an index)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def remove_weight_files(folder: str | os.PathLike, keep: str) -> None:
    """Delete weight files of the other format (``keep`` is "bin" or "safetensors") so loaders see one set."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    other = ".safetensors" if keep == "bin" else ".bin"
    for path in folder.iterdir():
        stem = path.name
        is_weights = stem.startswith(("pytorch_model", "model"))
        if is_weights and (stem.endswith(other) or stem.endswith(other + ".index.json")):
            path.unlink()


def save_bin_checkpoint(
    state: dict[str, torch.Tensor], folder: str | os.PathLike, max_shard_size: str | int = "10GB"
) -> list[str]:
    """Write ``state`` as ``pytorch_model.bin``, or as numbered shards with ``pytorch_model.bin.index.json``.

    Each file is written to a temporary name and renamed, so an interrupted save never leaves a truncated
    file under the final name. Returns the written file names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard_size
    )
    written = []
    for filename, names in split.filename_to_tensors.items():
        tmp = folder / (filename + ".tmp")
        torch.save({name: state[name].detach().contiguous() for name in names}, tmp)
        os.replace(tmp, folder / filename)
        written.append(filename)
    for path in folder.glob("pytorch_model*.bin"):
        if path.name not in written:  # shards of an earlier, differently sized save
            path.unlink()
    index = folder / BIN_INDEX
    if split.is_sharded:
        content = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        index.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        written.append(BIN_INDEX)
    elif index.exists():
        index.unlink()
    return written
