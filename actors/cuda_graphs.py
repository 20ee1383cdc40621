"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (one memory pool).

A decode step's shapes depend only on the batch size, so each bucket is captured once over
static input buffers; a step copies its inputs into the first `batch` rows, pads the rest with a
harmless dummy sequence (one token in a reserved cache block), and replays. Block tables are
`max_blocks` wide; entries past a sequence's length are never read."""
import torch

from kernels.attention import AttentionMetadata


def buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


class DecodeGraphs:
    def __init__(self, forward, vocab_size: int, max_batch: int, max_blocks: int, pad_slot: int,
                 pad_block: int, device: torch.device):
        self.forward = forward                              # (input_ids, positions, meta) -> logits
        self.pad_slot, self.pad_block = pad_slot, pad_block
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), pad_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full((max_batch, max_blocks), pad_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.sizes = buckets(max_batch)

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(self.slots[:batch], self.block_tables[:batch], self.context_lens[:batch],
                                 self.cu_seqlens[:batch + 1], 1)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for batch in reversed(self.sizes):                  # largest first: the pool fits the rest
            args = (self.input_ids[:batch], self.positions[:batch], self._meta(batch))
            torch.cuda.synchronize()
            for _ in range(2):                              # warm-up: autotune, lazy inits
                self.forward(*args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(*args)
            pool = graph.pool()
            self.graphs[batch] = (graph, logits)
        torch.cuda.synchronize()

    def fits(self, batch: int, width: int) -> bool:
        return bool(self.graphs) and batch <= self.sizes[-1] and width <= self.block_tables.shape[1]

    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [batch, vocab] of a decode step through the smallest bucket that holds it."""
        batch, width = meta.block_tables.shape
        bucket = next(b for b in self.sizes if b >= batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slots[:batch].copy_(meta.slot_mapping)
        self.block_tables[:batch, :width].copy_(meta.block_tables)
        self.context_lens[:batch].copy_(meta.context_lens)
        self.slots[batch:bucket].fill_(self.pad_slot)       # padding rows: one token in the pad block
        self.block_tables[batch:bucket, 0].fill_(self.pad_block)
        self.context_lens[batch:bucket].fill_(1)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:batch]
