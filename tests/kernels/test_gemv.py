"""The weight-streaming matmul (`kernels.gemv.skinny_linear`) against fp64 references of its three
weight formats, with per-group and in-register dequantization, split-K and the fused epilogue, run
on CPU by Triton's interpreter; and the tuner's table on disk."""
import contextlib
import json
import os

import pytest
import torch

from kernels.gemv import Tile, pick_tile, skinny_linear


def _weight(n: int, k: int, bits: int, group_size: int, g: torch.Generator):
    """(stored weight, scales, the fp32 weight they stand for)."""
    if bits == 16:
        w = torch.randn(n, k, generator=g)
        return w, None, w
    scales = torch.rand(n, k // group_size, generator=g) + 0.5
    q = torch.randint(-8, 8, (n, k), generator=g) if bits == 4 else torch.randint(-127, 128, (n, k), generator=g)
    full = q.float() * scales.repeat_interleave(group_size, dim=1)
    if bits == 4:
        return ((q[:, 0::2] + 8) | ((q[:, 1::2] + 8) << 4)).to(torch.uint8), scales, full
    return q.to(torch.int8), scales, full


CASES = [(16, None), (8, None), (8, 64), (4, 64)]       # (bits, group size; None = one group per row)


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_matches_reference(bits, group, m):
    g = torch.Generator().manual_seed(m * 31 + bits)
    n, k = 48, 256
    w, scales, full = _weight(n, k, bits, group or k, g)
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    got = skinny_linear(x, w, bias, scales, bits, group)
    ref = x.double() @ full.double().T + bias.double()
    assert got.dtype == x.dtype and got.shape == (m, n)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("tile", [Tile(16, 16, 64, split_k=3), Tile(16, 32, 32, split_k=2), Tile(32, 32, 32, split_k=4),
                                  Tile(1, 8, 64, split_k=3, fma=True), Tile(1, 4, 128, split_k=2, fma=True),
                                  Tile(1, 8, 64, split_k=3, fma=True, prefetch=True),
                                  Tile(1, 4, 128, split_k=2, fma=True, prefetch=True, x_per_row=True),
                                  Tile(1, 4, 512, fma=True, prefetch=True),       # all of K before the wait
                                  Tile(1, 8, 64, split_k=3, rows=True), Tile(1, 2, 128, split_k=2, rows=True),
                                  Tile(1, 4, 64, split_k=3, rows=True, prefetch=True),
                                  Tile(1, 1, 256, rows=True)])
def test_split_k_and_ragged_edges(bits, group, tile):
    """N and K not multiples of the tile; K split into uneven parts; bias added once."""
    g = torch.Generator().manual_seed(7)
    n, k, m = 37, 320, min(tile.block_m, 5)
    w, scales, full = _weight(n, k, bits, group or k, g)
    x, bias = torch.randn(2, m, k, generator=g), torch.randn(n, generator=g)
    got = skinny_linear(x, w, bias, scales, bits, group, tile)
    ref = x.double() @ full.double().T + bias.double()
    assert got.shape == (2, m, n)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("bits,group", [(16, None), (8, None), (8, 64)])
@pytest.mark.parametrize("tile", [Tile(16, 16, 64, swap=True), Tile(32, 32, 64, split_k=3, swap=True),
                                  Tile(16, 16, 32, split_k=2, swap=True, l2_rows=128)])
@pytest.mark.parametrize("m", [3, 20])
def test_swapped_operand_tiles(bits, group, tile, m):
    """`_swap_kernel` (weight rows on the MMA's long side): ragged N and K, K split unevenly, rows past
    the tile's, the epilogue fused (or in the split-K reduction); `l2_rows` only matters on a GPU."""
    g = torch.Generator().manual_seed(m + bits)
    n, k = 37, 320
    w, scales, full = _weight(n, k, bits, group or k, g)
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    residual = torch.randn(m, n, generator=g)
    got = skinny_linear(x, w, bias, scales, bits, group, tile, activation="gelu_tanh", residual=residual)
    ref = EPILOGUE_REFS["gelu_tanh"](x.double() @ full.double().T + bias.double()) + residual.double()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_swapped_tiles_are_offered_past_the_cuda_core_rows_for_16_and_8_bits():
    from kernels.gemv_tuner import FMA_MAX_ROWS, SWAP_SHAPES, candidates
    swapped = [t for t in candidates(32, 2560, 16, 2560, torch.float16) if t.swap]
    assert {(t.block_n, t.block_k, t.num_stages) for t in swapped} == set(SWAP_SHAPES)
    assert all(t.block_m == 32 for t in swapped)
    assert all(128 % t.block_k == 0 for t in candidates(8, 2560, 8, 128, torch.float16) if t.swap)
    assert not any(t.swap for t in candidates(FMA_MAX_ROWS, 2560, 16, 2560, torch.float16)
                   + candidates(32, 2560, 4, 128, torch.float16))
    with pytest.raises(AssertionError, match="16-bit or int8"):
        w, scales, _ = _weight(8, 256, 4, 64, torch.Generator().manual_seed(0))
        skinny_linear(torch.randn(4, 256), w, None, scales, 4, 64, Tile(16, 16, 64, swap=True))


def test_half_precision_rows():
    g = torch.Generator().manual_seed(3)
    w, scales, full = _weight(64, 128, 8, 128, g)
    x = torch.randn(4, 128, generator=g).half()
    got = skinny_linear(x, w, None, scales.half(), 8)
    ref = x.double() @ full.double().T
    assert got.dtype == torch.half
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 2e-3


def test_heuristic_splits_k_only_when_programs_are_few():
    assert pick_tile(1, 2560, 10240, 16, 10240).split_k > 1          # 160 tiles: split for the GPU's SMs
    assert pick_tile(1, 50257, 2560, 16, 2560).split_k == 1          # the LM head fills the GPU already
    assert 128 % pick_tile(1, 4096, 4096, 4, 128).block_k == 0       # tiles stay inside a scale group


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, 64), (8, None), (16, None)])
@pytest.mark.parametrize("tile", [Tile(1, 8, 128, fma=True), Tile(1, 8, 128, fma=True, prefetch=True),
                                  Tile(1, 8, 128, fma=True, x_per_row=True), Tile(16, 16, 64)],
                         ids=["fma", "fma-prefetch", "fma-x-per-row", "tensor-cores"])
