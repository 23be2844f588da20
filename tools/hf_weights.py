"""Read and write the weight files of a Hugging Face checkpoint directory (safetensors, sharded or not).

    from tools.hf_weights import read_hf_weights, write_hf_weights, copy_hf_metadata, config_dtype

Used by tools/convert_hf_to_torch_dist.py and tools/convert_torch_dist_to_hf.py. Tensors keep the
dtype they were stored in; nothing here casts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
WEIGHT_INDEX_FILES = (INDEX_FILE, "pytorch_model.bin.index.json")


def _safetensor_files(directory: Path, flag: str) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{flag} {directory}: {INDEX_FILE} is not a valid index ({exc})") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{flag} {directory}: {INDEX_FILE} names missing shard files {missing}")
        return files
    return sorted(directory.glob("*.safetensors"))


def read_hf_weights(directory: str | os.PathLike, flag: str = "--hf-checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its Hugging Face name, in its stored dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"{flag} {path}: no such directory")
    files = _safetensor_files(path, flag)
    weights: dict[str, torch.Tensor] = {}
    if files:
        for file in files:
            try:
                shard = load_file(str(file))
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{flag} {path}: cannot read {file.name}: {exc}") from None
            duplicated = set(shard) & set(weights)
            if duplicated:
                raise ValueError(f"{flag} {path}: tensors {sorted(duplicated)[:3]} appear in more than one shard")
            weights.update(shard)
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise ValueError(f"{flag} {path}: no *.safetensors or pytorch_model*.bin weight files found")
        for file in bins:
            try:
                weights.update(torch.load(file, map_location="cpu", weights_only=True))
            except Exception as exc:  # torch.load raises many types for a corrupt file
                raise ValueError(f"{flag} {path}: cannot read {file.name}: {exc}") from None
    if not weights:
        raise ValueError(f"{flag} {path}: the weight files hold no tensors")
    return weights


def read_hf_config(directory: str | os.PathLike, flag: str) -> dict:
    config_file = Path(directory) / "config.json"
    if not config_file.exists():
        raise ValueError(f"{flag} {directory}: no config.json (not a Hugging Face checkpoint)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} {config_file}: not valid JSON ({exc})") from None


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype the config declares (`dtype`, or the older `torch_dtype`), or None."""
    name = config.get("dtype") or config.get("torch_dtype")
    if not isinstance(name, str) or name == "auto":
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _shards(weights: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_hf_weights(directory: str | os.PathLike, weights: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` + index past max_shard_bytes."""
    from safetensors.torch import save_file

    out = Path(directory)
    shards = _shards(weights, max_shard_bytes)
    contiguous = [{k: v.detach().cpu().contiguous() for k, v in shard.items()} for shard in shards]
    if len(contiguous) == 1:
        save_file(contiguous[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(contiguous):05d}.safetensors" for i in range(len(contiguous))]
    weight_map = {}
    for name, shard in zip(names, contiguous):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + [INDEX_FILE]


def copy_hf_metadata(source: str | os.PathLike, destination: str | os.PathLike) -> list[str]:
    """Copy config, generation config, tokenizer and template files (everything that is not weights)."""
    copied = []
    for file in sorted(Path(source).iterdir()):
        if not file.is_file() or file.name in WEIGHT_INDEX_FILES or file.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(file, Path(destination) / file.name)
        copied.append(file.name)
    return copied
