"""Training checkpoints with torch.distributed.checkpoint, written atomically; and Hugging Face export.

    from slime.backends.fsdp.checkpoint import save_checkpoint, load_checkpoint, save_hf_checkpoint

Layout under `--save`:
    iter_0000007/            DCP shards of {"model", "optim"} (optim absent with --no-save-optim)
        trainer_state.pt     scheduler state, weight version, whether optim was saved (rank 0)
        rng_rank{r}.pt       python / numpy / torch (/ cuda) RNG states of rank r
    latest_checkpointed_iteration.txt   "7"
Every rank writes into `iter_0000007.tmp/`; after a barrier rank 0 renames it to `iter_0000007/`
and then rewrites the tracker file (via a temporary file and os.replace), so a crash never
leaves a half-written directory that `--load` would pick up. A write that fails on any rank (disk
full, permissions) fails on every rank with `CheckpointSaveError`; the temporary folder is removed
and the previous checkpoint and tracker stay as they were. `begin_async_save` / `finish_save` (--async-save) split
a save into the collective staging of the state to CPU memory and, later, the commit (rename and tracker) once the
background write has finished on every rank.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | os.PathLike | None) -> int | None:
    """The iteration recorded in `root/latest_checkpointed_iteration.txt`, or None when there is none."""
    if not root:
        return None
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise ValueError(f"--load {root}: {TRACKER} holds {text!r}, expected an iteration number") from None
    if not iteration_dir(root, iteration).is_dir():
        raise ValueError(f"--load {root}: {TRACKER} names iteration {iteration} but {iteration_dir(root, iteration)} "
                         "does not exist")
    return iteration


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


LOW_DISK_BYTES = 64 * 2 ** 20


def _failure_reason(error: BaseException, root: str | os.PathLike) -> str:
    if isinstance(error, CheckpointException):
        reasons = [str(exc) for exc, _ in error.failures.values()]
        reason = reasons[0] if reasons else "checkpoint write failed"
    else:
        reason = str(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error}"
    if "unexpected pos" in reason:  # torch's zip writer reports a failed write this way, without the errno
        reason += " (a short write: the disk is full or a file-size limit was hit)"
    try:
        stat = os.statvfs(root)
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        return reason
    if free < LOW_DISK_BYTES:
        reason += f"; the disk is full: {free // 1024} KiB free on the file system of --save"
    return reason


def _raise_if_any_rank_failed(error: BaseException | None, root: str | os.PathLike, final: Path, tmp: Path,
                              previous: int | None) -> None:
    """Collective: every rank learns whether some rank failed, and all raise the same message."""
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, None if error is None else _failure_reason(error, root))
    failed = [(rank, r) for rank, r in enumerate(reasons) if r is not None]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    rank, reason = failed[0]
    kept = (f"the previous checkpoint {iteration_dir(root, previous).name} is intact and --load resumes from it"
            if previous is not None else "no earlier checkpoint exists")
    raise CheckpointSaveError(f"--save {root}: could not write checkpoint {final.name} (rank {rank}: {reason}); "
                              f"{kept}") from error


@dataclass
class PendingSave:
    """A checkpoint being written in the background (--async-save); `finish_save` commits it."""
    root: str | os.PathLike
    iteration: int
    final: Path
    tmp: Path
    previous: int | None
    future: Any  # concurrent.futures.Future of the DCP write


def save_checkpoint(root: str | os.PathLike, iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], *, save_optim: bool = True) -> Path:
    """Collective over all ranks. Returns the final directory; CheckpointSaveError if any rank cannot write."""
    final, tmp, previous = _begin(root, iteration)
    error: BaseException | None = None
    try:
        dcp.save(_training_state(model, optimizer, save_optim), checkpoint_id=str(tmp))
        _write_small_files(tmp, trainer_state, save_optim)
    except (OSError, RuntimeError, CheckpointException) as e:  # torch.save raises RuntimeError on a short write
        error = e
    _raise_if_any_rank_failed(error, root, final, tmp, previous)
    return _commit(root, iteration, final, tmp, previous)


def begin_async_save(root: str | os.PathLike, iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     trainer_state: dict[str, Any], *, save_optim: bool = True,
                     process_group: dist.ProcessGroup | None = None) -> PendingSave:
    """Collective. Returns once the state is copied to CPU memory (training may change the weights from then on);
    the shards are written by a background thread that talks over `process_group` (not the training group)."""
    final, tmp, previous = _begin(root, iteration)
    error: BaseException | None = None
    future = None
    try:
        _write_small_files(tmp, trainer_state, save_optim)
        response = dcp.async_save(_training_state(model, optimizer, save_optim), checkpoint_id=str(tmp),
                                  process_group=process_group)
        staged = getattr(response, "staging_completion", None)
        if staged is not None:  # staging itself in the background: wait for the copy before the weights move
            staged.result()
        future = getattr(response, "upload_completion", response)
    except (OSError, RuntimeError, CheckpointException) as e:
        error = e
    _raise_if_any_rank_failed(error, root, final, tmp, previous)
    return PendingSave(root, iteration, final, tmp, previous, future)


def finish_save(pending: PendingSave) -> Path:
    """Collective: wait for the background write on every rank, then commit the checkpoint (rename, tracker)."""
    error: BaseException | None = None
    try:
        pending.future.result()
    except Exception as e:  # noqa: BLE001 - any failure of the write fails the checkpoint on every rank
        error = e
    _raise_if_any_rank_failed(error, pending.root, pending.final, pending.tmp, pending.previous)
    return _commit(pending.root, pending.iteration, pending.final, pending.tmp, pending.previous)


def _begin(root: str | os.PathLike, iteration: int) -> tuple[Path, Path, int | None]:
    """Rank 0 makes an empty `iter_N.tmp/`; every rank learns whether it could."""
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    previous = latest_iteration(root) if Path(root).is_dir() else None
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    _raise_if_any_rank_failed(error, root, final, tmp, previous)
    return final, tmp, previous


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer, save_optim: bool) -> dict[str, Any]:
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if save_optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def _write_small_files(tmp: Path, trainer_state: dict[str, Any], save_optim: bool) -> None:
    torch.save(_rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        torch.save(dict(trainer_state, has_optim=save_optim, world_size=dist.get_world_size()),
                   tmp / "trainer_state.pt")


def _commit(root: str | os.PathLike, iteration: int, final: Path, tmp: Path, previous: int | None) -> Path:
    """Rank 0 renames `iter_N.tmp/` to `iter_N/`, then points the tracker at it; collective."""
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            tracker_tmp = Path(root) / (TRACKER + ".tmp")
            tracker_tmp.write_text(str(iteration))
            os.replace(tracker_tmp, Path(root) / TRACKER)
        except OSError as e:
            error = e
    _raise_if_any_rank_failed(error, root, final, tmp, previous)
    return final


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Only the model weights of a checkpoint directory (for --ref-load)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def load_checkpoint(root: str | os.PathLike, iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    *, load_optim: bool = True) -> dict[str, Any]:
    """Restore model (+ optimizer when saved) and this rank's RNG; returns the trainer state dict."""
    path = iteration_dir(root, iteration)
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    with_optim = load_optim and trainer_state.get("has_optim", False)
    if with_optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if with_optim:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    trainer_state["loaded_optim"] = with_optim
    return trainer_state


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors on rank 0, empty elsewhere. Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _as_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.replace("torch.", ""), None), torch.dtype):
        return getattr(torch, value.replace("torch.", ""))
    return torch.float32


