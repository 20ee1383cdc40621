"""The CUDA-only paths of the engine, on a GPU (`pytest -m gpu`; skipped without one): decode and
fresh-prefill CUDA graphs, the varlen prefill kernel and run-ahead give the tokens of the eager,
lockstep engine, for families with a local window (GPT-Neo), grouped-query attention (Llama) and
ALiBi (BLOOM); prompts of mixed lengths, so the prefill graphs pad. Also the kernels whose GPU code
the CPU tests cannot run: programmatic dependent launch, the half tiles' inline assembly, the
matmuls' bulk L2 prefetch, the swapped-operand tiles' wgmma, split-context decode attention's
tickets and cuBLASLt's epilogues."""
from dataclasses import replace

import pytest
import torch

import rayspeed
from actors.sequence import SamplingParams, Sequence
from kernels import attention, attention_torch, decode_plan, prefill_attention
from kernels.gemv import Tile, skinny_linear
from kernels.gemv_tuner import HALF_SHAPES, HALF_SHAPES_INT8, time_in_graph
from tests.helpers import tiny_model
from tests.kernels.test_attention import _decode_case, _fresh_prefill_case
from tests.kernels.test_gemv import _weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [list(range(40, 41)), list(range(7, 12)), list(range(60, 77)), list(range(3, 43))]


def generate(hf, **config) -> tuple[list[list[int]], object]:
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, device="cuda",
                                     max_num_seqs=8, **config)
    out = engine.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)
    return [o.outputs[0].token_ids for o in out], engine.backend


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_short_and_long_contexts_replay_their_own_decode_graphs(family):
    """Steps whose contexts all fit one of kernels.decode_plan.NARROW_CONTEXTS (64, 128, 256) replay graphs captured
    over the narrowest such block-table view (attention reading one 64-position chunk up to 64, the
    whole context before its wait up to 256: 128 in 4 warps, 256 in 16); longer ones the
    full-width graphs, whose attention splits contexts in 64-position steps (a tiny model's few heads
    leave the GPU idle). Tokens equal the eager lockstep engine's in all."""
    hf = tiny_model(family, max_position_embeddings=1024)
    batches = [[list(range(7, 30)), list(range(60, 77))], [list(range(7, 95)), list(range(60, 77))],
               [[5 + i % 200 for i in range(150)], list(range(9, 40))],
               [[3 + i % 250 for i in range(400)], list(range(9, 40))]]

    def tokens(**config):
        engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, device="cuda",
                                         max_num_seqs=4, **config)
        runs = [[o.outputs[0].token_ids for o in engine.generate(prompts, max_new_tokens=12, ignore_eos=True)]
                for prompts in batches]
        return runs, engine.backend

    expected, _ = tokens(enable_cuda_graph=False, run_ahead=False)
    got, engine = tokens()
    graphs = engine.runner.graphs
    assert graphs.narrow_blocks and graphs.narrow_blocks[-1] < graphs.max_blocks and graphs.short_max_batch >= 2
    assert {(2, width) for width in [*graphs.narrow_blocks, graphs.max_blocks]} <= graphs.graphs.keys()
    assert got == expected


@pytest.mark.parametrize("family", ["gpt_neo", "llama", "bloom"])
def test_graphs_and_run_ahead_give_the_eager_lockstep_tokens(family):
    hf = tiny_model(family)
    expected, _ = generate(hf, enable_cuda_graph=False, run_ahead=False)
    got, engine = generate(hf)
    assert engine.runner.graphs is not None and engine.runner.prefill_graphs is not None and engine.run_ahead
    assert len(engine.runner.prefill_graphs.graphs) > 1                 # small steps' buckets, from start-up
    assert got == expected
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


