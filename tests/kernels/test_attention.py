"""Paged attention: the torch reference against dense attention, `store_kv`, the Triton decode
kernel against the reference, and the CPU dispatch rule."""
import pytest
import torch

from kernels import attention, attention_torch, decode_plan, prefill_attention
from kernels.attention import AttentionMetadata
from kernels.attention_torch import paged_attention_torch, store_kv
from kernels.dispatch import use_triton

BLOCK_SIZE, HEADS, KV_HEADS, HEAD_DIM = 16, 4, 2, 32
CONTEXT_LENS = [5, 37, 1, 70]                       # none a multiple of BLOCK_SIZE
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _block_tables(context_lens, block_size, g, spare_blocks=3):
    """Shuffled block tables [seqs, max_blocks] int32 and the number of cache blocks."""
    needed = [_cdiv(c, block_size) for c in context_lens]
    num_blocks = sum(needed) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).int()
    tables = torch.zeros(len(context_lens), max(needed), dtype=torch.int32)
    start = 0
    for s, n in enumerate(needed):
        tables[s, :n] = perm[start:start + n]
        start += n
    return tables, num_blocks


def _slots(tables, positions_per_seq, block_size):
    """Flat cache slot of each (sequence, position), concatenated in sequence order: [tokens] int64."""
    return torch.cat([tables[s, pos // block_size].long() * block_size + pos % block_size
                      for s, pos in enumerate(positions_per_seq)])


def _decode_case(dtype, context_lens=CONTEXT_LENS, block_size=BLOCK_SIZE, heads=HEADS, kv_heads=KV_HEADS,
                 head_dim=HEAD_DIM):
    g = torch.Generator().manual_seed(0)
    tables, num_blocks = _block_tables(context_lens, block_size, g)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=g).to(dtype)
    v_cache = torch.randn(cache_shape, generator=g).to(dtype)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g).to(dtype)  # [seqs, heads, head_dim]
    return q, k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32)


def _alibi(heads):
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)


def _dense_attention(q, k, v, q_pos, scale, window, slopes):
    """Plain causal attention with an explicit mask. q: [q, heads, d], k, v: [ctx, kv_heads, d]."""
    k_pos = torch.arange(k.shape[0])
    rel = (k_pos[None, :] - q_pos[:, None]).float()                              # [q, ctx]
    allowed = rel <= 0
    if window is not None:
        allowed &= rel > -window
    bias = torch.zeros(q.shape[1], *rel.shape) if slopes is None else slopes[:, None, None] * rel
    mask = bias.masked_fill(~allowed, float("-inf"))                            # [heads, q, ctx]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def test_store_kv_writes_each_token_to_its_slot():
    g = torch.Generator().manual_seed(0)
    tables, num_blocks = _block_tables(CONTEXT_LENS, BLOCK_SIZE, g)
    positions = [torch.arange(c) for c in CONTEXT_LENS]
    slots = _slots(tables, positions, BLOCK_SIZE)
    k = torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=g)
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    store_kv(k, v, k_cache, v_cache, slots)
    token = 0
    for s, pos in enumerate(positions):
        for p in pos.tolist():
            block, row = int(tables[s, p // BLOCK_SIZE]), p % BLOCK_SIZE
            assert torch.equal(k_cache[block, row], k[token]) and torch.equal(v_cache[block, row], v[token])
            token += 1
    written = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.bool)
    written[slots] = True
    assert not k_cache.view(-1, KV_HEADS, HEAD_DIM)[~written].any()


@pytest.mark.parametrize("window,with_alibi", [(None, False), (None, True), (7, False), (20, True)])
@pytest.mark.parametrize("row_bytes", [None, 1])
def test_torch_decode_batch_matches_dense_attention(window, with_alibi, row_bytes, monkeypatch):
    """A decode step (one query a sequence) attends for all sequences at once, the shorter ones masked
    inside the longest's width (and, with row_bytes=1, one sequence per gather)."""
    if row_bytes is not None:
        monkeypatch.setattr(attention_torch, "DECODE_TORCH_BYTES", row_bytes)
    g = torch.Generator().manual_seed(2)
    context_lens = [1, 37, 20, 16, 5]
    tables, num_blocks = _block_tables(context_lens, BLOCK_SIZE, g)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g)   # garbage past each context
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g)
    q = torch.randn(len(context_lens), HEADS, HEAD_DIM, generator=g)
    slopes, scale = (_alibi(HEADS) if with_alibi else None), HEAD_DIM ** -0.5
    out = paged_attention_torch(q, k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32),
                                torch.arange(len(context_lens) + 1, dtype=torch.int32), scale, window, slopes)
    for s, ctx in enumerate(context_lens):
        positions = torch.arange(ctx)
        slots = tables[s, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
        keys, values = k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots], v_cache.view(-1, KV_HEADS, HEAD_DIM)[slots]
        ref = _dense_attention(q[s:s + 1], keys, values, torch.tensor([ctx - 1]), scale, window, slopes)
        torch.testing.assert_close(out[s:s + 1], ref, rtol=1e-5, atol=1e-5)


