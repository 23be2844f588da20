"""Weight transport between processes: shared-memory tensors and a standalone gloo broadcast group
(per tensor, or "flattened_bucket": one packed buffer per dtype).

    python -m pytest -q tests/test_weight_transport.py
"""

from __future__ import annotations

import base64
import json
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from slime.engine.weight_transport import (
    broadcast_tensors,
    check_load_format,
    deserialize_named_tensors,
    destroy,
    dtype_from_name,
    dtype_layout,
    flatten_named_tensors,
    init_weights_update_group,
    pack_by_dtype,
    receive_named_tensors,
    serialize_named_tensors,
    unpack_by_dtype,
)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_python(code: str, stdin: str = "", timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_serialize_round_trip_in_process_keeps_names_dtypes_values():
    named = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.bfloat16)),
             ("c", torch.randn(4, 6)[:, ::2])]  # a non-contiguous view
    out = deserialize_named_tensors(serialize_named_tensors(named))
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, a), (_, b) in zip(named, out):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_serialized_tensors_open_in_another_process_through_shared_memory():
    named = [("w", torch.randn(64, 32)), ("v", torch.full((7,), 3.5, dtype=torch.float16))]
    payload = serialize_named_tensors(named)
    out = _run_python(
        """
        import sys, json
        from slime.engine.weight_transport import deserialize_named_tensors
        items = deserialize_named_tensors(sys.stdin.read())
        print(json.dumps([[n, str(t.dtype), list(t.shape), float(t.double().sum())] for n, t in items]))
        """,
        stdin=payload,
    )
    got = json.loads(out)
    assert [g[0] for g in got] == ["w", "v"]
    assert got[0][1] == "torch.float32" and got[0][2] == [64, 32]
    assert got[0][3] == pytest.approx(float(named[0][1].double().sum()), rel=1e-6, abs=1e-6)
    assert got[1][3] == pytest.approx(7 * 3.5)
    assert len(payload) < 10_000, "tensor data must travel by reference, not by value"


@pytest.mark.parametrize("payload", ["not base64 !!", "aGVsbG8=", "truncated", "list"])
def test_bad_payload_gives_value_error(payload):
    if payload == "truncated":
        payload = serialize_named_tensors([("w", torch.ones(3))])[:40]
    elif payload == "list":  # valid pickle, wrong content
        payload = base64.b64encode(pickle.dumps([1, 2])).decode()
    with pytest.raises(ValueError, match="serialized_named_tensors"):
        deserialize_named_tensors(payload)


def test_dtype_names():
    assert dtype_from_name("torch.bfloat16") is torch.bfloat16
    assert dtype_from_name("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'complex7'"):
        dtype_from_name("complex7")


def test_gloo_group_broadcasts_to_other_process_without_touching_default_groups():
    port = _free_port()
    tensors = [torch.randn(16, 8), torch.arange(10, dtype=torch.int64), torch.randn(3).to(torch.bfloat16)]
    child_code = f"""
        import json, os, torch, torch.distributed as dist
        from slime.engine.weight_transport import init_weights_update_group, receive_named_tensors, destroy
        # the engine side may already run its own default group
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        handle = init_weights_update_group("127.0.0.1", {port}, rank=1, world_size=2, group_name="g1", backend="gloo")
        got = receive_named_tensors(handle, ["a", "b", "c"], ["float32", "int64", "torch.bfloat16"],
                                    [[16, 8], [10], [3]])
        destroy(handle)
        assert dist.get_world_size() == 1
        print(json.dumps([[n, str(t.dtype), float(t.double().sum())] for n, t in got]))
    """
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(child_code)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    handle = init_weights_update_group("127.0.0.1", port, rank=0, world_size=2, group_name="g1", backend="gloo",
                                       timeout_s=60)
    broadcast_tensors(handle, tensors, src=0)
    destroy(handle)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    got = json.loads(stdout)
    assert [g[0] for g in got] == ["a", "b", "c"]
    assert got[2][1] == "torch.bfloat16"
    for g, t in zip(got, tensors):
        assert g[2] == pytest.approx(float(t.double().sum()), rel=1e-6, abs=1e-6)
    assert not dist.is_initialized()


