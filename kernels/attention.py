"""Attention over a paged KV cache: a Triton decode kernel and `attention`, which picks it, the prefill
kernel (kernels/prefill_attention.py) or the torch reference (kernels/attention_torch.py) for a step.

Cache layout, per layer: k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
A sequence's token at position p lives in block `block_tables[s, p // block_size]`, row
`p % block_size`; `slot_mapping` gives each new token's flat slot (block * block_size + row).

Masking, shared by every path: a query at position qp sees key positions kp with kp <= qp and,
when `window` is set, qp - kp < window (GPT-Neo local layers, Mistral sliding window).
ALiBi adds slope[h] * (kp - qp) to the scores. Scores and softmax are fp32.
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.attention_torch import paged_attention_torch, store_kv
from kernels.decode_plan import L2_AHEAD_CHUNKS, SPLIT_MIN_CHUNKS, decode_plan
from kernels.dispatch import use_triton
from kernels.pdl import await_previous, hopper_or_later, prefetch_rows_l2
from kernels.pdl import enabled as programmatic_launch
from kernels.prefill_attention import prefill_attention_triton


@dataclass
class AttentionMetadata:
    """What one forward step needs to find each token's keys; built by the model runner."""
    slot_mapping: torch.Tensor      # [tokens] int64: flat cache slot of each new token
    block_tables: torch.Tensor      # [seqs, max_blocks] int32
    context_lens: torch.Tensor      # [seqs] int32: tokens in cache after this step
    cu_seqlens_q: torch.Tensor      # [seqs + 1] int32: new-token offsets per sequence
    max_query_len: int              # 1 for a pure decode step
    fresh_prefill: bool = False     # every sequence's context is exactly its new tokens (no cached prefix)

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


