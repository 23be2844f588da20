"""A run killed with SIGKILL resumes with --load and ends with the weights of an uninterrupted run.

    python -m pytest -q tests/test_resume.py

Real `python train.py` subprocesses (each with its own local Ray) on the tiny model; rollouts are
sampled at temperature 1 with a seed per sample index (tests/reliability_plugins.py), so a resumed
run draws the same tokens as the uninterrupted one. The killed run is SIGKILLed twice: once between
steps (after the checkpoint of rollout 0 is complete), and once while the checkpoint of rollout 1 is
being written (its `iter_0000001.tmp/` exists, the tracker still names 0). Every restart uses
`--load`; the final checkpoint (model, optimizer, scheduler, RNG) must equal the uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ray_helpers import tiny_task, train_argv

ROOT = Path(__file__).resolve().parents[1]
NUM_ROLLOUT = 3
TRACKER = "latest_checkpointed_iteration.txt"
RUN_TIMEOUT_S = 420


class TrainProcess:
    """`python train.py ...` in its own session, tagged so that every process it leaves behind can be found."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.tag = uuid.uuid4().hex
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), SLIME_PROGRESS="0",
                   OMP_NUM_THREADS="1", SLIME_TEST_RUN_TAG=self.tag, RAY_ADDRESS="")
        env.pop("RAY_ADDRESS")
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=str(ROOT), env=env,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill_everything()

    def sigkill(self, known: list[int] | None = None) -> None:
        """SIGKILL the whole run at once: `known` pids first (no scan delay), then its session, then any stragglers."""
        for pid in known or []:
            _kill(pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.kill_everything()
        self.proc.wait(30)

    def kill_everything(self) -> None:
        """SIGKILL every process that carries this run's tag (Ray workers, engine servers, the router)."""
        for pid in self.tagged_pids():
            _kill(pid)

    def tagged_pids(self) -> list[int]:
        marker = f"SLIME_TEST_RUN_TAG={self.tag}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _argv(model: Path, task: dict, save: Path, *extra: str) -> list[str]:
    argv = train_argv(model, task, "--colocate", "--save", str(save), "--save-interval", "1", "--rollout-shuffle",
                      "--rollout-temperature", "1.0", "--custom-generate-function-path",
                      "reliability_plugins.seeded_generate", "--metrics-dir", str(save / "metrics"),
                      "--save-debug-rollout-data", str(save / "rollouts" / "{rollout_id}.pt"), *extra,
                      rollouts=NUM_ROLLOUT)
    argv[argv.index("--custom-rm-path") + 1] = "reliability_plugins.token_parity_reward"
    return argv


def _tracker(save: Path) -> str | None:
    try:
        return (save / TRACKER).read_text().strip()
    except FileNotFoundError:
        return None


def _all_tensors(iteration_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model and optimizer), loaded in this process."""
    import torch.distributed.checkpoint as dcp

    metadata = FileSystemReader(str(iteration_dir)).read_metadata()
    state = {key: torch.empty(item.size, dtype=item.properties.dtype)
             for key, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(iteration_dir), no_dist=True)
    return state


def _wait_for(condition, proc: TrainProcess, what: str, timeout: float = RUN_TIMEOUT_S, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.proc.returncode}) before {what}:\n{proc.output()}")
        time.sleep(poll)
    proc.sigkill()
    raise AssertionError(f"timed out waiting for {what}:\n{proc.output()}")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("resume-task"))


def _saves_data_state_before_trainer_checkpoint() -> bool:
    import inspect

    from slime.train_loop import Run

    source = inspect.getsource(Run.save)
    trainer_saves = [i for i in (source.find("trainer.save"), source.find("save_trainers")) if i >= 0]
    return bool(trainer_saves) and 0 <= source.find("manager.save") < min(trainer_saves)


@pytest.mark.xfail(not _saves_data_state_before_trainer_checkpoint(), run=False,
                   reason="slime/train_loop.py Run.save writes the trainer checkpoint (and its tracker) before the "
                          "data-source state: a SIGKILL in between resumes with the prompt order restarted")
def test_sigkill_between_steps_and_mid_checkpoint_resumes_to_identical_state(tmp_path, tiny_model_dir, task):
    reference, killed = tmp_path / "reference", tmp_path / "killed"

    # 1. the uninterrupted run, alongside 2. SIGKILL between steps: right after the checkpoint of rollout 0
    uninterrupted = TrainProcess(_argv(tiny_model_dir, task, reference), tmp_path / "reference.log")
    run = TrainProcess(_argv(tiny_model_dir, task, killed), tmp_path / "killed-1.log")
    try:
        _wait_for(lambda: _tracker(killed) == "0", run, "the checkpoint of rollout 0")
        run.sigkill()
        assert _tracker(killed) == "0"
    finally:
        assert uninterrupted.wait() == 0, uninterrupted.output()
    assert _tracker(reference) == str(NUM_ROLLOUT - 1)
    metrics = (reference / "metrics" / "metrics.jsonl").read_text()
    assert '"train/grad_norm": 0.0,' not in metrics, "the run must really change its weights"

    # 3. resume, then SIGKILL while the checkpoint of rollout 1 is being written
    run = TrainProcess(_argv(tiny_model_dir, task, killed, "--load", str(killed)), tmp_path / "killed-2.log")
    _wait_for(lambda: (killed / "rollouts" / "1.pt").exists(), run, "rollout 1", poll=0.05)
    everyone = run.tagged_pids()  # the trainer actor included: killing it must not wait for a /proc scan
    _wait_for(lambda: (killed / "iter_0000001.tmp").exists() or _tracker(killed) == "1", run,
              "the checkpoint of rollout 1 to start")
    run.sigkill(known=everyone)
    assert _tracker(killed) == "0", "the kill missed the checkpoint write"
    assert (killed / "iter_0000001.tmp").exists() and not (killed / "iter_0000001").exists()

    # 4. resume from the last complete checkpoint and finish
    run = TrainProcess(_argv(tiny_model_dir, task, killed, "--load", str(killed)), tmp_path / "killed-3.log")
    assert run.wait() == 0, run.output()
    assert _tracker(killed) == str(NUM_ROLLOUT - 1)
    assert not list(killed.glob("iter_*.tmp")), "a stale temporary checkpoint was left behind"

    for rollout_id in range(NUM_ROLLOUT):  # the resumed run drew the same prompts and tokens
        a = torch.load(reference / "rollouts" / f"{rollout_id}.pt", weights_only=False)["samples"]
        b = torch.load(killed / "rollouts" / f"{rollout_id}.pt", weights_only=False)["samples"]
        assert [(s["index"], s["tokens"], s["reward"]) for s in a] == [(s["index"], s["tokens"], s["reward"]) for s in b]

    final = f"iter_{NUM_ROLLOUT - 1:07d}"
    expected, resumed = _all_tensors(reference / final), _all_tensors(killed / final)
    assert expected.keys() == resumed.keys() and any(k.startswith("optim.") for k in expected)
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), f"{key} differs after resuming"
    for rng_file in sorted((reference / final).glob("rng_rank*.pt")):
        a = torch.load(rng_file, weights_only=False)
        b = torch.load(killed / final / rng_file.name, weights_only=False)
        assert torch.equal(a["torch"], b["torch"]), "torch RNG state differs after resuming"