def test_group_rejects_bad_rank_and_backend():
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        init_weights_update_group("127.0.0.1", _free_port(), rank=2, world_size=2, group_name="x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl"):
            init_weights_update_group("127.0.0.1", _free_port(), rank=0, world_size=1, group_name="x", backend="nccl")
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        init_weights_update_group("127.0.0.1", _free_port(), rank=0, world_size=1, group_name="x", backend="mpi")


def test_single_rank_group_in_threads_receives_in_place():
    """Two ranks in one process (threads): the receiver's buffers are filled in place."""
    port = _free_port()
    source = [torch.randn(5, 5)]
    received: list = []

    def receiver():
        handle = init_weights_update_group("127.0.0.1", port, rank=1, world_size=2, group_name="t", timeout_s=60)
        received.extend(receive_named_tensors(handle, ["x"], ["float32"], [[5, 5]]))
        destroy(handle)

    thread = threading.Thread(target=receiver)
    thread.start()
    handle = init_weights_update_group("127.0.0.1", port, rank=0, world_size=2, group_name="t", timeout_s=60)
    broadcast_tensors(handle, source)
    destroy(handle)
    thread.join(60)
    assert received and torch.equal(received[0][1], source[0])


def _mixed_bucket() -> list[tuple[str, torch.Tensor]]:
    """Interleaved dtypes, odd sizes, an empty tensor, a scalar, NaN / -0.0 payloads (compared as bytes)."""
    special = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40])
    return [("a", torch.randn(3, 5)), ("b", torch.randn(7).bfloat16()), ("c", special), ("d", torch.arange(11)),
            ("e", torch.zeros(0, 4)), ("f", torch.tensor(2.5).bfloat16()), ("g", torch.tensor([True, False, True])),
            ("h", torch.randn(2, 3, 4))]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_pack_by_dtype_one_buffer_per_dtype_in_first_appearance_order():
    named = _mixed_bucket()
    buffers = pack_by_dtype(named, torch.device("cpu"))
    layout = dtype_layout([t.dtype for _, t in named], [t.shape for _, t in named])
    assert [dtype for dtype, *_ in layout] == [torch.float32, torch.bfloat16, torch.int64, torch.bool]
    assert [indices for _, indices, *_ in layout] == [[0, 2, 4, 7], [1, 5], [3], [6]]
    assert [b.numel() for b in buffers] == [size for *_, size in layout]
    assert all(b.dtype == torch.uint8 for b in buffers)
    # the receiver derives the same layout from the request's dtype names (aliases too) and shapes
    names, shapes = [n for n, _ in named], [list(t.shape) for _, t in named]
    dtypes = [dtype_from_name(d) for d in ("fp32", "bf16", "float32", "int64", "float", "torch.bfloat16", "bool",
                                           "float32")]
    out = unpack_by_dtype(buffers, names, dtypes, shapes)
    assert [n for n, _ in out] == names
    assert all(_same_bytes(got, sent) for (_, got), (_, sent) in zip(out, named))
    # one dtype: the layout of the by-reference flattened bucket
    single = [(n, t) for n, t in named if t.dtype == torch.float32]
    (buffer,) = pack_by_dtype(single, torch.device("cpu"))
    flat = flatten_named_tensors(single)
    assert flat["offsets"] == dtype_layout([t.dtype for _, t in single], [t.shape for _, t in single])[0][2]
    assert buffer.numel() == flat["buffer"].numel()


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_group_in_threads_moves_a_mixed_bucket_bit_exactly(load_format):
    """Per tensor (one broadcast each) or "flattened_bucket" (one per dtype), the receiver gets the same bytes."""
    port = _free_port()
    named = _mixed_bucket()
    received: list = []
    spec = ([n for n, _ in named], [str(t.dtype) for _, t in named], [list(t.shape) for _, t in named])

    def receiver():
        handle = init_weights_update_group("127.0.0.1", port, rank=1, world_size=2, group_name="m", timeout_s=60)
        received.extend(receive_named_tensors(handle, *spec, load_format=load_format))
        destroy(handle)

    thread = threading.Thread(target=receiver)
    thread.start()
    handle = init_weights_update_group("127.0.0.1", port, rank=0, world_size=2, group_name="m", timeout_s=60)
    sent = [t for _, t in named] if load_format is None else pack_by_dtype(named, handle.device)
    assert len(sent) == (len(named) if load_format is None else 4)
    broadcast_tensors(handle, sent)
    destroy(handle)
    thread.join(60)
    assert [n for n, _ in received] == spec[0]
    assert all(_same_bytes(got, t) for (_, got), (_, t) in zip(received, named))


