"""Load the Hugging Face model, freeze what the flags say, shard it with FSDP2 per decoder layer.

    from slime.backends.fsdp.model import build_sharded_policy

`PolicyModel` wraps the HF causal LM so that one forward call (which FSDP2 hooks) runs the decoder
on a packed row and returns response-token log-probs and entropy, projected chunk by chunk
(`log_probs.py`). Its state-dict names are the HF names prefixed with `hf.` (see `hf_name`).
SLIME_FSDP_COMPILE=layer compiles each decoder layer in place before sharding (`layer_compile.py`),
=1 only the elementwise ops (`fused_ops.py`); multi-GPU CUDA runs prefetch the next layer's all-gather.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from slime.backends.fsdp.batching import PackedRow
from slime.backends.fsdp.fused_ops import enabled as fused_ops_enabled
from slime.backends.fsdp.fused_ops import fuse_elementwise_ops
from slime.backends.fsdp.layer_compile import compile_decoder_layers, compile_mode
from slime.backends.fsdp.log_probs import chunked_log_probs_and_entropy
from slime.backends.fsdp.packed_attention import PACKED_ATTENTION, packed_attention_kwargs
from slime.backends.fsdp.packed_attention import register as register_packed_attention
from slime.utils.arguments.training import GRAD_REDUCE_DTYPE_NAMES

HF_PREFIX = "hf."


def hf_name(name: str) -> str:
    """State-dict name of the wrapper -> the Hugging Face name."""
    return name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name


def attention_implementation(device: str) -> str:
    """flash-attention handles packed rows natively on GPU; without it the packed varlen attention
    (`packed_attention.py`). On CPU the packed attention's per-sample path: sdpa would attend over a dense
    T x T block-diagonal mask (25% slower train steps at the quickstart's 1024-token rows), except under
    SLIME_FSDP_COMPILE=layer, where the per-sample path's Python list of lengths would re-trace the compiled
    layers for every new sample count."""
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return register_packed_attention()
    return "sdpa" if compile_mode() == "layer" else register_packed_attention()


def _attention_kwargs(hf_model: nn.Module, row: PackedRow) -> dict[str, Any]:
    """The sample boundaries of the row, for the packed attention (the other implementations read position ids)."""
    if getattr(hf_model.config, "_attn_implementation", None) != PACKED_ATTENTION:
        return {}
    return packed_attention_kwargs(row.seq_lengths or [row.num_tokens], row.input_ids.device)


def _auto_class(role: str):
    """The actor is a causal LM; the critic the same backbone with a 1-output token head (`score`)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    return AutoModelForTokenClassification if role == "critic" else AutoModelForCausalLM


def _role_kwargs(role: str) -> dict[str, Any]:
    return {"num_labels": 1} if role == "critic" else {}


def load_hf_model(path: str, device: str, role: str = "actor") -> nn.Module:
    try:
        model = _auto_class(role).from_pretrained(path, dtype=torch.float32,
                                                  attn_implementation=attention_implementation(device),
                                                  **_role_kwargs(role))
    except OSError as exc:
        raise ValueError(f"--hf-checkpoint {path!r} is not a loadable Hugging Face checkpoint: {exc}") from exc
    return model


def apply_trainable_patterns(model: nn.Module, only_train: list[str] | None, freeze: list[str] | None) -> list[str]:
    """Set requires_grad from --only-train-params-name-list / --freeze-params-name-list (regexes, re.search).

    Returns the names left trainable. Each regex must match at least one parameter."""
    if only_train and freeze:
        raise ValueError("--only-train-params-name-list and --freeze-params-name-list are mutually exclusive")
    patterns, flag = (only_train, "--only-train-params-name-list") if only_train else (freeze, "--freeze-params-name-list")
    if not patterns:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"{flag}: bad regex {pattern!r}: {exc}") from exc
    names = [n for n, _ in model.named_parameters()]
    for pattern, rx in zip(patterns, compiled):
        if not any(rx.search(n) for n in names):
            raise ValueError(f"{flag}: {pattern!r} matches no parameter (names look like {names[0]!r})")
    for name, param in model.named_parameters():
        matched = any(rx.search(name) for rx in compiled)
        param.requires_grad_(matched if only_train else not matched)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: expected a decoder-only model with .model.layers")
    return list(layers)


