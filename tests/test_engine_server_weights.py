"""Weight updates over real HTTP: from disk, from shared-memory tensors, from a gloo broadcast group.

    python -m pytest -q tests/test_engine_server_weights.py

The server starts on the seed-0 tiny model; each test loads another seed's weights and checks that
greedy tokens and log-probs equal an in-process LLMEngine started directly on that checkpoint, or
(broadcasts of mixed-dtype buckets, per tensor and "flattened_bucket", also through WeightSync)
exactly what the same server serves with those weights loaded from disk.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from slime.engine import EngineConfig, LLMEngine, SamplingParams
from slime.engine.weight_transport import (
    broadcast_tensors,
    destroy,
    dtype_name,
    init_weights_update_group,
    pack_by_dtype,
    serialize_named_tensors,
)
from test_engine_server import ServerProcess, free_port, generate, post

PROMPT = [12, 45, 78, 101, 33]
MAX_NEW = 8


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = ServerProcess(tiny_model_dir, "--weight-version", "v0").wait_healthy()
    yield proc
    proc.stop()


def reference(model_dir) -> dict:
    """Greedy tokens + log-probs of a fresh engine on the checkpoint (the ground truth after an update)."""
    engine = LLMEngine(EngineConfig(str(model_dir)))
    (out,) = engine.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True))
    return {"ids": out["token_ids"], "logprobs": out["logprobs"]}


def served(server) -> dict:
    out = generate(server, {"input_ids": PROMPT, "return_logprob": True,
                            "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}})
    pairs = out["meta_info"]["output_token_logprobs"]
    return {"ids": out["output_ids"], "logprobs": [p[0] for p in pairs], "version": out["meta_info"]["weight_version"]}


def assert_serves(server, expected: dict, version: str) -> None:
    got = served(server)
    assert got["version"] == version
    assert got["ids"] == expected["ids"]
    assert got["logprobs"] == pytest.approx(expected["logprobs"], abs=1e-4)
    assert httpx.get(server.url + "/get_weight_version").json() == {"weight_version": version}


def checkpoint_tensors(model_dir) -> list[tuple[str, torch.Tensor]]:
    return sorted(load_file(str(model_dir / "model.safetensors")).items())


@pytest.fixture(scope="module")
def seeds(tiny_model_factory, tiny_model_dir):
    dirs = {0: tiny_model_dir, **{s: tiny_model_factory("tiny", seed=s) for s in (1, 2, 3)}}
    refs = {s: reference(d) for s, d in dirs.items()}
    # the test only means something when the checkpoints answer differently
    assert len({tuple(r["ids"]) for r in refs.values()}) == len(refs) or len(
        {round(r["logprobs"][0], 3) for r in refs.values()}) == len(refs)
    return dirs, refs


def test_initial_version_and_weights(server, seeds):
    _, refs = seeds
    assert_serves(server, refs[0], "v0")


def test_update_from_disk(server, seeds):
    dirs, refs = seeds
    response = post(server, "/update_weights_from_disk", {"model_path": str(dirs[1]), "weight_version": "disk-1"})
    assert response.status_code == 200 and response.json()["success"], response.text
    assert_serves(server, refs[1], "disk-1")
    assert httpx.get(server.url + "/get_model_info").json()["model_path"] == str(dirs[1])


def test_update_from_tensor_through_shared_memory(server, seeds):
    dirs, refs = seeds
    named = checkpoint_tensors(dirs[2])
    payload = serialize_named_tensors(named)
    assert len(payload) < 20_000  # handles to shared memory, not the weights themselves
    response = post(server, "/update_weights_from_tensor",
                    {"serialized_named_tensors": [payload], "flush_cache": True, "weight_version": "tensor-2"})
    assert response.status_code == 200 and response.json()["success"], response.text
    del named  # the sender may drop its tensors once the call has returned
    assert_serves(server, refs[2], "tensor-2")


MIXED_DTYPES = (torch.bfloat16, torch.float32, torch.float64)  # tensor i travels as MIXED_DTYPES[i % 3]


@pytest.fixture(scope="module")
def mixed(seeds, tmp_path_factory):
    """Seed 3's checkpoint with every third tensor rounded to bf16 (so it travels as bf16 losslessly), its
    tensors in the dtypes they travel in, and what the server serves once it has loaded it from disk."""
    dirs, _ = seeds
    path = tmp_path_factory.mktemp("mixed-dtype")
    shutil.copytree(dirs[3], path, dirs_exist_ok=True)
    named = checkpoint_tensors(dirs[3])
    rounded = {n: t.to(torch.bfloat16).float() if i % 3 == 0 else t for i, (n, t) in enumerate(named)}
    save_file(rounded, str(path / "model.safetensors"))
    sent = [(n, t.to(MIXED_DTYPES[i % 3])) for i, (n, t) in enumerate(rounded.items())]
    return path, sent


def expected_from_disk(server, path, then_path) -> dict:
    """What the server serves with `path` loaded from disk; it is left on `then_path`'s weights, which
    serve something else."""
    response = post(server, "/update_weights_from_disk", {"model_path": str(path), "weight_version": "from-disk"})
    assert response.status_code == 200 and response.json()["success"], response.text
    expected = served(server)
    response = post(server, "/update_weights_from_disk", {"model_path": str(then_path), "weight_version": "other"})
    assert response.status_code == 200 and served(server)["logprobs"] != expected["logprobs"]
    return expected


class CountingGroup:
    """Wraps a process group and counts its broadcasts (collectives the sender issued)."""

    def __init__(self, group) -> None:
        self.group, self.broadcasts = group, 0

    def broadcast(self, *args):
        self.broadcasts += 1
        return self.group.broadcast(*args)

    def __getattr__(self, name):
        return getattr(self.group, name)


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_update_from_gloo_broadcast_group_in_buckets(server, seeds, mixed, load_format):
    """Mixed-dtype buckets, per tensor (SGLang's form) or one buffer per dtype: afterwards the server
    serves exactly what it serves with the same weights loaded from disk."""
    dirs, _ = seeds
    path, named = mixed
    expected = expected_from_disk(server, path, dirs[0])
    port = free_port()
    joined: dict = {}
    join = threading.Thread(target=lambda: joined.setdefault("response", post(server, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": "trainer-engines", "backend": "gloo"})))
    join.start()
    handle = init_weights_update_group("127.0.0.1", port, rank=0, world_size=2, group_name="trainer-engines",
                                       backend="gloo", timeout_s=120)
    join.join(120)
    assert joined["response"].status_code == 200 and joined["response"].json()["success"], joined["response"].text
    handle.process_group = counter = CountingGroup(handle.process_group)
    try:
        buckets = [named[: len(named) // 2], named[len(named) // 2:]]
        for i, bucket in enumerate(buckets):
            answer: dict = {}
            body = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket], "group_name": "trainer-engines",
                    "flush_cache": i == len(buckets) - 1, "weight_version": "dist-3" if i == len(buckets) - 1 else None}
            if load_format is not None:
                body["load_format"] = load_format
            request = threading.Thread(target=lambda a=answer, b=body: a.setdefault(
                "response", post(server, "/update_weights_from_distributed", b)))
            request.start()
            before = counter.broadcasts
            if load_format is None:
                broadcast_tensors(handle, [t for _, t in bucket], src=0)
                assert counter.broadcasts - before == len(bucket)
            else:
                broadcast_tensors(handle, pack_by_dtype(bucket, handle.device), src=0)
                assert counter.broadcasts - before == len(MIXED_DTYPES)  # one collective per dtype
            request.join(120)
            assert answer["response"].status_code == 200 and answer["response"].json()["success"], answer[
                "response"].text
        got = served(server)
        assert got["version"] == "dist-3"
        assert got["ids"] == expected["ids"] and got["logprobs"] == expected["logprobs"]  # bit-exact weights
    finally:
        destroy(handle)
    response = post(server, "/destroy_weights_update_group", {"group_name": "trainer-engines"})
    assert response.status_code == 200 and response.json()["success"]
    again = post(server, "/destroy_weights_update_group", {"group_name": "trainer-engines"})
    assert again.status_code == 400 and "no weight update group" in again.json()["message"]


class BucketTrainer:
    """What WeightSync reads of a trainer: a weight version and `export_weights(bucket_bytes)` buckets."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        self.named, self.weight_version = named, version

    def export_weights(self, bucket_bytes: int):
        bucket, size = [], 0
        for name, tensor in self.named:
            bucket.append((name, tensor.clone()))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket


@pytest.mark.parametrize("backend", ["builtin", "sglang"])
def test_weight_sync_broadcasts_flattened_buckets_to_the_builtin_engine(server, seeds, mixed, backend):
    """WeightSync's disaggregated mode: "flattened_bucket" for the built-in engine, per tensor for SGLang."""
    from slime.ray.weight_sync import WeightSync

    dirs, _ = seeds
    path, named = mixed
    expected = expected_from_disk(server, path, dirs[0])
    args = SimpleNamespace(rollout_backend=backend, update_weight_buffer_size=20_000, colocate=False)
    sync = WeightSync(args, rank=0, mode="distributed")
    formats: list = []
    plain_post = sync._post

    def recording_post(url, payload, timeout=600.0):
        if url.endswith("/update_weights_from_distributed"):
            formats.append(payload.get("load_format"))
        return plain_post(url, payload, timeout)

    sync._post = recording_post
    try:
        assert sync.update(BucketTrainer(named, 7), [{"url": server.url, "tp_size": 1}]) == 7
    finally:
        sync.close()
    assert len(formats) > 1  # several buckets
    assert set(formats) == ({"flattened_bucket"} if backend == "builtin" else {None})
    got = served(server)
    assert got["version"] == "7" and got["ids"] == expected["ids"] and got["logprobs"] == expected["logprobs"]


def test_an_engine_refusing_a_bucket_ends_the_broadcast_with_its_message(server, seeds, mixed):
    """Rank 0 does not wait out the group timeout (300 s) for an engine that answered 400; the next update works."""
    import time

    from slime.ray.weight_sync import WeightSync

    dirs, _ = seeds
    path, named = mixed
    expected = expected_from_disk(server, path, dirs[0])
    args = SimpleNamespace(rollout_backend="builtin", update_weight_buffer_size=20_000, colocate=False)
    sync = WeightSync(args, rank=0, mode="distributed")
    plain_post = sync._post

    def misaddressed_post(url, payload, timeout=600.0):
        if url.endswith("/update_weights_from_distributed"):
            payload = dict(payload, group_name="no-such-group")  # the engine refuses before receiving
        return plain_post(url, payload, timeout)

    sync._post = misaddressed_post
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="refused the bucket.*no-such-group"):
            sync.update(BucketTrainer(named, 3), [{"url": server.url, "tp_size": 1}])
        assert time.monotonic() - started < 60
        sync._post = plain_post
        assert sync.update(BucketTrainer(named, 4), [{"url": server.url, "tp_size": 1}]) == 4
    finally:
        sync.close()
    got = served(server)
    assert got["version"] == "4" and got["ids"] == expected["ids"] and got["logprobs"] == expected["logprobs"]


