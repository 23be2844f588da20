"""Move named weight tensors from a trainer to an engine: by reference (tensors) or by broadcast (process group).

    payload = {"serialized_named_tensors": [serialize_named_tensors(named)], "flush_cache": True, "weight_version": "3"}
    handle = init_weights_update_group("127.0.0.1", 29600, rank=0, world_size=2, group_name="g", backend="gloo")
    broadcast_tensors(handle, [t for _, t in named], src=0); destroy(handle)

    serialized, buffer = serialize_flattened_bucket(named)  # built-in engine: one buffer per bucket
    broadcast_tensors(handle, pack_by_dtype(named, handle.device))  # built-in engine: one buffer per dtype

Both sides import this module: the trainer serialises / broadcasts, the engine server deserialises /
receives (`slime/engine/server.py`). `serialize_named_tensors` is SGLang's format (a pickled list of
(name, tensor)); `serialize_flattened_bucket` packs a bucket into one byte buffer plus plain metadata,
so a bucket costs one CUDA IPC handle / one shared-memory file instead of one per tensor;
`deserialize_named_tensors` reads both (the packed one as views into the buffer), and the receiver
calls `finish_reading(named)` after copying out. Over a process group the built-in engine takes
load_format "flattened_bucket" too: the sender broadcasts one uint8 buffer per dtype of the bucket
(`pack_by_dtype`) instead of one tensor at a time; the receiver derives every offset from the names,
dtypes and shapes of the request (`bucket_layout`, the same 64-byte aligned layout as
`flatten_named_tensors`) and loads views (`receive_named_tensors(..., load_format=...)`).
By reference, tensors travel as base64 of `ForkingPickler` bytes with torch's reductions: CUDA IPC
handles on GPU, shared-memory files ("file_system" sharing strategy, set process-wide here) on CPU;
the sender must keep its tensors alive until the receiving HTTP call has returned. Process groups
made here are standalone (own TCPStore, own gloo / NCCL backend object): the default process group
of either side is never touched, so a trainer that already runs torch.distributed can still join an
engine. `destroy` is local (it never waits for the other ranks), so each side may leave in any order.
"""

from __future__ import annotations

import base64
import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing  # noqa: F401  (registers torch's ForkingPickler reductions)
from multiprocessing.reduction import ForkingPickler

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}


def dtype_from_name(name: str) -> torch.dtype:
    """`"torch.bfloat16"` / `"bfloat16"` / `"bf16"` -> torch.bfloat16; ValueError naming the string otherwise."""
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} in weight update request (known: {sorted(DTYPES)})")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _use_file_system_sharing() -> None:
    # "file_descriptor" passes fds over a unix socket, which an HTTP body cannot carry; "file_system"
    # names the shared-memory file so any process on the host can open it.
    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")


