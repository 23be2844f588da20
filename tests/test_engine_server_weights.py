"""Weight updates over real HTTP: from disk, from shared-memory tensors, from a gloo broadcast group.

    python -m pytest -q tests/test_engine_server_weights.py

The server starts on the seed-0 tiny model; each test loads another seed's weights and checks that
greedy tokens and log-probs equal an in-process LLMEngine started directly on that checkpoint.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import torch
from safetensors.torch import load_file

from slime.engine import EngineConfig, LLMEngine, SamplingParams
from slime.engine.weight_transport import (
    broadcast_tensors,
    destroy,
    dtype_name,
    init_weights_update_group,
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


def test_update_from_gloo_broadcast_group_in_buckets(server, seeds):
    dirs, refs = seeds
    named = checkpoint_tensors(dirs[3])
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
    try:
        buckets = [named[: len(named) // 2], named[len(named) // 2:]]
        for i, bucket in enumerate(buckets):
            answer: dict = {}
            request = threading.Thread(target=lambda b=bucket, last=(i == len(buckets) - 1): answer.setdefault(
                "response", post(server, "/update_weights_from_distributed", {
                    "names": [n for n, _ in b], "dtypes": [dtype_name(t.dtype) for _, t in b],
                    "shapes": [list(t.shape) for _, t in b], "group_name": "trainer-engines",
                    "flush_cache": last, "weight_version": "dist-3" if last else None})))
            request.start()
            broadcast_tensors(handle, [t for _, t in bucket], src=0)
            request.join(120)
            assert answer["response"].status_code == 200 and answer["response"].json()["success"]
        assert_serves(server, refs[3], "dist-3")
    finally:
        destroy(handle)
    response = post(server, "/destroy_weights_update_group", {"group_name": "trainer-engines"})
    assert response.status_code == 200 and response.json()["success"]
    again = post(server, "/destroy_weights_update_group", {"group_name": "trainer-engines"})
    assert again.status_code == 400 and "no weight update group" in again.json()["message"]


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
