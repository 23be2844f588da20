"""The default rollout function (`--rollout-function-path slime.rollout.sglang_rollout.generate_rollout`).

    output = generate_rollout(args, rollout_id, data_source)            # RolloutFnTrainOutput
    output = generate_rollout(args, rollout_id, None, evaluation=True)  # RolloutFnEvalOutput

Train step: take `--over-sampling-batch-size` groups at a time from the data source, generate with at
most `--sglang-server-concurrency` requests in flight, score (`--rm-type` / `--custom-rm-path` /
`--group-rm`), run `--rollout-sample-hook-path` hooks, filter whole groups with
`--dynamic-sampling-filter-path`, and stop as soon as `--rollout-batch-size` groups are kept. What is
still in flight is aborted (`/abort_request` on every worker); with `--partial-rollout` the half-done
groups go back to the data source to be continued next step (`--mask-offpolicy-in-partial-rollout`
masks their earlier tokens). Groups with a FAILED sample are dropped, the reason counted in metrics.

A group's samples go to the engine as ONE batched /generate request (`--rollout-group-requests`, on by
default for the built-in engine): `input_ids` is the list of the samples' prompts, with one
`sampling_params` object for all (samples whose params differ, e.g. continued partial samples with
different budgets left, go in separate requests); the answer, a list in the same order, is split back
into the samples exactly as the per-sample path would fill them. A group holds one
`--sglang-server-concurrency` slot per sample while its request is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from slime.utils.http_utils import get, post
from slime.utils.types import Sample

from .async_runner import run
from .base_types import RolloutFnTrainOutput
from .errors import RolloutConfigError, load_plugin
from .filters import call_dynamic_filter
from .generate import (
    apply_generate_output,
    base_sampling_params,
    generate,
    generate_max_retries,
    generate_payload,
    router_url,
    serves_builtin_engines,
    with_sampling_seed,
)
from .metrics import RolloutMetrics
from .rewarding import failure_reason, mark_failed, score_group, score_sample
from .sample_hooks import apply_rollout_sample_hooks
from .tokenization import get_tokenizer

__all__ = ["generate", "generate_and_rm", "generate_and_rm_group", "generate_rollout", "GenerateState", "abort",
           "group_requests_enabled"]

logger = logging.getLogger(__name__)

ABORT_ROUNDS = 30  # abort + wait 1 s rounds before in-flight tasks are cancelled outright


class GenerateState:
    """Shared rollout state for one `args`: concurrency limit, in-flight group tasks, the aborted flag.

    `GenerateState(args)` returns the same object for the same `args`, as the original's singleton did, so
    plugins written for it (`GenerateState(args).tokenizer`, `.semaphore`, `.sampling_params`) keep working.
    """

    _instance: "GenerateState | None" = None

    def __new__(cls, args) -> "GenerateState":
        state = cls._instance
        if state is None or state.args is not args:
            state = super().__new__(cls)
            state.args = args
            state.concurrency = int(getattr(args, "sglang_server_concurrency", None) or 512)
            state._semaphores = {}
            state._slot_locks = {}
            state.reset()
            cls._instance = state
        return state

    @classmethod
    def get(cls, args) -> "GenerateState":
        return cls(args)

    @property
    def tokenizer(self):
        return get_tokenizer(self.args.hf_checkpoint)

    @property
    def sampling_params(self) -> dict[str, Any]:
        return base_sampling_params(self.args)

    @property
    def semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.concurrency)
        return self._semaphores[loop]

    @property
    def slot_lock(self) -> asyncio.Lock:
        """Held while a group gathers its slots, so that two groups never each hold half of what they need."""
        loop = asyncio.get_running_loop()
        if loop not in self._slot_locks:
            self._slot_locks[loop] = asyncio.Lock()
        return self._slot_locks[loop]

    def reset(self) -> None:
        self.pendings: set[asyncio.Task] = set()
        self.remaining_batch_size = 0
        self.aborted = False


async def _call_generate(args, sample: Sample, sampling_params: dict[str, Any], evaluation: bool) -> Sample | list:
    path = getattr(sample, "generate_function_path", None) or getattr(args, "custom_generate_function_path", None)
    if not path:
        return await generate(args, sample, sampling_params)
    fn = load_plugin(path, "--custom-generate-function-path")
    if "evaluation" in inspect.signature(fn).parameters:
        return await fn(args, sample, sampling_params, evaluation=evaluation)
    return await fn(args, sample, sampling_params)


def _needs_generation(args, sample: Sample) -> bool:
    """Masks off-policy tokens (partial rollout); False for a sample finished in an earlier step."""
    if getattr(args, "partial_rollout", False) and getattr(args, "mask_offpolicy_in_partial_rollout", False) \
            and sample.response_length > 0:
        sample.loss_mask = [0] * sample.response_length
    return not (sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED) and (
        sample.reward is not None or getattr(args, "group_rm", False)))


async def _hooks_and_reward(args, result: Sample | list, evaluation: bool, rollout_id: int | None) -> Sample | list:
    result = await apply_rollout_sample_hooks(args, result, rollout_id=rollout_id, evaluation=evaluation)
    if getattr(args, "group_rm", False):
        return result
    samples = result if isinstance(result, list) else [result]
    if any(s.status == Sample.Status.ABORTED for s in samples):
        return result
    await asyncio.gather(*(score_sample(args, s) for s in samples))
    return result


async def generate_and_rm(args, sample: Sample, sampling_params: dict[str, Any], evaluation: bool = False,
                          rollout_id: int | None = None) -> Sample | list[Sample]:
    """Generate (default or custom), run sample hooks, then score unless --group-rm. Never raises for a bad sample."""
    if not _needs_generation(args, sample):
        return sample  # finished in an earlier step (partial rollout)

    state = GenerateState.get(args)
    async with state.semaphore:
        if state.aborted:
            sample.status = Sample.Status.ABORTED
            return sample
        try:
            result = await _call_generate(args, sample, sampling_params, evaluation)
        except RolloutConfigError:
            raise  # bad flags / plugin paths: stop the run with the message
        except Exception as e:  # noqa: BLE001 - engine errors (after retries) fail this sample only
            mark_failed(sample, f"generate {type(e).__name__}: {e}", "generate")
            return sample
    return await _hooks_and_reward(args, result, evaluation, rollout_id)


def group_requests_enabled(args, group: list) -> bool:
    """Whether the group's samples go out as one batched /generate request (see --rollout-group-requests)."""
    if getattr(args, "custom_generate_function_path", None):
        return False
    if any(not isinstance(s, Sample) or getattr(s, "generate_function_path", None) for s in group):
        return False
    mode = getattr(args, "rollout_group_requests", None) or "auto"
    if mode == "auto":
        return serves_builtin_engines(args)
    if mode not in ("on", "off"):
        raise RolloutConfigError(f"--rollout-group-requests must be auto, on or off, got {mode!r}")
    return mode == "on"


