"""Paged attention in torch: the reference for any mix of prefill and decode, and `store_kv`, the
cache write. It is the path wherever the Triton kernels do not run (CPU, or RAYSPEED_DISABLE_TRITON=1:
`kernels.dispatch.use_triton`), so what CI and the demo (serve_apps/demo_model.py) run without a GPU,
and what the kernels of kernels/attention.py and kernels/prefill_attention.py are tested against.
A decode step (one query a sequence) attends for all sequences at once, in row groups of at most
DECODE_TORCH_BYTES of keys; otherwise one sequence at a time. Cache layout and masking as in
kernels/attention.py; scores and softmax fp32."""
import torch


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new keys/values [tokens, kv_heads, head_dim] into their cache slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` cached rows: [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].flatten(0, 1)[:length]


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          scale: float, window: int | None = None,
                          alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for any mix of prefill and decode. q: [tokens, heads, head_dim] -> same shape. A decode
    step (one query a sequence) attends for all sequences at once; otherwise one sequence at a time."""
    if q.shape[0] == len(context_lens) and bool((cu_seqlens_q.diff() == 1).all()):
        return _decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale, window, alibi_slopes)
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    for s in range(len(context_lens)):
        start, end, ctx = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1]), int(context_lens[s])
        k = _gather(k_cache, block_tables[s], ctx).float()
        v = _gather(v_cache, block_tables[s], ctx).float()
        if num_kv_heads != num_heads:                       # grouped-query attention
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        rel = k_pos[None, :] - q_pos[:, None]               # [q, k], <= 0 where visible
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None, None] * rel
        visible = rel <= 0
        if window is not None:
            visible &= rel > -window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


DECODE_TORCH_BYTES = 64 << 20      # fp32 keys a batched torch decode gathers at a time (then the next rows)


def _decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale, window, alibi_slopes):
    """One query a sequence, at position context_len - 1: the sequences' cached keys gathered into one
    [seqs, longest context] batch (shorter ones masked), in row groups of at most DECODE_TORCH_BYTES."""
    seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    lens = context_lens.long()
    longest = int(lens.max()) if seqs else 0
    rows = max(1, DECODE_TORCH_BYTES // max(1, longest * num_kv_heads * head_dim * 4))
    out = torch.empty_like(q)
    for r in range(0, seqs, rows):
        sl = slice(r, r + rows)
        blocks = block_tables[sl, :-(-longest // block_size)].long()          # [b, blocks]
        k = k_cache[blocks].flatten(1, 2)[:, :longest].float()                 # [b, longest, kv_heads, d]
        v = v_cache[blocks].flatten(1, 2)[:, :longest].float()
        qg = q[sl].float().view(-1, num_kv_heads, group, head_dim)
        scores = torch.einsum("bkgd,bnkd->bkgn", qg, k) * scale               # [b, kv_heads, group, longest]
        rel = torch.arange(longest, device=q.device)[None, :] - (lens[sl] - 1)[:, None]   # [b, longest], <= 0 seen
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float().view(1, num_kv_heads, group, 1) * rel[:, None, None, :]
        visible = rel <= 0
        if window is not None:
            visible &= rel > -window
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        out[sl] = torch.einsum("bkgn,bnkd->bkgd", scores.softmax(-1), v).reshape(-1, num_heads, head_dim).to(q.dtype)
    return out
