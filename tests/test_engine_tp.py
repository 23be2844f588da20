"""Tensor parallelism of the built-in engine on CPU (gloo): tp > 1 must reproduce tp 1.

    python -m pytest -q tests/test_engine_tp.py

Each tp engine starts its worker ranks as processes; the checks compare greedy tokens (exact) and
log-probs (1e-4, float32) with a tp 1 engine on the same checkpoint, after weight updates from disk,
tensors and a gloo broadcast (per tensor and "flattened_bucket"), after memory release/resume, and
through the HTTP server, which must leave no worker process behind when it stops or is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from slime.engine import EngineConfig, LLMEngine, SamplingParams
from test_engine_core_checkpoint import ENGINE_PROMPTS, sharpened_checkpoint, tiny_moe_checkpoint

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)
KV_TOKENS = 1024


def _engine(path: Path, tp: int) -> LLMEngine:
    return LLMEngine(EngineConfig(str(path), kv_cache_tokens=KV_TOKENS, tp_size=tp))


def assert_same(reference: list[dict], actual: list[dict]) -> None:
    for ref, out in zip(reference, actual, strict=True):
        assert out["token_ids"] == ref["token_ids"]
        assert out["finish_reason"] == ref["finish_reason"]
        assert max(abs(a - b) for a, b in zip(ref["logprobs"], out["logprobs"], strict=True)) < 1e-4


@pytest.fixture(scope="module")
def new_weights_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return sharpened_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("sharp-tiny-2"), seed=2)


@pytest.fixture(scope="module")
def reference(sharp_tiny_dir, new_weights_dir) -> dict[str, list[dict]]:
    """tp 1 greedy outputs of both checkpoints."""
    torch.set_num_threads(1)
    results = {}
    for key, path in (("old", sharp_tiny_dir), ("new", new_weights_dir)):
        engine = _engine(path, 1)
        results[key] = engine.generate(ENGINE_PROMPTS, GREEDY)
    return results


@pytest.fixture(scope="module")
def tp2(sharp_tiny_dir):
    torch.set_num_threads(1)
    engine = _engine(sharp_tiny_dir, 2)
    yield engine
    engine.close()


def test_tp2_matches_tp1_greedy_and_seeded_sampling(tp2, sharp_tiny_dir, reference):
    assert tp2.runner.local.kv_shape_tail[1] == 1  # 2 kv heads over 2 ranks
    assert_same(reference["old"], tp2.generate(ENGINE_PROMPTS, GREEDY))
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=8, seed=5)
    tp1 = _engine(sharp_tiny_dir, 1)
    assert_same(tp1.generate(ENGINE_PROMPTS, sampled), tp2.generate(ENGINE_PROMPTS, sampled))


def test_weight_updates_from_disk_and_tensors(tp2, sharp_tiny_dir, new_weights_dir, reference):
    from slime.engine.models.loader import iterate_checkpoint
    from slime.engine.weight_transport import serialize_named_tensors

    tp2.load_weights_from_disk(str(new_weights_dir))
    assert_same(reference["new"], tp2.generate(ENGINE_PROMPTS, GREEDY))
    named = list(iterate_checkpoint(str(sharp_tiny_dir)))  # the sender keeps its tensors alive
    payload = serialize_named_tensors(named)
    assert tp2.load_serialized_weights([payload, payload]) > 0  # one payload per tp rank (SGLang)
    assert_same(reference["old"], tp2.generate(ENGINE_PROMPTS, GREEDY))
    tp2.load_weights(iterate_checkpoint(str(new_weights_dir)))  # full tensors in this process
    assert_same(reference["new"], tp2.generate(ENGINE_PROMPTS, GREEDY))
    with pytest.raises(ValueError, match="one per tp rank"):
        tp2.load_serialized_weights([payload] * 3)


def test_weights_checker_on_every_rank(tp2, sharp_tiny_dir, reference):
    """snapshot / reset_tensors / compare reach each tp rank's shard (--check-weight-update-equal)."""
    tp2.load_weights_from_disk(str(sharp_tiny_dir))
    snapshot = tp2.runner.check_weights("snapshot")  # each rank's own count (its shard), rank 0 first
    assert snapshot.startswith("tp rank 0: snapshot of") and "; tp rank 1: snapshot of" in snapshot
    tp2.runner.check_weights("reset_tensors")
    with pytest.raises((ValueError, RuntimeError), match="tensors differ from the snapshot"):
        tp2.runner.check_weights("compare")
    tp2.load_weights_from_disk(str(sharp_tiny_dir))
    assert tp2.runner.check_weights("compare").count("equal the snapshot") == 2
    assert_same(reference["old"], tp2.generate(ENGINE_PROMPTS, GREEDY))


