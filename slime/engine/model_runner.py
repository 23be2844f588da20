"""Owns the model, its KV cache and the sampler; turns a scheduled batch into next tokens.

    from slime.engine.model_runner import ModelRunner
    runner = ModelRunner(engine_config, hf_config)
    token_ids, logprobs = runner.run(seqs, is_prefill=True)

Batches are flat: the new tokens of every sequence back to back, their absolute positions, the KV
slot each new token is written to, and per sequence its context slots / padded block table. The KV
cache is one tensor per layer for K and one for V, [num_blocks, block_size, kv_heads, head_dim],
sized from `kv_cache_tokens` (CPU default 32768 tokens, fewer if they would pass 2 GiB) or, on GPU, from `mem_fraction_static` of the
device memory minus what is already used (weights included).

Backends: the torch reference attention and sampler everywhere; on CUDA with Triton installed, the
Triton paged-attention kernels, fused RMSNorm / q-k norm + RoPE / SiLU-and-mul kernels
(`slime.engine.kernels.fused_ops`), the fused Gumbel sampler for untruncated rows, and (unless
`enforce_eager`) decode steps replayed from CUDA graphs, captured lazily at the first decode and
dropped whenever the KV cache or the weights are reallocated.

Tensor parallelism: given a `TPInfo` of size > 1 the runner is one rank's shard (its heads in the KV
cache, all ranks agreeing on the smallest block count); only rank 0 computes logits and samples,
the other ranks call `forward` (driven by `slime.engine.tp_worker`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from slime.engine.attention import AttentionBackend, AttentionMetadata, TorchPagedAttention
from slime.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_CPU_KV_CACHE_TOKENS, EngineConfig
from slime.engine.models.loader import iterate_checkpoint
from slime.engine.models.registry import model_spec_for
from slime.engine.parallel import TPInfo
from slime.engine.sampler import Sampler, SamplingTensors
from slime.engine.sequence import Sequence
from slime.engine.weight_checker import WeightChecker


def _triton_ready(device: torch.device) -> bool:
    from slime.engine.kernels import triton_available

    return triton_available(device)


def _triton_attention() -> AttentionBackend:
    from slime.engine.kernels.paged_attention import TritonPagedAttention

    return TritonPagedAttention()


def _is_triton_attention(attention: AttentionBackend) -> bool:
    """CUDA graphs need a backend that reads only device tensors from the metadata."""
    from slime.engine.kernels.paged_attention import TritonPagedAttention

    return isinstance(attention, TritonPagedAttention)


@dataclass
class InflightStep:
    """A step enqueued by `ModelRunner.launch`: its batch, the sampled token ids on the device (the next decode
    step's inputs under overlap scheduling), and [tokens; log-probs] on their way to the host (`done`, a CUDA
    event, set when they arrived; None on CPU)."""

    seqs: list[Sequence]
    tokens: torch.Tensor
    host: torch.Tensor
    done: Any


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: Any, max_positions: int,
                 attention: AttentionBackend | None = None, eos_token_ids: Iterable[int] = (),
                 tp: TPInfo | None = None) -> None:
        self.config = config
        self.tp = tp or TPInfo()
        self.eos_token_ids = list(eos_token_ids)  # masked while a request is short of its min_new_tokens
        self.hf_config = hf_config
        self.device = torch.device(config.device)
        self.dtype = config.resolve_dtype(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None))
        self.block_size = config.block_size
        model_cls, variant = model_spec_for(hf_config)
        fast_gpu = self.device.type == "cuda" and _triton_ready(self.device)
        if attention is None:
            attention = _triton_attention() if fast_gpu else TorchPagedAttention()
        with torch.device(self.device):
            self.model = model_cls(hf_config, variant, self.dtype, attention, max_positions, tp=self.tp)
        self.model.eval()
        self.model.compute_logits = self.tp.rank == 0
        # one kernel per RMSNorm / q-k norm + RoPE / SiLU-and-mul on the fast GPU path
        self.fused_ops = self.model.set_fused_ops(True) if fast_gpu else False
        missing = self.model.missing_weights(self.model.load_weights(iterate_checkpoint(config.model_path)))
        if missing:
            raise ValueError(f"checkpoint {config.model_path!r} lacks weights: {sorted(missing)[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}")
        self.sampler = Sampler(fused_gpu_sampling=fast_gpu)
        self.vocab_size = hf_config.vocab_size
        layer = self.model.attention_layers()[0]
        self.num_layers = len(self.model.attention_layers())
        self.kv_shape_tail = (self.block_size, layer.num_kv_heads, layer.head_dim)
        self.num_blocks = self.tp.min_int(self._count_kv_blocks(), self.device)
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.weights_backup: dict[str, torch.Tensor] | None = None
        self.weight_checker: WeightChecker | None = None
        self.allocate_kv_cache()
        self.decode_graphs = None
        if fast_gpu and not config.enforce_eager and _is_triton_attention(attention):
            from slime.engine.cuda_graph import DecodeGraphRunner

            max_blocks = (max_positions + self.block_size - 1) // self.block_size
            self.decode_graphs = DecodeGraphRunner(self.model, config.max_num_seqs, max_blocks, self.vocab_size,
                                                   self.device)

    # ---- memory ---------------------------------------------------------------------------------
    def _bytes_per_block(self) -> int:
        block_size, kv_heads, head_dim = self.kv_shape_tail
        return 2 * self.num_layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def _count_kv_blocks(self) -> int:
        if self.config.kv_cache_tokens is not None:
            return max(1, self.config.kv_cache_tokens // self.block_size)
        if self.device.type != "cuda":
            return max(1, min(DEFAULT_CPU_KV_CACHE_TOKENS // self.block_size,
                              DEFAULT_CPU_KV_CACHE_BYTES // self._bytes_per_block()))
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * self.config.mem_fraction_static - (total - free)
        num_blocks = int(budget // self._bytes_per_block())
        if num_blocks < 1:
            raise ValueError(f"--mem-fraction-static {self.config.mem_fraction_static} leaves no room for the KV cache "
                             f"({(total - free) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB already used); raise it")
        return num_blocks

    def allocate_kv_cache(self) -> None:
        if self.kv_cache is not None:
            return
        shape = (self.num_blocks, *self.kv_shape_tail)
        self.kv_cache = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                          torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
        for layer, (k_cache, v_cache) in zip(self.model.attention_layers(), self.kv_cache):
            layer.k_cache, layer.v_cache = k_cache, v_cache

    def free_kv_cache(self) -> None:
        self.drop_graphs()
        for layer in self.model.attention_layers():
            layer.k_cache = layer.v_cache = None
        self.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def offload_weights(self) -> None:
        """GPU: keep a CPU copy and free the device storage. CPU: nothing to free."""
        if self.device.type != "cuda" or self.weights_backup is not None:
            return
        self.drop_graphs()
        self.weights_backup = {}
        for name, param in self.model.named_parameters():
            self.weights_backup[name] = param.data.to("cpu")
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)
        torch.cuda.empty_cache()

    def onload_weights(self) -> None:
        if self.weights_backup is None:
            return
        for name, param in self.model.named_parameters():
            param.data = self.weights_backup[name].to(self.device)
        self.weights_backup = None

    def drop_graphs(self) -> None:
        """Destroy the captured decode graphs (recaptured at the next decode); NCCL cannot release a
        communicator that live graphs captured collectives of."""
        if self.decode_graphs is not None:
            self.decode_graphs.reset()

    @property
    def weights_offloaded(self) -> bool:
        return self.weights_backup is not None

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[tuple[str, Any]]:
        if self.weights_offloaded:
            raise RuntimeError("weights are released; resume_memory(['weights']) before updating them")
        with torch.no_grad():
            return self.model.load_weights(named_tensors)

    def load_weights_from_disk(self, path: str) -> None:
        self.load_weights(iterate_checkpoint(path))

    def check_weights(self, action: str) -> str:
        """`/weights_checker`: snapshot / reset_tensors / compare this rank's parameters (weight_checker.py)."""
        if self.weights_offloaded:
            raise RuntimeError("weights are released; resume_memory(['weights']) before checking them")
        if self.weight_checker is None:
            self.weight_checker = WeightChecker()
        return self.weight_checker.handle(self.model, action)

    # ---- batches --------------------------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _metadata(self, seqs: list[Sequence], is_prefill: bool, slot_mapping: list[int],
                  query_lens: list[int]) -> AttentionMetadata:
        context_lens = [len(seq) for seq in seqs]
        max_blocks = max(len(seq.block_table) for seq in seqs)
        tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
        for row, seq in zip(tables, seqs):
            row[:len(seq.block_table)] = seq.block_table
        block_tables = torch.from_numpy(tables).to(self.device)
        meta = AttentionMetadata(
            is_prefill=is_prefill, slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=self.device),
            query_lens=query_lens, context_lens=context_lens, context_slots=[], block_tables=block_tables)
        if is_prefill:  # the reference backend's prefill gathers each context by its slots
            slot_table = (block_tables.long()[:, :, None] * self.block_size
                          + torch.arange(self.block_size, device=self.device)).view(len(seqs), -1)
            meta.context_slots = [slot_table[i, :n] for i, n in enumerate(context_lens)]
        else:  # decode reads the padded block tables, masked past each context
            lengths = torch.tensor(context_lens, device=self.device)
            keys = torch.arange(max_blocks * self.block_size, device=self.device)
            meta.context_mask = (keys[None, :] < lengths[:, None])[:, None, None, :]
        return meta

    def prepare(self, seqs: list[Sequence], is_prefill: bool) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                                          torch.Tensor]:
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_lens: list[int] = []
        for seq in seqs:
            start = seq.num_computed_tokens if is_prefill else len(seq) - 1
            assert start < len(seq) and len(seq.block_table) * self.block_size >= len(seq)
            input_ids.extend(seq.token_ids[start:])
            positions.extend(range(start, len(seq)))
            slot_mapping.extend(self._slots(seq, start, len(seq)))
            query_lens.append(len(seq) - start)
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
        meta = self._metadata(seqs, is_prefill, slot_mapping, query_lens)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        return ids, pos, meta, last

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list[float]]:
        """Forward the batch and sample one token per sequence; returns (token ids, log-probs)."""
        return self.collect(self.launch(seqs, is_prefill))

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool,
               last_token_ids: torch.Tensor | None = None) -> InflightStep:
        """Enqueue the batch's forward and sampling without waiting for them; `collect` waits for the tokens and
        log-probs (one copy to the host, one sync). `last_token_ids` [len(seqs)] on the device replaces each
        sequence's last token in a decode step (`--enable-overlap-schedule`: a placeholder for the token the
        previous, still running step samples)."""
        logits = self.forward(seqs, is_prefill, last_token_ids)
        tensors = SamplingTensors.build([s.params for s in seqs], [s.sampling_seed for s in seqs],
                                        [s.num_output_tokens for s in seqs], logits.shape[-1], self.device,
                                        self.eos_token_ids)
        tokens, logprobs = self.sampler(logits, tensors)
        packed = torch.stack((tokens.to(torch.float64), logprobs.to(torch.float64)))
        if self.device.type != "cuda":
            return InflightStep(seqs, tokens, packed, None)
        host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return InflightStep(seqs, tokens, host, done)

    @staticmethod
    def collect(step: InflightStep) -> tuple[list[int], list[float]]:
        if step.done is not None:
            step.done.synchronize()
        return step.host[0].long().tolist(), step.host[1].tolist()

    @torch.inference_mode()
    def forward(self, seqs: list[Any], is_prefill: bool, last_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(seqs), vocab] (tp rank 0), or the last hidden states (other tp ranks). `seqs` need only
        request_id, token_ids, num_computed_tokens, block_table and len() (a `tp_worker.SeqView` will do)."""
        if self.kv_cache is None:
            raise RuntimeError("KV cache is released; resume_memory(['kv_cache']) before generating")
        if self.weights_offloaded:
            raise RuntimeError("weights are released; resume_memory(['weights']) before generating")
        if not is_prefill and self.decode_graphs is not None:
            if not self.decode_graphs.captured:
                self.decode_graphs.capture()
            logits = self.decode_graphs.run(seqs, self.block_size, last_token_ids)
        else:
            ids, pos, meta, last = self.prepare(seqs, is_prefill)
            if last_token_ids is not None:
                assert not is_prefill and ids.shape == last_token_ids.shape
                ids = last_token_ids
            logits = self.model(ids, pos, meta, last)
        return logits