@contextlib.asynccontextmanager
async def _request_slots(state: GenerateState, count: int) -> AsyncIterator[None]:
    """Hold `count` --sglang-server-concurrency slots (at most all of them) while a batched request runs."""
    count = max(1, min(count, state.concurrency))
    semaphore = state.semaphore
    taken = 0
    try:
        async with state.slot_lock:
            while taken < count:
                await semaphore.acquire()
                taken += 1
        yield
    finally:
        for _ in range(taken):
            semaphore.release()


async def _post_batch(args, batch: list[tuple[Sample, dict[str, Any]]]) -> None:
    """One /generate call for samples that share sampling params; all of them FAIL if it fails."""
    samples = [sample for sample, _ in batch]
    # one sampling_seed for the batch (the first sample's): the server gives the j-th prompt seed + j
    body = with_sampling_seed(args, samples[0], batch[0][1])
    if len(batch) > 1:
        body = {"input_ids": [payload["input_ids"] for _, payload in batch],
                "sampling_params": body["sampling_params"], "return_logprob": True}
    try:
        outputs = await post(router_url(args), body, max_retries=generate_max_retries(args))
        if len(batch) == 1:
            outputs = [outputs]
        if not isinstance(outputs, list) or len(outputs) != len(batch):
            raise ValueError(f"/generate answered {type(outputs).__name__} "
                             f"{len(outputs) if isinstance(outputs, list) else ''} for a batch of {len(batch)} prompts")
        for sample, output in zip(samples, outputs):
            apply_generate_output(sample, output)
    except RolloutConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - engine errors (after retries) fail these samples only
        for sample in samples:
            mark_failed(sample, f"generate {type(e).__name__}: {e}", "generate")