@pytest.mark.parametrize("limit", [0, 64])
def test_prefill_graphs_of_small_steps_are_captured_at_start_up(limit):
    """With prefill_graph_tokens=64 every bucket of steps of up to 64 tokens is captured before the first
    request (0: of up to 16 tokens, the smallest token bucket); the tokens equal the eager lockstep
    engine's either way."""
    hf = tiny_model("gpt_neo")
    expected, _ = generate(hf, enable_cuda_graph=False, run_ahead=False)
    wrapper = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, device="cuda",
                                      max_num_seqs=8, prefill_graph_tokens=limit)
    engine = wrapper.backend
    graphs = engine.runner.prefill_graphs
    captured = {key for key, entry in graphs.graphs.items() if entry is not None}
    assert captured == set(graphs.buckets_up_to(limit))
    assert {tokens for tokens, _ in captured} == ({16, 32, 64} if limit else {16})
    startup = engine.startup                        # what the worker's load report carries
    assert startup["prefill_graphs"] == len(captured) and startup["decode_graphs"] == len(engine.runner.graphs.graphs)
    assert min(startup["tune_s"], startup["decode_capture_s"], startup["prefill_capture_s"]) > 0
    out = wrapper.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in out] == expected


def test_sampled_decode_runs_ahead_on_the_gpu():
    """Unseeded sampling picks its tokens on the GPU, so graphs and run-ahead serve it: top_k=1 gives
    the eager lockstep greedy tokens, and the engine launched steps ahead."""
    hf = tiny_model("gpt_neo")
    expected, _ = generate(hf, enable_cuda_graph=False, run_ahead=False)
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, device="cuda",
                                     max_num_seqs=8)
    launched = []
    run_ahead = engine.backend.runner.run_ahead
    engine.backend.runner.run_ahead = lambda seqs, ids: launched.append(len(seqs)) or run_ahead(seqs, ids)
    out = engine.generate(PROMPTS, max_new_tokens=20, ignore_eos=True, do_sample=True, top_k=1)
    assert [o.outputs[0].token_ids for o in out] == expected and launched


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
@pytest.mark.parametrize("dtype", [torch.float16, "int8"])
def test_programmatic_dependent_launch_gives_the_same_tokens(family, dtype, monkeypatch):
    """Programmatic dependent launch (kernels/pdl.py, on by default on Hopper): the decode chain's kernels
    overlap their launches and wait on the GPU instead; greedy tokens with graphs and run-ahead equal
    those of a run with RAYSPEED_PDL=0."""
    hf = tiny_model(family)

    def tokens():
        engine = rayspeed.init_inference(hf, dtype=dtype, replace_with_kernel_inject=True, device="cuda",
                                         max_num_seqs=8)
        return [o.outputs[0].token_ids for o in engine.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)]

    monkeypatch.setenv("RAYSPEED_PDL", "0")
    expected = tokens()
    monkeypatch.setenv("RAYSPEED_PDL", "1")
    assert tokens() == expected
    monkeypatch.setenv("RAYSPEED_L2_PREFETCH_MB", "0")      # PDL without the matmuls' L2 prefetch
    assert tokens() == expected


@pytest.mark.parametrize("dtype, group", [("int8", None), ("int4", 32)])
def test_quantized_lm_head_streams_and_dequantizes_like_its_reference(dtype, group):
    """quant.lm_head on the GPU: decode rows stream the head's quantized copy through the tuned kernels,
    many rows dequantize it for cuBLAS; both equal the dequantized head in fp32, and graphs with
    run-ahead give the eager lockstep engine's tokens."""
    from kernels.quant import dequantize
    hf = tiny_model("gpt_neo")
    quant = {"lm_head": {"enabled": True}, **({"weight": {"group_size": group}} if group else {})}

    def engine(**config):
        return rayspeed.init_inference(hf, dtype=dtype, quant=quant, replace_with_kernel_inject=True, device="cuda",
                                       max_num_seqs=8, **config)

    eager = engine(enable_cuda_graph=False, run_ahead=False)
    expected = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)]
    graphed = engine()
    assert [o.outputs[0].token_ids for o in graphed.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)] == expected
    model = graphed.backend.model
    width, vocab = model.spec.embed_dim, model.spec.vocab_size
    head = dequantize(model.head_qweight, model.head_scales, model.head_quant.bits,
                      model.head_quant.k_group(width), torch.float32)[:vocab]
    for rows in (1, 8, 300):
        h = torch.randn(rows, width, device="cuda", dtype=torch.float16)
        ref = h.float() @ head.T
        assert ((model.compute_logits(h) - ref).norm() / ref.norm()).item() < 2e-3


