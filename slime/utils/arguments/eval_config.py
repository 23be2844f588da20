"""`--eval-config FILE.yaml`: eval datasets, each with its own sampling, keys and reward.

    eval:
      defaults:                      # every dataset's settings unless it names its own
        n_samples_per_eval_prompt: 4
        max_response_len: 1024
      datasets:
        - name: aime
          path: data/aime.jsonl
          n_samples_per_eval_prompt: 16
          rm_type: math
        - name: gsm8k
          path: data/gsm8k.jsonl
          temperature: 0.6

`load_eval_config(path)` -> [{"name", "path", "overrides": {arg dest: value}}]; the eval rollout applies a dataset's
overrides over the run's arguments (`slime/rollout/eval.py`). Unknown keys, wrong types and duplicate names are
errors naming the file and the dataset.
"""

from __future__ import annotations

from typing import Any

from slime.utils.arguments.yaml_config import load_yaml_mapping

# setting in the file -> (argument it overrides, type, must be > 0)
SETTINGS: dict[str, tuple[str, type, bool]] = {
    "n_samples_per_eval_prompt": ("n_samples_per_eval_prompt", int, True),
    "temperature": ("eval_temperature", float, True),
    "top_p": ("eval_top_p", float, True),
    "top_k": ("eval_top_k", int, False),
    "max_response_len": ("eval_max_response_len", int, True),
    "max_prompt_len": ("eval_max_prompt_len", int, True),
    "min_new_tokens": ("eval_min_new_tokens", int, False),
    "max_context_len": ("eval_max_context_len", int, True),
    "input_key": ("eval_input_key", str, False),
    "label_key": ("eval_label_key", str, False),
    "tool_key": ("eval_tool_key", str, False),
    "metadata_key": ("metadata_key", str, False),
    "reward_key": ("eval_reward_key", str, False),
    "rm_type": ("rm_type", str, False),
    "custom_rm_path": ("custom_rm_path", str, False),
}


def load_eval_config(path: str) -> list[dict[str, Any]]:
    where = f"--eval-config {path}"
    data = load_yaml_mapping(path, "--eval-config", "a mapping with a 'datasets' list")
    section = data.get("eval", data)
    if not isinstance(section, dict) or not isinstance(section.get("datasets"), list) or not section["datasets"]:
        raise ValueError(f"{where}: expected a mapping with a non-empty 'datasets' list (under 'eval:' or at the top)")
    extra = sorted(set(section) - {"defaults", "datasets"})
    if extra:
        raise ValueError(f"{where}: unknown key(s) {extra}; expected 'defaults' and 'datasets'")
    defaults = _settings(section.get("defaults") or {}, f"{where} defaults")
    datasets, names = [], set()
    for i, entry in enumerate(section["datasets"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("path"), str)):
            raise ValueError(f"{where}: dataset {i} needs a 'name' and a 'path' (strings), got {entry!r:.120}")
        name = entry["name"]
        if name in names:
            raise ValueError(f"{where}: dataset name {name!r} appears twice")
        names.add(name)
        own = {k: v for k, v in entry.items() if k not in ("name", "path")}
        datasets.append({"name": name, "path": entry["path"],
                         "overrides": {**defaults, **_settings(own, f"{where} dataset {name!r}")}})
    return datasets


def _settings(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {raw!r:.80}")
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    out = {}
    for key, value in raw.items():
        dest, kind, positive = SETTINGS[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be of type {kind.__name__}, got {value!r}")
        if positive and value <= 0:
            raise ValueError(f"{where}: {key} must be > 0, got {value!r}")
        out[dest] = value
    return out