def test_torch_reference_with_as_many_tokens_as_sequences_but_not_one_each():
    """3 tokens for 3 sequences, as 2 + 0 + 1: not a decode step (the batched decode path is not taken)."""
    g = torch.Generator().manual_seed(3)
    context_lens, query_lens = [6, 4, 9], [2, 0, 1]
    tables, num_blocks = _block_tables(context_lens, BLOCK_SIZE, g)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g)
    q = torch.randn(3, HEADS, HEAD_DIM, generator=g)
    cu = torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    out = paged_attention_torch(q, k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32), cu, 0.3)
    for seq, start, end in [(0, 0, 2), (2, 2, 3)]:                  # sequence 1 has no query
        ctx = context_lens[seq]
        positions = torch.arange(ctx)
        slots = tables[seq, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
        keys, values = k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots], v_cache.view(-1, KV_HEADS, HEAD_DIM)[slots]
        ref = _dense_attention(q[start:end], keys, values, torch.arange(ctx - (end - start), ctx), 0.3, None, None)
        torch.testing.assert_close(out[start:end], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,with_alibi", [(None, False), (None, True), (7, False), (20, True)])
def test_torch_reference_matches_dense_attention(window, with_alibi):
    g = torch.Generator().manual_seed(1)
    context_lens, query_lens = [5, 37, 20], [5, 37, 4]          # two full prefills, one chunk after a prefix
    tables, num_blocks = _block_tables(context_lens, BLOCK_SIZE, g)
    keys = [torch.randn(c, KV_HEADS, HEAD_DIM, generator=g) for c in context_lens]
    values = [torch.randn(c, KV_HEADS, HEAD_DIM, generator=g) for c in context_lens]
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g)   # garbage where unwritten
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g)
    store_kv(torch.cat(keys), torch.cat(values), k_cache, v_cache,
             _slots(tables, [torch.arange(c) for c in context_lens], BLOCK_SIZE))
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, generator=g)                   # [tokens, heads, head_dim]
    cu_seqlens_q = torch.tensor([0] + query_lens).cumsum(0).int()
    slopes = _alibi(HEADS) if with_alibi else None
    scale = HEAD_DIM ** -0.5
    out = paged_attention_torch(q, k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32),
                                cu_seqlens_q, scale, window, slopes)
    for s, (ctx, qlen) in enumerate(zip(context_lens, query_lens)):
        start, end = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        ref = _dense_attention(q[start:end], keys[s], values[s], torch.arange(ctx - qlen, ctx), scale, window, slopes)
        torch.testing.assert_close(out[start:end], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,with_alibi", [(None, False), (None, True), (20, False), (20, True)])
def test_decode_triton_matches_torch(dtype, window, with_alibi):
    q, k_cache, v_cache, tables, context_lens = _decode_case(dtype)
    slopes = _alibi(HEADS) if with_alibi else None
    cu_seqlens_q = torch.arange(len(context_lens) + 1, dtype=torch.int32)
    out = attention.paged_decode_attention_triton(q, k_cache, v_cache, tables, context_lens, 0.2, window, slopes)
    ref = paged_attention_torch(q, k_cache, v_cache, tables, context_lens, cu_seqlens_q, 0.2, window, slopes)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(2, 2, 24, 8), (8, 1, 64, 32)])