async def _generate_batched(args, samples: list[Sample], sampling_params: dict[str, Any]) -> None:
    """The default generate for `samples`, one request per distinct sampling params (normally one in all)."""
    batches: dict[str, list[tuple[Sample, dict[str, Any]]]] = {}
    for sample in samples:
        try:
            payload = generate_payload(args, sample, sampling_params)
        except RolloutConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a bad sample fails alone, as in the per-sample path
            mark_failed(sample, f"generate {type(e).__name__}: {e}", "generate")
            continue
        if payload is not None:  # None: no budget left, TRUNCATED without a request
            key = json.dumps(payload["sampling_params"], sort_keys=True)
            batches.setdefault(key, []).append((sample, payload))
    await asyncio.gather(*(_post_batch(args, batch) for batch in batches.values()))


async def _generate_and_rm_batched(args, group: list[Sample], sampling_params: dict[str, Any], evaluation: bool,
                                   rollout_id: int | None) -> list:
    """generate_and_rm for every sample of the group, with the generation done in one batched request."""
    state = GenerateState.get(args)
    todo = [sample for sample in group if _needs_generation(args, sample)]
    if not todo:
        return list(group)
    async with _request_slots(state, len(todo)):
        if state.aborted:
            for sample in todo:
                sample.status = Sample.Status.ABORTED
            return list(group)
        await _generate_batched(args, todo, sampling_params)
    generated = [sample for sample in todo if sample.status != Sample.Status.FAILED]
    finished = await asyncio.gather(*(_hooks_and_reward(args, s, evaluation, rollout_id) for s in generated))
    replaced = {id(sample): result for sample, result in zip(generated, finished)}
    return [replaced.get(id(sample), sample) for sample in group]


async def generate_and_rm_group(args, group: list[Sample], sampling_params: dict[str, Any], evaluation: bool = False,
                                rollout_id: int | None = None) -> list:
    state = GenerateState.get(args)
    if state.aborted:
        return group
    if group_requests_enabled(args, group):
        results = await _generate_and_rm_batched(args, group, dict(sampling_params), evaluation, rollout_id)
    else:
        results = await asyncio.gather(*(
            generate_and_rm(args, sample, dict(sampling_params), evaluation=evaluation, rollout_id=rollout_id)
            for sample in group
        ))
    if getattr(args, "group_rm", False) and not state.aborted:
        flat = [s for r in results for s in (r if isinstance(r, list) else [r])]
        if not any(s.status == Sample.Status.ABORTED for s in flat):
            await score_group(args, flat)
    return list(results)


def _flat(group: list) -> list[Sample]:
    return [s for item in group for s in (item if isinstance(item, list) else [item])]


async def worker_urls(args) -> list[str]:
    """Engine URLs behind the router, or the router itself when it lists none (a bare engine).

    Our fallback router answers `GET /list_workers` -> {"urls": [...]}; the real sglang-router 0.3.x
    answers `GET /workers` -> {"workers": [{"url": ...}, ...]} instead.
    """
    for path in ("/list_workers", "/workers"):
        try:
            answer = await get(router_url(args, path), timeout=10)
        except Exception:  # noqa: BLE001 - this router (or bare engine) has no such endpoint
            continue
        urls = _urls_in(answer)
        if urls:
            return [u if u.startswith("http") else f"http://{u}" for u in urls]
    return [router_url(args, "")]


def _urls_in(answer: object) -> list[str]:
    if not isinstance(answer, dict):
        return []
    if isinstance(answer.get("urls"), list):
        return [u for u in answer["urls"] if isinstance(u, str)]
    workers = answer.get("workers")
    if isinstance(workers, list):
        return [w["url"] for w in workers if isinstance(w, dict) and isinstance(w.get("url"), str)]
    return []


async def abort_all_requests(urls: list[str]) -> None:
    await asyncio.gather(*(post(f"{url}/abort_request", {"rid": "", "abort_all": True}, max_retries=3) for url in urls),
                         return_exceptions=True)


