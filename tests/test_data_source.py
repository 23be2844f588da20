"""Data source + buffer: grouping, epochs, shuffling, buffer filters, and exact resume after save/load.

    python -m pytest -q tests/test_data_source.py
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slime.data.data_source import (
    RolloutDataSourceWithBuffer,
    create_data_source,
    resolve_num_rollout,
    state_path,
)
from slime.utils.arguments import parse_args
from slime.utils.types import Sample, Status


def make_args(tmp_path: Path, n_prompts: int = 10, **overrides) -> argparse.Namespace:
    """Real `parse_args` output; keyword overrides are flag dests (`rollout_shuffle=True` -> `--rollout-shuffle`)."""
    return parse_args(make_argv(tmp_path, n_prompts, **overrides))


def make_argv(tmp_path: Path, n_prompts: int = 10, **overrides) -> list[str]:
    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"input": f"p{i}", "label": str(i)}) + "\n" for i in range(n_prompts)))
    values = dict(prompt_data=str(data), label_key="label", n_samples_per_prompt=2, rollout_batch_size=3,
                  save=str(tmp_path / "ckpt"), load=str(tmp_path / "ckpt"),
                  actor_num_gpus_per_node=1)
    values.update(overrides)
    argv: list[str] = []
    for dest, value in values.items():
        if dest == "rollout_global_dataset":
            argv += [] if value else ["--disable-rollout-global-dataset"]
        elif value is True:
            argv.append("--" + dest.replace("_", "-"))
        elif value is not None and value is not False:
            argv += ["--" + dest.replace("_", "-"), json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def prompts_of(groups: list[list[Sample]]) -> list[str]:
    return [group[0].prompt for group in groups]


def test_groups_are_fresh_copies_with_increasing_indices(tmp_path):
    source = RolloutDataSourceWithBuffer(make_args(tmp_path, n_samples_per_prompt=3))
    groups = source.get_samples(2) + source.get_samples(2)
    assert prompts_of(groups) == ["p0", "p1", "p2", "p3"]
    assert all(len(g) == 3 for g in groups)
    assert [s.index for g in groups for s in g] == list(range(12))
    assert [[s.group_index for s in g] for g in groups] == [[0] * 3, [1] * 3, [2] * 3, [3] * 3]
    assert all(s.label == s.prompt[1:] and s.status is Status.PENDING for g in groups for s in g)
    groups[0][0].metadata["touched"] = True
    groups[0][0].tokens.append(5)
    assert groups[0][1].metadata == {} and groups[0][1].tokens == []
    assert source.dataset.samples[0].metadata == {} and source.dataset.samples[0].index is None
    assert source.dataset_size == 10 and source.get_samples(0) == []
    with pytest.raises(ValueError, match="num_samples must be >= 0"):
        source.get_samples(-1)
    args = make_args(tmp_path)
    args.n_samples_per_prompt = 0  # parse_args may reject it first; the data source must too
    with pytest.raises(ValueError, match="--n-samples-per-prompt must be >= 1, got 0"):
        RolloutDataSourceWithBuffer(args)


def test_epochs_wrap_in_order_without_shuffle(tmp_path):
    source = RolloutDataSourceWithBuffer(make_args(tmp_path, n_prompts=4, n_samples_per_prompt=1))
    assert prompts_of(source.get_samples(3)) == ["p0", "p1", "p2"]
    assert prompts_of(source.get_samples(3)) == ["p3", "p0", "p1"]
    assert source.epoch_id == 1
    # more than a whole epoch in one call
    assert prompts_of(source.get_samples(7)) == ["p2", "p3", "p0", "p1", "p2", "p3", "p0"]
    assert source.epoch_id == 3 and source.sample_offset == 1


def test_shuffle_is_seeded_per_epoch_and_covers_every_prompt(tmp_path):
    def run(seed: int) -> list[list[str]]:
        source = RolloutDataSourceWithBuffer(make_args(tmp_path, n_prompts=10, rollout_shuffle=True,
                                                       rollout_seed=seed, n_samples_per_prompt=1))
        return [prompts_of(source.get_samples(10)) for _ in range(3)]

    epochs = run(7)
    assert epochs == run(7)
    assert epochs != run(8)
    all_prompts = sorted(f"p{i}" for i in range(10))
    assert all(sorted(epoch) == all_prompts for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != [f"p{i}" for i in range(10)]


def test_buffer_is_served_first_and_checked(tmp_path):
    source = RolloutDataSourceWithBuffer(make_args(tmp_path))
    first = source.get_samples(2)
    for group in first:
        for sample in group:
            sample.status = Status.ABORTED
    source.add_samples(first)
    assert source.get_buffer_length() == 2
    again = source.get_samples(3)
    assert [g[0].index for g in again[:2]] == [0, 2]  # the same groups, indices kept
    assert again[0][0].status is Status.ABORTED
    assert prompts_of(again) == ["p0", "p1", "p2"] and again[2][0].index == 4
    assert source.get_buffer_length() == 0

    with pytest.raises(ValueError, match="group 0 has 1 samples, --n-samples-per-prompt is 2"):
        source.add_samples([[Sample(prompt="x")]])
    with pytest.raises(ValueError, match="group 1 must be a list of Sample"):
        source.add_samples([[Sample(), Sample()], "oops"])
    with pytest.raises(ValueError, match="expects a list of groups"):
        source.add_samples(Sample())
    source.add_samples([])
    assert source.get_buffer_length() == 0


def run_steps(source, steps: int, batch: int, leftover_every: int = 3) -> list[list[tuple]]:
    """Simulate rollouts: take `batch` groups, put the last one back every few steps (partial rollout)."""
    seen = []
    for step in range(steps):
        groups = source.get_samples(batch)
        seen.append([(g[0].prompt, g[0].index, g[0].group_index, len(g)) for g in groups])
        if step % leftover_every == 0:
            source.add_samples(groups[-1:])
    return seen


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_at_step_k_matches_uninterrupted_run(tmp_path, shuffle):
    kwargs = dict(n_prompts=7, rollout_shuffle=shuffle, rollout_seed=3)
    uninterrupted = run_steps(RolloutDataSourceWithBuffer(make_args(tmp_path, **kwargs)), steps=10, batch=3)

    k = 4
    first = RolloutDataSourceWithBuffer(make_args(tmp_path, **kwargs))
    before = run_steps(first, steps=k, batch=3)
    assert first.epoch_id >= 1  # the save happens after an epoch boundary
    first.metadata["custom"] = {"seen": k}
    path = first.save(rollout_id=k - 1)
    assert path == state_path(str(tmp_path / "ckpt"), k - 1) and os.path.exists(path)
    assert [p for p in os.listdir(os.path.dirname(path)) if ".tmp" in p] == []
    first.get_samples(5)  # activity after the save must not leak into the resumed source

    resumed = RolloutDataSourceWithBuffer(make_args(tmp_path, **kwargs))
    assert resumed.load(k - 1) is True
    assert resumed.metadata == {"custom": {"seen": k}}
    # step numbering restarts at k so that the leftover pattern matches the uninterrupted run
    after = []
    for step in range(k, 10):
        groups = resumed.get_samples(3)
        after.append([(g[0].prompt, g[0].index, g[0].group_index, len(g)) for g in groups])
        if step % 3 == 0:
            resumed.add_samples(groups[-1:])
    assert before + after == uninterrupted


def test_buffer_contents_survive_save_and_load(tmp_path):
    args = make_args(tmp_path)
    source = RolloutDataSourceWithBuffer(args)
    group = source.get_samples(1)[0]
    for i, sample in enumerate(group):
        sample.tokens = [1, 2, 3 + i]
        sample.response = f"resp{i}"
        sample.response_length = 1
        sample.reward = {"acc": float(i)}
        sample.loss_mask = [1]
        sample.rollout_log_probs = [-0.5]
        sample.status = Status.TRUNCATED
        sample.metadata = {"turns": [{"role": "assistant", "content": "x"}]}
        sample.weight_versions = ["3"]
    source.add_samples([group])
    source.save(5)

    resumed = RolloutDataSourceWithBuffer(args)
    assert resumed.load() is True  # None = latest saved id
    assert resumed.get_buffer_length() == 1
    restored = resumed.get_samples(1)[0]
    assert [s.to_dict() for s in restored] == [s.to_dict() for s in group]
    assert restored[0].status is Status.TRUNCATED


def test_nested_groups_from_multi_sample_generate_round_trip(tmp_path):
    """A generate function may return several samples per request; such groups nest one level."""
    args = make_args(tmp_path)
    source = RolloutDataSourceWithBuffer(args)
    nested = [[Sample(prompt="a", index=0), Sample(prompt="a", index=1, response="turn 2")], Sample(prompt="a", index=2)]
    source.add_samples([nested])
    with pytest.raises(ValueError, match="group 0 must be a list of Sample"):
        source.add_samples([[[Sample(), "x"], Sample()]])
    source.save(0)
    resumed = RolloutDataSourceWithBuffer(args)
    assert resumed.load(0)
    (group,) = resumed.get_samples(1)
    assert isinstance(group[0], list) and [s.response for s in group[0]] == ["", "turn 2"]
    assert group[1].index == 2


def test_load_is_a_no_op_without_saved_state(tmp_path):
    source = RolloutDataSourceWithBuffer(make_args(tmp_path, load=None))
    assert source.load(3) is False
    source = RolloutDataSourceWithBuffer(make_args(tmp_path, load=str(tmp_path / "empty")))
    assert source.load(3) is False and source.load() is False
    assert prompts_of(source.get_samples(2)) == ["p0", "p1"]
    with pytest.raises(ValueError, match="--save is not set"):
        RolloutDataSourceWithBuffer(make_args(tmp_path, save=None)).save(0)
    bad = state_path(str(tmp_path / "broken"), 1)
    os.makedirs(os.path.dirname(bad))
    Path(bad).write_text("garbage")
    with pytest.raises(ValueError, match=r"--load: cannot read data-source state .*global_dataset_state_dict_1\.pt"):
        RolloutDataSourceWithBuffer(make_args(tmp_path, load=str(tmp_path / "broken"))).load(1)


def test_custom_buffer_filter_plugin(tmp_path, monkeypatch):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "my_buffer_filter.py").write_text(textwrap.dedent("""
        CALLS = []

        def pop_highest_reward(args, rollout_id, buffer, num_samples):
            CALLS.append((rollout_id, len(buffer), num_samples))
            buffer.sort(key=lambda group: -group[0].reward)
            taken = buffer[:num_samples]
            del buffer[:num_samples]
            return taken

        def too_many(args, rollout_id, buffer, num_samples):
            return buffer * 3
    """))
    monkeypatch.syspath_prepend(str(plugin_dir))
    import my_buffer_filter

    source = RolloutDataSourceWithBuffer(make_args(tmp_path, buffer_filter_path="my_buffer_filter.pop_highest_reward"))
    groups = source.get_samples(3)
    for reward, group in zip([0.1, 0.9, 0.5], groups):
        for sample in group:
            sample.reward = reward
    source.add_samples(groups)
    served = source.get_samples(2)
    assert [g[0].reward for g in served] == [0.9, 0.5]
    assert my_buffer_filter.CALLS == [(None, 3, 2)]
    assert source.get_buffer_length() == 1

    greedy = RolloutDataSourceWithBuffer(make_args(tmp_path, buffer_filter_path="my_buffer_filter.too_many"))
    greedy.add_samples(greedy.get_samples(1))
    with pytest.raises(ValueError, match="--buffer-filter-path returned list of 3 groups; expected a list of at most 2"):
        greedy.get_samples(2)
    with pytest.raises(ValueError, match="--buffer-filter-path"):
        RolloutDataSourceWithBuffer(make_args(tmp_path, buffer_filter_path="my_buffer_filter.missing"))


def test_disabled_global_dataset_hands_out_empty_samples(tmp_path):
    source = RolloutDataSourceWithBuffer(make_args(tmp_path, prompt_data=None, rollout_global_dataset=False))
    groups = source.get_samples(2)
    assert source.dataset_size == 0 and source.dataset is None
    assert [[s.prompt for s in g] for g in groups] == [["", ""], ["", ""]]
    assert [s.index for g in groups for s in g] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="--prompt-data is required"):
        RolloutDataSourceWithBuffer(make_args(tmp_path, prompt_data=None))


def test_chat_template_through_args(tmp_path, tiny_model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2="}], "label": "4"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "x" * 100}], "label": "0"}) + "\n")
    args = make_args(tmp_path, prompt_data=str(data), input_key="messages", apply_chat_template=True,
                     rollout_max_prompt_len=40, hf_checkpoint=str(tiny_model_dir), n_samples_per_prompt=1)
    source = RolloutDataSourceWithBuffer(args)
    assert source.dataset_size == 1
    assert source.get_samples(1)[0][0].prompt == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="--hf-checkpoint is required"):
        RolloutDataSourceWithBuffer(make_args(tmp_path, prompt_data=str(data), input_key="messages",
                                              apply_chat_template=True))


def test_create_data_source_honours_data_source_path(tmp_path, monkeypatch):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "my_source.py").write_text(textwrap.dedent("""
        from slime.utils.types import Sample

        class CountingSource:
            def __init__(self, args):
                self.args = args
                self.calls = 0

            def get_samples(self, n):
                self.calls += 1
                return [[Sample(prompt=f"gen{self.calls}-{i}")] for i in range(n)]
    """))
    monkeypatch.syspath_prepend(str(plugin_dir))
    custom = create_data_source(make_args(tmp_path, data_source_path="my_source.CountingSource"))
    assert [g[0].prompt for g in custom.get_samples(2)] == ["gen1-0", "gen1-1"]
    default = create_data_source(make_args(tmp_path, data_source_path="slime.data.data_source.RolloutDataSourceWithBuffer"))
    assert isinstance(default, RolloutDataSourceWithBuffer)
    with pytest.raises(ValueError, match="--data-source-path"):
        create_data_source(make_args(tmp_path, data_source_path="my_source.Nope"))


def test_resolve_num_rollout(tmp_path):
    assert resolve_num_rollout(make_args(tmp_path, num_epoch=3, rollout_batch_size=4), dataset_size=10) == 6
    assert resolve_num_rollout(make_args(tmp_path, num_rollout=5, num_epoch=3), dataset_size=10) == 5
    assert resolve_num_rollout(make_args(tmp_path, num_epoch=1, rollout_batch_size=10), dataset_size=10) == 1
    with pytest.raises(ValueError, match="set --num-rollout or --num-epoch"):
        resolve_num_rollout(make_args(tmp_path), dataset_size=10)
    with pytest.raises(ValueError, match="--rollout-batch-size 11 is larger than the 10 prompts"):
        resolve_num_rollout(make_args(tmp_path, num_epoch=1, rollout_batch_size=11), dataset_size=10)
    with pytest.raises(ValueError, match="--num-epoch needs the global dataset"):
        resolve_num_rollout(make_args(tmp_path, num_epoch=1), dataset_size=0)
    with pytest.raises(ValueError, match="--num-epoch must be positive"):
        resolve_num_rollout(make_args(tmp_path, num_epoch=0), dataset_size=10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_prompts=st.integers(1, 6),
    shuffle=st.booleans(),
    n_per_prompt=st.integers(1, 3),
    plan=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2)), min_size=1, max_size=8),
    save_after=st.integers(0, 7),
)
def test_resume_matches_for_any_request_plan(tmp_path, n_prompts, shuffle, n_per_prompt, plan, save_after):
    """Any mix of batch sizes and returned leftovers: save after step k, reload, same groups as without a break."""
    save_after = min(save_after, len(plan) - 1)
    case_dir = tmp_path / f"case-{n_prompts}-{shuffle}-{n_per_prompt}-{len(plan)}-{save_after}-{abs(hash(tuple(plan)))}"
    case_dir.mkdir(exist_ok=True)

    def make() -> RolloutDataSourceWithBuffer:
        return RolloutDataSourceWithBuffer(make_args(case_dir, n_prompts=n_prompts, rollout_shuffle=shuffle,
                                                     n_samples_per_prompt=n_per_prompt))

    def play(source, steps) -> list:
        out = []
        for batch, give_back in steps:
            groups = source.get_samples(batch)
            out.append([(g[0].prompt, [s.index for s in g], g[0].group_index) for g in groups])
            source.add_samples(groups[:give_back])
        return out

    expected = play(make(), plan)
    first = make()
    head = play(first, plan[: save_after + 1])
    first.save(save_after)
    resumed = make()
    assert resumed.load(save_after)
    assert head + play(resumed, plan[save_after + 1:]) == expected


CROSS_PROCESS_SCRIPT = """
import json, sys
from slime.data.data_source import RolloutDataSourceWithBuffer
from slime.utils.arguments import parse_args
args = parse_args(json.loads(sys.argv[1]))
mode, steps = sys.argv[2], int(sys.argv[3])
source = RolloutDataSourceWithBuffer(args)
if mode == "resume":
    assert source.load(None)