class PolicyModel(nn.Module):
    """HF causal LM + chunked log-prob head; forward(packed row) -> (log_probs [N], entropy [N]) over its targets."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def body(self, row: PackedRow) -> torch.Tensor:
        out = self.hf.model(input_ids=row.input_ids, position_ids=row.position_ids, attention_mask=None,
                            use_cache=False, **_attention_kwargs(self.hf, row))
        return out.last_hidden_state[0]

    def forward(self, row: PackedRow, temperature: float = 1.0, chunk_size: int = -1, with_entropy: bool = True,
                return_logits: bool = False, entropy_grad: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """return_logits: the whole row's logits [1, T, V] / temperature in fp32 (for --loss-type custom_loss).
        entropy_grad=False computes the entropy without autograd (a metric only: --entropy-coef 0)."""
        if return_logits:
            return self.hf.lm_head(self.body(row).unsqueeze(0)).float() / temperature
        hidden = self.body(row).index_select(0, row.predict_positions)
        return chunked_log_probs_and_entropy(hidden, row.targets, self.hf.lm_head, temperature=temperature,
                                             chunk_size=chunk_size, with_entropy=with_entropy,
                                             entropy_grad=entropy_grad)


class ValueModel(nn.Module):
    """Critic: HF backbone + `score` head (AutoModelForTokenClassification, 1 label); forward(row) -> values [N]
    at the positions that predict the response tokens (aligned with the actor's log-probs)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, row: PackedRow) -> torch.Tensor:
        out = self.hf.model(input_ids=row.input_ids, position_ids=row.position_ids, attention_mask=None,
                            use_cache=False, **_attention_kwargs(self.hf, row))
        hidden = out.last_hidden_state[0].index_select(0, row.predict_positions)
        return self.hf.score(hidden).float().squeeze(-1)


def reshard_all(model: nn.Module) -> None:
    """Back to sharded parameters (the root stays unsharded after a no-grad forward until resharded)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def reshard_after_forward(setting: str, device: str, num_ranks: int, recompute: bool) -> bool:
    """--fsdp-reshard-after-forward: auto keeps a layer's bf16 copy from forward to backward only where it
    costs no communication to free it (one rank) and nothing recomputes the forward."""
    if setting == "auto":
        return not (device == "cuda" and num_ranks == 1 and not recompute)
    return setting == "true"


GRAD_REDUCE_DTYPES = {name: getattr(torch, name) for name in GRAD_REDUCE_DTYPE_NAMES}


def mixed_precision(device: str, grad_reduce_dtype: str = "float32") -> MixedPrecisionPolicy:
    """CUDA: bf16 compute over the fp32 sharded master weights; gradients reduce-scattered (and, under
    --fsdp-reduce-grads-per-step, accumulated across micro-batches) in --fsdp-grad-reduce-dtype. CPU: fp32."""
    if grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
        raise ValueError(f"--fsdp-grad-reduce-dtype {grad_reduce_dtype!r}: expected one of "
                         f"{', '.join(GRAD_REDUCE_DTYPES)}")
    if device != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=GRAD_REDUCE_DTYPES[grad_reduce_dtype])


def shard_model(model: nn.Module, mesh: DeviceMesh, device: str, *, recompute: bool,
                reshard: str = "auto", grad_reduce_dtype: str = "float32") -> nn.Module:
    if recompute:
        if hasattr(model.hf, "activation_checkpointing_enable"):
            model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = mixed_precision(device, grad_reduce_dtype)
    layers = decoder_layers(model.hf)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward(reshard, device, mesh.size(), recompute))
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if device == "cuda" and mesh.size() > 1:
        # issue layer i+1's all-gather when layer i starts: the host runs ahead less than the GPU needs
        for layer, following in zip(layers, layers[1:]):
            layer.set_modules_to_forward_prefetch([following])
    return model


def provided_model(args: Any, path: str, role: str) -> nn.Module:
    """--custom-model-provider-path: `provider(args, path, role) -> nn.Module`, an HF-style decoder (`.config`,
    `.model.layers`, `.model(...)` returning `.last_hidden_state`, and `.lm_head` for the actor or a 1-output
    `.score` for the critic) with the checkpoint's parameter names. Called on every rank; rank 0's weights are
    the ones every rank trains from. The trainer keeps fp32 master weights and sets the packed attention."""
    from slime.utils.plugins import load_function

    flag = "--custom-model-provider-path"
    model = load_function(args.custom_model_provider_path, flag=flag)(args, path, role)
    head = "score" if role == "critic" else "lm_head"
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, head, None), nn.Module):
        raise ValueError(f"{flag} {args.custom_model_provider_path}: returned {type(model).__name__}, expected an "
                         f"nn.Module with a .{head} head for the {role}")
    decoder_layers(model)  # names the missing .model.layers
    model = model.to(torch.float32)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attention_implementation(args.device))
    return model


def _meta_hf_model(path: str, device: str, role: str) -> nn.Module:
    """The architecture of `path` with parameters on the meta device (no memory, no disk read of weights)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, **_role_kwargs(role))
    except OSError as exc:
        raise ValueError(f"--hf-checkpoint {path!r} is not a loadable Hugging Face checkpoint: {exc}") from exc
    with torch.device("meta"):
        return _auto_class(role).from_config(config, dtype=torch.float32,
                                             attn_implementation=attention_implementation(device))


