"""The CLI: parsing, derived defaults, validation messages, --help coverage of the flag reference.

    python -m pytest -q tests/test_arguments.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from slime.utils.arguments import NOT_SUPPORTED_YET, build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "slime-flags.md"
BASE = ["--rollout-batch-size", "4", "--actor-num-gpus-per-node", "1"]


def parse_error(argv: list[str], capsys) -> str:
    """Parse argv expecting argparse's exit code 2; return the error message."""
    with pytest.raises(SystemExit) as exc_info:
        parse_args(argv)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err, err
    return err.split("error:", 1)[1].strip()


def reference_flags() -> set[str]:
    text = REFERENCE.read_text()
    flags = set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", text))
    flags.discard("--flag")  # "not supported yet: --flag" is a placeholder
    return flags


# --- every flag of the reference ---------------------------------------------------------------


def test_reference_is_present():
    assert REFERENCE.exists(), f"flag reference not found at {REFERENCE}"
    assert len(reference_flags()) > 150


def test_help_lists_every_reference_flag():
    help_text = build_parser().format_help()
    listed = set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", help_text))
    missing = sorted(reference_flags() - listed)
    assert missing == [], f"flags of the reference missing from --help: {missing}"


@pytest.mark.parametrize("command", [["-m", "slime.utils.arguments"], ["train.py"]])
def test_help_command_lists_every_reference_flag(command):
    if command == ["train.py"] and not (ROOT / "train.py").exists():
        pytest.skip("train.py not written yet")
    result = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    missing = sorted(reference_flags() - set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", result.stdout)))
    assert missing == [], f"flags of the reference missing from {' '.join(command)} --help: {missing}"


def test_command_line_error_exits_2_with_the_message():
    result = subprocess.run([sys.executable, "-m", "slime.utils.arguments", "--rollout-batch-size", "4",
                             "--rollout-temperature", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: --rollout-temperature must be > 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_reference_flag_parses_to_its_dest():
    parser = build_parser()
    options = parser._option_string_actions
    inverted = {"--disable-rollout-global-dataset", "--disable-grpo-std-normalization",
                "--disable-rewards-normalization", "--disable-compute-advantages-and-returns",
                "--disable-wandb-random-suffix", "--no-offload-train", "--no-offload-rollout"}
    for flag in reference_flags():
        if flag.endswith("-") or flag not in options:
            continue
        if flag in inverted:
            continue
        assert options[flag].dest == flag[2:].replace("-", "_"), flag


# --- defaults and derived defaults ----------------------------------------------------------------


def test_reference_defaults():
    args = parse_args(BASE)
    expected = {
        "actor_num_nodes": 1, "num_gpus_per_node": 8, "rollout_num_gpus_per_engine": 1, "colocate": False,
        "train_backend": "fsdp", "rollout_backend": "builtin", "train_env_vars": {},
        "update_weight_transport": "nccl", "update_weight_buffer_size": 512 * 1024**2, "update_weights_interval": 1,
        "log_probs_chunk_size": -1, "data_pad_size_multiplier": 128, "num_critic_only_steps": 0,
        "micro_batch_size": 1, "lr": 1e-6, "clip_grad": 1.0, "seed": 1234, "distributed_timeout_minutes": 10,
        "rollout_temperature": 1.0, "rollout_top_p": 1.0, "rollout_top_k": -1, "rollout_seed": 42,
        "rollout_health_check_interval": 30, "rollout_health_check_timeout": 30,
        "rollout_health_check_first_wait": 0, "sglang_server_concurrency": 512,
        "sglang_router_request_timeout_secs": 14400, "input_key": "input", "metadata_key": "metadata",
        "tool_key": "tools", "apply_chat_template_kwargs": {}, "n_samples_per_prompt": 1,
        "loss_mask_type": "qwen", "n_samples_per_eval_prompt": 1, "advantage_estimator": "grpo",
        "loss_type": "policy_loss", "eps_clip": 0.2, "value_clip": 0.2, "kl_coef": 0.0, "kl_loss_coef": 0.0,
        "kl_loss_type": "k1", "entropy_coef": 0.0, "gamma": 1.0, "lambd": 1.0, "tis_clip": 2.0,
        "tis_clip_low": 0.0, "rollout_sample_hook_path": [], "rollout_global_dataset": True,
        "rewards_normalization": True, "compute_advantages_and_returns": True, "wandb_random_suffix": True,
        "sglang_extra_args": {},
    }
    for dest, value in expected.items():
        assert getattr(args, dest) == value, dest


def test_derived_defaults_without_colocate():
    args = parse_args(BASE + ["--n-samples-per-prompt", "2", "--max-tokens-per-gpu", "512",
                              "--eps-clip", "0.3", "--rollout-max-context-len", "100",
                              "--rollout-max-response-len", "64", "--rollout-temperature", "0.7"])
    assert args.eps_clip_high == 0.3
    assert args.over_sampling_batch_size == 4
    assert args.log_probs_max_tokens_per_gpu == 512
    assert args.offload_train is False and args.offload_rollout is False
    assert args.global_batch_size == 8
    assert args.dp_size == 1
    assert args.device in ("cpu", "cuda")
    assert args.distributed_backend == ("nccl" if args.device == "cuda" else "gloo")
    assert args.rollout_num_gpus == 1 and args.rollout_engine_count == 1
    assert args.rollout_max_prompt_len == 99
    assert (args.eval_temperature, args.eval_top_p, args.eval_top_k) == (0.7, 1.0, -1)
    assert (args.eval_max_response_len, args.eval_max_context_len, args.eval_max_prompt_len) == (64, 100, 99)
    assert args.eval_input_key == "input" and args.eval_function_path == args.rollout_function_path
    assert args.grpo_std_normalization is True and args.disable_grpo_std_normalization is False


def test_colocate_turns_on_offload_and_sizes_the_engines():
    args = parse_args(["--rollout-batch-size", "8", "--actor-num-nodes", "2", "--actor-num-gpus-per-node", "2",
                       "--colocate", "--rollout-num-gpus-per-engine", "2"])
    assert args.offload_train is True and args.offload_rollout is True
    assert args.rollout_num_gpus == 4 and args.rollout_engine_count == 2 and args.dp_size == 4
    args = parse_args(BASE + ["--colocate", "--no-offload-train"])
    assert args.offload_train is False and args.offload_rollout is True
    args = parse_args(BASE + ["--offload"])
    assert args.offload_train is True and args.offload_rollout is True


def test_num_steps_per_rollout_sets_global_batch():
    args = parse_args(BASE + ["--n-samples-per-prompt", "4", "--num-steps-per-rollout", "2"])
    assert args.global_batch_size == 8
    args = parse_args(BASE + ["--n-samples-per-prompt", "4", "--global-batch-size", "4"])
    assert args.global_batch_size == 4


def test_load_debug_rollout_data_implies_train_only_and_needs_no_batch_size():
    args = parse_args(["--load-debug-rollout-data", "/tmp/dump_{rollout_id}.pt", "--actor-num-gpus-per-node", "1"])
    assert args.debug_train_only is True and args.rollout_batch_size is None


def test_dump_details_fills_both_dump_paths_unless_given():
    args = parse_args(BASE + ["--dump-details", "/tmp/d"])
    assert args.save_debug_rollout_data == "/tmp/d/rollout_data/{rollout_id}.pt"
    assert args.save_debug_train_data == "/tmp/d/train_data/{rollout_id}_{rank}.pt"
    args = parse_args(BASE + ["--dump-details", "/tmp/d", "--save-debug-rollout-data", "/x/{rollout_id}.pt"])
    assert args.save_debug_rollout_data == "/x/{rollout_id}.pt"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--save-debug-train-data", "/tmp/{step}.pt"], "--save-debug-train-data '/tmp/{step}.pt' may only use"),
        (["--save-debug-rollout-data", "/tmp/{rank}.pt"], "--save-debug-rollout-data '/tmp/{rank}.pt' may only use"),
        (["--save-debug-train-data", "/tmp/{rollout_id}.pt", "--actor-num-gpus-per-node", "2"],
         "needs the {rank} field: 2 train ranks"),
        (["--load-debug-rollout-data-subsample", "0.5"], "--load-debug-rollout-data-subsample needs"),
        (["--load-debug-rollout-data", "/tmp/{rollout_id}.pt", "--load-debug-rollout-data-subsample", "0"],
         "--load-debug-rollout-data-subsample must be in (0, 1], got 0.0"),
        (["--save-debug-rollout-data", "/tmp/{rollout_id.pt"], "--save-debug-rollout-data '/tmp/{rollout_id.pt'"),
        (["--use-pytorch-profiler", "--profile-step-start", "3", "--profile-step-end", "3"],
         "--profile-step-start 3 and --profile-step-end 3: need 0 <= start < end"),
    ],
)
def test_debug_dump_rules(extra, message, capsys):
    assert message in parse_error(BASE + extra, capsys)


def test_n_samples_one_turns_off_std_normalization():
    assert parse_args(BASE).grpo_std_normalization is False


def test_eval_prompt_data_pairs_and_rm_type_prefix():
    args = parse_args(BASE + ["--eval-prompt-data", "aime", "a.jsonl", "gsm8k", "g.jsonl", "--rm-type", "boxed_math",
                              "--eval-interval", "5"])
    assert args.eval_datasets == [{"name": "aime", "path": "a.jsonl"}, {"name": "gsm8k", "path": "g.jsonl"}]
    assert args.rm_type == "boxed_math"


def test_json_flags_parse_to_dicts():
    args = parse_args(BASE + ["--train-env-vars", '{"NCCL_DEBUG": "WARN"}',
                              "--apply-chat-template-kwargs", '{"enable_thinking": false}'])
    assert args.train_env_vars == {"NCCL_DEBUG": "WARN"}
    assert parse_args(BASE + ["--train-env-vars", '{"OMP_NUM_THREADS": 1}']).train_env_vars == {"OMP_NUM_THREADS": "1"}
    assert args.apply_chat_template_kwargs == {"enable_thinking": False}


def test_megatron_launch_script_flags_are_accepted():
    args = parse_args(BASE + ["--use-distributed-optimizer", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
                              "--accumulate-allreduce-grads-in-fp32", "--attention-softmax-in-fp32",
                              "--attention-backend", "flash", "--optimizer", "adam", "--position-embedding-type",
                              "rope", "--use-rotary-position-embeddings", "--make-vocab-size-divisible-by", "64",
                              "--moe-grouped-gemm", "--moe-aux-loss-coeff", "1e-3", "--moe-layer-freq", "[0]*1+[1]*47",
                              "--lr-decay-style", "constant", "--weight-decay", "0.1", "--adam-beta2", "0.98",
                              "--recompute-granularity", "full", "--recompute-method", "uniform",
                              "--recompute-num-layers", "1", "--bf16"])
    assert args.megatron_ignored_args == {"moe-grouped-gemm": True, "moe-aux-loss-coeff": "1e-3",
                                          "moe-layer-freq": "[0]*1+[1]*47"}
    assert args.weight_decay == 0.1 and args.adam_beta2 == 0.98 and args.lr_decay_style == "constant"


# --- validation: each rule names its flag, exit code 2 ----------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--actor-num-gpus-per-node", "1"], "--rollout-batch-size is required"),
        (BASE + ["--over-sampling-batch-size", "2"], "--over-sampling-batch-size 2 must be >= --rollout-batch-size 4"),
        (BASE + ["--kl-coef", "0.1", "--kl-loss-coef", "0.01"], "--kl-coef 0.1 and --kl-loss-coef 0.01 cannot both"),
        (BASE + ["--rollout-temperature", "0"], "--rollout-temperature must be > 0, got 0.0"),
        (BASE + ["--rollout-temperature", "-1"], "--rollout-temperature must be > 0, got -1.0"),
        (BASE + ["--eval-temperature", "0"], "--eval-temperature must be > 0"),
        (["--rollout-batch-size", "3", "--actor-num-gpus-per-node", "2"],
         "--global-batch-size 3 is not divisible by the data-parallel size 2 "
         "(--actor-num-nodes 1 * --actor-num-gpus-per-node 2)"),
        (BASE + ["--global-batch-size", "3"], "--global-batch-size 3 must divide the samples of one rollout"),
        (BASE + ["--num-steps-per-rollout", "3"], "--num-steps-per-rollout 3 must divide --rollout-batch-size 4"),
        (BASE + ["--num-steps-per-rollout", "2", "--global-batch-size", "4"],
         "--global-batch-size 4 disagrees with --num-steps-per-rollout 2"),
        (BASE + ["--eps-clip-c", "1.0"], "--eps-clip-c (dual-clip bound) must be > 1, got 1.0"),
        (BASE + ["--only-train-params-name-list", "a", "--freeze-params-name-list", "b"],
         "use only one of --only-train-params-name-list and --freeze-params-name-list"),
        (BASE + ["--hf-checkpoint", "/nonexistent/model"], "--hf-checkpoint /nonexistent/model is not a directory"),
        (BASE + ["--eval-prompt-data", "aime", "a.jsonl", "gsm8k"], "--eval-prompt-data takes name/path pairs"),
        (BASE + ["--eval-interval", "2"], "--eval-interval needs --eval-prompt-data"),
        (BASE + ["--rm-type", "boxed_nope"], "argument --rm-type: 'boxed_nope' is not one of math, dapo"),
        (BASE + ["--rm-type", "remote_rm"], "--rm-type remote_rm needs --rm-url"),
        (BASE + ["--train-env-vars", "{bad"], "argument --train-env-vars: expected a JSON object"),
        (BASE + ["--train-env-vars", '{"A": [1]}'], "--train-env-vars: the value of 'A' must be a string or a number"),
        (BASE + ["--apply-chat-template-kwargs", "[1, 2]"], "argument --apply-chat-template-kwargs: expected a JSON object"),
        (BASE + ["--use-dynamic-batch-size"], "--use-dynamic-batch-size needs --max-tokens-per-gpu"),
        (BASE + ["--save-interval", "5"], "--save-interval needs --save"),
        (BASE + ["--update-weight-transport", "disk"], "--update-weight-transport disk needs --update-weight-disk-dir"),
        (BASE + ["--loss-type", "custom_loss"], "--loss-type custom_loss needs --custom-loss-function-path"),
        (BASE + ["--advantage-estimator", "reinforce_plus_plus"],
         "--advantage-estimator reinforce_plus_plus needs --normalize-advantages"),
        (BASE + ["--debug-rollout-only", "--debug-train-only"], "--debug-rollout-only and --debug-train-only"),
        (BASE + ["--rollout-num-gpus", "3", "--rollout-num-gpus-per-engine", "2"],
         "--rollout-num-gpus 3 is not a multiple of --rollout-num-gpus-per-engine 2"),
        (BASE + ["--rollout-max-context-len", "10", "--rollout-max-prompt-len", "10"],
         "--rollout-max-prompt-len 10 must be below --rollout-max-context-len 10"),
        (BASE + ["--rollout-batch-size", "0"], "--rollout-batch-size must be > 0, got 0"),
        (BASE + ["--n-samples-per-prompt", "0"], "--n-samples-per-prompt must be > 0, got 0"),
        (BASE + ["--micro-batch-size", "0"], "--micro-batch-size must be > 0, got 0"),
        (BASE + ["--max-tokens-per-gpu", "-5"], "--max-tokens-per-gpu must be > 0, got -5"),
        (BASE + ["--actor-num-nodes", "0"], "--actor-num-nodes must be > 0, got 0"),
        (BASE + ["--rollout-num-gpus", "-1"], "--rollout-num-gpus must be >= 0, got -1"),
        (BASE + ["--update-weight-buffer-size", "1.5"], "argument --update-weight-buffer-size: expected a positive whole"),
        (BASE + ["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1"),
        (BASE + ["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    ],
)
def test_validation_rule_names_the_flag(argv, message, capsys):
    assert message in parse_error(argv, capsys)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train-backend", "megatron"], "not supported yet: --train-backend (got 'megatron'"),
        (["--record-memory-history"], "not supported yet: --record-memory-history"),
        (["--memory-snapshot-dir", "/tmp/x"], "not supported yet: --memory-snapshot-dir"),
        (["--num-critic-only-steps", "1"], "--num-critic-only-steps 1: needs --advantage-estimator ppo"),
        (["--critic-lr", "1e-5"], "--critic-lr 1e-05: needs --advantage-estimator ppo"),
        (["--tensor-model-parallel-size", "2"], "not supported yet: --tensor-model-parallel-size under --train-backend fsdp"),
        (["--sequence-parallel"], "not supported yet: --sequence-parallel under --train-backend fsdp"),
    ],
)
def test_not_supported_yet(extra, message, capsys):
    assert message in parse_error(BASE + extra, capsys)


def test_not_supported_registry_flags_exist_with_their_default():
    parser = build_parser()
    for flag, allowed in NOT_SUPPORTED_YET.items():
        assert flag in parser._option_string_actions, flag
        assert parser.get_default(flag[2:].replace("-", "_")) == allowed, flag
    # each default on its own is accepted
    parse_args(BASE + ["--tensor-model-parallel-size", "1", "--train-backend", "fsdp"])


def test_add_custom_arguments_hook():
    args = parse_args(BASE + ["--my-flag", "7"],
                      add_custom_arguments=lambda parser: parser.add_argument("--my-flag", type=int, default=0))
    assert args.my_flag == 7


def test_eval_config_datasets_with_defaults_and_overrides(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("eval:\n  defaults: {n_samples_per_eval_prompt: 4, temperature: 1}\n  datasets:\n"
                      "    - {name: aime, path: aime.jsonl, n_samples_per_eval_prompt: 16, rm_type: math}\n"
                      "    - {name: gsm8k, path: g.jsonl, label_key: answer}\n")
    args = parse_args(BASE + ["--eval-config", str(config), "--eval-prompt-data", "extra", "x.jsonl",
                              "--eval-interval", "5"])
    assert args.eval_datasets == [
        {"name": "aime", "path": "aime.jsonl",
         "overrides": {"n_samples_per_eval_prompt": 16, "eval_temperature": 1.0, "rm_type": "math"}},
        {"name": "gsm8k", "path": "g.jsonl",
         "overrides": {"n_samples_per_eval_prompt": 4, "eval_temperature": 1.0, "eval_label_key": "answer"}},
        {"name": "extra", "path": "x.jsonl"}]


@pytest.mark.parametrize(
    "text, message",
    [
        ("datasets: []\n", "a non-empty 'datasets' list"),
        ("datasets:\n  - {name: a, path: a.jsonl, temprature: 1.0}\n",
         "dataset 'a': unknown setting(s) ['temprature']"),
        ("datasets:\n  - {name: a, path: a.jsonl, n_samples_per_eval_prompt: 0}\n",
         "n_samples_per_eval_prompt must be > 0"),
        ("datasets:\n  - {name: a, path: a.jsonl, top_k: fast}\n", "top_k must be of type int, got 'fast'"),
        ("datasets:\n  - {name: a, path: a.jsonl}\n  - {name: a, path: b.jsonl}\n", "'a' appears twice"),
        ("datasets:\n  - {name: a}\n", "dataset 0 needs a 'name' and a 'path'"),
        ("eval: {datasets: [{name: a, path: a.jsonl}], extra: 1}\n", "unknown key(s) ['extra']"),
        ("datasets: [\n", "not valid YAML"),
    ],
)
def test_eval_config_errors_name_the_file_and_the_dataset(tmp_path, capsys, text, message):
    config = tmp_path / "eval.yaml"
    config.write_text(text)
    error = parse_error(BASE + ["--eval-config", str(config)], capsys)
    assert f"--eval-config {config}" in error and message in error


def test_eval_config_file_not_found_and_name_clash(tmp_path, capsys):
    assert "file not found" in parse_error(BASE + ["--eval-config", str(tmp_path / "none.yaml")], capsys)
    config = tmp_path / "eval.yaml"
    config.write_text("datasets:\n  - {name: a, path: a.jsonl}\n")
    assert "must be unique" in parse_error(BASE + ["--eval-config", str(config), "--eval-prompt-data", "a", "b.jsonl"],
                                           capsys)


def test_advantage_estimator_choices_are_the_ones_the_algorithms_know():
    from slime.algo import ADVANTAGE_ESTIMATORS as known
    from slime.utils.arguments.algorithm import ADVANTAGE_ESTIMATORS as choices

    assert tuple(choices) == tuple(known)