@triton.jit
def _cached_chunk(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, table_stride, cache_block_stride,
                  cache_row_stride, head_offs, d_mask, c, first, cached, BLOCK_SIZE: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Cached keys and values [CHUNK, BLOCK_D] at positions c * CHUNK + [0, CHUNK) (zeros where not visible)."""
    k_pos = c * CHUNK + tl.arange(0, CHUNK)[:, None]                        # [CHUNK, 1]
    visible = (k_pos < cached) & (k_pos >= first)
    block = tl.load(block_tables_ptr + seq * table_stride + k_pos // BLOCK_SIZE, mask=visible, other=0)
    offs = block.to(tl.int64) * cache_block_stride + (k_pos % BLOCK_SIZE) * cache_row_stride + head_offs[None, :]
    kv_mask = visible & d_mask[None, :]
    return tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0), tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, alibi_ptr, out_ptr,
                         k_new_ptr, v_new_ptr, slots_ptr, ws_ptr, counters_ptr,
                         q_seq_stride, q_head_stride, k_new_stride, v_new_stride, cache_block_stride, cache_row_stride,
                         table_stride, num_heads, group, head_dim, scale, window,
                         USE_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, NEW_KV: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                         PREFETCH: tl.constexpr, PDL: tl.constexpr, SPLITS: tl.constexpr = 1,
                         SPLIT_MIN_CHUNKS: tl.constexpr = 4, EARLY: tl.constexpr = False, L2_AHEAD: tl.constexpr = 0,
                         row_bytes=0, WHOLE: tl.constexpr = False):
    """One (head, sequence, split): online softmax over the cached keys in chunks of CHUNK positions
    (several cache blocks per step). With EARLY (the default, kernels/decode_plan.py) the first chunk is
    read before waiting for the previous kernel (PDL: earlier steps wrote it, and the block table and
    context lengths are the step's inputs), and each next one after the current one is used: one
    chunk in registers. PREFETCH reads the first early too and then each next chunk while the current
    one is computed (two in registers, so fewer programs fit an SM); without either, every chunk is
    read in the loop. With L2_AHEAD (Hopper; EARLY), the first query head of each KV head also asks
    the L2 for the keys and values of the L2_AHEAD positions after its first chunk before the wait,
    `row_bytes` a row (one bulk prefetch each), so the loop's later chunks come from L2, not HBM.
    With NEW_KV this step's key and value come from k_new/v_new (registers), and the program of each
    KV head's first query head writes them to their cache slot: no separate store kernel, and no
    program reads that slot.

    WHOLE (with EARLY, one split): the host knows every context fits one chunk, so the keys and values
    read before the wait are all there is, and the softmax runs once over them, with no per-lane states.

    SPLITS > 1 (flash-decoding, for grids too small to fill the GPU): a context of more than
    SPLIT_MIN_CHUNKS chunks is shared out among up to SPLITS programs per (head, sequence), two
    chunks or more each; each writes its softmax state (max, sum, unscaled output) to `ws`, and the
    last of them to finish (a ticket from `counters`, which it resets to zero) merges the states in
    split order and writes the output: no second kernel, and the result does not depend on which
    program finished last. A shorter context stays with the first program (bench/attention_sweep.py
    --decode on an H100: at 160 positions one program took 4.7 us, eight splits 5.5; at 1,024
    positions 21.3 against 9.6, at 8,192 156 against 41)."""
    head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    kv_head = head // group
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    q_pos = ctx - 1
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    first = 0
    if USE_WINDOW:
        first = tl.maximum(q_pos - window + 1, 0)
    head_offs = kv_head * head_dim + d                                      # [BLOCK_D]
    cached = ctx - 1 if NEW_KV else ctx     # without NEW_KV the step's token is in the cache (store_kv before)
    c_first, c_end = first // CHUNK, tl.cdiv(cached, CHUNK)
    active = 1
    if SPLITS > 1:    # a context of more than SPLIT_MIN_CHUNKS chunks is shared out, 2 or more a program
        chunks = c_end - c_first
        active = tl.where(chunks > SPLIT_MIN_CHUNKS, tl.minimum(tl.cdiv(chunks, 2), SPLITS), 1)
        per_split = tl.cdiv(chunks, active)
        c_first += split * per_split                                        # past c_end: nothing to do
        c_end = tl.minimum(c_first + per_split, c_end)
    if split < active:                      # the programs of empty splits exit at once
        end = tl.minimum(cached, c_end * CHUNK)                             # positions past it are not ours
        if PREFETCH or EARLY:
            k, v = _cached_chunk(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, table_stride, cache_block_stride,
                                 cache_row_stride, head_offs, d_mask, c_first, first, end, BLOCK_SIZE, CHUNK)
        if L2_AHEAD:
            if head % group == 0:
                ahead = (c_first + 1) * CHUNK + tl.arange(0, L2_AHEAD)
                later = ahead < end                          # positions past it: the head's row in block 0
                block = tl.load(block_tables_ptr + seq * table_stride + ahead // BLOCK_SIZE, mask=later, other=0)
                rows = block.to(tl.int64) * cache_block_stride + (ahead % BLOCK_SIZE) * cache_row_stride
                rows = tl.where(later, rows, 0) + kv_head * head_dim
                prefetch_rows_l2(k_cache_ptr + rows, row_bytes)
                prefetch_rows_l2(v_cache_ptr + rows, row_bytes)
        await_previous(PDL)
        q = tl.load(q_ptr + seq * q_seq_stride + head * q_head_stride + d, mask=d_mask, other=0.0).to(tl.float32)
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + head).to(tl.float32)
        m = tl.full((), float("-inf"), tl.float32)
        l = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        if NEW_KV:
            if split == 0:                        # start the softmax from this step's token (always visible)
                k_new = tl.load(k_new_ptr + seq * k_new_stride + head_offs, mask=d_mask, other=0.0)
                v_new = tl.load(v_new_ptr + seq * v_new_stride + head_offs, mask=d_mask, other=0.0)
                m = tl.sum(q * k_new.to(tl.float32), axis=0) * scale
                l = tl.full((), 1.0, tl.float32)
                acc = v_new.to(tl.float32)
                if head % group == 0:
                    slot = tl.load(slots_ptr + seq)
                    row_offs = (slot // BLOCK_SIZE) * cache_block_stride + (slot % BLOCK_SIZE) * cache_row_stride \
                        + head_offs
                    tl.store(k_cache_ptr + row_offs, k_new, mask=d_mask)
                    tl.store(v_cache_ptr + row_offs, v_new, mask=d_mask)
        if WHOLE:                                 # the one chunk, read before the wait: one softmax over it
            whole_pos = c_first * CHUNK + tl.arange(0, CHUNK)
            scores = tl.sum(q[None, :] * k.to(tl.float32), axis=1) * scale                 # [CHUNK]
            if HAS_ALIBI:
                scores += slope * (whole_pos - q_pos).to(tl.float32)
            scores = tl.where((whole_pos < end) & (whole_pos >= first), scores, float("-inf"))
            m_all = tl.maximum(tl.max(scores), m)
            base = tl.where(m_all == float("-inf"), 0.0, m_all)
            p = tl.exp(scores - base)
            own_weight = tl.exp(m - base)
            l = l * own_weight + tl.sum(p)
            acc = acc * own_weight + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        else:
            # Each of the CHUNK position lanes (positions j, j + CHUNK, ...) keeps its own running max, sum and
            # output, merged once after the loop: the loop then reduces only over head_dim (within a warp),
            # never across positions (across warps, through shared memory and barriers).
            positions = tl.arange(0, CHUNK)[:, None]                                # [CHUNK, 1]
            m_lane = tl.full((CHUNK, 1), float("-inf"), tl.float32)
            l_lane = tl.zeros((CHUNK, 1), tl.float32)
            acc_lane = tl.zeros((CHUNK, BLOCK_D), tl.float32)
            for c in range(c_first, c_end):
                if PREFETCH:
                    k_next, v_next = _cached_chunk(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, table_stride,
                                                   cache_block_stride, cache_row_stride, head_offs, d_mask, c + 1,
                                                   first, end, BLOCK_SIZE, CHUNK)      # all masked past the end
                elif not EARLY:
                    k, v = _cached_chunk(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, table_stride,
                                         cache_block_stride, cache_row_stride, head_offs, d_mask, c, first, end,
                                         BLOCK_SIZE, CHUNK)
                k_pos = c * CHUNK + positions
                scores = tl.sum(q[None, :] * k.to(tl.float32), axis=1, keep_dims=True) * scale     # [CHUNK, 1]
                if HAS_ALIBI:
                    scores += slope * (k_pos - q_pos).to(tl.float32)
                scores = tl.where((k_pos < end) & (k_pos >= first), scores, float("-inf"))
                m_new = tl.maximum(m_lane, scores)
                base = tl.where(m_new == float("-inf"), 0.0, m_new)                 # a lane that has seen nothing yet
                alpha = tl.exp(m_lane - base)
                p = tl.exp(scores - base)
                acc_lane = acc_lane * alpha + p * v.to(tl.float32)
                l_lane = l_lane * alpha + p
                m_lane = m_new
                if PREFETCH:
                    k, v = k_next, v_next
                elif EARLY:                                                     # all masked past the end
                    k, v = _cached_chunk(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, table_stride,
                                         cache_block_stride, cache_row_stride, head_offs, d_mask, c + 1, first, end,
                                         BLOCK_SIZE, CHUNK)
            m_all = tl.maximum(tl.max(m_lane), m)                               # the lanes and the new token
            base = tl.where(m_all == float("-inf"), 0.0, m_all)
            lane_weight = tl.exp(m_lane - base)
            own_weight = tl.exp(m - base)
            l = l * own_weight + tl.sum(l_lane * lane_weight)
            acc = acc * own_weight + tl.sum(acc_lane * lane_weight, axis=0)
        out_offs = (seq * num_heads + head) * head_dim + d
        if active == 1:
            out = acc / tl.where(l > 0, l, 1.0)
            tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=d_mask)
        else:
            pair = seq * num_heads + head
            states = ws_ptr + tl.num_programs(1) * num_heads * SPLITS * BLOCK_D  # [pairs, SPLITS, 2] after outputs
            tl.store(ws_ptr + (pair * SPLITS + split) * BLOCK_D + d, acc)
            tl.store(states + (pair * SPLITS + split) * 2 + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, m_all, l))
            tl.debug_barrier()                  # every thread's stores before the ticket (released with it)
            ticket = tl.atomic_add(counters_ptr + pair, 1, sem="acq_rel", scope="gpu")
            if ticket == active - 1:            # the others' states are visible: merge them (from L2, not L1)
                tl.store(counters_ptr + pair, 0)
                s = tl.arange(0, SPLITS)
                parts = pair * SPLITS + s
                ms = tl.load(states + parts * 2, mask=s < active, other=float("-inf"), cache_modifier=".cg")
                ls = tl.load(states + parts * 2 + 1, mask=s < active, other=0.0, cache_modifier=".cg")
                accs = tl.load(ws_ptr + parts[:, None] * BLOCK_D + d[None, :], mask=(s < active)[:, None], other=0.0,
                               cache_modifier=".cg")
                m_top = tl.max(ms)
                weights = tl.exp(ms - tl.where(m_top == float("-inf"), 0.0, m_top))
                total = tl.sum(ls * weights)
                out = tl.sum(accs * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
                tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes) -> None:
    assert q.dim() == 3, f"q must be [num_seqs, num_heads, head_dim], got {tuple(q.shape)}"
    assert k_cache.dim() == 4, f"k_cache must be [blocks, block_size, kv_heads, head_dim], got {tuple(k_cache.shape)}"
    assert k_cache.shape == v_cache.shape, f"k/v cache shapes differ: {k_cache.shape} vs {v_cache.shape}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "k_cache and v_cache must be contiguous"
    assert q.stride(-1) == 1, "q must be contiguous in head_dim"
    assert q.dtype == k_cache.dtype == v_cache.dtype, f"dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    assert cache_head_dim == head_dim, f"cache head_dim {cache_head_dim} != q head_dim {head_dim}"
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} not a multiple of kv heads {num_kv_heads}"
    assert block_size & (block_size - 1) == 0, f"block_size must be a power of two, got {block_size}"
    assert head_dim <= 256, f"head_dim up to 256 supported, got {head_dim}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, "block_tables must be [num_seqs, max_blocks]"
    assert context_lens.shape == (num_seqs,), f"context_lens must be [{num_seqs}] (one query per sequence)"
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        assert t.dtype in (torch.int32, torch.int64), f"{name} must be int32 or int64, got {t.dtype}"
        assert t.stride(-1) == 1 and t.device == q.device, f"{name} must be contiguous (rows) and on q's device"
    if alibi_slopes is not None:
        assert alibi_slopes.shape == (num_heads,), f"alibi_slopes must be [{num_heads}]"
        assert alibi_slopes.is_contiguous() and alibi_slopes.device == q.device, "alibi_slopes: contiguous, q's device"


def _bulk_prefetch(device: torch.device) -> bool:
    """Whether kernels on `device` may ask the L2 for bytes (`cp.async.bulk.prefetch.L2`: Hopper on)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and hopper_or_later(device.index or 0)


# The split tickets, per device; each merge resets its own. Two split decode kernels must not run at
# once on a device (they would share tickets): the engine issues them one after another on one stream.
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(pairs: int, device: torch.device) -> torch.Tensor | None:
    """Zeroed tickets for `pairs` (head, sequence) merges, allocated once per device outside any CUDA
    graph capture (the decode graphs' eager warm-up runs first); None where that is not possible."""
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[device] = torch.zeros(4096, dtype=torch.int32, device=device)
    return counters if pairs <= counters.numel() else None


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                                  k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                                  slot_mapping: torch.Tensor | None = None,
                                  max_context: int | None = None, l2_ahead: bool = False) -> torch.Tensor:
    """Decode attention, one query per sequence at position context_len - 1; one program per (head,
    sequence), or several splitting its context where the grid is small (`decode_splits`) and
    `max_context` (a bound on context_lens known on the host; None: unknown) does not rule it out.

    q: [num_seqs, num_heads, head_dim] -> same shape, q's dtype. Same result as `paged_attention_torch`
    with cu_seqlens_q = arange(num_seqs + 1). Given this step's `k_new`, `v_new` [num_seqs, kv_heads,
    head_dim] and their `slot_mapping`, the kernel also writes them to the cache (`store_kv` included).
    """
    _check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes)
    assert window is None or window >= 1, f"window must be >= 1, got {window}"
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    new_kv = k_new is not None
    if new_kv:
        assert v_new is not None and slot_mapping is not None, "k_new needs v_new and slot_mapping"
        assert k_new.shape == v_new.shape == (num_seqs, num_kv_heads, head_dim), \
            f"k_new/v_new must be [{num_seqs}, {num_kv_heads}, {head_dim}], got {tuple(k_new.shape)}"
        assert k_new.stride()[1:] == v_new.stride()[1:] == (head_dim, 1), "k_new, v_new: contiguous per token"
        assert slot_mapping.shape == (num_seqs,), f"slot_mapping must be [{num_seqs}]"
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    pairs = num_heads * num_seqs
    plan = decode_plan(pairs, q.device, l2_ahead, max_context, head_dim, block_size)
    counters = _split_counters(pairs, q.device) if plan.splits > 1 else None
    if plan.splits > 1 and counters is None:
        plan = decode_plan(pairs, q.device, l2_ahead, max_context, head_dim, block_size, can_split=False)
    splits, chunk, mode, warps, whole = plan
    ws = q if splits == 1 else torch.empty(pairs * splits * (block_d + 2), dtype=torch.float32,
                                           device=q.device)       # the splits' softmax states
    pdl = programmatic_launch(q)
    row_bytes = head_dim * q.element_size()
    asked = mode == "early-l2" and not whole and _bulk_prefetch(q.device) and row_bytes % 16 == 0
    positions_ahead = L2_AHEAD_CHUNKS * chunk if asked else 0
    _paged_decode_kernel[(num_heads, num_seqs, splits)](
        q, k_cache, v_cache, block_tables, context_lens, q if alibi_slopes is None else alibi_slopes, out,
        k_new if new_kv else q, v_new if new_kv else q, slot_mapping if new_kv else context_lens,
        ws, context_lens if counters is None else counters,
        q.stride(0), q.stride(1), k_new.stride(0) if new_kv else 0, v_new.stride(0) if new_kv else 0,
        k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0), num_heads, num_heads // num_kv_heads, head_dim, scale, window or 0,
        USE_WINDOW=window is not None, HAS_ALIBI=alibi_slopes is not None, NEW_KV=new_kv,
        BLOCK_SIZE=block_size, CHUNK=chunk, BLOCK_D=block_d, PREFETCH=mode == "prefetch", PDL=pdl, SPLITS=splits,
        SPLIT_MIN_CHUNKS=SPLIT_MIN_CHUNKS, EARLY=mode in ("early", "early-l2"), L2_AHEAD=positions_ahead,
        row_bytes=row_bytes, WHOLE=whole, num_warps=warps, launch_pdl=pdl)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              meta: AttentionMetadata, scale: float, window: int | None = None,
              alibi_slopes: torch.Tensor | None = None, l2_ahead: bool = False) -> torch.Tensor:
    """Write this step's k, v [tokens, kv_heads, head_dim] to the cache and attend: on CUDA a decode
    step or a fresh prefill does both in one kernel; otherwise (CPU, or Triton disabled) `store_kv`
    then the torch reference. `l2_ahead`: see `kernels.decode_plan.decode_chunk`."""
    if use_triton(q) and meta.is_decode:
        return paged_decode_attention_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                             window, alibi_slopes, k, v, meta.slot_mapping,
                                             max_context=meta.block_tables.shape[1] * k_cache.shape[1],
                                             l2_ahead=l2_ahead)
    if use_triton(q) and meta.fresh_prefill:
        return prefill_attention_triton(q, k, v, meta.cu_seqlens_q, meta.max_query_len, scale, window, alibi_slopes,
                                        k_cache, v_cache, meta.slot_mapping)
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return paged_attention_torch(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q,
                                 scale, window, alibi_slopes)
