"""Checkpoints in the public HF layout (``pytorch_model.bin`` or shards plus an index): writing them, and cheap
checks that the weight files of a folder are all there and complete before anything is loaded."""

from __future__ import annotations

import json
import os
import struct
import zipfile
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


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files a loader reads from ``folder`` (safetensors first, as ``transformers`` prefers).

    A sharded checkpoint is listed from its index; a missing index, shard or weights file raises
    ``FileNotFoundError`` and an unreadable index ``ValueError``, each naming the file.
    """
    folder = Path(folder)
    for single, index in ((SAFE_NAME, SAFE_INDEX), (BIN_NAME, BIN_INDEX)):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, AttributeError, TypeError) as error:
                raise ValueError(f"{folder / index}: not a valid weights index ({type(error).__name__}: {error}); "
                                 "download it again") from error
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / missing[0]}: missing ({len(missing)} of the {len(shards)} "
                                        f"files listed in {index}); download it again")
            return [folder / name for name in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: no weights file (expected {SAFE_NAME} or {BIN_NAME}, or shards with "
                            f"{SAFE_INDEX} / {BIN_INDEX})")


def check_weight_file(path: str | os.PathLike, thorough: bool = False) -> None:
    """Raise ``ValueError`` ("<file>: truncated or corrupt (...); download it again") if ``path`` is incomplete.

    Cheap by default: a ``.safetensors`` file must be as long as its header says, a ``.bin`` file must be a
    complete zip archive (``torch.save``'s format). ``thorough`` also checks every stored CRC of a ``.bin`` file
    (reads the whole file).
    """
    path = Path(path)
    size = path.stat().st_size

    def broken(why: str) -> ValueError:
        return ValueError(f"{path}: truncated or corrupt ({why}); download it again")

    if path.suffix == ".safetensors":
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise broken(f"{size} bytes, shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if 8 + length > size:
                raise broken(f"the header needs {8 + length:,} bytes, the file has {size:,}")
            try:
                header = json.loads(handle.read(length))
                end = max((spec["data_offsets"][1] for key, spec in header.items() if key != "__metadata__"),
                          default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
                raise broken(f"unreadable safetensors header: {error}") from error
        if 8 + length + end != size:
            raise broken(f"the header describes {8 + length + end:,} bytes, the file has {size:,}")
        return
    if not zipfile.is_zipfile(path):
        with path.open("rb") as handle:
            if handle.read(1) == b"\x80":  # torch's pre-1.6 pickle format: nothing cheap to check
                return
        raise broken(f"{size:,} bytes, not a complete torch.save archive")
    try:
        with zipfile.ZipFile(path) as archive:
            ends = [info.header_offset + info.compress_size for info in archive.infolist()]
            if ends and max(ends) > size:
                raise broken(f"the archive lists {max(ends):,} bytes, the file has {size:,}")
            bad = archive.testzip() if thorough else None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise broken(f"{type(error).__name__}: {error}") from error
    if bad is not None:
        raise broken(f"the stored checksum of {bad} does not match")
