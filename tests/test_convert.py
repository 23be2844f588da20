"""HF <-> torch.distributed.checkpoint conversion tools: bit-exact round trips, from_pretrained, the trainer's --load.

    python -m pytest -q tests/test_convert.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_fsdp_harness import hf_response_log_probs, make_args, make_rollout_data, run_ranks
from tools import convert_hf_to_torch_dist as to_dcp
from tools import convert_torch_dist_to_hf as to_hf
from tools.hf_weights import read_hf_weights

ROOT = Path(__file__).resolve().parents[1]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def _run_tool(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *map(str, argv)], capture_output=True,
                          text=True, timeout=120, cwd=str(ROOT))


def test_cli_round_trip_is_bit_exact_and_loads_with_from_pretrained(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dcp_dir, hf_dir = tmp_path / "dcp", tmp_path / "hf"
    done = _run_tool("convert_hf_to_torch_dist.py", "--hf-checkpoint", tiny_model_dir, "--save", dcp_dir)
    assert done.returncode == 0, done.stderr
    assert (dcp_dir / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (dcp_dir / "iter_0000000" / ".metadata").exists() and not (dcp_dir / "iter_0000000.tmp").exists()
    done = _run_tool("convert_torch_dist_to_hf.py", "--input-dir", dcp_dir / "iter_0000000", "--output-dir", hf_dir,
                     "--origin-hf-dir", tiny_model_dir)
    assert done.returncode == 0, done.stderr

    _assert_same_tensors(load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(hf_dir / "model.safetensors")))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (hf_dir / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name

    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(hf_dir))("round trip", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(original(ids).logits, converted(ids).logits)


def test_bf16_untied_model_round_trips_with_sharded_output(tmp_path, tiny_model_factory):
    from tools.make_tiny_model import make_model

    source = make_model("tiny-qwen2", tmp_path / "qwen2-bf16", seed=3, dtype="bfloat16")
    original = read_hf_weights(source)
    assert "lm_head.weight" in original and {t.dtype for t in original.values()} == {torch.bfloat16}

    iteration = to_dcp.convert(source, tmp_path / "dcp")
    stored = to_hf.read_model_tensors(iteration)
    _assert_same_tensors(stored, original)  # dtype preserved inside the DCP folder

    out = tmp_path / "hf"
    to_hf.convert(tmp_path / "dcp", out, source, max_shard_bytes=40_000)  # the --save root resolves to iter_0000000
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_tensors(read_hf_weights(out), original)


def _load_converted_and_train(rank: int, world_size: int, model_dir: str, load: str, save: str) -> dict:
    from slime.backends.fsdp.trainer import FSDPTrainer

    data = make_rollout_data(4, seed=5)
    trainer = FSDPTrainer(make_args(model_dir, load=load, save=save))
    start = trainer.init()
    loaded_log_probs = trainer.compute_log_probs(data)
    trainer.train(start, data)
    trained_log_probs = trainer.compute_log_probs(data)
    trainer.save(start)
    return dict(start=start, loaded=loaded_log_probs, trained=trained_log_probs, data=data)


def test_trainer_loads_converted_checkpoint_and_its_save_converts_back(tmp_path, tiny_model_factory):
    """HF (seed 1) -> DCP -> trainer --load gives HF's log-probs; the trainer's own save -> HF gives the trainer's."""
    base = tiny_model_factory("tiny", 0)  # the trainer starts from these weights unless --load replaces them
    other = tiny_model_factory("tiny", 1)
    to_dcp.convert(other, tmp_path / "dcp")
    (result,) = run_ranks(_load_converted_and_train, 1, tmp_path, model_dir=str(base), load=str(tmp_path / "dcp"),
                          save=str(tmp_path / "run"))

    assert result["start"] == 0, "a converted checkpoint records rollout -1: the run starts at rollout 0"
    expected = hf_response_log_probs(other, result["data"])
    for got, want in zip(result["loaded"], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.cat(hf_response_log_probs(base, result["data"])), torch.cat(expected))

    trained_iteration = sorted((tmp_path / "run").glob("iter_*"))[-1]
    to_hf.convert(trained_iteration, tmp_path / "trained-hf", other)
    for got, want in zip(hf_response_log_probs(tmp_path / "trained-hf", result["data"]), result["trained"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _save_two_ranks(rank: int, world_size: int, model_dir: str, save: str) -> dict:
    from slime.backends.fsdp.trainer import FSDPTrainer

    trainer = FSDPTrainer(make_args(model_dir, save=save))
    trainer.init()
    trainer.train(0, make_rollout_data(4, seed=rank))
    trainer.save(0)
    full = {name: tensor for bucket in trainer.export_weights() for name, tensor in bucket}
    import torch.distributed as dist

    to_hf.convert(Path(save) / "iter_0000000", Path(save).parent / "hf-from-2-ranks", model_dir)  # collective
    to_dcp.convert(model_dir, Path(save).parent / "dcp-inside-a-group")  # collective; rank 0 writes
    dist.barrier()
    return full


def test_checkpoint_written_by_two_ranks_converts_to_the_full_model(tmp_path, tiny_model_dir):
    results = run_ranks(_save_two_ranks, 2, tmp_path, model_dir=str(tiny_model_dir), save=str(tmp_path / "ckpt"))
    converted = read_hf_weights(tmp_path / "hf-from-2-ranks")
    expected = {k: v for k, v in results[0].items() if k != "lm_head.weight"}
    _assert_same_tensors(converted, expected)
    _assert_same_tensors(to_hf.read_model_tensors(tmp_path / "dcp-inside-a-group" / "iter_0000000"),
                         {**read_hf_weights(tiny_model_dir),
                          "lm_head.weight": read_hf_weights(tiny_model_dir)["model.embed_tokens.weight"]})


# ---------------------------------------------------------------- bad input: clear messages naming the flag

def test_cli_errors_name_the_flag(tmp_path, tiny_model_dir):
    done = _run_tool("convert_hf_to_torch_dist.py", "--hf-checkpoint", tmp_path / "nowhere", "--save", tmp_path / "o")
    assert done.returncode == 2 and "--hf-checkpoint" in done.stderr and "Traceback" not in done.stderr
    done = _run_tool("convert_torch_dist_to_hf.py", "--input-dir", tmp_path, "--output-dir", tmp_path / "o",
                     "--origin-hf-dir", tiny_model_dir)
    assert done.returncode == 2 and "--input-dir" in done.stderr and "no .metadata" in done.stderr
    assert "Traceback" not in done.stderr


def test_refuses_to_overwrite_and_rejects_unfinished_or_mismatched_input(tmp_path, tiny_model_dir, tiny_model_factory):
    to_dcp.convert(tiny_model_dir, tmp_path / "dcp")
    with pytest.raises(ValueError, match="--save .* already holds a checkpoint"):
        to_dcp.convert(tiny_model_dir, tmp_path / "dcp")
    to_dcp.convert(tiny_model_dir, tmp_path / "dcp", overwrite=True)

    unfinished = tmp_path / "ckpt" / "iter_0000003.tmp"
    unfinished.mkdir(parents=True)
    with pytest.raises(ValueError, match="unfinished checkpoint"):
        to_hf.convert(unfinished, tmp_path / "out", tiny_model_dir)

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="--output-dir .* is not empty"):
        to_hf.convert(tmp_path / "dcp", tmp_path / "busy", tiny_model_dir)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "precious"

    # an origin config of another architecture: the tensors do not fit it
    with pytest.raises(ValueError, match="--hf-checkpoint: weights do not match config.json"):
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        for f in tiny_model_dir.iterdir():
            (mixed / f.name).write_bytes(f.read_bytes())
        (mixed / "config.json").write_text((tiny_model_factory("tiny-llama") / "config.json").read_text())
        to_dcp.convert(mixed, tmp_path / "dcp-mixed")
    assert not (tmp_path / "dcp-mixed").exists()

    with pytest.raises(ValueError, match="--max-shard-size"):
        to_hf.parse_size("lots")
    assert to_hf.parse_size("2MB") == 2_000_000 and to_hf.parse_size("1GiB") == 2 ** 30


def test_untied_lm_head_under_a_tied_config_is_an_error_not_silent_loss(tmp_path, tiny_model_dir):
    from slime.backends.fsdp.model import HF_PREFIX
    import torch.distributed.checkpoint as dcp

    weights = read_hf_weights(tiny_model_dir)
    state = {HF_PREFIX + k: v for k, v in weights.items()}
    state[HF_PREFIX + "lm_head.weight"] = weights["model.embed_tokens.weight"] + 1.0
    (tmp_path / "ckpt").mkdir()
    dcp.save({"model": state}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        to_hf.convert(tmp_path / "ckpt", tmp_path / "out", tiny_model_dir)
    assert not (tmp_path / "out").exists()