def mixed_dtypes(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Every other tensor as float64 (lossless): buckets of two interleaved dtypes."""
    return [(n, t.double() if i % 2 else t) for i, (n, t) in enumerate(named)]


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_weight_update_over_a_gloo_group(tp2, sharp_tiny_dir, new_weights_dir, reference, load_format):
    """The trainer is rank 0; engine tp rank r joins as rank_offset + r and keeps its shard of each tensor,
    sent one broadcast per tensor or ("flattened_bucket") one per dtype."""
    from slime.engine.models.loader import iterate_checkpoint
    from slime.engine.weight_transport import (broadcast_tensors, destroy, dtype_name, init_weights_update_group,
                                               pack_by_dtype)
    from test_engine_server import free_port

    tp2.load_weights_from_disk(str(new_weights_dir))  # the broadcast must bring the old weights back
    port = free_port()
    box: dict = {}
    joiner = threading.Thread(target=lambda: box.update(
        group=tp2.runner.join_weight_group("127.0.0.1", port, 1, 3, "g", "gloo")))
    joiner.start()
    trainer = init_weights_update_group("127.0.0.1", port, 0, 3, "g", "gloo")
    joiner.join(60)
    named = mixed_dtypes(list(iterate_checkpoint(str(sharp_tiny_dir))))
    names, dtypes = [n for n, _ in named], [dtype_name(t.dtype) for _, t in named]
    shapes = [list(t.shape) for _, t in named]
    receiver = threading.Thread(target=lambda: tp2.runner.receive_weights(box["group"], names, dtypes, shapes,
                                                                          load_format))
    receiver.start()
    tensors = [t for _, t in named] if load_format is None else pack_by_dtype(named, trainer.device)
    broadcast_tensors(trainer, tensors, src=0)
    receiver.join(60)
    assert not receiver.is_alive()
    tp2.flush_cache()
    assert_same(reference["old"], tp2.generate(ENGINE_PROMPTS, GREEDY))
    tp2.runner.leave_weight_group(box["group"])
    destroy(trainer)


def test_release_and_resume_memory(tp2, sharp_tiny_dir, reference):
    tp2.load_weights_from_disk(str(sharp_tiny_dir))
    tp2.release_memory()
    assert tp2.runner.local.kv_cache is None
    with pytest.raises(RuntimeError, match="released"):
        tp2.add_request("x", [1, 2], GREEDY)
    tp2.resume_memory()
    assert_same(reference["old"], tp2.generate(ENGINE_PROMPTS, GREEDY))


@pytest.mark.parametrize("model,tp", [("moe", 2), ("tiny-qwen2", 4)])
def test_moe_and_replicated_kv_heads(model, tp, tiny_model_factory, tmp_path_factory):
    """Qwen3-MoE splits each expert's intermediate dim; Qwen2 (q/k/v bias) at tp 4 > 2 kv heads replicates them."""
    torch.set_num_threads(1)
    path = (tiny_moe_checkpoint(tmp_path_factory.mktemp("moe-tp")) if model == "moe"
            else sharpened_checkpoint(tiny_model_factory(model), tmp_path_factory.mktemp("qwen2-tp"), seed=3))
    expected = _engine(path, 1).generate(ENGINE_PROMPTS, GREEDY)
    engine = _engine(path, tp)
    try:
        assert_same(expected, engine.generate(ENGINE_PROMPTS, GREEDY))
    finally:
        engine.close()
    assert all(not p.is_alive() for p in engine.runner.procs)


def test_bad_tp_size_is_a_clear_error(sharp_tiny_dir):
    with pytest.raises(ValueError, match=r"--tp-size 3 does not divide the model's num_attention_heads"):
        EngineConfig(str(sharp_tiny_dir), tp_size=3)
    with pytest.raises(ValueError, match=r"--tp-size must be >= 1"):
        EngineConfig(str(sharp_tiny_dir), tp_size=0)
    with pytest.raises(ValueError, match=r"num_key_value_heads"):
        EngineConfig(str(_config_dir(sharp_tiny_dir, num_key_value_heads=3, num_attention_heads=6)), tp_size=2)


def _config_dir(source: Path, **overrides) -> Path:
    import json
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="tp-config-"))
    config = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **overrides}))
    return out


# ----- the HTTP server ---------------------------------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(pids)


