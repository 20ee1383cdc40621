"""Runs the injected model for a scheduled batch: owns the KV cache, turns sequences into flat
token tensors plus `AttentionMetadata`, and returns logits.

Under tensor parallelism only the TP group's rank 0 schedules. Each step it broadcasts the plan with
torch.distributed, a 6-number header host to host (gloo: a follower learns the step's shapes without
waiting for its GPU) and one int64 payload on the device group (queued behind the step before), and
the other ranks `follow()` in lockstep; no Ray call per step.
"""
import array
import itertools
import time

import numpy as np
import torch

from actors.cuda_graphs import DecodeGraphs, PrefillGraphs, buckets
from actors.sequence import Sequence
from kernels.attention import AttentionMetadata
from kernels.decode_plan import NARROW_CONTEXTS, decode_splits
from kernels.dispatch import use_triton
from kernels.gemv_tuner import TUNED_MAX_ROWS, tuning_window
from kernels.model import CausalLM

ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f"}   # `array` type codes
TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device`, without waiting for the GPU: staged through pinned memory (a plain copy
    from pageable memory would synchronise the stream, and a step launched ahead would wait). Built
    from the list through `array` (three times faster than torch.tensor on a 512-token prompt)."""
    t = torch.frombuffer(array.array(ARRAY_CODES[dtype], values), dtype=dtype) if values else \
        torch.empty(0, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def upload(parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays on `device` through one staged copy (as `to_device`): views of one buffer, of the
    arrays' shapes and dtypes, each starting 16 bytes aligned (as a tensor of its own would, so the
    Triton kernels they reach see the alignment they were specialised for)."""
    starts = list(itertools.accumulate((-(-p.nbytes // 16) * 16 for p in parts), initial=0))
    host = np.empty(starts[-1], np.uint8)
    for part, start in zip(parts, starts):
        host[start:start + part.nbytes] = part.reshape(-1).view(np.uint8)
    buffer = torch.from_numpy(host)
    buffer = buffer.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else buffer.to(device)
    return [buffer[start:start + p.nbytes].view(TORCH_DTYPES[p.dtype]).view(p.shape)
            for p, start in zip(parts, starts)]


def block_tables(seqs: list[Sequence], dtype) -> np.ndarray:
    """The sequences' block tables as one [seqs, longest] array, rows padded with block 0."""
    width = max(len(s.block_table) for s in seqs)
    return np.array([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype)


# plan commands: run a step / end of a driver call / leave the loop / nothing (an idle group's keepalive:
# a follower waits for its next plan inside a collective, which times out after the group's timeout)
STEP, DONE, STOP, KEEPALIVE = 0, 1, 2, 3


def kv_cache_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    layer = model.layers[0].attn.qkv
    per_token = 2 * layer.num_kv_heads * layer.head_dim * dtype.itemsize
    return per_token * block_size * len(model.layers)


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: torch.device):
        self.model, self.block_size, self.device, self.tp = model, block_size, device, model.tp
        self.last_command = STEP                  # of the last plan a follower received
        qkv = model.layers[0].attn.qkv
        # one block more than the block manager hands out: CUDA-graph padding rows write there
        shape = (num_blocks + 1, block_size, qkv.num_kv_heads, qkv.head_dim)
        self.pad_block = num_blocks
        dtype = model.embed.weight.dtype
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in model.layers]
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None

    @torch.inference_mode()
    def tune_kernels(self) -> None:
        """Let the matmul tuner (kernels/gemv_tuner.py) time whatever it has no choice for yet, now at
        start-up rather than on a request: one eager decode-shaped step of 1, 2, 4, ... TUNED_MAX_ROWS
        sequences (every row count it tunes; a prefill of n tokens multiplies the same n rows), each
        a token in the padding block, as CUDA-graph padding rows are. The tuner times only inside
        this window. Every TP rank runs the same steps (their all-reduces pair up)."""
        pad_slot = self.pad_block * self.block_size
        with tuning_window():
            for rows in (1 << i for i in range(TUNED_MAX_ROWS.bit_length())):
                meta = AttentionMetadata(
                    torch.full((rows,), pad_slot, dtype=torch.int64, device=self.device),
                    torch.full((rows, 1), self.pad_block, dtype=torch.int32, device=self.device),
                    torch.ones(rows, dtype=torch.int32, device=self.device),
                    torch.arange(rows + 1, dtype=torch.int32, device=self.device), 1)
                ids = torch.zeros(rows, dtype=torch.int64, device=self.device)
                self._eager(ids, ids, meta, False)

    def capture_cudagraphs(self, max_batch: int, max_seq_len: int, prefill_tokens: int = 0) -> dict:
        """Capture the decode step for every batch bucket up to `max_batch`, and, where prefill runs the
        Triton kernels (CUDA only), the fresh-prefill graphs of steps up to `prefill_tokens` tokens (the
        others on first use). Returns what it took: graphs, seconds, and the memory the caching
        allocator reserved meanwhile (the graphs' pools; MiB)."""
        torch.cuda.empty_cache()            # the tuner's weight copies: freed, or the baseline counts them
        reserved, start = torch.cuda.memory_reserved(self.device), time.perf_counter()
        max_blocks = -(-max_seq_len // self.block_size)
        eager = lambda ids, pos, meta: self._eager(ids, pos, meta, False)     # noqa: E731
        heads = self.model.layers[0].attn.qkv.num_heads           # this rank's
        graphs = DecodeGraphs(eager, self.model.spec.vocab_size, max_batch, max_blocks,
                              self.pad_block * self.block_size, self.pad_block, self.device,
                              # graphs of their own for contexts within each bound attention reads by
                              narrow_blocks=tuple(c // self.block_size for c in NARROW_CONTEXTS),
                              short_max_batch=max((b for b in buckets(max_batch)
                                                   if decode_splits(heads * b, self.device) > 1), default=0))
        graphs.capture()
        self.graphs = graphs
        took = {"decode_graphs": len(graphs.graphs), "decode_capture_s": time.perf_counter() - start,
                "decode_graph_mb": (torch.cuda.memory_reserved(self.device) - reserved) / 2**20}
        if use_triton(self.model.embed.weight):
            reserved, start = torch.cuda.memory_reserved(self.device), time.perf_counter()
            self.prefill_graphs = PrefillGraphs(eager, max_batch, self.pad_block * self.block_size, self.device)
            took["prefill_graphs"] = len(self.prefill_graphs.warm_up(prefill_tokens))
            took["prefill_capture_s"] = time.perf_counter() - start
            took["prefill_graph_mb"] = (torch.cuda.memory_reserved(self.device) - reserved) / 2**20
        return took

    def _step_tensors(self, seqs: list[Sequence], input_ids, positions, slots, context_lens, cu_seqlens):
        """(input_ids or None, positions, slot_mapping, block_tables, context_lens, cu_seqlens) on the
        device in one copy (lists or host arrays in; the first three int64, the rest int32)."""
        tables = block_tables(seqs, np.int32)
        longs = [np.asarray(part, np.int64) for part in ([] if input_ids is None else [input_ids]) + [positions, slots]]
        ints = [np.asarray(part, np.int32) for part in (tables, context_lens, cu_seqlens)]
        *longs, tables, context_lens, cu_seqlens = upload(longs + ints, self.device)
        return (None if input_ids is None else longs[0], *longs[-2:], tables, context_lens, cu_seqlens)

    def prepare_prefill(self, seqs: list[Sequence]):
        """Every uncached token of each sequence; returns (input_ids, positions, meta)."""
        return self._prefill_tensors(seqs, *self._prefill_arrays(seqs))

    def _prefill_arrays(self, seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, positions, slots, cu_seqlens) of every uncached token, int64 host arrays built
        without a Python loop over tokens."""
        starts = np.fromiter((s.num_cached_tokens for s in seqs), np.int64, len(seqs))
        lens = np.fromiter((len(s) for s in seqs), np.int64, len(seqs)) - starts
        cu_seqlens = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum(lens, out=cu_seqlens[1:])
        total = int(cu_seqlens[-1])
        input_ids = np.fromiter(itertools.chain.from_iterable(s.token_ids[s.num_cached_tokens:] for s in seqs),
                                np.int64, total)
        index = np.arange(total) - np.repeat(cu_seqlens[:-1] - starts, lens)     # each token's index in its sequence
        which = np.repeat(np.arange(len(seqs)), lens)
        bs = self.block_size
        slots = block_tables(seqs, np.int64)[which, index // bs] * bs + index % bs
        offsets = np.fromiter((s.position_offset for s in seqs), np.int64, len(seqs))
        return input_ids, index + offsets[which], slots, cu_seqlens

    def _prefill_tensors(self, seqs: list[Sequence], input_ids, positions, slots, cu_seqlens):
        ids, pos, slot_mapping, tables, context_lens, cu = self._step_tensors(
            seqs, input_ids, positions, slots, [len(s) for s in seqs], cu_seqlens)
        meta = AttentionMetadata(slot_mapping, tables, context_lens, cu, max_query_len=int(np.diff(cu_seqlens).max()),
                                 fresh_prefill=all(s.num_cached_tokens == 0 for s in seqs))
        return ids, pos, meta

    def prepare_decode(self, seqs: list[Sequence], ahead: int = 0):
        """The newest token of each sequence; returns (input_ids, positions, meta). With `ahead=1`, the
        token after it (launched before it is known: the caller supplies input_ids)."""
        last, bs = [len(s) - 1 + ahead for s in seqs], self.block_size
        input_ids = None if ahead else [s.token_ids[-1] for s in seqs]
        positions = [p + s.position_offset for s, p in zip(seqs, last)]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, last)]
        ids, pos, slot_mapping, tables, context_lens, cu = self._step_tensors(
            seqs, input_ids, positions, slots, [p + 1 for p in last], list(range(len(seqs) + 1)))
        return ids, pos, AttentionMetadata(slot_mapping, tables, context_lens, cu, max_query_len=1)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, all_logits: bool = False) -> torch.Tensor:
        """Logits of each sequence's last token [seqs, vocab], or of every new token when `all_logits`."""
        if not is_prefill:
            return self._launch(seqs, 0, *self.prepare_decode(seqs), all_logits)
        arrays = self._prefill_arrays(seqs)
        if self.prefill_graphs is not None and self.tp.size == 1 and not all_logits \
                and all(s.num_cached_tokens == 0 for s in seqs):
            logits = self.prefill_graphs.run_arrays(*arrays)        # inputs padded on the host, one copy
            if logits is not None:
                for seq in seqs:
                    seq.num_cached_tokens = len(seq)
                return logits
        return self._launch(seqs, 0, *self._prefill_tensors(seqs, *arrays), all_logits)

    @torch.inference_mode()
    def run_ahead(self, seqs: list[Sequence], input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [seqs, vocab] of the decode step after the one in flight, whose tokens `input_ids`
        (on the device) are not on the host yet; their blocks must be appended already."""
        _, positions, meta = self.prepare_decode(seqs, ahead=1)
        return self._launch(seqs, 1, input_ids, positions, meta, False)

    def _launch(self, seqs: list[Sequence], ahead: int, input_ids, positions, meta: AttentionMetadata,
                all_logits: bool) -> torch.Tensor:
        """Send the plan to the TP followers, count the step's tokens as cached, run it."""
        if self.tp.size > 1:
            self._send_plan(input_ids, positions, meta, all_logits)
        for seq in seqs:
            seq.num_cached_tokens = len(seq) + ahead
        return self._forward(input_ids, positions, meta, all_logits)

    def _forward(self, input_ids, positions, meta: AttentionMetadata, all_logits: bool) -> torch.Tensor:
        if self.graphs is not None and meta.is_decode and self.graphs.fits(*meta.block_tables.shape):
            return self.graphs.run(input_ids, positions, meta)
        if self.prefill_graphs is not None and meta.fresh_prefill and not meta.is_decode and not all_logits:
            logits = self.prefill_graphs.run(input_ids, positions, meta)
            if logits is not None:
                return logits
        return self._eager(input_ids, positions, meta, all_logits)

    def _eager(self, input_ids, positions, meta: AttentionMetadata, all_logits: bool) -> torch.Tensor:
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        if not all_logits and not meta.is_decode:           # one token a sequence: its rows are the last ones
            hidden = hidden[meta.cu_seqlens_q[1:].long() - 1]
        return self.model.compute_logits(hidden)

    # -- lockstep across the TP group --------------------------------------------------------

    def _send_header(self, command: int, *sizes: int) -> None:
        """The plan's header host to host (a follower reads it without waiting for its GPU); the
        payload follows on the device group, queued behind the follower's earlier steps."""
        header = [command, *sizes] + [0] * (5 - len(sizes))
        self.tp.broadcast_host(torch.tensor(header, dtype=torch.int64))

    def _send_plan(self, input_ids, positions, meta: AttentionMetadata, all_logits: bool) -> None:
        num_seqs, max_blocks = meta.block_tables.shape
        flags = int(all_logits) | int(meta.fresh_prefill) << 1
        self._send_header(STEP, len(input_ids), num_seqs, max_blocks, meta.max_query_len, flags)
        parts = [input_ids, positions, meta.slot_mapping, meta.block_tables.flatten(), meta.context_lens,
                 meta.cu_seqlens_q]
        self.tp.broadcast(torch.cat([p.long() for p in parts]))

    def signal(self, command: int) -> None:
        """Rank 0: tell the followers a driver call ended (DONE), the loop is over (STOP), or that it
        is still there (KEEPALIVE)."""
        if self.tp.size > 1:
            self._send_header(command)

    @torch.inference_mode()
    def follow(self) -> tuple[int, torch.Tensor | None]:
        """Ranks > 0: receive one plan and run it. Returns (command, all-token logits when the
        plan asked for them, else None)."""
        while True:
            header = self.tp.broadcast_host(torch.zeros(6, dtype=torch.int64)).tolist()
            command, num_tokens, num_seqs, max_blocks, max_query_len, flags = header
            if command != KEEPALIVE:
                break
        self.last_command = command
        if command != STEP:
            return command, None
        sizes = [num_tokens, num_tokens, num_tokens, num_seqs * max_blocks, num_seqs, num_seqs + 1]
        payload = self.tp.broadcast(torch.empty(sum(sizes), dtype=torch.int64, device=self.device))
        input_ids, positions, slots, tables, context_lens, cu_seqlens = payload.split(sizes)
        all_logits = bool(flags & 1)
        meta = AttentionMetadata(slot_mapping=slots, block_tables=tables.view(num_seqs, max_blocks).int(),
                                 context_lens=context_lens.int(), cu_seqlens_q=cu_seqlens.int(),
                                 max_query_len=max_query_len, fresh_prefill=bool(flags & 2))
        logits = self._forward(input_ids, positions, meta, all_logits)
        return command, logits if all_logits else None
