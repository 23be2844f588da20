"""Tensor parallelism on 2 GPUs (NCCL, Triton kernels, CUDA graphs) at the Qwen3-0.6B shape: tp 2 == tp 1.

    cd /work/main && python -m pytest -q tests/test_engine_tp_gpu.py   # skips with fewer than 2 GPUs

The checkpoint is the qwen3-0.6b preset with informative (sharpened) weights. float32 must agree
token for token (log-probs within TF32 noise); in bfloat16 tp 2 must be as close to float32 as tp 1 is.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_engine_core_checkpoint import sharpen_

from slime.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]
PROMPTS = [[40, 41, 42, 43], [5, 6, 7], list(range(100, 160)), [77], list(range(1000, 1300, 3))]
KV_TOKENS = 16384


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tools.make_tiny_model import make_model

    path = make_model("qwen3-0.6b", tmp_path_factory.mktemp("q06-tp"), seed=0, dtype="float32", device="cuda")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    sharpen_(model, seed=1)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _engine(path, tp: int, dtype: str, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(str(path), device="cuda", dtype=dtype, kv_cache_tokens=KV_TOKENS, tp_size=tp, **kw))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _run(path, tp: int, dtype: str, params, **kw) -> list[dict]:
    engine = _engine(path, tp, dtype, **kw)
    try:
        return engine.generate(PROMPTS, params)
    finally:
        engine.close()


def test_tp2_close_releases_the_group_at_once_and_the_next_engine_works(model_dir, caplog):
    """Decode graphs hold the NCCL collectives they captured: close() must release them before the group
    (otherwise rank 0's teardown hung for TPInfo.shutdown's 10 s, and later engines of the process stalled)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    outputs, close_seconds = [], []
    for _ in range(2):
        engine = _engine(model_dir, 2, "bfloat16")
        outputs.append([r["token_ids"] for r in engine.generate(PROMPTS, params)])
        assert engine.runner.local.decode_graphs.captured
        started = time.monotonic()
        engine.close()
        close_seconds.append(time.monotonic() - started)
    assert outputs[0] == outputs[1]
    assert max(close_seconds) < 8.0, close_seconds
    assert "did not shut down" not in caplog.text


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_tp2_float32_matches_tp1(model_dir, enforce_eager):
    params = [SamplingParams(temperature=0.0, max_new_tokens=24)] * 3 + [
        SamplingParams(temperature=0.8, max_new_tokens=24, seed=i, ignore_eos=True) for i in range(2)]
    reference = _run(model_dir, 1, "float32", params, enforce_eager=enforce_eager)
    actual = _run(model_dir, 2, "float32", params, enforce_eager=enforce_eager)
    for ref, out in zip(reference, actual, strict=True):
        same = _common_prefix(ref["token_ids"], out["token_ids"])
        assert same >= 16, (ref["token_ids"], out["token_ids"])  # a near-tie may flip a late token (TF32)
        # Triton's tl.dot rounds float32 inputs to TF32 and tp=2 sums o_proj/down_proj in another order:
        # 0.0086 and 0.029 at most in two runs on 4xH200 (2026-11-26), late in the 24 tokens; a wrong shard
        # or a missed all-reduce is off by whole nats
        torch.testing.assert_close(torch.tensor(out["logprobs"][:same]), torch.tensor(ref["logprobs"][:same]),
                                   atol=5e-2, rtol=0)


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory):
    """The preset's own initialisation (std 0.02): not sharpened, so bfloat16 rounding does not snowball."""
    from tools.make_tiny_model import make_model

    return make_model("qwen3-0.6b", tmp_path_factory.mktemp("q06-plain"), seed=0, dtype="bfloat16", device="cuda")


def test_tp2_bfloat16_is_as_close_to_float32_as_tp1(plain_model_dir):
    """bfloat16 rounds differently with 2 ranks (each rank rounds its partial o_proj/down_proj sum before the
    all-reduce). On the sharpened checkpoint even tp 1 in bfloat16 picked float32's greedy first token for only
    8% of prompts (4xH100), so this uses the unsharpened weights and seeded sampling (T = 1): per prompt, the
    first sampled token and its log-prob against the float32 tp-1 engine. tp 2 must be about as close as tp 1;
    a wrong shard or a missed all-reduce moves every log-prob by tenths of a nat."""
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 5000, (int(n),), generator=generator).tolist()
               for n in torch.randint(3, 200, (48,), generator=generator)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=1, seed=i) for i in range(len(prompts))]

    def first_tokens(tp: int, dtype: str) -> list[tuple[int, float]]:
        engine = _engine(plain_model_dir, tp, dtype)
        try:
            return [(r["token_ids"][0], r["logprobs"][0]) for r in engine.generate(prompts, params)]
        finally:
            engine.close()

    exact, tp1, tp2 = first_tokens(1, "float32"), first_tokens(1, "bfloat16"), first_tokens(2, "bfloat16")

    def closeness(bf16: list[tuple[int, float]]) -> tuple[float, float]:
        same = [(lp, ref_lp) for (tok, lp), (ref_tok, ref_lp) in zip(bf16, exact, strict=True) if tok == ref_tok]
        return len(same) / len(exact), sum(abs(a - b) for a, b in same) / max(1, len(same))

    (agree1, err1), (agree2, err2) = closeness(tp1), closeness(tp2)
    assert agree1 >= 0.75, (agree1, err1)  # the comparison itself is meaningful
    assert agree2 >= agree1 - 0.15, (agree1, agree2)
    assert err2 <= 2 * err1 + 0.02, (err1, err2)


def test_tp2_weight_updates_and_memory_release_on_gpu(model_dir):
    from slime.engine.models.loader import iterate_checkpoint
    from slime.engine.weight_transport import serialize_named_tensors

    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    engine = _engine(model_dir, 2, "float32")
    try:
        before = engine.generate(PROMPTS, params)
        engine.release_memory()
        engine.resume_memory()
        assert [r["token_ids"] for r in engine.generate(PROMPTS, params)] == [r["token_ids"] for r in before]
        named = list(iterate_checkpoint(str(model_dir)))  # shared-memory payload (a CUDA IPC one would be opened
        payload = serialize_named_tensors(named)          # by rank 0 in its own process here)
        engine.load_serialized_weights([payload, payload])
        assert [r["token_ids"] for r in engine.generate(PROMPTS, params)] == [r["token_ids"] for r in before]
        engine.load_weights_from_disk(str(model_dir))
        assert [r["token_ids"] for r in engine.generate(PROMPTS, params)] == [r["token_ids"] for r in before]
    finally:
        engine.close()