def test_decode_triton_other_layouts(heads, kv_heads, head_dim, block_size):
    q, k_cache, v_cache, tables, context_lens = _decode_case(
        torch.float32, [3, 45], block_size, heads, kv_heads, head_dim)
    q = torch.cat([q, torch.randn_like(q)], dim=-1)[..., :head_dim]                 # strided q
    cu_seqlens_q = torch.arange(3, dtype=torch.int32)
    tables = torch.cat([tables, torch.zeros_like(tables)], dim=1)[:, :tables.shape[1]]   # strided rows
    out = attention.paged_decode_attention_triton(q, k_cache, v_cache, tables, context_lens, 0.3, window=4)
    ref = paged_attention_torch(q, k_cache, v_cache, tables, context_lens, cu_seqlens_q, 0.3, window=4)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def _new_token_case(dtype, window, with_alibi, heads, kv_heads, seed):
    """A decode step of four sequences (5, 37, 1 and 150 tokens) with this step's k, v given apart
    (strided views, as in the model) and the reference: the cache after `store_kv`, the torch output.
    Returns q, k_cache, v_cache, tables, lens, k_new, v_new, slots, slopes, k_ref, v_ref, ref."""
    context_lens = [5, 37, 1, 150]
    q, k_cache, v_cache, tables, lens = _decode_case(dtype, context_lens, heads=heads, kv_heads=kv_heads)
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(len(context_lens), heads + 2 * kv_heads, HEAD_DIM, generator=g).to(dtype)
    k_new, v_new = qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    slots = _slots(tables, [torch.tensor([c - 1]) for c in context_lens], BLOCK_SIZE)
    slopes = _alibi(heads) if with_alibi else None
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k_new, v_new, k_ref, v_ref, slots)
    ref = paged_attention_torch(q, k_ref, v_ref, tables, lens, torch.arange(5, dtype=torch.int32), 0.2, window,
                                slopes)
    return q, k_cache, v_cache, tables, lens, k_new, v_new, slots, slopes, k_ref, v_ref, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits,chunk", [(2, 16), (4, 16), (16, 16)])
@pytest.mark.parametrize("window,with_alibi,heads,kv_heads", [(None, False, 4, 2), (20, True, 4, 1)])
def test_split_context_decode_matches_torch(dtype, splits, chunk, window, with_alibi, heads, kv_heads, monkeypatch):
    """Flash-decoding: a context of more than 4 chunks (150 positions: 10) shared out among up to
    `splits` programs, two chunks or more each (some empty with 16), the last to finish merging their
    softmax states; shorter ones (37, 5, 1 positions; every one under the window) left to the first
    program; with this step's token (split 0 folds it in and stores it) and without; twice in a row,
    so the tickets are back at zero after each merge."""
    monkeypatch.setenv("RAYSPEED_DECODE_SPLITS", str(splits))
    monkeypatch.setattr(decode_plan, "decode_chunk", lambda *args, **kwargs: (chunk, "prefetch", 4))
    q, k_cache, v_cache, tables, lens, k_new, v_new, slots, slopes, k_ref, v_ref, ref = _new_token_case(
        dtype, window, with_alibi, heads, kv_heads, seed=splits)
    for _ in range(2):
        out = attention.paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.2, window, slopes,
                                                      k_new, v_new, slots)
        torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert not attention._COUNTERS[q.device].any()
    # without this step's token (already in the cache)
    out = attention.paged_decode_attention_triton(q, k_ref, v_ref, tables, lens, 0.2, window, slopes)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_a_host_bound_on_the_context_keeps_one_program_per_pair(monkeypatch):
    """Told that no context exceeds SPLIT_MIN_CHUNKS loop steps (`max_context`, from the block-table
    width), the launcher splits nothing and launches no idle programs; past that, or unbounded, it
    splits as asked."""
    monkeypatch.setenv("RAYSPEED_DECODE_SPLITS", "4")
    grids, real = [], attention._paged_decode_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]
    monkeypatch.setattr(attention, "_paged_decode_kernel", Spy())
    q, k_cache, v_cache, tables, lens = _decode_case(torch.float32, [5, 37])
    bound = attention.SPLIT_MIN_CHUNKS * 64                    # 64 positions a loop step off the GPU
    for max_context in (None, bound, bound + 1):
        attention.paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.2, max_context=max_context)
    assert [grid[2] for grid in grids] == [4, 1, 4]


