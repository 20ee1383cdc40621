"""Decode steps and fresh prefills replayed from CUDA graphs.

A decode step's shapes depend only on the batch size, so each bucket is captured once over
static input buffers; a step copies its inputs into the first `batch` rows, pads the rest with a
harmless dummy sequence (one token in a reserved cache block), and replays. Block tables are
`max_blocks` wide; entries past a sequence's length are never read. In buckets up to
`short_max_batch` (those whose decode attention may split contexts over several programs,
kernels/attention.py), steps whose contexts all fit one of `narrow_blocks` replay a graph captured
over the narrowest such view of the tables: attention then knows on the host how long a context can
be, so it launches no split programs that would find nothing to do, and picks how to read them
(`kernels.decode_plan.decode_chunk`).

A fresh prefill (prompts with nothing cached) depends on its token and sequence counts: buckets of
powers of two, those of up to `prefill_graph_tokens` tokens captured at start-up (`warm_up`), the
others the first time a step needs one (tens of ms, once), and replayed after. Captured on first use
they stalled serving: in a burst of 64 requests on an H100, prefill captures took 0.27 s of the engine
thread's 1.1 s (py-spy, docs/performance.md). Its
padding is one extra sequence that owns the padding tokens (token 0 at position 0, all written to
the reserved cache slot), followed by empty sequences: every row the kernels compute is finite.
Eager prefill is host-bound (GPT-Neo 2.7B: 19.5 ms for 32 tokens whose kernels take 3.1 ms).

Every graph recorded here is also kept in a weak set, so that `release_graphs` can reset them all
before the NCCL group is destroyed: a live graph holding captured collectives makes
`destroy_process_group` hang (pytorch/pytorch#115388; seen here on 2 x H200 when a TP=2 rank exited)."""
import weakref

import numpy as np
import torch
import torch.distributed as dist

from kernels.attention import AttentionMetadata