def serialize_named_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Base64 of ForkingPickler bytes of `[(name, tensor), ...]`; CPU tensors are moved to shared memory."""
    _use_file_system_sharing()
    items = [(str(name), tensor.detach()) for name, tensor in named_tensors]
    return base64.b64encode(ForkingPickler.dumps(items, pickle.HIGHEST_PROTOCOL)).decode("ascii")


FLATTENED_KEY = "slime_flattened_bucket"
FLATTENED_BUCKET = "flattened_bucket"  # load_format of a packed bucket, by reference or by broadcast
_ALIGN = 64  # bytes; every tensor starts aligned so its dtype view and vectorised copies are legal


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel * dtype.itemsize


def bucket_layout(dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a packed uint8 buffer (64-byte aligned, in order) and the buffer's
    size; sender and receiver both derive the layout from dtypes and shapes alone."""
    offsets, total = [], 0
    for dtype, shape in zip(dtypes, shapes, strict=True):
        offsets.append(total)
        total += -(-_nbytes(dtype, shape) // _ALIGN) * _ALIGN
    return offsets, max(total, _ALIGN)


def _pack_into(buffer: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    with torch.no_grad():
        for tensor, offset in zip(tensors, offsets):
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes:
                buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)


def _views(buffer: torch.Tensor, names: Sequence[str], dtypes: Sequence[torch.dtype],
           shapes: Sequence[Sequence[int]], offsets: Sequence[int]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, dtype, shape, offset in zip(names, dtypes, shapes, offsets):
        nbytes = _nbytes(dtype, shape)
        if offset < 0 or offset + nbytes > buffer.numel():
            raise ValueError(f"flattened bucket: tensor {name!r} lies outside the buffer")
        out.append((str(name), buffer[offset:offset + nbytes].view(dtype).view(tuple(int(d) for d in shape))))
    return out


def flatten_named_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """One uint8 buffer on the tensors' device holding every tensor (each at a 64-byte aligned offset),
    plus names, dtypes, shapes and byte offsets as plain lists."""
    if not named_tensors:
        raise ValueError("flatten_named_tensors needs at least one tensor")
    device = named_tensors[0][1].device
    for name, tensor in named_tensors:
        if tensor.device != device:
            raise ValueError(f"tensor {name!r} is on {tensor.device}, the bucket on {device}")
    tensors = [t for _, t in named_tensors]
    offsets, size = bucket_layout([t.dtype for t in tensors], [t.shape for t in tensors])
    buffer = torch.empty(size, dtype=torch.uint8, device=device)
    _pack_into(buffer, tensors, offsets)
    return {FLATTENED_KEY: 1, "buffer": buffer, "names": [str(n) for n, _ in named_tensors],
            "dtypes": [dtype_name(t.dtype) for t in tensors], "shapes": [list(t.shape) for t in tensors],
            "offsets": offsets}


def unflatten_named_tensors(bucket: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """Views into `bucket["buffer"]` (no copy), in the order they were flattened."""
    buffer = bucket["buffer"]
    names, dtypes, shapes, offsets = bucket["names"], bucket["dtypes"], bucket["shapes"], bucket["offsets"]
    if not (isinstance(buffer, torch.Tensor) and buffer.dtype == torch.uint8 and buffer.dim() == 1):
        raise ValueError("flattened bucket: 'buffer' must be a 1-D uint8 tensor")
    if not (len(names) == len(dtypes) == len(shapes) == len(offsets)):
        raise ValueError("flattened bucket: names, dtypes, shapes and offsets differ in length")
    return _views(buffer, names, [dtype_from_name(d) for d in dtypes], shapes, offsets)


def dtype_layout(dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]]
                 ) -> list[tuple[torch.dtype, list[int], list[int], int]]:
    """The per-dtype buffers of a broadcast bucket: (dtype, indices of its tensors in bucket order, their
    byte offsets, buffer bytes), dtypes in order of first appearance."""
    members: dict[torch.dtype, list[int]] = {}
    for i, dtype in enumerate(dtypes):
        members.setdefault(dtype, []).append(i)
    layout = []
    for dtype, indices in members.items():
        offsets, size = bucket_layout([dtype] * len(indices), [shapes[i] for i in indices])
        layout.append((dtype, indices, offsets, size))
    return layout


def pack_by_dtype(named_tensors: Sequence[tuple[str, torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    """Sender of a "flattened_bucket" broadcast: one uint8 buffer on `device` per dtype of the bucket."""
    tensors = [t.detach() for _, t in named_tensors]
    buffers = []
    for _, indices, offsets, size in dtype_layout([t.dtype for t in tensors], [t.shape for t in tensors]):
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
        _pack_into(buffer, [tensors[i] for i in indices], offsets)
        buffers.append(buffer)
    return buffers


def unpack_by_dtype(buffers: Sequence[torch.Tensor], names: Sequence[str], dtypes: Sequence[torch.dtype],
                    shapes: Sequence[Sequence[int]], layout: list | None = None) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `pack_by_dtype`: views into `buffers` (no copy), in bucket order (`layout`: the
    `dtype_layout` of these dtypes and shapes, when the caller has it already)."""
    layout = dtype_layout(dtypes, shapes) if layout is None else layout
    assert len(buffers) == len(layout), "one buffer per dtype"
    out: list[Any] = [None] * len(names)
    for buffer, (dtype, indices, offsets, _) in zip(buffers, layout):
        views = _views(buffer, [names[i] for i in indices], [dtype] * len(indices), [shapes[i] for i in indices],
                       offsets)
        for i, view in zip(indices, views):
            out[i] = view
    return out


def serialize_flattened_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor]:
    """(payload, buffer): the payload names one buffer by reference; keep `buffer` alive until the
    receiving HTTP call has returned."""
    _use_file_system_sharing()
    bucket = flatten_named_tensors(named_tensors)
    return base64.b64encode(ForkingPickler.dumps(bucket, pickle.HIGHEST_PROTOCOL)).decode("ascii"), bucket["buffer"]


def deserialize_named_tensors(payload: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `serialize_named_tensors` and `serialize_flattened_bucket`, in any process on the same host."""
    _use_file_system_sharing()
    try:
        raw = base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"serialized_named_tensors is not valid base64: {e}") from e
    try:
        items = pickle.loads(raw)
    except Exception as e:  # unpickling failures come in many types (EOFError, RuntimeError for a gone shm file, ...)
        raise ValueError(f"serialized_named_tensors could not be unpickled: {type(e).__name__}: {e}") from e
    if isinstance(items, dict) and items.get(FLATTENED_KEY) == 1:
        try:
            return unflatten_named_tensors(items)
        except KeyError as e:
            raise ValueError(f"flattened bucket is missing {e}") from e
    if not isinstance(items, list) or not all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)
        for item in items
    ):
        raise ValueError("serialized_named_tensors must hold a list of (name, tensor) pairs")
    return items


def finish_reading(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Receiver of tensors by reference: wait until the copies out of them have run on the GPU, so the
    sender may reuse that memory once the HTTP call returns (CUDA IPC frees on refcount, not on stream)."""
    devices = {t.device for _, t in named_tensors if t.is_cuda}
    for device in devices:
        torch.cuda.synchronize(device)


@dataclass
class WeightUpdateGroup:
    """A standalone process group between trainer rank 0 and the engine ranks."""

    group_name: str
    rank: int
    world_size: int
    backend: str
    device: torch.device
    process_group: Any
    store: Any = field(repr=False)


def init_weights_update_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    device: str | torch.device | None = None,
) -> WeightUpdateGroup:
    """Join (rank 0: create) the group; blocks until all `world_size` ranks have joined.

    Rank 0 hosts the TCPStore at `master_address:master_port`. The default process group is not used.
    `device` is where received tensors are allocated for nccl (default: the current CUDA device).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size} (check rank_offset / world_size)")
    backend = backend.lower()
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0),
                          timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(f"slime_weights_update/{group_name}", store)
    if backend == "gloo":
        process_group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        device = torch.device("cpu")
    elif backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA; use backend 'gloo' on CPU")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        process_group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if device.type != "cuda":
            raise ValueError(f"backend 'nccl' needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        raise ValueError(f"unknown backend {backend!r} for the weight update group (use 'gloo' or 'nccl')")
    return WeightUpdateGroup(group_name, rank, world_size, backend, device, process_group, store)


class BroadcastAborted(RuntimeError):
    """`broadcast_tensors` stopped waiting because `abort_reason` named a reason (a peer will never join)."""


def broadcast_tensors(handle: WeightUpdateGroup, tensors: Iterable[torch.Tensor], src: int = 0,
                      abort_reason: Callable[[], str | None] | None = None) -> None:
    """Broadcast each tensor in order from `src`; receivers pass pre-allocated tensors that are filled in place.

    With `abort_reason`, the sender polls it while the broadcasts are in flight and raises BroadcastAborted
    with its answer instead of waiting out the group timeout for a peer that refused to join; the group is
    then unusable (`destroy` it, or keep a reference: a gloo group still holds the pending work)."""
    works = []
    for tensor in tensors:
        if tensor.device != handle.device:
            raise ValueError(f"tensor on {tensor.device} cannot travel over a {handle.backend} group on {handle.device}")
        work = handle.process_group.broadcast([tensor if tensor.is_contiguous() else tensor.contiguous()],
                                              _broadcast_options(src))
        if abort_reason is None:
            work.wait()
        else:
            works.append(work)
    while works and not all(work.is_completed() for work in works):
        reason = abort_reason()
        if reason is not None:
            raise BroadcastAborted(reason)
        time.sleep(0.001)
    for work in works:
        work.wait()  # raises what a completed work failed with


def check_load_format(load_format: str | None) -> str | None:
    """`load_format` of /update_weights_from_distributed: None (one broadcast per tensor, SGLang's form) or
    "flattened_bucket" (one per dtype); ValueError naming any other."""
    if load_format not in (None, FLATTENED_BUCKET):
        raise ValueError(f"load_format {load_format!r} is not supported by /update_weights_from_distributed "
                         f"(use {FLATTENED_BUCKET!r} or leave it out)")
    return load_format


def receive_named_tensors(
    handle: WeightUpdateGroup, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
    src: int = 0, load_format: str | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Engine side of `/update_weights_from_distributed`: allocate, then receive from `src` each tensor
    (load_format None) or each per-dtype buffer of `pack_by_dtype` ("flattened_bucket", returned as views)."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    torch_dtypes = [dtype_from_name(dt) for dt in dtypes]
    if check_load_format(load_format) == FLATTENED_BUCKET:
        layout = dtype_layout(torch_dtypes, shapes)
        buffers = [torch.empty(size, dtype=torch.uint8, device=handle.device) for *_, size in layout]
        broadcast_tensors(handle, buffers, src=src)
        return unpack_by_dtype(buffers, names, torch_dtypes, shapes, layout)
    tensors = [torch.empty(tuple(int(d) for d in shape), dtype=dtype, device=handle.device)
               for dtype, shape in zip(torch_dtypes, shapes)]
    broadcast_tensors(handle, tensors, src=src)
    return list(zip(names, tensors))


def destroy(handle: WeightUpdateGroup) -> None:
    """Leave the group without waiting for the other ranks; the handle is unusable afterwards."""
    group = handle.process_group
    handle.process_group = None
    handle.store = None
    if group is None:
        return
    if handle.backend == "nccl":
        torch.cuda.synchronize(handle.device)  # let our last broadcast finish before the communicator goes
        group.abort()  # local; ncclCommFinalize (shutdown) would wait for the peers
        return
    try:
        group.shutdown()
    except RuntimeError:
        pass  # gloo builds without shutdown support raise here; dropping the object frees it


def _broadcast_options(src: int) -> Any:
    options = dist.BroadcastOptions()
    options.rootRank = src
    options.rootTensor = 0
    return options