def test_decode_launcher_rejects_bad_inputs():
    q, k_cache, v_cache, tables, context_lens = _decode_case(torch.float32)
    with pytest.raises(AssertionError, match="dtypes differ"):
        attention.paged_decode_attention_triton(q.half(), k_cache, v_cache, tables, context_lens, 0.2)
    with pytest.raises(AssertionError, match="one query per sequence"):
        attention.paged_decode_attention_triton(q, k_cache, v_cache, tables, context_lens[:2], 0.2)
    with pytest.raises(AssertionError, match="power of two"):
        attention.paged_decode_attention_triton(q, k_cache[:, :12].contiguous(), v_cache[:, :12].contiguous(),
                                                tables, context_lens, 0.2)


def test_dispatch_uses_torch_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("Triton path taken for a CPU tensor")
    monkeypatch.setattr(attention, "paged_decode_attention_triton", fail)
    monkeypatch.setattr(attention, "prefill_attention_triton", fail)
    q, k_cache, v_cache, tables, context_lens = _decode_case(torch.float32)
    num_seqs = len(context_lens)
    slots = _slots(tables, [torch.tensor([c - 1]) for c in context_lens.tolist()], BLOCK_SIZE)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=context_lens,
                             cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32), max_query_len=1)
    assert meta.is_decode and not use_triton(q)
    k_new, v_new = torch.randn(2, num_seqs, KV_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    out = attention.attention(q, k_new, v_new, k_cache, v_cache, meta, 0.2)
    ref = paged_attention_torch(q, k_cache, v_cache, tables, context_lens, meta.cu_seqlens_q, 0.2)   # stored
    assert torch.equal(k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots], k_new)
    assert torch.equal(out, ref)


def _fresh_prefill_case(lens, kv_heads, dtype=torch.float32, heads=4, dim=16, block=8):
    """Fresh prompts of `lens` tokens: q, k, v (k, v as strided views of one fused QKV tensor, as the
    model gives them), cu_seqlens, a paged cache holding k, v for the reference, and their slots."""
    g = torch.Generator().manual_seed(0)
    tokens = sum(lens)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=g).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    needed = [_cdiv(n, block) for n in lens]
    tables = torch.zeros(len(lens), max(needed), dtype=torch.int32)
    perm, start = torch.randperm(sum(needed), generator=g).int(), 0
    for s, n in enumerate(needed):
        tables[s, :n] = perm[start:start + n]
        start += n
    k_cache = torch.zeros(sum(needed), block, kv_heads, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = _slots(tables, [torch.arange(n) for n in lens], block)
    store_kv(k, v, k_cache, v_cache, slots)
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).int()
    return q, k, v, cu, k_cache, v_cache, tables, slots


PREFILL_CASES = [(None, False, 4), (5, False, 2), (None, True, 4), (7, True, 1), (70, False, 2)]


@pytest.mark.parametrize("window, alibi, kv_heads", PREFILL_CASES)
def test_fresh_prefill_sdpa_matches_the_paged_reference(window, alibi, kv_heads):
    lens = [9, 1, 20]
    q, k, v, cu, k_cache, v_cache, tables, _ = _fresh_prefill_case(lens, kv_heads)
    slopes = _alibi(4) if alibi else None
    expected = paged_attention_torch(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), cu, 0.3,
                                     window, slopes)
    got = prefill_attention.prefill_attention_sdpa(q, k, v, cu.tolist(), 0.3, window, slopes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window, alibi, kv_heads", PREFILL_CASES)
def test_fresh_prefill_triton_matches_the_paged_reference(dtype, window, alibi, kv_heads):
    """Varlen prompts in one launch: lengths below, at and across the 64-row query/key blocks (130
    spans three), a single token; windows narrower and wider than a block. Given the caches, the
    kernel also fills them exactly as `store_kv`."""
    lens = [9, 1, 130, 64]
    q, k, v, cu, k_cache, v_cache, tables, slots = _fresh_prefill_case(lens, kv_heads, dtype)
    slopes = _alibi(4) if alibi else None
    expected = paged_attention_torch(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), cu, 0.3,
                                     window, slopes)
    got = prefill_attention.prefill_attention_triton(q, k, v, cu, max(lens), 0.3, window, slopes)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got, expected, **TOL[dtype])
    k_stored, v_stored, k_ref, v_ref = (torch.full_like(k_cache, 7.0) for _ in range(4))
    store_kv(k, v, k_ref, v_ref, slots)
    again = prefill_attention.prefill_attention_triton(q, k, v, cu, max(lens), 0.3, window, slopes,
                                                       k_stored, v_stored, slots)
    assert torch.equal(again, got)
    assert torch.equal(k_stored, k_ref) and torch.equal(v_stored, v_ref)


