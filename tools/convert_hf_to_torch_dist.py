"""Convert a Hugging Face checkpoint into the FSDP trainer's torch.distributed.checkpoint layout.

    python tools/convert_hf_to_torch_dist.py --hf-checkpoint /models/Qwen3-0.6B --save /ckpt/Qwen3-0.6B_torch_dist

Writes `--save/iter_0000000/` (DCP shards of {"model": {"hf.<HF name>": tensor}}, the keys the trainer's
`--load` / `--ref-load` read; see slime/backends/fsdp/checkpoint.py) plus `trainer_state.pt` and the
`latest_checkpointed_iteration.txt` marker. Tensors keep their stored dtype, so converting back with
tools/convert_torch_dist_to_hf.py is bit-exact. The checkpoint holds no optimizer or RNG state and
records `rollout_id = -1`: a run that `--load`s it starts at rollout 0 with fresh optimizer state.
The directory is written under a temporary name and renamed when complete.

Runs in one process without torch.distributed, or inside an initialised group (rank 0 writes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from slime.backends.fsdp.checkpoint import TRACKER, iteration_dir
from slime.backends.fsdp.model import HF_PREFIX
from tools.hf_weights import read_hf_config, read_hf_weights

MODEL_KEY = "model"
CONVERTED_ROLLOUT_ID = -1


def expected_parameter_names(config: dict[str, Any], flag: str) -> set[str] | None:
    """State-dict names of the model the config describes (built on the meta device), or None if unknown."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        hf_config = AutoConfig.for_model(config["model_type"], **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (KeyError, ValueError) as exc:
        print(f"warning: {flag}: cannot build the model of config.json to check tensor names ({exc})", file=sys.stderr)
        return None
    return set(model.state_dict())


def trainer_model_state(weights: dict[str, torch.Tensor], config: dict[str, Any], flag: str) -> dict[str, torch.Tensor]:
    """HF tensors under the trainer's names; a tied lm_head is materialised as the embedding (as the trainer saves it)."""
    weights = dict(weights)
    expected = expected_parameter_names(config, flag)
    if expected is not None:
        if "lm_head.weight" in expected and "lm_head.weight" not in weights and config.get("tie_word_embeddings"):
            embed = [k for k in expected if k.endswith("embed_tokens.weight")]
            if len(embed) == 1 and embed[0] in weights:
                weights["lm_head.weight"] = weights[embed[0]]
        missing = sorted(expected - set(weights))
        unexpected = sorted(set(weights) - expected)
        if missing or unexpected:
            raise ValueError(f"{flag}: weights do not match config.json: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return {HF_PREFIX + name: tensor for name, tensor in weights.items()}


def _write_tracker(root: Path, iteration: int) -> None:
    tmp = root / (TRACKER + ".tmp")
    tmp.write_text(str(iteration))
    os.replace(tmp, root / TRACKER)


def convert(hf_checkpoint: str | os.PathLike, save: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the DCP checkpoint; returns the iteration directory. Collective when a process group exists."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = iteration_dir(save, 0)
    if rank == 0:
        final = _convert_on_this_process(Path(hf_checkpoint), Path(save), overwrite)
    if dist.is_initialized():
        dist.barrier()
    return final


def _convert_on_this_process(hf_checkpoint: Path, save: Path, overwrite: bool) -> Path:
    config = read_hf_config(hf_checkpoint, "--hf-checkpoint")
    if (save / TRACKER).exists() and not overwrite:
        raise ValueError(f"--save {save} already holds a checkpoint ({TRACKER}); choose an empty directory "
                         "or pass --overwrite")
    state = trainer_model_state(read_hf_weights(hf_checkpoint, "--hf-checkpoint"), config, "--hf-checkpoint")
    final = iteration_dir(save, 0)
    tmp = final.with_name(final.name + ".tmp")
    try:
        save.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({MODEL_KEY: state}, checkpoint_id=str(tmp), no_dist=True)
        torch.save({"scheduler": {"num_steps": 0}, "weight_version": 0, "rollout_id": CONVERTED_ROLLOUT_ID,
                    "has_optim": False, "world_size": 1, "converted_from_hf": str(hf_checkpoint)},
                   tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_tracker(save, 0)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"--save {save}: cannot write the checkpoint: {exc}") from None
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-checkpoint", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--save", required=True, help="output directory (gets iter_0000000/ and the tracker file)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --save")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # model-architecture flags of the Megatron converter (--num-layers, ...) come from config.json here
        print(f"note: ignoring {' '.join(unknown)} (the architecture is read from config.json)", file=sys.stderr)
    try:
        final = convert(args.hf_checkpoint, args.save, overwrite=args.overwrite)
    except ValueError as exc:
        parser.error(str(exc))
    print(final)


if __name__ == "__main__":
    main()