def test_update_with_unknown_tensor_name_fails_and_keeps_version(server, seeds):
    version = httpx.get(server.url + "/get_weight_version").json()["weight_version"]
    payload = serialize_named_tensors([("model.no_such.weight", torch.zeros(2, 2))])
    response = post(server, "/update_weights_from_tensor", {"serialized_named_tensors": [payload],
                                                            "weight_version": "never"})
    assert response.status_code == 400 and response.json()["success"] is False
    assert "model.no_such.weight" in response.json()["message"]
    assert httpx.get(server.url + "/get_weight_version").json()["weight_version"] == version


def test_update_while_generating_lands_between_steps(server, seeds):
    """A request in flight keeps running across an update and reports the version it finished under."""
    dirs, refs = seeds

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            long = asyncio.create_task(client.post(server.url + "/generate", json={
                "input_ids": PROMPT, "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}))
            while not (await client.get(server.url + "/get_server_info")).json()["internal_states"][0][
                    "num_running_requests"]:
                await asyncio.sleep(0.02)
            update = await client.post(server.url + "/update_weights_from_disk",
                                       json={"model_path": str(dirs[0]), "weight_version": "back-to-0"})
            return (await long).json(), update

    result, update = asyncio.run(scenario())
    assert update.status_code == 200 and update.json()["success"]
    assert result["meta_info"]["finish_reason"] == {"type": "length", "length": 400}
    assert result["meta_info"]["weight_version"] == "back-to-0"
    assert_serves(server, refs[0], "back-to-0")


def test_update_weight_version_only(server):
    response = post(server, "/update_weight_version", {"new_version": "relabelled"})
    assert response.status_code == 200 and response.json()["new_version"] == "relabelled"
    assert httpx.get(server.url + "/get_weight_version").json() == {"weight_version": "relabelled"}
    assert served(server)["version"] == "relabelled"


def test_weights_checker_finds_the_tensor_an_update_left_out(server, seeds):
    """/weights_checker (--check-weight-update-equal): after snapshot and reset_tensors, an update that skips one
    tensor leaves exactly that tensor different; the full update restores every tensor bit for bit."""
    dirs, refs = seeds
    assert post(server, "/update_weights_from_disk", {"model_path": str(dirs[0]), "weight_version": "v0"}).json()[
        "success"]
    for action in ("snapshot", "reset_tensors"):
        response = post(server, "/weights_checker", {"action": action})
        assert response.status_code == 200 and response.json()["success"], response.text
    named = checkpoint_tensors(dirs[0])
    partial = [(n, t) for n, t in named if n != "model.norm.weight"]
    update = {"serialized_named_tensors": [serialize_named_tensors(partial)], "weight_version": "partial"}
    assert post(server, "/update_weights_from_tensor", update).json()["success"]
    response = post(server, "/weights_checker", {"action": "compare"})
    assert response.status_code == 400 and not response.json()["success"]
    assert "1 of" in response.json()["message"] and "model.norm.weight" in response.json()["message"]

    update = {"serialized_named_tensors": [serialize_named_tensors(named)], "weight_version": "v0"}
    assert post(server, "/update_weights_from_tensor", update).json()["success"]
    response = post(server, "/weights_checker", {"action": "compare"})
    assert response.status_code == 200 and "tensors equal the snapshot" in response.json()["message"]
    assert_serves(server, refs[0], "v0")
    bad = post(server, "/weights_checker", {"action": "rewind"})
    assert bad.status_code == 400 and "is not one of snapshot, reset_tensors, compare" in bad.json()["message"]