def test_16_bit_rows(dtype, bits, group, tile):
    """16-bit x, as on GPUs (the CUDA-core kernel reads each pair of x values of an int4 byte as one
    32-bit word; the tensor-core tiles build int8/int4 values in the mantissa of 16-bit floats), also
    from a view that starts at an odd element (copied to an aligned buffer first)."""
    if dtype == torch.bfloat16 and not tile.fma and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter computes tl.dot of bfloat16 operands wrongly (even for float weights)")
    g = torch.Generator().manual_seed(bits)
    w, scales, full = _weight(24, 256, bits, group or 256, g)
    storage = torch.randn(2 * 256 + 1, generator=g).to(dtype)
    x = storage[1:].view(2, 256)                       # the second row starts 2 * 257 bytes in
    scales = None if scales is None else scales.to(dtype)
    got = skinny_linear(x, w.to(dtype) if bits == 16 else w, None, scales, bits, group, tile)
    ref = x.double() @ full.double().T
    assert got.dtype == dtype
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group,tile", [(64, Tile(1, 8, 128, fma=True, half=True)),
                                        (32, Tile(1, 4, 256, split_k=2, fma=True, half=True, prefetch=True)),
                                        (None, Tile(1, 2, 64, fma=True, half=True)),
                                        (64, Tile(1, 8, 128, split_k=2, fma=True, half=True, x_per_row=True)),
                                        (64, Tile(1, 8, 128, rows=True, half=True)),
                                        (32, Tile(1, 4, 256, split_k=2, rows=True, half=True, prefetch=True)),
                                        (None, Tile(1, 2, 64, rows=True, half=True))])