@pytest.mark.parametrize("window,alibi", [(None, True), (150, False), (150, True), (64, False), (40, False)])
@pytest.mark.parametrize("block,block_n", [(64, 64), (32, 32), (64, 128), (64, 32), (32, 128)])
def test_fresh_prefill_long_prompts_mask_only_edge_blocks(window, alibi, block, block_n):
    """Prompts of several key blocks: the blocks on the window's lower edge and across the diagonal
    are masked, those between are taken whole; all three kinds of step in one query block row; key
    blocks as wide as, wider and narrower than the query blocks (a window narrower than a key block
    too). Given the caches, every position is stored once, as `store_kv` would."""
    lens = [300, 70]
    q, k, v, cu, k_cache, v_cache, tables, slots = _fresh_prefill_case(lens, 2)
    slopes = _alibi(4) if alibi else None
    expected = paged_attention_torch(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), cu, 0.3,
                                     window, slopes)
    k_stored, v_stored, k_ref, v_ref = (torch.full_like(k_cache, 7.0) for _ in range(4))
    store_kv(k, v, k_ref, v_ref, slots)
    got = prefill_attention.prefill_attention_triton(q, k, v, cu, max(lens), 0.3, window, slopes, k_stored, v_stored,
                                                     slots, block=block, block_n=block_n)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_stored, k_ref) and torch.equal(v_stored, v_ref)


def test_prefill_config_override(monkeypatch):
    assert prefill_attention.prefill_config(128) == (64, 64, 4, 3)
    assert prefill_attention.prefill_config(256)[:2] == (32, 32)
    monkeypatch.setenv("RAYSPEED_PREFILL_CONFIG", "64,128,8,2")
    assert prefill_attention.prefill_config(128) == (64, 128, 8, 2)


def test_fresh_prefill_triton_head_dim_80_pads_to_128():
    """A head_dim of 80 (Phi-2's 32 heads of 80) is not a power of two: the padded lanes must not leak in."""
    lens = [33, 5]
    q, k, v, cu, k_cache, v_cache, tables, _ = _fresh_prefill_case(lens, 2, dim=80)
    expected = paged_attention_torch(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), cu, 1.0)
    got = prefill_attention.prefill_attention_triton(q, k, v, cu, max(lens), 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,with_alibi,heads,kv_heads", [(None, False, 4, 2), (20, True, 4, 2), (3, False, 4, 1),
                                                            (None, True, 2, 2)])
@pytest.mark.parametrize("chunk,mode", [(64, "prefetch"), (16, "plain"), (16, "prefetch"), (16, "early"),
                                        (16, "early-l2"), (128, "early"), (256, "early")])
def test_decode_with_new_token_stores_and_attends(dtype, window, with_alibi, heads, kv_heads, chunk, mode,
                                                  monkeypatch):
    """The fused decode (this step's k, v given) equals store_kv + the reference, cache included;
    contexts span several chunks (per-lane softmax states merged after the loop; lanes a window
    leaves empty; the next chunk loaded before or after this one's arithmetic, the first before the
    wait or in the loop) and a single token; with 256 positions, every context known to fit one chunk
    (`max_context`), the one softmax over it (WHOLE)."""
    monkeypatch.setattr(decode_plan, "decode_chunk", lambda *args, **kwargs: (chunk, mode, 4))
    q, k_cache, v_cache, tables, lens, k_new, v_new, slots, slopes, k_ref, v_ref, ref = _new_token_case(
        dtype, window, with_alibi, heads, kv_heads, seed=5)
    out = attention.paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.2, window, slopes,
                                                  k_new, v_new, slots, max_context=256 if chunk == 256 else None)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