def test_prefill_graph_logits_equal_eager_logits():
    """The padded graph replay returns each prompt's last-token logits as the eager forward does (to
    rounding: cuBLAS may pick another algorithm for the padded row count); fed from host arrays
    (`run_arrays`, padded on the host), the same graph returns the same logits."""
    _, engine = generate(tiny_model("gpt_neo"))
    runner = engine.runner
    seqs = [Sequence(p, SamplingParams()) for p in PROMPTS]
    for seq in seqs:
        engine.block_manager.allocate(seq)
    try:
        ids, positions, meta = runner.prepare_prefill(seqs)
        graphed = runner.prefill_graphs.run(ids, positions, meta).clone()
        from_host = runner.prefill_graphs.run_arrays(*runner._prefill_arrays(seqs)).clone()
        eager = runner._eager(ids, positions, meta, False)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        assert torch.equal(from_host, graphed)
    finally:
        for seq in seqs:
            engine.block_manager.deallocate(seq)


@pytest.mark.parametrize("bits,shape", [(4, s) for s in HALF_SHAPES] + [(8, s) for s in HALF_SHAPES_INT8])
@pytest.mark.parametrize("split_k,prefetch", [(1, False), (2, True)])
def test_half_tiles_match_the_fp32_tiles(bits, shape, split_k, prefetch):
    """The packed-fp16 int4 and int8 tiles run their inline assembly here (the CPU tests run its
    Triton twin): against fp64 and the fp32-arithmetic tile on a GPT-Neo-sized product, bias and
    residual fused, group 128; their fp16 sums of two or four products add ~1e-3 relative at most."""
    block_n, block_k, num_warps = shape
    g = torch.Generator().manual_seed(block_n + block_k)
    n, k = 2560, 2560
    w, scales, full = _weight(n, k, bits, 128, g)
    x = torch.randn(1, k, generator=g).half()
    bias, residual = torch.randn(n, generator=g).half(), torch.randn(1, n, generator=g).half()
    args = [t.cuda() for t in (x, w, bias, scales.half())]
    half = skinny_linear(*args, bits, 128, Tile(1, block_n, block_k, split_k, num_warps, fma=True, half=True,
                                               prefetch=prefetch), residual=residual.cuda())
    fp32 = skinny_linear(*args, bits, 128, Tile(1, 8, 1024 if bits == 4 else 512, split_k, fma=True),
                         residual=residual.cuda())
    ref = x.double() @ full.double().T + bias.double() + residual.double()
    err = lambda got: ((got.cpu().double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert err(half) < 3e-3 and err(fp32) < 3e-3


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_x_per_row_tiles_agree_with_the_broadcast_ones(bits):
    """`x_per_row` changes only how x reaches the registers (no shared-memory exchange under Triton
    3.6): the same products, summed in another order at most."""
    g = torch.Generator().manual_seed(bits)
    w, scales, full = _weight(2560, 2560, bits, 128 if bits < 16 else 2560, g)
    x = torch.randn(1, 2560, generator=g).half()
    args = [x.cuda(), (w.half() if bits == 16 else w).cuda(), None, None if scales is None else scales.half().cuda()]
    group = 128 if bits < 16 else None
    broadcast = skinny_linear(*args, bits, group, Tile(1, 4, 1024, fma=True))
    per_row = skinny_linear(*args, bits, group, Tile(1, 4, 1024, fma=True, x_per_row=True))
    torch.testing.assert_close(per_row, broadcast, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_l2_prefetch_changes_no_result(bits, monkeypatch):
    """The bulk L2 prefetch a CUDA-core product issues before its PDL wait only moves bytes into L2:
    products with and without it are equal, for a weight larger than the prefetch and one smaller (its
    lanes past the end repeat the last chunk)."""
    g = torch.Generator().manual_seed(bits)
    for n, k in ((10240, 2560), (96, 256)):
        group = 128 if bits < 16 else None
        w, scales, _ = _weight(n, k, bits, group or k, g)
        x = torch.randn(1, k, generator=g).half().cuda()
        args = [x, (w.half() if bits == 16 else w).cuda(), None, None if scales is None else scales.half().cuda()]
        tile = Tile(1, 4, 256, fma=True)

        def product(megabytes):
            monkeypatch.setenv("RAYSPEED_L2_PREFETCH_MB", megabytes)
            return skinny_linear(*args, bits, group, tile)
        assert torch.equal(product("0"), product("8"))
    torch.cuda.synchronize()


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("m", [5, 32])
def test_swapped_tiles_on_hopper_match_the_reference(bits, m, monkeypatch):
    """`_swap_kernel` on the GPU (wgmma, PDL, per-row bulk L2 prefetch) against fp32 products of the
    same fp16/int8 weights, epilogue fused and in the split-K reduction; the prefetch and PDL change
    no bit of the result (the last split's prefetch is clamped into its rows: the last row included)."""
    g = torch.Generator().manual_seed(bits + m)
    n, k = 7680, 2560
    group = 128 if bits == 8 else None
    w, scales, full = _weight(n, k, bits, group or k, g)
    x, bias = torch.randn(m, k, generator=g).half().cuda(), torch.randn(n, generator=g).half().cuda()
    args = [x, (w.half() if bits == 16 else w).cuda(), bias, None if scales is None else scales.half().cuda(), bits,
            group]
    ref = torch.nn.functional.gelu(x.float() @ full.half().float().cuda().T + bias.float(), approximate="tanh")
    for tile in (Tile(32, 64, 128, num_stages=4, swap=True), Tile(32, 128, 128, split_k=3, swap=True)):
        plain = skinny_linear(*args, tile, "gelu_tanh")
        torch.testing.assert_close(plain.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        assert torch.equal(skinny_linear(*args, Tile(**{**tile.__dict__, "l2_rows": 512}), "gelu_tanh"), plain)
        monkeypatch.setenv("RAYSPEED_PDL", "0")
        assert torch.equal(skinny_linear(*args, tile, "gelu_tanh"), plain)
        monkeypatch.delenv("RAYSPEED_PDL")
    torch.cuda.synchronize()


@pytest.mark.parametrize("window", [None, 256])
def test_split_context_decode_is_deterministic_and_exact(window, monkeypatch):
    """Split-context decode (the default at small batch) on GPT-Neo 2.7B's attention shape (20 heads
    of 128), contexts from 1 to 2,000 tokens: against the reference, and bitwise the same over 200
    launches (the last program of each (head, sequence) merges in split order, whatever order the
    programs finished in: a race in the tickets would show as a differing or wrong result)."""
    q, k_cache, v_cache, tables, lens = _decode_case(torch.float16, [1, 37, 160, 2000], heads=20, kv_heads=20,
                                                     head_dim=128)
    args = [t.cuda() for t in (q, k_cache, v_cache, tables, lens)]
    ref = attention_torch.paged_attention_torch(*args[:4], args[4], torch.arange(5, dtype=torch.int32, device="cuda"),
                                                0.1, window)
    assert decode_plan.decode_splits(20 * 4, torch.device("cuda")) > 1
    first = attention.paged_decode_attention_triton(*args, 0.1, window)
    torch.testing.assert_close(first, ref, rtol=2e-3, atol=2e-3)
    for _ in range(200):
        assert torch.equal(attention.paged_decode_attention_triton(*args, 0.1, window), first)
    monkeypatch.setenv("RAYSPEED_DECODE_SPLITS", "1")
    torch.testing.assert_close(attention.paged_decode_attention_triton(*args, 0.1, window), first,
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("window,heads,kv_heads", [(None, 20, 20), (256, 20, 20), (None, 32, 8)])
@pytest.mark.parametrize("block_n", [64, 128])
def test_fresh_prefill_on_the_gpu_stores_every_position_once(window, heads, kv_heads, block_n):
    """The prefill kernel as the model launches it (PDL on Hopper), prompts of 512, 300 and 40 tokens
    on GPT-Neo 2.7B's and Llama's (grouped) attention shapes, key blocks as wide as the query blocks
    and wider: the reference's output, and a cache equal to `store_kv`'s."""
    lens = [512, 300, 40]
    case = _fresh_prefill_case(lens, kv_heads, torch.float16, heads=heads, dim=128, block=16)
    q, k, v, cu, k_cache, v_cache, tables, slots = (t.cuda() for t in case)
    ref = attention_torch.paged_attention_torch(q, k_cache, v_cache, tables, torch.tensor(lens, device="cuda").int(),
                                                cu, 0.1, window)
    k_stored, v_stored = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    got = prefill_attention.prefill_attention_triton(q, k, v, cu, 512, 0.1, window, None, k_stored, v_stored, slots,
                                                     block_n=block_n)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    assert torch.equal(k_stored, k_cache) and torch.equal(v_stored, v_cache)


@pytest.mark.parametrize("window,heads,kv_heads", [(None, 20, 20), (256, 20, 20), (None, 32, 8)])
def test_decode_asking_the_l2_ahead_changes_no_result(window, heads, kv_heads, monkeypatch):
    """The "early-l2" chunk mode (the first query head of each KV head asks the L2 for the positions
    after its first chunk before the PDL wait) gives exactly the "early" mode's output, with and
    without context splits, on contexts of 1 to 700 tokens: past the prefetched range too, a window,
    grouped KV heads."""
    q, k_cache, v_cache, tables, lens = _decode_case(torch.float16, [1, 37, 160, 300, 700], heads=heads,
                                                     kv_heads=kv_heads, head_dim=128)
    args = [t.cuda() for t in (q, k_cache, v_cache, tables, lens)]
    ref = attention_torch.paged_attention_torch(*args[:4], args[4], torch.arange(6, dtype=torch.int32, device="cuda"),
                                                0.1, window)
    for splits in ("1", "4"):
        monkeypatch.setenv("RAYSPEED_DECODE_SPLITS", splits)
        monkeypatch.setenv("RAYSPEED_DECODE_CONFIG", "64,early,4")
        early = attention.paged_decode_attention_triton(*args, 0.1, window)
        monkeypatch.setenv("RAYSPEED_DECODE_CONFIG", "64,early-l2,4")
        assert torch.equal(attention.paged_decode_attention_triton(*args, 0.1, window), early)
        torch.testing.assert_close(early, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cublas_epilogue_activations_match_separate_ones(activation, dtype):
    """Float products of many rows apply a tanh GELU or a ReLU in cuBLASLt's epilogue: the same
    function as the separate activation (to the rounding of the pre-activation, which the epilogue
    keeps in fp32)."""
    from kernels.activation import FUSABLE_ACTIVATIONS
    from kernels.linear import ColumnParallelLinear, TensorParallel
    layer = ColumnParallelLinear(256, 1024, True, TensorParallel(), dtype).cuda()
    torch.nn.init.normal_(layer.weight, std=0.05)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 16, 256, device="cuda", dtype=dtype)
    fused = layer._torch_matmul(x, layer.bias, activation, None)
    separate = FUSABLE_ACTIVATIONS[activation](torch.nn.functional.linear(x.float(), layer.weight.float(),
                                                                          layer.bias.float()))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(fused.float(), separate, **tol)


def test_the_tuner_times_a_product_as_decode_runs_it():
    """`time_in_graph` (the tuner's clock): a GPT-Neo MLP-sized fp16 product cycling over weight copies
    that miss L2 takes at least its bytes at 4.8 TB/s (the H200's HBM peak, the fastest GPU here) and,
    for a tile the H100 table chooses, under three times that."""
    weights = [torch.randn(10240, 2560, device="cuda", dtype=torch.float16) for _ in range(4)]
    x = torch.randn(1, 2560, device="cuda", dtype=torch.float16)
    ms = time_in_graph(lambda i: skinny_linear(x, weights[i], tile=Tile(1, 4, 512, fma=True)), len(weights))
    floor = weights[0].numel() * 2 / 4.8e9
    assert floor <= ms < 3 * floor


@pytest.mark.parametrize("bits,half", [(16, False), (8, False), (8, True), (4, False), (4, True)])
def test_rows_tiles_match_fp64_with_prefetch_and_l2(bits, half):
    """`rows` tiles (kernels/gemv_rows.py) on a GPT-Neo-sized product with bias and residual fused:
    against fp64 (the packed-fp16 ones run their inline assembly here), and their next-tile
    prefetch and L2 request change no result."""
    g = torch.Generator().manual_seed(bits + 2 * half)
    n, k, group = 2560, 2560, 128 if bits == 4 else None
    w, scales, full = _weight(n, k, bits, group or k, g)
    x = torch.randn(1, k, generator=g).half()
    bias, residual = torch.randn(n, generator=g).half(), torch.randn(1, n, generator=g).half()
    args = [x.cuda(), (w.half() if bits == 16 else w).cuda(), bias.cuda(),
            None if scales is None else scales.half().cuda()]
    tile = Tile(1, 8, 1024 if half and bits == 4 else 512, 2, 1, half=half, rows=True)
    plain = skinny_linear(*args, bits, group, tile, residual=residual.cuda())
    ref = x.double() @ full.double().T + bias.double() + residual.double()
    assert ((plain.cpu().double() - ref).abs().max() / ref.abs().max()).item() < 3e-3
    for twin in (replace(tile, prefetch=True), replace(tile, l2_rows=1 << 20)):
        assert torch.equal(skinny_linear(*args, bits, group, twin, residual=residual.cuda()), plain)


@pytest.mark.parametrize("bits,half", [(16, False), (8, True), (4, False), (4, True)])
@pytest.mark.parametrize("rms", [False, True])
def test_rows_tiles_do_the_norm_before_them_on_the_gpu(bits, half, rms):
    """A GPT-Neo-sized rows product with the LayerNorm (or RMSNorm) before it inside (`NormFold`; the
    packed-fp16 tiles run their inline assembly here): against fp64 norm-then-product, on a stream
    with a large mean; the same with the next-tile prefetch."""
    from kernels.gemv import NormFold
    g = torch.Generator().manual_seed(bits + 2 * half + 4 * rms)
    n, k, group = 2560, 2560, 128 if bits == 4 else None
    w, scales, full = _weight(n, k, bits, group or k, g)
    x = (torch.randn(1, k, generator=g) * 4 + 3).half()
    gamma, beta = (torch.rand(k, generator=g) + 0.5).half(), torch.randn(k, generator=g).half()
    bias, residual = torch.randn(n, generator=g).half(), torch.randn(1, n, generator=g).half()
    xd = x.double()
    if rms:
        xn, c1, folded = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double(), None, bias.double()
    else:
        xn = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
        xn = xn * gamma.double() + beta.double()
        c1, folded = (full.double() @ gamma.double()).float().cuda(), bias.double() + full.double() @ beta.double()
    norm = NormFold(gamma.cuda(), c1, 1e-5)
    args = [x.cuda(), (w.half() if bits == 16 else w).cuda(), folded.half().cuda(),
            None if scales is None else scales.half().cuda()]
    tile = Tile(1, 8, 1024 if half and bits == 4 else 512, 1, 1, half=half, rows=True)
    got = skinny_linear(*args, bits, group, tile, residual=residual.cuda(), norm=norm)
    ref = xn @ full.double().T + bias.double() + residual.double()
    assert ((got.cpu().double() - ref).abs().max() / ref.abs().max()).item() < 5e-3
    assert torch.equal(skinny_linear(*args, bits, group, replace(tile, prefetch=True), residual=residual.cuda(),
                                     norm=norm), got)


@pytest.mark.parametrize("family,dtype", [("gpt_neo", torch.int8), ("llama", "int4")])
def test_folded_norms_give_the_norm_kernels_tokens(family, dtype, monkeypatch):
    """fp16 decode on rows tiles (forced, as the tuner picks them for large models) with the norms
    inside QKV and MLP up against the same engine with norm kernels (`kernels.linear.FOLD_NORMS`
    off): close logits."""
    import kernels.gemv_tuner as tuner
    import kernels.linear as linear
    from kernels.block import DecoderBlock
    tile = lambda x, w, b, s, bits, *args, **kwargs: Tile(1, 8, 64, rows=True, half=bits < 16)   # noqa: E731
    monkeypatch.setattr(tuner, "tuned_tile", tile)
    hf = tiny_model(family)
    quant = {"quant": {"weight": {"group_size": 32}}} if dtype == "int4" else {}
    engine = rayspeed.init_inference(hf, dtype=dtype, replace_with_kernel_inject=True, device="cuda", max_num_seqs=8,
                                     **quant)
    ids = torch.tensor([PROMPTS[1]], device="cuda")
    blocks = [m for m in engine.backend.model.modules() if isinstance(m, DecoderBlock)]
    assert all(b._folds(torch.zeros(1, hf.config.hidden_size, dtype=torch.half, device="cuda")) for b in blocks)
    folded = engine.module(ids).logits.float()
    monkeypatch.setattr(linear, "FOLD_NORMS", False)
    plain = engine.module(ids).logits.float()
    assert ((folded - plain).norm() / plain.norm()).item() < 5e-3