def build_sharded_policy(args: Any, mesh: DeviceMesh, path: str | None = None, role: str = "actor"
                         ) -> PolicyModel | ValueModel:
    """Rank 0 reads the checkpoint; the other ranks build the model on the meta device and receive their
    shards from rank 0 (so host memory holds one full copy, not one per rank). Buffers are broadcast too."""
    device = args.device
    path = path or args.hf_checkpoint
    multi_rank = dist.get_world_size() > 1
    if getattr(args, "custom_model_provider_path", None):
        hf_model = provided_model(args, path, role)
    elif dist.get_rank() == 0 or not multi_rank:
        hf_model = load_hf_model(path, device, role)
    else:
        hf_model = _meta_hf_model(path, device, role)
    full_state = {HF_PREFIX + k: v for k, v in hf_model.state_dict().items()} if dist.get_rank() == 0 else {}
    apply_trainable_patterns(hf_model, getattr(args, "only_train_params_name_list", None),
                             getattr(args, "freeze_params_name_list", None))
    recompute = getattr(args, "recompute_granularity", None) == "full"
    mode = compile_mode()
    if mode == "layer":  # before fully_shard (in place: state-dict names unchanged)
        compile_decoder_layers(hf_model, device)
    elif mode == "1" and fused_ops_enabled(device):
        fuse_elementwise_ops(hf_model)
    wrapper = ValueModel(hf_model) if role == "critic" else PolicyModel(hf_model)
    model = shard_model(wrapper, mesh, device, recompute=recompute,
                        reshard=getattr(args, "fsdp_reshard_after_forward", "auto"),
                        grad_reduce_dtype=getattr(args, "fsdp_grad_reduce_dtype", "float32"))
    if not multi_rank:
        return model
    if dist.get_rank() != 0:
        model.to_empty(device=device)
        if getattr(hf_model.config, "tie_word_embeddings", False) and hasattr(hf_model, "lm_head"):
            assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight, "tied embeddings came apart"
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                     broadcast_from_rank0=True))
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return model