def _http_weight_updates(server, old_dir: Path, new_dir: Path, reference: dict[str, list[dict]]) -> None:
    from slime.engine.models.loader import iterate_checkpoint
    from slime.engine.weight_transport import (broadcast_tensors, destroy, dtype_name, init_weights_update_group,
                                               pack_by_dtype, serialize_named_tensors)
    from test_engine_server import free_port, generate, post

    def greedy(prompt: list[int]) -> list[int]:
        return generate(server, {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 10}})[
            "output_ids"]

    def with_logprobs(prompt: list[int]) -> tuple[list[int], list[float]]:
        out = generate(server, {"input_ids": prompt, "return_logprob": True,
                                "sampling_params": {"temperature": 0, "max_new_tokens": 10}})
        return out["output_ids"], [p[0] for p in out["meta_info"]["output_token_logprobs"]]

    prompt, index = ENGINE_PROMPTS[0], 0
    assert post(server, "/update_weights_from_disk", {"model_path": str(new_dir)}).json()["success"]
    assert greedy(prompt) == reference["new"][index]["token_ids"]
    named = list(iterate_checkpoint(str(old_dir)))
    payload = serialize_named_tensors(named)
    response = post(server, "/update_weights_from_tensor", {"serialized_named_tensors": [payload, payload]})
    assert response.json()["success"], response.text
    old_served = with_logprobs(prompt)
    assert old_served[0] == reference["old"][index]["token_ids"]
    # trainer rank 0 + engine tp ranks 1, 2 over gloo; the new weights arrive by broadcast
    port, box = free_port(), {}
    init = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 3,
            "group_name": "tp-test", "backend": "gloo"}
    joiner = threading.Thread(target=lambda: box.update(init=post(server, "/init_weights_update_group", init)))
    joiner.start()
    trainer = init_weights_update_group("127.0.0.1", port, 0, 3, "tp-test", "gloo")
    joiner.join(60)
    assert box["init"].json()["success"], box["init"].text
    new = list(iterate_checkpoint(str(new_dir)))
    body = {"names": [n for n, _ in new], "dtypes": [dtype_name(t.dtype) for _, t in new],
            "shapes": [list(t.shape) for _, t in new], "group_name": "tp-test"}
    sender = threading.Thread(target=lambda: box.update(update=post(server, "/update_weights_from_distributed", body)))
    sender.start()
    broadcast_tensors(trainer, [t for _, t in new], src=0)
    sender.join(60)
    assert box["update"].json()["success"], box["update"].text
    assert greedy(prompt) == reference["new"][index]["token_ids"]
    # then the old weights again, in two-dtype buckets packed one buffer per dtype: bit-exact on every rank
    for bucket in (named[: len(named) // 2], named[len(named) // 2:]):
        bucket = mixed_dtypes(bucket)
        body = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": "tp-test",
                "load_format": "flattened_bucket"}
        sender = threading.Thread(target=lambda b=body: box.update(
            update=post(server, "/update_weights_from_distributed", b)))
        sender.start()
        broadcast_tensors(trainer, pack_by_dtype(bucket, trainer.device), src=0)
        sender.join(60)
        assert box["update"].json()["success"], box["update"].text
    assert with_logprobs(prompt) == old_served
    assert post(server, "/destroy_weights_update_group", {"group_name": "tp-test"}).json()["success"]
    destroy(trainer)


@pytest.mark.parametrize("stop", ["terminate", "sigkill"])
def test_server_tp2_generates_and_leaves_no_workers(stop, sharp_tiny_dir, new_weights_dir, reference):
    from test_engine_server import ServerProcess, generate

    server = ServerProcess(sharp_tiny_dir, "--tp-size", "2", "--device", "cpu", "--max-total-tokens",
                           str(KV_TOKENS), "--skip-tokenizer-init").wait_healthy()
    try:
        workers = _descendants(server.proc.pid)
        assert workers, "the tp worker process is missing"
        out = generate(server, {"input_ids": ENGINE_PROMPTS[2], "return_logprob": True,
                                "sampling_params": {"temperature": 0, "max_new_tokens": 10}})
        assert out["output_ids"] == reference["old"][2]["token_ids"]
        if stop == "terminate":  # also the three weight-update endpoints, once
            _http_weight_updates(server, sharp_tiny_dir, new_weights_dir, reference)
        if stop == "sigkill":
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
        else:
            server.proc.terminate()
            server.proc.wait(60)
        assert not _wait_gone(workers), "tp workers outlived the server"
    finally:
        server.stop()


def test_server_rejects_bad_tp_size(sharp_tiny_dir):
    from test_engine_server import ServerProcess

    server = ServerProcess(sharp_tiny_dir, "--tp-size", "3", "--device", "cpu", "--skip-tokenizer-init")
    try:
        assert server.proc.wait(120) == 2
        assert "--tp-size 3 does not divide" in server.output()
    finally:
        server.stop()


def test_exit_process_keeps_the_exit_code_and_the_output_when_a_group_release_is_stuck():
    import subprocess
    import sys

    script = ("import threading, time\n"
              "from slime.engine import parallel\n"
              "stuck = threading.Thread(target=time.sleep, args=(60,), daemon=True)\n"
              "stuck.start()\n"
              "parallel._STUCK_RELEASES.append(stuck)\n"
              "print('result written', end='')\n"
              "parallel.exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout) == (3, "result written"), proc.stderr
    free = subprocess.run([sys.executable, "-c", "from slime.engine import parallel; parallel.exit_process(4)"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert free.returncode == 4, free.stderr
