"""The built-in inference engine: add requests, call `step()` until done, read `TokenOutput`s.

    from slime.engine import EngineConfig, LLMEngine, SamplingParams
    engine = LLMEngine(EngineConfig("/path/to/hf-checkpoint"))
    engine.add_request("r1", [1, 2, 3], SamplingParams(temperature=0, max_new_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step(): print(out)

Single-threaded by design (the async server owns it in one thread). Token ids only; the tokenizer
lives at the HTTP edge, and so do stop strings.

Memory: `release_memory(["kv_cache"])` frees the KV cache tensors and forgets the prefix cache;
`release_memory(["weights"])` moves the weights to a CPU copy on GPU (on CPU the weights stay, there
being nowhere cheaper to put them). Both need an idle engine (no unfinished request) and are undone
by `resume_memory`. `None` means both tags.

Tensor parallelism (`tp_size > 1`): the runner is a `slime.engine.tp_worker.TPModelRunner`, which
starts the other ranks as processes and mirrors every runner call on them; `close()` stops them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Collection, Iterable

import torch

from slime.engine.block_manager import BlockManager
from slime.engine.config import EngineConfig
from slime.engine.model_runner import ModelRunner
from slime.engine.outputs import TokenOutput
from slime.engine.overlap import OverlapStepper
from slime.engine.sampling_params import SamplingParams
from slime.engine.scheduler import Scheduler
from slime.engine.sequence import Sequence, SequenceStatus

MEMORY_TAGS = ("kv_cache", "weights")


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def load_hf_config(model_path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--model-path {model_path!r}: cannot read config.json ({exc})") from exc


def read_eos_token_ids(model_path: str, hf_config: Any) -> list[int]:
    """EOS ids of config.json and generation_config.json together."""
    ids = _as_id_list(getattr(hf_config, "eos_token_id", None))
    generation_config = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(generation_config):
        try:
            ids += _as_id_list(json.load(open(generation_config)).get("eos_token_id"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{generation_config}: invalid JSON ({exc})") from exc
    return sorted(set(ids))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.hf_config = load_hf_config(config.model_path)
        self.eos_token_ids: list[int] = read_eos_token_ids(config.model_path, self.hf_config)
        model_max = int(getattr(self.hf_config, "max_position_embeddings", 0) or 0) or 32768
        self.max_context_len: int = config.context_length or model_max
        max_positions = max(self.max_context_len, model_max)
        if config.tp_size > 1:
            from slime.engine.tp_worker import TPModelRunner

            self.runner: Any = TPModelRunner(config, self.hf_config, max_positions, self.eos_token_ids)
        else:
            self.runner = ModelRunner(config, self.hf_config, max_positions=max_positions,
                                      eos_token_ids=self.eos_token_ids)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size)
        # A sequence may never need more blocks than the whole cache holds.
        max_seq_len = min(self.max_context_len, self.block_manager.capacity_tokens)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.eos_token_ids, max_seq_len)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.requests: dict[str, Sequence] = {}
        self.pending_outputs: list[TokenOutput] = []
        self.kv_cache_released = False
        self.overlap = OverlapStepper(self) if config.uses_overlap_schedule else None

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    quiet: bool = False) -> None:
        """Queue a request. `quiet`: `step()` reports it only when it finishes (or is aborted), then with all of
        its output tokens and log-probs at once, not one TokenOutput per step."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.kv_cache_released or self.runner.weights_offloaded:
            raise RuntimeError("engine memory is released; call resume_memory() before adding requests")
        if not prompt_token_ids:
            raise ValueError("input_ids is empty; a request needs at least one prompt token")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.hf_config.vocab_size]
        if bad:
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {self.hf_config.vocab_size}): {bad[:5]}")
        stop_ids = set(self.eos_token_ids) | set(params.stop_token_ids)
        if params.min_new_tokens > 0 and len(stop_ids) >= self.hf_config.vocab_size:
            raise ValueError("sampling_params.min_new_tokens > 0 with stop_token_ids covering the whole vocabulary "
                             "leaves nothing to sample")
        limit = self.scheduler.max_seq_len
        if len(prompt_token_ids) >= limit:
            what = "context length" if limit == self.max_context_len else "KV cache capacity"
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens does not fit the {what} of {limit} tokens "
                             f"(--context-length / --max-total-tokens)")
        seed = params.seed if params.seed is not None else int(
            torch.randint(0, 2**62, (1,), generator=self.generator).item())
        seq = Sequence(request_id, prompt_token_ids, params, sampling_seed=seed, quiet=quiet)
        if params.max_new_tokens == 0:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = {"type": "length", "length": 0}
            seq.cached_tokens = 0
            self.pending_outputs.append(self._output(seq, [], []))
            return
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        self.settle()
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, {"type": "abort", "message": "Abort request."})
        self.pending_outputs.append(self._output(seq, [], []))
        return True

    def take_outputs(self, request_ids: Collection[str]) -> list[TokenOutput]:
        """Remove and return the queued outputs (e.g. of just-aborted requests) of these ids, ahead of `step()`."""
        taken = [out for out in self.pending_outputs if out.request_id in request_ids]
        self.pending_outputs = [out for out in self.pending_outputs if out.request_id not in request_ids]
        return taken

    def abort_all(self) -> list[str]:
        ids = list(self.requests)
        for request_id in ids:
            self.abort_request(request_id)
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self.pending_outputs)

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def max_total_num_tokens(self) -> int:
        """KV cache capacity in tokens (SGLang's `max_total_num_tokens`)."""
        return self.block_manager.capacity_tokens

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        if self.overlap is not None:
            return self.overlap.step()
        outputs, self.pending_outputs = self.pending_outputs, []
        if not self.scheduler.has_unfinished():
            return outputs
        seqs, is_prefill = self.schedule()
        return outputs + self.run_batch(seqs, is_prefill)

    def schedule(self) -> tuple[list[Sequence], bool]:
        if self.kv_cache_released or self.runner.weights_offloaded:
            raise RuntimeError("engine memory is released; call resume_memory() before step()")
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:  # add_request's capacity checks make this unreachable; fail loudly rather than spin
            raise RuntimeError(f"scheduler made no progress with {len(self.scheduler.waiting)} waiting requests "
                               f"and {self.block_manager.num_free_blocks} free KV blocks")
        return seqs, is_prefill

    def run_batch(self, seqs: list[Sequence], is_prefill: bool) -> list[TokenOutput]:
        """Forward one scheduled batch, wait for its tokens, append them; the step's outputs."""
        token_ids, logprobs = self.runner.run(seqs, is_prefill)
        self.scheduler.postprocess(seqs, token_ids, logprobs)
        return self.step_outputs(zip(seqs, token_ids, logprobs))

    def step_outputs(self, results: Iterable[tuple[Sequence, int, float]]) -> list[TokenOutput]:
        """Outputs of sequences that just got a token: every one, or only finished ones for quiet requests."""
        outputs = []
        for seq, token_id, logprob in results:
            finished = seq.is_finished
            if finished:
                del self.requests[seq.request_id]
            if finished or not seq.quiet:
                outputs.append(self._output(seq, [token_id], [logprob]))
        return outputs

    def settle(self) -> None:
        """Apply the decode step in flight (overlap scheduling) before anything changes the engine's state."""
        if self.overlap is not None:
            self.overlap.flush()

    def _output(self, seq: Sequence, token_ids: list[int], logprobs: list[float]) -> TokenOutput:
        """This step's tokens; a quiet request's (finished) output carries all of them."""
        if seq.quiet:
            token_ids, logprobs = seq.output_token_ids, list(seq.output_logprobs)
        return TokenOutput(request_id=seq.request_id, token_ids=token_ids, logprobs=logprobs,
                           finished=seq.is_finished, finish_reason=seq.finish_reason if seq.is_finished else None,
                           prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                           cached_tokens=seq.cached_tokens or 0)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[dict]:
        """Run prompts to completion (tests, benchmarks): [{"token_ids", "logprobs", "finish_reason"}]."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{id(self)}-{i}" for i in range(len(prompts))]
        results: dict[str, dict] = {i: {"token_ids": [], "logprobs": [], "finish_reason": None} for i in ids}
        for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(request_id, prompt, p)
        while any(results[i]["finish_reason"] is None for i in ids):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id]["token_ids"] += out.token_ids
                    results[out.request_id]["logprobs"] += out.logprobs
                    if out.finished:
                        results[out.request_id]["finish_reason"] = out.finish_reason
        return [results[i] for i in ids]

    def warmup(self) -> None:
        """Run every GPU code path once before serving, as SGLang's server warm-up does: Triton kernels
        compile and the decode CUDA graphs are captured here, not in the first rollout. Short prompts and a
        long one (prefill), a repeat that hits the prefix cache (cached-context prefill), greedy and sampled
        rows (both samplers), a few decode steps (graph capture on every tp rank). Leaves no cache behind."""
        vocab = int(self.hf_config.vocab_size)
        block = self.block_manager.block_size
        longest = max(1, min(4 * block + 3, self.scheduler.max_seq_len - 8))  # fits the context and the cache
        prompts = [[(7 + i) % vocab for i in range(n)] for n in (3, longest)]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True, seed=0)  # seeded: the engine's
        # own generator (unseeded requests) is left where it was
        sampled = SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, seed=0)
        self.generate(prompts, [greedy, sampled])
        self.generate([prompts[1] + [11, 12]], sampled)  # the long prompt's blocks come from the prefix cache
        self.block_manager.reset_prefix_cache()

    # ---- weights and caches ---------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors (any subset, e.g. one bucket) in place; then forget the prefix cache."""
        self.settle()
        self.runner.load_weights(named_tensors)
        self.block_manager.reset_prefix_cache()

    def load_weights_from_disk(self, path: str) -> None:
        """Every tp rank reads the checkpoint itself and keeps its shard."""
        self.settle()
        self.runner.load_weights_from_disk(path)
        self.block_manager.reset_prefix_cache()

    def load_serialized_weights(self, payloads: list[str]) -> int:
        """`/update_weights_from_tensor`: tp rank r loads payloads[r] (payloads[0] when only one is given)."""
        self.settle()
        if self.config.tp_size > 1:
            if len(payloads) not in (1, self.config.tp_size):
                raise ValueError(f"serialized_named_tensors holds {len(payloads)} payloads; expected one per tp rank "
                                 f"({self.config.tp_size}) or a single one for all ranks")
            count = self.runner.load_serialized(payloads)
        else:
            from slime.engine.weight_transport import deserialize_named_tensors, finish_reading

            named = deserialize_named_tensors(payloads[0])
            self.runner.load_weights(named)
            finish_reading(named)
            count = len(named)
        self.block_manager.reset_prefix_cache()
        return count

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do for tp_size 1); idempotent."""
        self.settle()
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def flush_cache(self) -> bool:
        """Forget the prefix cache; refused (False) while requests are running, as SGLang does."""
        self.settle()
        if self.requests:
            return False
        self.block_manager.reset_prefix_cache()
        return True

    def release_memory(self, tags: list[str] | None = None) -> None:
        self.settle()
        tags = self._check_tags(tags)
        if self.requests:
            raise RuntimeError(f"cannot release memory with {len(self.requests)} unfinished requests; "
                               "abort them first (/abort_request)")
        if "kv_cache" in tags and not self.kv_cache_released:
            self.block_manager.reset_prefix_cache()
            self.runner.free_kv_cache()
            self.kv_cache_released = True
        if "weights" in tags:
            self.runner.offload_weights()

    def resume_memory(self, tags: list[str] | None = None) -> None:
        tags = self._check_tags(tags)
        if "weights" in tags:
            self.runner.onload_weights()
        if "kv_cache" in tags and self.kv_cache_released:
            self.runner.allocate_kv_cache()
            self.kv_cache_released = False

    @staticmethod
    def _check_tags(tags: list[str] | None) -> list[str]:
        if tags is None:
            return list(MEMORY_TAGS)
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            raise ValueError(f"memory tags {unknown} are unknown; use {list(MEMORY_TAGS)}")
        return list(tags)