def test_quantized_weights_in_packed_half_arithmetic(bits, group, tile):
    """Half tiles (int4 or int8, fp16 x: weights to fp16 pairs, packed fp16 multiply-adds of four
    (int4) or two (int8) products per half before fp32) against fp64: within fp16 rounding of those
    sums. K not a tile multiple, split K, a tile spanning groups, a group per row, bias and residual
    fused. On CPU the Triton-operation twins of the inline assembly run; the assembly itself is
    built in test_sm90_builds and run by the GPU tests."""
    g = torch.Generator().manual_seed(11)
    n, k = 37, 448
    w, scales, full = _weight(n, k, bits, group or k, g)
    x = torch.randn(2, k, generator=g).half()
    bias, residual = torch.randn(n, generator=g).half(), torch.randn(2, n, generator=g).half()
    got = skinny_linear(x, w, bias, scales.half(), bits, group, tile, residual=residual)
    ref = x.double() @ full.double().T + bias.double() + residual.double()
    assert got.dtype == torch.float16
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 3e-3


def test_half_tiles_take_quantized_weights_and_fp16_rows():
    g = torch.Generator().manual_seed(2)
    with pytest.raises(AssertionError, match="fp16 x"):
        skinny_linear(torch.randn(1, 256, generator=g).half(), torch.randn(8, 256, generator=g).half(), None, None,
                      16, None, Tile(1, 8, 128, fma=True, half=True))
    w, scales, _ = _weight(8, 256, 4, 64, g)
    with pytest.raises(AssertionError, match="fp16 x"):
        skinny_linear(torch.randn(1, 256, generator=g).bfloat16(), w, None, scales.bfloat16(), 4, 64,
                      Tile(1, 8, 128, fma=True, half=True))
    w, scales, _ = _weight(8, 240, 4, 48, g)
    with pytest.raises(AssertionError, match="K=240"):
        skinny_linear(torch.randn(1, 240, generator=g).half(), w, None, scales.half(), 4, 48,
                      Tile(1, 8, 96, fma=True, half=True))


def test_half_tiles_are_offered_for_quantized_weights_and_fp16_rows():
    from kernels.gemv_tuner import HALF_SHAPES, HALF_SHAPES_INT8, candidates
    fp16 = torch.float16
    for bits, shapes in ((4, HALF_SHAPES), (8, HALF_SHAPES_INT8)):
        half = [t for t in candidates(1, 2560, bits, 128, fp16) if t.half and t.fma]
        assert {(t.block_n, t.block_k, t.num_warps) for t in half} == set(shapes)
    assert {t.block_k for t in candidates(1, 2560, 8, 2560, fp16) if t.half and t.fma} == {b for _, b, _ in HALF_SHAPES_INT8}
    assert not any(t.half for t in candidates(1, 2560, 16, 2560, fp16) + candidates(1, 2552, 4, 88, fp16)
                   + candidates(1, 2552, 8, 2552, fp16) + candidates(4, 2560, 4, 128, fp16)
                   + candidates(1, 2560, 4, 128, torch.bfloat16) + candidates(1, 2560, 8, 128, torch.bfloat16))


def test_rows_tiles_are_offered_for_one_or_two_rows():
    """One or two rows also get `rows` tiles (4 or 8 rows a thread, a 16-byte vector a thread per K
    tile), packed-fp16 ones for quantized weights against fp16 x; more rows do not."""
    from kernels.gemv_tuner import candidates, rows_candidates
    for bits, group in ((16, 2560), (8, 2560), (4, 128)):
        tiles = [t for t in candidates(1, 2560, bits, group, torch.float16) if t.rows]
        assert tiles == rows_candidates(2560, bits, group, torch.float16) and {t.block_n for t in tiles} == {4, 8}
        assert any(t.half for t in tiles) == (bits < 16)
        assert all(t.block_k <= 2560 and (t.block_k % group == 0 or group % t.block_k == 0) for t in tiles)
    assert not any(t.rows for t in candidates(4, 2560, 8, 2560, torch.float16))
    assert not any(t.half for t in candidates(1, 2560, 8, 2560, torch.bfloat16) if t.rows)


def test_rows_tiles_take_one_two_four_or_eight_rows():
    x, w = torch.randn(1, 64), torch.randn(8, 64)
    with pytest.raises(AssertionError, match="1, 2, 4 or 8 rows"):
        skinny_linear(x, w, tile=Tile(1, 3, 64, rows=True))