def record(forward, args: tuple, pool, warmups: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`forward(*args)` captured in a CUDA graph (memory pool `pool`, None for a new one) after
    `warmups` eager runs (Triton compiles, cuBLAS picks its kernels): the graph and its output."""
    torch.cuda.synchronize()
    for _ in range(warmups):
        forward(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward(*args)
    _live.add(graph)
    return graph, out


_live: "weakref.WeakSet[torch.cuda.CUDAGraph]" = weakref.WeakSet()


def release_graphs(wait: bool = True) -> int:
    """Reset every graph `record` made that is still alive and return how many: their replays become
    invalid, so callers drop the owners' graphs first or are shutting down. Before
    `destroy_process_group`, this is what keeps it from hanging. With `wait`, after the device
    finishes its work; a caller whose group failed passes False (a collective left waiting for a dead
    peer would hold the device until the group's timeout)."""
    graphs = list(_live)
    if graphs and wait:
        torch.cuda.synchronize()
    for graph in graphs:
        graph.reset()
    _live.clear()
    return len(graphs)


def destroy_process_group(failed: bool = False) -> None:
    """`dist.destroy_process_group()` (every group), after `release_graphs` (without waiting for the
    device if the group `failed`), if a group exists."""
    if dist.is_initialized():
        release_graphs(wait=not failed)
        dist.destroy_process_group()


def buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


class DecodeGraphs:
    def __init__(self, forward, vocab_size: int, max_batch: int, max_blocks: int, pad_slot: int,
                 pad_block: int, device: torch.device, narrow_blocks: tuple[int, ...] = (), short_max_batch: int = 0):
        self.forward = forward                              # (input_ids, positions, meta) -> logits
        self.pad_slot, self.pad_block = pad_slot, pad_block
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), pad_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full((max_batch, max_blocks), pad_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        # (bucket, table width) -> graph and its logits; the width is max_blocks or one of narrow_blocks
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.sizes = buckets(max_batch)
        self.max_blocks, self.pool = max_blocks, None
        self.narrow_blocks = sorted({b for b in narrow_blocks if 0 < b < max_blocks})
        self.short_max_batch = short_max_batch if self.narrow_blocks else 0

    def _widths(self, batch: int) -> list[int]:
        return [self.max_blocks, *self.narrow_blocks] if batch <= self.short_max_batch else [self.max_blocks]

    def _meta(self, batch: int, width: int) -> AttentionMetadata:
        return AttentionMetadata(self.slots[:batch], self.block_tables[:batch, :width], self.context_lens[:batch],
                                 self.cu_seqlens[:batch + 1], 1)

    def _capture(self, batch: int, width: int) -> None:
        args = (self.input_ids[:batch], self.positions[:batch], self._meta(batch, width))
        graph, logits = record(self.forward, args, self.pool, warmups=2)
        self.pool = graph.pool()
        self.graphs[batch, width] = (graph, logits)

    @torch.inference_mode()
    def capture(self) -> None:
        """Every bucket at its widths, largest first (the pool then fits the rest)."""
        for batch in reversed(self.sizes):
            for width in self._widths(batch):
                self._capture(batch, width)
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
        narrow = [b for b in self.narrow_blocks if width <= b] if bucket <= self.short_max_batch else []
        graph, logits = self.graphs[bucket, narrow[0] if narrow else self.max_blocks]
        graph.replay()
        return logits[:batch]


PREFILL_GRAPH_MAX_TOKENS = 4096      # the default max_num_batched_tokens; beyond, prefill runs eagerly


def _pow2_range(first: int, last: int) -> list[int]:
    """Powers of two from `first` (one) up to `last`."""
    out = [first]
    while out[-1] * 2 <= last:
        out.append(out[-1] * 2)
    return out


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


class _PrefillInputs:
    """A prefill bucket's static inputs, views of one device buffer, and a pinned host buffer of the
    same layout that fills it in one copy: input_ids, positions and slots [tokens] int64, cu_seqlens
    [seqs + 1] int32."""

    def __init__(self, tokens: int, seqs: int, device: torch.device):
        self.tokens, self.seqs = tokens, seqs
        size = 24 * tokens + 4 * (seqs + 1)
        with torch.inference_mode(False):        # normal tensors: a step may fill them outside inference mode
            self.buffer = torch.zeros(size, dtype=torch.uint8, device=device)
            self.input_ids, self.positions, self.slots, self.cu_seqlens = self._views(self.buffer)
        self.staging = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.copied = torch.cuda.Event() if device.type == "cuda" else None

    def _views(self, buffer):
        """(input_ids, positions, slots, cu_seqlens) of `buffer` (a tensor or a numpy array)."""
        t = self.tokens
        longs = buffer[:24 * t].view(torch.int64 if isinstance(buffer, torch.Tensor) else np.int64)
        ints = buffer[24 * t:].view(torch.int32 if isinstance(buffer, torch.Tensor) else np.int32)
        return longs[:t], longs[t:2 * t], longs[2 * t:], ints

    def host(self) -> tuple[np.ndarray, ...]:
        """The four views of the host buffer, free to write (its last copy out has finished)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self._views(self.staging.numpy())

    def send(self) -> None:
        """The host buffer to the device buffer, asynchronously."""
        self.buffer.copy_(self.staging, non_blocking=True)
        if self.copied is not None:
            self.copied.record()


class PrefillGraphs:
    """Captures the buckets of small steps at start-up (`warm_up`) and the others lazily. Each bucket's
    graph reads its inputs from a buffer of its own, which `run_arrays` fills from the host in one copy."""

    def __init__(self, forward, max_seqs: int, pad_slot: int, device: torch.device,
                 max_tokens: int = PREFILL_GRAPH_MAX_TOKENS):
        self.forward = forward                  # (input_ids, positions, meta) -> logits of each last token
        self.pad_slot, self.max_tokens, self.device = pad_slot, max_tokens, device
        self.max_seqs = _pow2_at_least(max_seqs + 1, 2)        # + the padding sequence
        self.unused = torch.zeros(1, 1, dtype=torch.int32, device=device)   # block tables: a fresh prefill reads none
        self.inputs: dict[tuple[int, int], _PrefillInputs] = {}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor] | None] = {}
        self.pool = None

    def warm_up(self, max_tokens: int = 0) -> list[tuple[int, int]]:
        """Capture every bucket a step of up to `max_tokens` tokens can fall in (at least the smallest,
        which compiles the kernels), largest first, so the smaller graphs take their memory from the
        pool the larger ones grew; returns the buckets."""
        keys = self.buckets_up_to(max_tokens)
        for key in sorted(keys, reverse=True):
            inputs = self._inputs(key)
            inputs.slots.fill_(self.pad_slot)
            inputs.cu_seqlens[1:].fill_(key[0])                 # one padding sequence of every token
            self.graphs[key] = self._capture(inputs)
        return keys

    def buckets_up_to(self, max_tokens: int) -> list[tuple[int, int]]:
        """Every bucket a step of at most `max_tokens` tokens (at least 16) can fall in."""
        return [(tokens, seqs) for tokens in _pow2_range(16, min(_pow2_at_least(max_tokens, 16), self.max_tokens))
                for seqs in _pow2_range(2, self.max_seqs) if seqs // 2 <= tokens]    # a sequence has a token

    def bucket(self, tokens: int, seqs: int) -> tuple[int, int] | None:
        """(padded tokens, padded sequences) for a step, or None when it is too large for a graph."""
        if tokens > self.max_tokens or seqs + 1 > self.max_seqs:
            return None
        return _pow2_at_least(tokens, 16), _pow2_at_least(seqs + 1, 2)

    def _inputs(self, key: tuple[int, int]) -> _PrefillInputs:
        if key not in self.inputs:
            self.inputs[key] = _PrefillInputs(*key, self.device)
        return self.inputs[key]

    def _capture(self, inputs: _PrefillInputs):
        """The graph of a bucket over its inputs and its logits, or None when capturing fails (e.g.
        out of memory for the graph's pool: that bucket then runs eagerly)."""
        meta = AttentionMetadata(inputs.slots, self.unused.expand(inputs.seqs, 1), self.unused[0].expand(inputs.seqs),
                                 inputs.cu_seqlens, inputs.tokens, fresh_prefill=True)
        try:
            graph, logits = record(self.forward, (inputs.input_ids, inputs.positions, meta), self.pool, warmups=1)
        except torch.OutOfMemoryError:
            torch.cuda.synchronize()
            return None
        self.pool = graph.pool()
        return graph, logits

    def _replay(self, key: tuple[int, int], seqs: int) -> torch.Tensor | None:
        if key not in self.graphs:
            self.graphs[key] = self._capture(self.inputs[key])
        entry = self.graphs[key]
        if entry is None:
            return None
        graph, logits = entry
        graph.replay()
        return logits[:seqs]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Logits [seqs, vocab] of each sequence's last token, or None when no graph serves this step."""
        tokens, seqs = len(input_ids), len(meta.cu_seqlens_q) - 1
        key = self.bucket(tokens, seqs)
        if key is None:
            return None
        inputs = self._inputs(key)
        inputs.input_ids[:tokens].copy_(input_ids)
        inputs.input_ids[tokens:].zero_()
        inputs.positions[:tokens].copy_(positions)
        inputs.positions[tokens:].zero_()
        inputs.slots[:tokens].copy_(meta.slot_mapping)
        inputs.slots[tokens:].fill_(self.pad_slot)
        inputs.cu_seqlens[:seqs + 1].copy_(meta.cu_seqlens_q)
        inputs.cu_seqlens[seqs + 1:].fill_(key[0])              # the padding sequence, then empty ones
        return self._replay(key, seqs)

    def run_arrays(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                   cu_seqlens: np.ndarray) -> torch.Tensor | None:
        """`run` from host arrays: padded on the host and sent in one copy (a single-rank fresh
        prefill's inputs never exist as device tensors of their own)."""
        tokens, seqs = len(input_ids), len(cu_seqlens) - 1
        key = self.bucket(tokens, seqs)
        if key is None:
            return None
        inputs = self._inputs(key)
        ids, pos, slot, cu = inputs.host()
        ids[:tokens], pos[:tokens], slot[:tokens], cu[:seqs + 1] = input_ids, positions, slots, cu_seqlens
        ids[tokens:], pos[tokens:], slot[tokens:], cu[seqs + 1:] = 0, 0, self.pad_slot, key[0]
        inputs.send()
        return self._replay(key, seqs)