def source_checkpoint_dtype(source_dir: str | os.PathLike | None) -> torch.dtype | None:
    """The dtype `config.json` in `source_dir` declares (`dtype`, or the older `torch_dtype`; a multimodal
    config's `text_config` too); None when there is no such file or field."""
    if not source_dir:
        return None
    try:
        config = json.loads((Path(source_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        value = section.get("dtype") or section.get("torch_dtype")
        if value:
            return _as_dtype(value)
    return None


def save_hf_checkpoint(path: str | os.PathLike, model: nn.Module, hf_model: nn.Module, source_dir: str | None,
                       name_map=lambda n: n) -> None:
    """Write a checkpoint that AutoModelForCausalLM.from_pretrained loads (collective; rank 0 writes).

    Weights and config are in the dtype of the checkpoint in `source_dir` (a bf16 model stays bf16; the
    trainer's fp32 master copy would double the size and make the engines that load it decode in fp32);
    tokenizer files are copied from `source_dir`."""
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        dtype = source_checkpoint_dtype(source_dir) or _as_dtype(getattr(hf_model.config, "dtype", None))
        hf_state = {name_map(k): v.to(dtype) for k, v in state.items()}
        if getattr(hf_model.config, "tie_word_embeddings", False):
            hf_state.pop("lm_head.weight", None)
        from safetensors.torch import save_file

        config = copy.deepcopy(hf_model.config)
        config.dtype = dtype  # from_pretrained in fp32 rewrote it
        config.save_pretrained(str(out))
        if getattr(hf_model, "generation_config", None) is not None:
            hf_model.generation_config.save_pretrained(str(out))
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        if source_dir:
            for f in Path(source_dir).iterdir():
                if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",
                                                                                 "vocab.json", "merges.txt",
                                                                                 "chat_template.jinja")):
                    shutil.copy2(f, out / f.name)
    dist.barrier()