out = []
for _ in range(steps):
    groups = source.get_samples(args.rollout_batch_size)
    out.append([g[0].prompt for g in groups])
    source.add_samples(groups[:1])
if mode == "first":
    source.save(steps - 1)
print(json.dumps(out))
"""


def test_resume_in_a_fresh_process(tmp_path):
    """The rollout manager is a Ray actor: state saved by one process must resume in another."""
    import subprocess
    import sys

    argv = make_argv(tmp_path, n_prompts=9, rollout_shuffle=True, rollout_seed=11, rollout_batch_size=4)
    args = parse_args(argv)

    def run(mode: str, steps: int) -> list:
        result = subprocess.run([sys.executable, "-c", CROSS_PROCESS_SCRIPT, json.dumps(argv), mode, str(steps)],
                                cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    uninterrupted = RolloutDataSourceWithBuffer(args)
    expected = []
    for _ in range(6):
        groups = uninterrupted.get_samples(4)
        expected.append([g[0].prompt for g in groups])
        uninterrupted.add_samples(groups[:1])
    assert run("first", 3) + run("resume", 3) == expected


def test_preview_cli(tmp_path):
    import subprocess
    import sys

    argv = make_argv(tmp_path, n_prompts=5, n_samples_per_prompt=1, rollout_batch_size=2, num_epoch=2)
    cmd = [sys.executable, "-m", "slime.data.data_source", *argv, "--preview-steps", "3"]
    root = Path(__file__).resolve().parents[1]
    ok = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["5 prompts; num_rollout = 4", 'step 0: ["p0", "p1"]', 'step 1: ["p2", "p3"]',
                                      'step 2: ["p4", "p0"]']
    bad = subprocess.run(cmd + ["--prompt-data", str(tmp_path / "nope.jsonl")], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "error: --prompt-data: file not found" in bad.stderr
    assert "Traceback" not in bad.stderr