def test_few_rows_are_offered_the_cuda_core_kernel():
    """Up to FMA_MAX_ROWS rows the tuner also times `_fma_kernel` tiles of 4-16 KB of weights."""
    from kernels.gemv_tuner import FMA_MAX_ROWS, candidates
    for bits in (16, 8, 4):
        fma = [t for t in candidates(1, 10240, bits, 128 if bits == 4 else 10240, torch.float16) if t.fma]
        assert fma and all(4096 <= t.block_n * t.block_k * bits // 8 <= 16384 for t in fma)
    assert not any(t.fma for t in candidates(FMA_MAX_ROWS + 1, 4096, 16, 4096, torch.float16))


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (8, 128)])
@pytest.mark.parametrize("block_k", [32, 128])
@pytest.mark.parametrize("prefetch", [False, True])
def test_cuda_core_tiles_spanning_or_inside_scale_groups(bits, group, block_k, prefetch):
    """A [BN, BK / sub, sub] tile scales each sub-tile by its own group's scale, whether the tile spans
    several groups (block_k > group) or lies inside one (block_k < group); K not a tile multiple."""
    g = torch.Generator().manual_seed(bits * block_k)
    n, k = 37, 384
    w, scales, full = _weight(n, k, bits, group, g)
    x, bias = torch.randn(2, k, generator=g), torch.randn(n, generator=g)
    got = skinny_linear(x, w, bias, scales, bits, group, Tile(1, 8, block_k, fma=True, prefetch=prefetch))
    ref = x.double() @ full.double().T + bias.double()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_rejects_mismatched_scales():
    w, scales, _ = _weight(16, 128, 8, 64, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="scales"):
        skinny_linear(torch.randn(1, 128), w, None, scales[:, :1], 8, 64)


EPILOGUE_REFS = {None: lambda y: y, "gelu_tanh": lambda y: torch.nn.functional.gelu(y, approximate="tanh"),
                 "gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu}


@pytest.mark.parametrize("activation", list(EPILOGUE_REFS))
@pytest.mark.parametrize("tile", [Tile(16, 16, 64), Tile(16, 16, 64, split_k=4), Tile(32, 16, 64, split_k=2),
                                  Tile(1, 8, 64, fma=True), Tile(1, 8, 32, split_k=2, fma=True)])
def test_fused_epilogue(activation, tile):
    """act(x W^T + b) + residual, fused in the kernel or in the split-K reduction."""
    g = torch.Generator().manual_seed(11)
    w, scales, full = _weight(40, 256, 8, 64, g)
    x, bias = torch.randn(3, 256, generator=g), torch.randn(40, generator=g) * 30
    residual = torch.randn(3, 40, generator=g) * 100
    got = skinny_linear(x, w, bias, scales, 8, 64, tile, activation=activation, residual=residual)
    ref = EPILOGUE_REFS[activation](x.double() @ full.double().T + bias.double()) + residual.double()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32), (4, 64)])
@pytest.mark.parametrize("tile", [Tile(16, 16, 128, scale_in_tile=True), Tile(16, 32, 64, split_k=3, scale_in_tile=True)])
def test_tiles_dequantized_in_registers_may_span_groups(bits, group, tile):
    """Wide tiles scale each weight in registers (int4 unpacked by interleaving), across K-groups."""
    g = torch.Generator().manual_seed(bits + (group or 0))
    w, scales, full = _weight(40, 256, bits, group or 256, g)
    x, bias = torch.randn(5, 256, generator=g), torch.randn(40, generator=g)
    got = skinny_linear(x, w, bias, scales, bits, group, tile, activation="relu", residual=torch.ones(5, 40))
    ref = torch.relu(x.double() @ full.double().T + bias.double()) + 1
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_tuned_choices_persist_per_gpu_model(tmp_path, monkeypatch):
    """A later process reads the tuner's choices back (a tile or cuBLAS) instead of timing again."""
    from kernels import gemv_tuner as gemv
    monkeypatch.setenv("RAYSPEED_CACHE", str(tmp_path))
    key = lambda n: (1, n, 2560, 8, 2560, "torch.float16", False, None, True, "cuda:0")   # noqa: E731
    writer = gemv._Choices()
    assert writer.get(key(7680), "NVIDIA H100 80GB HBM3") is None
    writer.put(key(7680), "NVIDIA H100 80GB HBM3", Tile(16, 64, 256, split_k=4, scale_in_tile=True))
    writer.put(key(2560), "NVIDIA H100 80GB HBM3", gemv.CUBLAS)
    reader = gemv._Choices()
    assert reader.get(key(7680), "NVIDIA H100 80GB HBM3") == Tile(16, 64, 256, split_k=4, scale_in_tile=True)
    assert reader.get(key(2560), "NVIDIA H100 80GB HBM3") == gemv.CUBLAS
    assert gemv._Choices().get(key(7680), "NVIDIA H200") is None                       # another GPU model


