"""Convert one of the FSDP trainer's torch.distributed.checkpoint folders into a Hugging Face checkpoint.

    python tools/convert_torch_dist_to_hf.py --input-dir /ckpt/run/iter_0000042 --output-dir /models/run-42 \
        --origin-hf-dir /models/Qwen3-0.6B

Reads only the model tensors (`model.hf.<HF name>`) of the DCP folder, whatever number of ranks
wrote it, and writes safetensors (sharded past `--max-shard-size`) that `from_pretrained` loads.
`--origin-hf-dir` supplies config.json, generation config and tokenizer files; tensors are cast to
the dtype that config declares (so HF -> DCP -> HF is bit-exact), or kept with `--keep-dtype`.
A tied `lm_head.weight` is dropped (it must equal the embedding). `--input-dir` may also be the
`--save` root: the iteration in latest_checkpointed_iteration.txt is used.

Runs in one process without torch.distributed, or inside an initialised group (rank 0 writes).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from slime.backends.fsdp.checkpoint import TRACKER, iteration_dir
from slime.backends.fsdp.model import HF_PREFIX
from tools.hf_weights import config_dtype, copy_hf_metadata, read_hf_config, write_hf_weights

MODEL_PREFIX = "model." + HF_PREFIX
SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
              "GIB": 2 ** 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1000000")
    return max(1, int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()]))


def resolve_iteration_dir(input_dir: str | os.PathLike) -> Path:
    """`iter_XXXXXXX/` itself, or the root holding the tracker file."""
    path = Path(input_dir)
    if (path / ".metadata").exists():
        return path
    tracker = path / TRACKER
    if tracker.exists():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise ValueError(f"--input-dir {path}: {TRACKER} holds {text!r}, expected an iteration number")
        resolved = iteration_dir(path, int(text))
        if (resolved / ".metadata").exists():
            return resolved
        raise ValueError(f"--input-dir {path}: {TRACKER} names {resolved.name}, which is missing or incomplete")
    if path.name.endswith(".tmp"):
        raise ValueError(f"--input-dir {path}: an unfinished checkpoint (the run died while writing it)")
    raise ValueError(f"--input-dir {path}: not a torch.distributed.checkpoint folder (no .metadata) and no {TRACKER}")


def read_model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full tensors of every `model.hf.*` entry, under HF names, in the stored dtype."""
    try:
        metadata = FileSystemReader(str(checkpoint)).read_metadata()
    except Exception as exc:  # the reader raises pickle/OS errors of several kinds on a damaged file
        raise ValueError(f"--input-dir {checkpoint}: cannot read .metadata: {exc}") from None
    state: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata):
            state[key] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise ValueError(f"--input-dir {checkpoint}: holds no model tensors (keys starting with {MODEL_PREFIX!r})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return {key[len(MODEL_PREFIX):]: tensor for key, tensor in state.items()}


def to_hf_weights(tensors: dict[str, torch.Tensor], config: dict, keep_dtype: bool) -> dict[str, torch.Tensor]:
    weights = dict(tensors)
    if config.get("tie_word_embeddings") and "lm_head.weight" in weights:
        embed = [k for k in weights if k.endswith("embed_tokens.weight")]
        if len(embed) == 1 and not torch.equal(weights[embed[0]], weights["lm_head.weight"]):
            raise ValueError("--origin-hf-dir config.json ties word embeddings, but the checkpoint's lm_head.weight "
                             f"differs from {embed[0]}; use the config of the model that was trained")
        weights.pop("lm_head.weight")
    dtype = None if keep_dtype else config_dtype(config)
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
    return weights


def convert(input_dir: str | os.PathLike, output_dir: str | os.PathLike, origin_hf_dir: str | os.PathLike, *,
            max_shard_bytes: int = 5 * 10 ** 9, keep_dtype: bool = False, overwrite: bool = False) -> Path:
    """Collective when a process group exists; rank 0 reads and writes."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(output_dir)
    if rank == 0:
        _convert_on_this_process(Path(input_dir), out, Path(origin_hf_dir), max_shard_bytes, keep_dtype, overwrite)
    if dist.is_initialized():
        dist.barrier()
    return out


def _convert_on_this_process(input_dir: Path, out: Path, origin: Path, max_shard_bytes: int, keep_dtype: bool,
                             overwrite: bool) -> None:
    config = read_hf_config(origin, "--origin-hf-dir")
    checkpoint = resolve_iteration_dir(input_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--output-dir {out} is not empty; choose a new directory or pass --overwrite")
    weights = to_hf_weights(read_model_tensors(checkpoint), config, keep_dtype)
    tmp = out.with_name(out.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        copy_hf_metadata(origin, tmp)
        write_hf_weights(tmp, weights, max_shard_bytes)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"--output-dir {out}: cannot write the checkpoint: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-dir", required=True, help="iter_XXXXXXX folder (or the --save root)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--origin-hf-dir", required=True, help="HF checkpoint that gives config and tokenizer")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--keep-dtype", action="store_true", help="keep the stored dtype instead of the config's")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args(argv)
    try:
        out = convert(args.input_dir, args.output_dir, args.origin_hf_dir, max_shard_bytes=parse_size(args.max_shard_size),
                      keep_dtype=args.keep_dtype, overwrite=args.overwrite)
    except ValueError as exc:
        parser.error(str(exc))
    print(out)


if __name__ == "__main__":
    main()