async def abort(args, rollout_id: int, metrics: RolloutMetrics | None = None) -> list[list[Sample]]:
    """Stop every in-flight request; return the unfinished groups (partial rollout) or nothing."""
    state = GenerateState.get(args)
    state.aborted = True
    if not state.pendings:
        return []
    urls = await worker_urls(args)
    pending = set(state.pendings)
    finished: list[asyncio.Task] = []
    for _ in range(ABORT_ROUNDS):
        await abort_all_requests(urls)
        done, pending = await asyncio.wait(pending, timeout=1.0)
        finished += done
        if not pending:
            break
    for task in pending:  # a custom generate that ignores aborts
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        logger.warning("cancelled %d rollout groups that kept running after %d abort rounds", len(pending), ABORT_ROUNDS)
    state.pendings.clear()
    if metrics is not None:
        metrics.aborted_groups += len(finished) + len(pending)
    if not getattr(args, "partial_rollout", False):
        return []
    leftovers = []
    for task in finished:
        if task.cancelled() or task.exception() is not None:
            continue
        group = task.result()
        for sample in _flat(group):
            if sample.status == Sample.Status.FAILED:
                break
            if sample.response_length > 0 and "start_rollout_id" not in sample.metadata:
                sample.metadata["start_rollout_id"] = rollout_id
        else:
            leftovers.append(group)
    if metrics is not None:
        metrics.partial_groups_returned += len(leftovers)
    return leftovers


def _first_index(group: list) -> int:
    first = _flat(group)[0]
    return first.index if first.index is not None else 0


async def generate_rollout_async(args, rollout_id: int, get_samples) -> tuple[RolloutFnTrainOutput, list[list[Sample]]]:
    state = GenerateState.get(args)
    state.reset()
    metrics = RolloutMetrics()
    target = int(args.rollout_batch_size)
    over_sampling = int(getattr(args, "over_sampling_batch_size", None) or target)
    if over_sampling < 1:
        raise ValueError(f"--over-sampling-batch-size must be >= 1, got {over_sampling}")
    dynamic_filter = None
    if getattr(args, "dynamic_sampling_filter_path", None):
        dynamic_filter = load_plugin(args.dynamic_sampling_filter_path, "--dynamic-sampling-filter-path")
    sampling_params = base_sampling_params(args)
    failed_groups, first_failure = 0, None
    data: list[list] = []
    try:
        while len(data) < target:
            while state.remaining_batch_size < target:
                groups = get_samples(over_sampling)
                if not groups:
                    raise ValueError("the data source returned no prompts (check --prompt-data)")
                for group in groups:
                    state.pendings.add(asyncio.ensure_future(
                        generate_and_rm_group(args, group, sampling_params, rollout_id=rollout_id)))
                state.remaining_batch_size += len(groups)
            done, state.pendings = await asyncio.wait(state.pendings, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                group = task.result()
                failed = [s for s in _flat(group) if s.status == Sample.Status.FAILED]
                if failed:
                    for sample in failed:
                        metrics.on_failed_sample(sample.metadata.get("failure_stage"))
                    metrics.on_drop("failed_sample")
                    state.remaining_batch_size -= 1
                    failed_groups += 1
                    first_failure = first_failure or failure_reason(failed[0])
                    if not data and failed_groups >= 2 * max(target, over_sampling):
                        raise RuntimeError(f"every rollout group is failing ({failed_groups} so far); "
                                           f"first reason: {first_failure}")
                    continue
                verdict = call_dynamic_filter(dynamic_filter, args, group)
                if not verdict.keep:
                    metrics.on_drop(verdict.reason)
                    state.remaining_batch_size -= 1
                    dropped = sum(metrics.drop_reasons.values())
                    if dropped % (10 * max(target, over_sampling)) == 0:
                        logger.warning("--dynamic-sampling-filter-path has dropped %d groups and kept %d of %d so far "
                                       "(reasons: %s)", dropped, len(data), target, dict(metrics.drop_reasons))
                    continue
                if len(data) < target:
                    data.append(group)
        leftovers = await abort(args, rollout_id, metrics)
    except BaseException:
        for task in state.pendings:
            task.cancel()
        state.pendings.clear()
        raise
    finally:
        state.aborted = False
    data.sort(key=_first_index)
    return RolloutFnTrainOutput(samples=data, metrics=metrics.collect()), leftovers


def generate_rollout(args, rollout_id: int, data_source: Any, evaluation: bool = False):
    """Entry point with the original signature; `data_source` needs `get_samples(n)` and `add_samples(groups)`."""
    if evaluation:
        from .eval import eval_rollout

        return run(eval_rollout(args, rollout_id))
    output, leftovers = run(generate_rollout_async(args, rollout_id, data_source.get_samples))
    if leftovers:
        data_source.add_samples(leftovers)
    return output
