"""The CLI's YAML config, engine (--sglang-*) flags and the Megatron-architecture check against HF config.json.

    python -m pytest -q tests/test_arguments_config.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slime.utils.arguments import build_parser, engine_server_argv, parse_args

_TABLE_FLAGS = set(build_parser()._option_string_actions)

BASE = ["--rollout-batch-size", "4", "--actor-num-gpus-per-node", "1"]

# What a Megatron launch script (scripts/models/qwen3-*.sh style) passes for the "tiny" preset.
TINY_MODEL_ARGS = [
    "--swiglu", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
    "--use-rotary-position-embeddings", "--disable-bias-linear", "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-6", "--rotary-base", "10000", "--vocab-size", "320", "--qk-layernorm",
    "--max-position-embeddings", "2048",
]


def parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc_info:
        parse_args(argv)
    assert exc_info.value.code == 2
    return capsys.readouterr().err.split("error:", 1)[1].strip()


# --- engine flags -------------------------------------------------------------------------------


def test_engine_flags_table_and_extras():
    args = parse_args(BASE + ["--sglang-mem-fraction-static", "0.7", "--sglang-disable-cuda-graph",
                              "--sglang-enable-deterministic-inference", "--sglang-attention-backend", "fa3",
                              "--sglang-cuda-graph-bs", "1", "2", "4", "--sglang-schedule-conservativeness=0.5",
                              "--sglang-router-port", "30000", "--sglang-random-seed", "-3"])
    assert args.sglang_mem_fraction_static == 0.7
    assert args.sglang_disable_cuda_graph is True
    assert args.sglang_random_seed == -3
    assert args.sglang_router_port == 30000
    assert args.sglang_context_length is None
    assert args.sglang_extra_args == {
        "enable-deterministic-inference": True,
        "attention-backend": "fa3",
        "cuda-graph-bs": ["1", "2", "4"],
        "schedule-conservativeness": "0.5",
    }
    argv = engine_server_argv(args)
    assert argv == ["--mem-fraction-static", "0.7", "--random-seed", "-3", "--disable-cuda-graph",
                    "--enable-deterministic-inference", "--attention-backend", "fa3",
                    "--cuda-graph-bs", "1", "2", "4", "--schedule-conservativeness", "0.5"]


def test_engine_server_argv_is_empty_by_default():
    args = parse_args(BASE)
    assert args.sglang_extra_args == {}
    assert engine_server_argv(args) == []


def test_engine_flag_with_bad_value_names_the_flag(capsys):
    assert "argument --sglang-context-length: invalid int value: 'long'" in parse_error(
        BASE + ["--sglang-context-length", "long"], capsys)


def test_extras_do_not_swallow_following_slime_flags():
    args = parse_args(["--sglang-enable-foo", "--rollout-batch-size", "4", "--actor-num-gpus-per-node", "1"])
    assert args.sglang_extra_args == {"enable-foo": True}
    assert args.rollout_batch_size == 4


# --- YAML config ----------------------------------------------------------------------------------


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_sets_flags_and_command_line_wins(tmp_path):
    path = write_yaml(tmp_path, "\n".join([
        "rollout_batch_size: 8",
        "n-samples-per-prompt: 2",
        "lr: 1e-5",
        "rollout-temperature: 0.5",
        "colocate: true",
        "disable-rewards-normalization: true",
        "rollout_stop: ['</answer>', \"\\n\\n\"]",
        "train_env_vars: {A: '1'}",
        "sglang-mem-fraction-static: 0.6",
        "sglang-enable-foo: true",
        "advantage_estimator: gspo",
    ]))
    args = parse_args(["--custom-config-path", path, "--actor-num-gpus-per-node", "1", "--rollout-temperature", "0.9"])
    assert args.rollout_batch_size == 8 and args.n_samples_per_prompt == 2
    assert args.lr == 1e-5
    assert args.rollout_temperature == 0.9  # command line wins
    assert args.colocate is True and args.offload_train is True
    assert args.rewards_normalization is False and args.disable_rewards_normalization is True
    assert args.rollout_stop == ["</answer>", "\n\n"]
    assert args.train_env_vars == {"A": "1"}
    assert args.sglang_mem_fraction_static == 0.6
    assert args.sglang_extra_args == {"enable-foo": True}
    assert args.advantage_estimator == "gspo"
    assert args.custom_config_path == path


def test_yaml_inverted_and_negated_keys(tmp_path):
    path = write_yaml(tmp_path, "\n".join([
        "colocate: true",
        "no-offload-train: true",
        "rewards_normalization: false",  # dest form: the dest's own value
        "disable_compute_advantages_and_returns: true",  # flag form
        "moe-grouped-gemm: true",
    ]))
    args = parse_args(BASE + ["--custom-config-path", path])
    assert args.offload_train is False and args.offload_rollout is True
    assert args.rewards_normalization is False
    assert args.compute_advantages_and_returns is False
    assert args.megatron_ignored_args == {"moe-grouped-gemm": True}


def test_yaml_values_feed_validation(tmp_path, capsys):
    path = write_yaml(tmp_path, "kl_coef: 0.1\nkl_loss_coef: 0.1\n")
    assert "--kl-coef 0.1 and --kl-loss-coef 0.1 cannot both" in parse_error(
        BASE + ["--custom-config-path", path], capsys)


@pytest.mark.parametrize(
    "text, message",
    [
        ("rollout_batch_sise: 4\n", "unknown key 'rollout_batch_sise' (no flag --rollout-batch-sise)"),
        ("rollout_batch_size: many\n", "key 'rollout_batch_size': invalid value 'many'"),
        ("advantage_estimator: nope\n", "key 'advantage_estimator': 'nope' is not one of grpo"),
        ("colocate: 3\n", "key 'colocate': expected true or false, got 3"),
        ("lr: [1, 2]\n", "key 'lr': expected a single value"),
        ("- a\n- b\n", "expected a mapping of flag names to values, got list"),
        ("a: [b\n", "not valid YAML"),
    ],
)
def test_yaml_errors_name_file_and_key(tmp_path, capsys, text, message):
    path = write_yaml(tmp_path, text)
    error = parse_error(BASE + ["--custom-config-path", path], capsys)
    assert f"--custom-config-path {path}" in error and message in error


def test_yaml_missing_file(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert f"--custom-config-path {missing}: file not found" in parse_error(
        BASE + ["--custom-config-path", missing], capsys)


# --- Megatron architecture flags vs HF config.json --------------------------------------------------


def test_matching_architecture_flags_pass(tiny_model_dir):
    args = parse_args(BASE + ["--hf-checkpoint", str(tiny_model_dir)] + TINY_MODEL_ARGS)
    assert args.hidden_size == 64 and args.num_query_groups == 2


def test_padded_vocab_is_accepted(tiny_model_dir):
    parse_args(BASE + ["--hf-checkpoint", str(tiny_model_dir), "--vocab-size", "384"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hidden-size", "1024"], "--hidden-size 1024 does not match hidden_size 64 in {config}"),
        (["--num-layers", "3"], "--num-layers 3 does not match num_hidden_layers 2 in {config}"),
        (["--ffn-hidden-size", "256"], "--ffn-hidden-size 256 does not match intermediate_size 128 in {config}"),
        (["--num-attention-heads", "8"], "--num-attention-heads 8 does not match num_attention_heads 4 in {config}"),
        (["--num-query-groups", "4"], "--num-query-groups 4 does not match num_key_value_heads 2 in {config}"),
        (["--kv-channels", "32"], "--kv-channels 32 does not match head_dim 16 in {config}"),
        (["--vocab-size", "100"], "--vocab-size 100 does not match vocab_size 320 in {config} (must be >= it)"),
        (["--max-position-embeddings", "4096"],
         "--max-position-embeddings 4096 does not match max_position_embeddings 2048 in {config}"),
        (["--rotary-base", "1000000"], "--rotary-base 1000000 does not match rope_parameters.rope_theta 10000 in {config}"),
        (["--norm-epsilon", "1e-5"], "--norm-epsilon 1e-05 does not match rms_norm_eps 1e-06 in {config}"),
        (["--untie-embeddings-and-output-weights"],
         "--untie-embeddings-and-output-weights is set, which does not match tie_word_embeddings true in {config}"),
        (["--add-qkv-bias"], "--add-qkv-bias is set, which does not match attention_bias false in {config}"),
        (["--normalization", "LayerNorm"], "--normalization LayerNorm does not match rms_norm_eps (RMSNorm) in {config}"),
        (["--num-experts", "8"], "--num-experts 8 is given but {config} has no num_experts"),
    ],
)
def test_architecture_mismatch_names_both_values(tiny_model_dir, capsys, flags, message):
    config = tiny_model_dir / "config.json"
    error = parse_error(BASE + ["--hf-checkpoint", str(tiny_model_dir)] + flags, capsys)
    assert message.format(config=config) in error


def test_missing_boolean_flag_is_a_mismatch_when_the_model_is_described(tiny_model_dir, capsys):
    flags = [flag for flag in TINY_MODEL_ARGS if flag != "--qk-layernorm"]
    error = parse_error(BASE + ["--hf-checkpoint", str(tiny_model_dir)] + flags, capsys)
    assert "--qk-layernorm is not set, which does not match model_type qwen3" in error


def test_qwen2_implies_qkv_bias_and_untied_embeddings(tiny_model_factory, capsys):
    qwen2 = tiny_model_factory("tiny-qwen2")
    parse_args(BASE + ["--hf-checkpoint", str(qwen2), "--num-layers", "2", "--swiglu", "--add-qkv-bias",
                       "--untie-embeddings-and-output-weights"])
    error = parse_error(BASE + ["--hf-checkpoint", str(qwen2), "--num-layers", "2", "--swiglu",
                                "--untie-embeddings-and-output-weights"], capsys)
    assert "--add-qkv-bias is not set, which does not match model_type qwen2" in error


def test_rope_theta_at_top_level_and_moe_keys(tmp_path, tiny_model_dir, capsys):
    model = tmp_path / "moe"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=1e6, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32)
    (model / "config.json").write_text(json.dumps(config))
    parse_args(BASE + ["--hf-checkpoint", str(model), "--rotary-base", "1e6", "--num-experts", "8",
                       "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"])
    error = parse_error(BASE + ["--hf-checkpoint", str(model), "--moe-router-topk", "4"], capsys)
    assert f"--moe-router-topk 4 does not match num_experts_per_tok 2 in {model / 'config.json'}" in error


def test_architecture_flags_from_yaml_are_checked(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "model.yaml"
    path.write_text("hidden-size: 32\n")
    error = parse_error(BASE + ["--hf-checkpoint", str(tiny_model_dir), "--custom-config-path", str(path)], capsys)
    assert "--hidden-size 32 does not match hidden_size 64" in error


def test_checkpoint_without_config_json(tmp_path, capsys):
    error = parse_error(BASE + ["--hf-checkpoint", str(tmp_path), "--hidden-size", "64"], capsys)
    assert f"--hf-checkpoint {tmp_path} has no config.json" in error


# --- a real slime launch script (scripts/run-qwen3-4B.sh shape, TP 1) --------------------------------


def test_qwen3_4b_launch_script_parses(tmp_path):
    from tools.make_tiny_model import PRESETS

    model = tmp_path / "Qwen3-4B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(PRESETS["qwen3-4b"]))
    model_args = ["--swiglu", "--num-layers", "36", "--hidden-size", "2560", "--ffn-hidden-size", "9728",
                  "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8",
                  "--use-rotary-position-embeddings", "--disable-bias-linear", "--normalization", "RMSNorm",
                  "--norm-epsilon", "1e-6", "--rotary-base", "1000000", "--vocab-size", "151936",
                  "--kv-channels", "128", "--qk-layernorm"]
    argv = [
        "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "8", "--colocate", *model_args,
        "--hf-checkpoint", str(model), "--ref-load", "/root/Qwen3-4B_torch_dist", "--load", "/root/ckpt",
        "--save", "/root/ckpt", "--save-interval", "20",
        "--prompt-data", "/root/dapo-math-17k.jsonl", "--input-key", "prompt", "--label-key", "label",
        "--apply-chat-template", "--rollout-shuffle", "--rm-type", "deepscaler", "--num-rollout", "3000",
        "--rollout-batch-size", "32", "--n-samples-per-prompt", "8", "--rollout-max-response-len", "8192",
        "--rollout-temperature", "0.8", "--global-batch-size", "256", "--balance-data",
        "--eval-interval", "20", "--eval-prompt-data", "aime", "/root/aime-2024.jsonl",
        "--n-samples-per-eval-prompt", "16", "--eval-max-response-len", "16384", "--eval-top-p", "0.7",
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--context-parallel-size", "1",
        "--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "1",
        "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
        "--use-dynamic-batch-size", "--max-tokens-per-gpu", "9216",
        "--advantage-estimator", "grpo", "--use-kl-loss", "--kl-loss-coef", "0.00", "--kl-loss-type", "low_var_kl",
        "--entropy-coef", "0.00", "--eps-clip", "0.2", "--eps-clip-high", "0.28",
        "--optimizer", "adam", "--lr", "1e-6", "--lr-decay-style", "constant", "--weight-decay", "0.1",
        "--adam-beta1", "0.9", "--adam-beta2", "0.98",
        "--use-wandb", "--wandb-project", "slime-dev", "--wandb-group", "qwen3-4B-test", "--wandb-key", "k",
        "--rollout-num-gpus-per-engine", "2", "--sglang-mem-fraction-static", "0.7",
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--accumulate-allreduce-grads-in-fp32",
        "--attention-softmax-in-fp32", "--attention-backend", "flash",
    ]
    args = parse_args(argv)
    assert args.rollout_num_gpus == 8 and args.rollout_engine_count == 4 and args.dp_size == 8
    assert args.offload_train and args.offload_rollout
    assert args.eps_clip_high == 0.28 and args.log_probs_max_tokens_per_gpu == 9216
    assert args.eval_datasets == [{"name": "aime", "path": "/root/aime-2024.jsonl"}]
    assert args.eval_top_p == 0.7 and args.eval_temperature == 0.8
    assert engine_server_argv(args) == ["--mem-fraction-static", "0.7"]


def test_original_call_with_a_custom_arguments_function(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py", *BASE, "--my-flag", "x"])
    args = parse_args(lambda parser: parser.add_argument("--my-flag", default=None))
    assert args.my_flag == "x"


_names = st.from_regex(r"[a-z][a-z0-9]{0,6}(-[a-z0-9]{1,6}){0,2}", fullmatch=True).filter(
    lambda name: "--sglang-" + name not in _TABLE_FLAGS)
_values = st.one_of(st.just(True), st.from_regex(r"[A-Za-z0-9._/-]{1,8}", fullmatch=True).filter(
    lambda v: not v.startswith("--")))


@settings(max_examples=40, deadline=None)
@given(extras=st.dictionaries(_names, _values, max_size=4))
def test_engine_extras_round_trip(extras):
    argv = list(BASE)
    for name, value in extras.items():
        argv += ["--sglang-" + name] + ([] if value is True else [value])
    args = parse_args(argv)
    assert args.sglang_extra_args == extras
    expected = [item for name, value in extras.items() for item in (["--" + name] if value is True else ["--" + name, value])]
    assert engine_server_argv(args) == expected
