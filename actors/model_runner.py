"""Runs the injected model for a scheduled batch: owns the KV cache, turns sequences into flat
token tensors plus `AttentionMetadata`, and returns logits."""
import torch

from actors.sequence import Sequence
from kernels.attention import AttentionMetadata
from kernels.model import CausalLM


def kv_cache_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    layer = model.layers[0].attn.qkv
    per_token = 2 * layer.num_kv_heads * layer.head_dim * dtype.itemsize
    return per_token * block_size * len(model.layers)


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: torch.device):
        self.model, self.block_size, self.device = model, block_size, device
        qkv = model.layers[0].attn.qkv
        shape = (num_blocks, block_size, qkv.num_kv_heads, qkv.head_dim)
        dtype = model.embed.weight.dtype
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in model.layers]

    def _tensor(self, values: list, dtype=torch.int32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def prepare_prefill(self, seqs: list[Sequence]):
        """Every uncached token of each sequence; returns (input_ids, positions, meta)."""
        input_ids, positions, slots, cu_seqlens = [], [], [], [0]
        for seq in seqs:
            new = range(seq.num_cached_tokens, len(seq))
            input_ids += seq.token_ids[seq.num_cached_tokens:]
            positions += [p + seq.position_offset for p in new]
            slots += [self._slot(seq, p) for p in new]
            cu_seqlens.append(cu_seqlens[-1] + len(new))
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64), block_tables=self._block_tables(seqs),
            context_lens=self._tensor([len(s) for s in seqs]), cu_seqlens_q=self._tensor(cu_seqlens),
            max_query_len=max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])))
        return self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta

    def prepare_decode(self, seqs: list[Sequence]):
        """The newest token of each sequence; returns (input_ids, positions, meta)."""
        meta = AttentionMetadata(
            slot_mapping=self._tensor([self._slot(s, len(s) - 1) for s in seqs], torch.int64),
            block_tables=self._block_tables(seqs), context_lens=self._tensor([len(s) for s in seqs]),
            cu_seqlens_q=self._tensor(list(range(len(seqs) + 1))), max_query_len=1)
        input_ids = self._tensor([s.token_ids[-1] for s in seqs], torch.int64)
        positions = self._tensor([len(s) - 1 + s.position_offset for s in seqs], torch.int64)
        return input_ids, positions, meta

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, all_logits: bool = False) -> torch.Tensor:
        """Logits of each sequence's last token [seqs, vocab], or of every new token when `all_logits`."""
        input_ids, positions, meta = (self.prepare_prefill if is_prefill else self.prepare_decode)(seqs)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        if not all_logits:
            hidden = hidden[meta.cu_seqlens_q[1:].long() - 1]
        for seq in seqs:
            seq.num_cached_tokens = len(seq)
        return self.model.compute_logits(hidden)