def test_unknown_load_format_is_refused_before_any_broadcast():
    with pytest.raises(ValueError, match="load_format 'zstd'"):
        check_load_format("zstd")
    handle = SimpleNamespace(device=torch.device("cpu"), process_group=None)  # a broadcast would fail differently
    with pytest.raises(ValueError, match="load_format 'zstd'"):
        receive_named_tensors(handle, ["a"], ["float32"], [[1]], load_format="zstd")
    assert check_load_format(None) is None and check_load_format("flattened_bucket") == "flattened_bucket"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_travel_as_ipc_handles():
    named = [("w", torch.randn(256, 128, device="cuda")), ("b", torch.arange(9, device="cuda", dtype=torch.bfloat16))]
    payload = serialize_named_tensors(named)
    out = _run_python(
        """
        import sys, json
        from slime.engine.weight_transport import deserialize_named_tensors
        items = deserialize_named_tensors(sys.stdin.read())
        print(json.dumps([[n, str(t.device), float(t.double().sum())] for n, t in items]))
        """,
        stdin=payload,
    )
    got = json.loads(out)
    assert [g[1] for g in got] == ["cuda:0", "cuda:0"]
    assert got[0][2] == pytest.approx(float(named[0][1].double().sum()), rel=1e-6, abs=1e-4)
    assert got[1][2] == pytest.approx(36.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_nccl_group_broadcasts_between_gpus(load_format):
    port = _free_port()
    tensors = [torch.randn(64, 32, device="cuda:0"), torch.randn(5, device="cuda:0").to(torch.bfloat16),
               torch.randn(3, device="cuda:0")]
    child_code = f"""
        import json, torch
        from slime.engine.weight_transport import init_weights_update_group, receive_named_tensors, destroy
        handle = init_weights_update_group("127.0.0.1", {port}, rank=1, world_size=2, group_name="n",
                                           backend="nccl", device="cuda:1")
        got = receive_named_tensors(handle, ["a", "b", "c"], ["float32", "bfloat16", "float32"], [[64, 32], [5], [3]],
                                    load_format={load_format!r})
        torch.cuda.synchronize()
        print(json.dumps([[n, str(t.device), float(t.double().sum())] for n, t in got]))
        destroy(handle)
    """
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(child_code)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    handle = init_weights_update_group("127.0.0.1", port, rank=0, world_size=2, group_name="n", backend="nccl",
                                       timeout_s=120, device="cuda:0")
    named = list(zip("abc", tensors))
    broadcast_tensors(handle, tensors if load_format is None else pack_by_dtype(named, handle.device), src=0)
    destroy(handle)  # must not wait for the receiver
    stdout, stderr = child.communicate(timeout=180)
    assert child.returncode == 0, stderr
    got = json.loads(stdout.strip().splitlines()[-1])
    assert [g[0] for g in got] == ["a", "b", "c"] and [g[1] for g in got] == ["cuda:1"] * 3
    for g, t in zip(got, tensors):
        assert g[2] == pytest.approx(float(t.double().sum()), rel=1e-3, abs=1e-3)
