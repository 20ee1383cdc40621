"""Runs the injected model for a scheduled batch: owns the KV cache, turns sequences into flat
token tensors plus `AttentionMetadata`, and returns logits.

Under tensor parallelism only the TP group's rank 0 schedules. Each step it broadcasts the plan
(`_Plan`: a 6-number header, then one int64 payload) with torch.distributed, and the other ranks
`follow()` in lockstep; no Ray call per step.
"""
import array
import itertools

import torch

from actors.cuda_graphs import DecodeGraphs, PrefillGraphs, buckets
from actors.sequence import Sequence
from kernels.attention import AttentionMetadata, decode_splits
from kernels.dispatch import use_triton
from kernels.gemv_tuner import TUNED_MAX_ROWS, tuning_window
from kernels.model import CausalLM

ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f"}   # `array` type codes


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device`, without waiting for the GPU: staged through pinned memory (a plain copy
    from pageable memory would synchronise the stream, and a step launched ahead would wait). Built
    from the list through `array` (three times faster than torch.tensor on a 512-token prompt)."""
    t = torch.frombuffer(array.array(ARRAY_CODES[dtype], values), dtype=dtype) if values else \
        torch.empty(0, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


STEP, DONE, STOP = 0, 1, 2        # plan commands: run a step / end of a driver call / leave the loop
SHORT_DECODE_CONTEXT = 256        # decode graphs of their own for steps whose contexts all fit (cuda_graphs.py)


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

    def capture_cudagraphs(self, max_batch: int, max_seq_len: int) -> None:
        """Capture the decode step for every batch bucket up to `max_batch`, and set up fresh-prefill
        graphs (captured on first use) where prefill runs the Triton kernels (CUDA only)."""
        max_blocks = -(-max_seq_len // self.block_size)
        eager = lambda ids, pos, meta: self._eager(ids, pos, meta, False)     # noqa: E731
        heads = self.model.layers[0].attn.qkv.num_heads           # this rank's
        graphs = DecodeGraphs(eager, self.model.spec.vocab_size, max_batch, max_blocks,
                              self.pad_block * self.block_size, self.pad_block, self.device,
                              short_blocks=SHORT_DECODE_CONTEXT // self.block_size,
                              short_max_batch=max((b for b in buckets(max_batch)
                                                   if decode_splits(heads * b, self.device) > 1), default=0))
        graphs.capture()
        self.graphs = graphs
        if use_triton(self.model.embed.weight):
            self.prefill_graphs = PrefillGraphs(eager, max_batch, self.pad_block * self.block_size, self.device)
            self.prefill_graphs.warm_up()

    def _tensor(self, values: list, dtype=torch.int32) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    def _tensors(self, dtype: torch.dtype, *parts: list) -> list[torch.Tensor]:
        """Several lists as tensors on the device through one staged copy (`_tensor`): views of one
        buffer, each starting 16 bytes aligned (as a separate tensor would, so the Triton kernels they
        reach see the alignment they were specialised for)."""
        align = 16 // dtype.itemsize
        flat, sizes = [], []
        for part in parts:
            flat += part
            flat += [0] * (-len(part) % align)
            sizes.append(len(part))
        buffer = self._tensor(flat, dtype)
        starts = itertools.accumulate((n + -n % align for n in sizes), initial=0)
        return [buffer[start:start + n] for start, n in zip(starts, sizes)]

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """The flat cache slots of `seq`'s positions [start, end): runs of its blocks' slots."""
        bs = self.block_size
        first = start // bs
        runs = (range(b * bs, b * bs + bs) for b in seq.block_table[first:-(-end // bs)])
        return list(itertools.islice(itertools.chain.from_iterable(runs), start - first * bs, end - first * bs))

    def _step_tensors(self, seqs: list[Sequence], input_ids: list | None, positions: list, slots: list,
                      context_lens: list, cu_seqlens: list):
        """(input_ids or None, positions, slot_mapping, block_tables, context_lens, cu_seqlens) on the
        device in two copies: the int64 lists in one, the int32 ones in the other."""
        width = max(len(s.block_table) for s in seqs)
        tables = []
        for s in seqs:
            tables += s.block_table
            tables += [0] * (width - len(s.block_table))
        longs = self._tensors(torch.int64, *([] if input_ids is None else [input_ids]), positions, slots)
        tables, context_lens, cu_seqlens = self._tensors(torch.int32, tables, context_lens, cu_seqlens)
        return (None if input_ids is None else longs[0], *longs[-2:], tables.view(len(seqs), width), context_lens,
                cu_seqlens)

    def prepare_prefill(self, seqs: list[Sequence]):
        """Every uncached token of each sequence; returns (input_ids, positions, meta)."""
        input_ids, positions, slots, cu_seqlens = [], [], [], [0]
        for seq in seqs:
            start, end = seq.num_cached_tokens, len(seq)
            input_ids += seq.token_ids[start:end]
            positions += range(start + seq.position_offset, end + seq.position_offset)
            slots += self._slots(seq, start, end)
            cu_seqlens.append(cu_seqlens[-1] + end - start)
        ids, pos, slot_mapping, tables, context_lens, cu = self._step_tensors(
            seqs, input_ids, positions, slots, [len(s) for s in seqs], cu_seqlens)
        meta = AttentionMetadata(slot_mapping, tables, context_lens, cu,
                                 max_query_len=max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])),
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
        input_ids, positions, meta = (self.prepare_prefill if is_prefill else self.prepare_decode)(seqs)
        return self._launch(seqs, 0, input_ids, positions, meta, all_logits)

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
        header = [command, *sizes] + [0] * (5 - len(sizes))
        self.tp.broadcast(self._tensor(header, torch.int64))

    def _send_plan(self, input_ids, positions, meta: AttentionMetadata, all_logits: bool) -> None:
        num_seqs, max_blocks = meta.block_tables.shape
        flags = int(all_logits) | int(meta.fresh_prefill) << 1
        self._send_header(STEP, len(input_ids), num_seqs, max_blocks, meta.max_query_len, flags)
        parts = [input_ids, positions, meta.slot_mapping, meta.block_tables.flatten(), meta.context_lens,
                 meta.cu_seqlens_q]
        self.tp.broadcast(torch.cat([p.long() for p in parts]))

    def signal(self, command: int) -> None:
        """Rank 0: tell the followers a driver call ended (DONE) or the loop is over (STOP)."""
        if self.tp.size > 1:
            self._send_header(command)

    @torch.inference_mode()
    def follow(self) -> tuple[int, torch.Tensor | None]:
        """Ranks > 0: receive one plan and run it. Returns (command, all-token logits when the
        plan asked for them, else None)."""
        header = self.tp.broadcast(self._tensor([0] * 6, torch.int64)).tolist()
        command, num_tokens, num_seqs, max_blocks, max_query_len, flags = header
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