def test_shipped_tables_are_read_and_the_user_cache_wins(tmp_path, monkeypatch):
    from kernels import gemv_tuner as gemv
    monkeypatch.setenv("RAYSPEED_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "kernels"
    (shipped / "tuned").mkdir(parents=True)
    key = (1, 2560, 2560, 4, 128, "torch.float16", True, None, False)
    name = gemv._Choices._name("Test GPU")
    (shipped / "tuned" / name).write_text(json.dumps({repr(key): {"block_m": 16, "block_n": 32, "block_k": 128}}))
    monkeypatch.setattr(gemv, "__file__", str(shipped / "gemv.py"))
    assert gemv._Choices().get((*key, "cuda:0"), "Test GPU") == Tile(16, 32, 128)
    monkeypatch.setenv("RAYSPEED_GEMV_SHIPPED", "0")                 # bench/tune.py: time anew
    assert gemv._Choices().get((*key, "cuda:0"), "Test GPU") is None
    monkeypatch.delenv("RAYSPEED_GEMV_SHIPPED")
    gemv._Choices().put((*key, "cuda:0"), "Test GPU", gemv.CUBLAS)
    assert gemv._Choices().get((*key, "cuda:0"), "Test GPU") == gemv.CUBLAS


def test_streamed_linear_follows_the_tuners_verdict(monkeypatch):
    """cuBLAS's verdict runs the offered torch path; a tile runs the kernel with that tile."""
    from kernels import gemv_tuner as gemv
    g = torch.Generator().manual_seed(2)
    w, _, full = _weight(32, 128, 16, 128, g)
    x = torch.randn(2, 128, generator=g)
    monkeypatch.setattr(gemv, "tuned_tile", lambda *args: gemv.CUBLAS)
    assert gemv.streamed_linear(x, w, torch_path=lambda v, w: "torch") == "torch"
    monkeypatch.setattr(gemv, "tuned_tile", lambda *args: Tile(16, 16, 64, split_k=2))
    got = gemv.streamed_linear(x, w, torch_path=lambda v, w: "torch")
    assert ((got - x.double() @ full.double().T).abs().max()).item() < 1e-4


def test_small_products_are_not_timed(monkeypatch):
    """A weight under TUNE_MIN_BYTES is never timed, even at start-up: cuBLAS for float weights (at one
    row as at many), the heuristic tile for quantized ones; the same choice outside the window."""
    from kernels import gemv_tuner as gemv
    monkeypatch.setattr(gemv, "_choices", gemv._Choices())
    monkeypatch.setattr(gemv, "_gpu_name", lambda device: "Test GPU")
    monkeypatch.setattr(gemv, "TUNE_MIN_BYTES", 64 * 256 * 2 + 1)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(gemv, "time_in_graph", lambda fn, copies: pytest.fail("a small product was timed"))
    x, w = torch.randn(1, 256), torch.randn(64, 256, dtype=torch.float16)
    q, scales = torch.zeros(64, 128, dtype=torch.uint8), torch.ones(64, 2)
    for window in (gemv.tuning_window(), contextlib.nullcontext()):
        with window:
            assert gemv.tuned_tile(x, w, None, None, 16, None, None, None, torch_path=lambda v, w: v) == gemv.CUBLAS
            assert gemv.tuned_tile(x, q, None, scales, 4, 128, None, None) == gemv.pick_tile(1, 64, 256, 4, 128)


@pytest.mark.parametrize("twin_ms,expect_prefetch", [(0.4, True), (0.6, False)])
def test_tuner_times_the_winning_cuda_core_tile_again_with_prefetch(tmp_path, monkeypatch, twin_ms, expect_prefetch):
    """Inside the start-up window, the fastest candidate, when a CUDA-core tile, is timed once more
    with `prefetch`, the faster of the two once more with `x_per_row`; the fastest is kept (and
    persisted). Outside it nothing is timed."""
    from kernels import gemv_tuner as gemv
    monkeypatch.setenv("RAYSPEED_CACHE", str(tmp_path))
    monkeypatch.setattr(gemv, "_choices", gemv._Choices())
    monkeypatch.setattr(gemv, "_gpu_name", lambda device: "Test GPU")
    monkeypatch.setattr(gemv, "_l2_bytes", lambda device: 160 << 10)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    best = next(t for t in gemv.candidates(1, 256, 16, 256, torch.float32) if t.fma)
    timed = []

    def fake_bench(fn, copies):                        # what tile is this? the one skinny_linear was given
        assert copies == 5                             # 64 KB of weights: 2 x 160 KB of L2 needs 5 copies
        tile = fn.__closure__ and next((c.cell_contents for c in fn.__closure__
                                        if isinstance(c.cell_contents, gemv.Tile)), None)
        timed.append(tile)
        if tile == best:
            return 0.5
        return twin_ms if tile == gemv.replace(best, prefetch=True) else 1.0

    monkeypatch.setattr(gemv, "time_in_graph", fake_bench)
    x, w = torch.randn(1, 256), torch.randn(64, 256)
    assert gemv.tuned_tile(x, w, None, None, 16, None, None, None) == gemv.pick_tile(1, 64, 256, 16, 256)
    assert not timed                                   # outside the start-up window: nothing is timed
    with gemv.tuning_window():
        choice = gemv.tuned_tile(x, w, None, None, 16, None, None, None)
    assert choice == gemv.replace(best, prefetch=expect_prefetch)
    assert sum(t is not None and t.prefetch and not t.x_per_row for t in timed) == 1
    assert timed[-1] == gemv.replace(choice, x_per_row=True)          # then x in the weights' layout, slower here
    assert gemv._Choices().get((1, 64, 256, 16, 256, str(x.dtype), False, None, False, x.device), "Test GPU") == choice


@pytest.mark.parametrize("bits,group,k", [(8, None, 320), (8, 64, 320), (4, 64, 320), (4, 32, 1088), (8, 96, 1152)])
def test_dequantize_weight_matches_the_reference(bits, group, k):
    """Ragged N and K, groups smaller and larger than the kernel's sub-tile, and not a power of two."""
    from kernels.dequant import dequantize_weight
    from kernels.quant import dequantize
    w, scales, full = _weight(37, k, bits, group or k, torch.Generator().manual_seed(bits))
    got = dequantize_weight(w, scales, bits, group, torch.float32)
    assert torch.equal(got, dequantize(w, scales, bits, group or k, torch.float32))
    assert torch.allclose(got, full)


@pytest.mark.parametrize("bits", [8, 4])
def test_large_quantized_products_dequantize_once_then_use_torch(monkeypatch, bits):
    """Kernel dispatch of `quant_linear` (as on CUDA): from DEQUANT_MIN_ROWS rows one float copy of
    the weight and F.linear, below it the in-register kernel; both equal the reference."""
    from kernels import gemv_tuner, quant
    from kernels.dequant import DEQUANT_MIN_ROWS
    monkeypatch.setattr(quant, "use_triton", lambda x: True)
    monkeypatch.setattr(gemv_tuner, "tuned_tile", lambda x, w, bias, scales, bits, group, *epilogue: pick_tile(
        x.shape[0], w.shape[0], x.shape[1], bits, group))                     # no GPU to time tiles on
    copies = []
    real = quant.dequantize_weight
    monkeypatch.setattr(quant, "dequantize_weight", lambda *args: copies.append(args) or real(*args))
    w, scales, full = _weight(24, 128, bits, 64, torch.Generator().manual_seed(5))
    for rows, expect_copy in ((DEQUANT_MIN_ROWS[bits], True), (3, False)):
        copies.clear()
        x, bias = torch.randn(rows, 128), torch.randn(24)
        got = quant.quant_linear(x, w, scales, bits, 64, bias)
        ref = x.double() @ full.double().T + bias.double()
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
        assert bool(copies) == expect_copy


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("bits,group,dtype,tile", [
    (16, None, torch.float32, Tile(1, 4, 64, rows=True)),
    (8, None, torch.float32, Tile(1, 2, 128, rows=True, prefetch=True)),
    (8, 64, torch.float32, Tile(1, 4, 64, rows=True)),
    (4, 64, torch.float32, Tile(1, 2, 128, rows=True, prefetch=True)),
    (8, None, torch.float16, Tile(1, 8, 128, rows=True, half=True)),
    (8, 64, torch.float16, Tile(1, 2, 64, rows=True, half=True, prefetch=True)),
    (4, 64, torch.float16, Tile(1, 8, 128, rows=True, half=True))])
def test_norm_inside_the_product(bits, group, kind, dtype, tile):
    """A rows tile with the norm before it (`NormFold`): the residual stream x in, W norm(x) + bias +
    residual out, against fp64 LayerNorm / RMSNorm then the product; the norm's bias in the caller's
    bias as W b_norm, the mean's share through c1 = W g. x has a large mean, as residual streams may."""
    from kernels.gemv import NormFold
    g = torch.Generator().manual_seed(5)
    n, k = 37, 384
    w, scales, full = _weight(n, k, bits, group or k, g)
    x = (torch.randn(2, k, generator=g) * 3 + 2).to(dtype)
    gamma, beta = (torch.rand(k, generator=g) + 0.5).to(dtype), torch.randn(k, generator=g).to(dtype)
    bias, residual = torch.randn(n, generator=g).to(dtype), torch.randn(2, n, generator=g).to(dtype)
    xd = x.double()
    if kind == "layer":
        xn = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
        xn = xn * gamma.double() + beta.double()
        c1, folded_bias = (full.double() @ gamma.double()).float(), bias.double() + full.double() @ beta.double()
    else:
        xn = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double()
        c1, folded_bias = None, bias.double()
    w_in = w.to(dtype) if bits == 16 else w
    got = skinny_linear(x, w_in, folded_bias.to(dtype), None if scales is None else scales.to(dtype), bits, group,
                        tile, residual=residual, norm=NormFold(gamma, c1, 1e-5))
    ref = xn @ full.double().T + bias.double() + residual.double()
    assert got.dtype == dtype and got.shape == (2, n)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_norm_needs_a_rows_tile_of_one_split():
    from kernels.gemv import NormFold
    g = torch.Generator().manual_seed(6)
    w, scales, _ = _weight(8, 256, 8, 256, g)
    norm = NormFold(torch.ones(256), None, 1e-5)
    for tile in (Tile(1, 4, 64, split_k=2, rows=True), Tile(1, 4, 64, fma=True)):
        with pytest.raises(ValueError, match="rows tiles of one K split"):
            skinny_linear(torch.randn(1, 256, generator=g), w, None, scales, 8, None, tile, norm=norm)


@pytest.mark.parametrize("bits,group,dtype,tile", [(8, None, torch.float16, Tile(1, 8, 128, rows=True, half=True)),
                                                   (4, 64, torch.float16, Tile(1, 4, 128, rows=True, half=True)),
                                                   (16, None, torch.float32, Tile(1, 4, 64, rows=True))])
def test_norm_whose_weight_is_in_the_product(bits, group, dtype, tile):
    """`NormFold(weight=None)`: the norm's weight already multiplied into W, so x goes in as it is;
    against fp64 LayerNorm (no affine) then W."""
    from kernels.gemv import NormFold
    g = torch.Generator().manual_seed(8)
    n, k = 24, 256
    w, scales, full = _weight(n, k, bits, group or k, g)
    x = (torch.randn(1, k, generator=g) * 2 + 1).to(dtype)
    xd = x.double()
    xn = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    norm = NormFold(None, full.sum(1).float(), 1e-5)
    got = skinny_linear(x, w.to(dtype) if bits == 16 else w, None, None if scales is None else scales.to(dtype), bits,
                        group, tile, norm=norm)
    ref = xn @ full.double().T
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < (1e-5 if dtype == torch.float32 else 5e-3)
