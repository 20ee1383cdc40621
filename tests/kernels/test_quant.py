"""kernels/quant.py: the storage format, error bounds per group, DeepSpeed MoQ row-group semantics,
and the quantized parallel linears (loaders, shapes, errors)."""
import pytest
import torch
import torch.nn.functional as F

from kernels.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                            RowParallelLinear, TensorParallel)
from kernels.quant import (QuantSpec, dequantize, pack_int4, quant_linear, quantize, quantize_row_groups,
                           unpack_int4)


def weight(n=48, k=64, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("bits, group_size", [(8, 64), (8, 16), (4, 32), (4, 8)])
def test_dequantize_error_is_at_most_half_a_scale_per_group(bits, group_size):
    w = weight()
    q, scales = quantize(w, bits, group_size)
    assert scales.shape == (48, 64 // group_size)
    assert q.shape == ((48, 64) if bits == 8 else (48, 32))
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    per_element = scales.repeat_interleave(group_size, dim=1)
    assert ((w - dequantize(q, scales, bits, group_size)).abs() <= per_element / 2 + 1e-7).all()
    codes = q if bits == 8 else unpack_int4(q)
    qmax = 127 if bits == 8 else 7
    assert codes.abs().max() == qmax and codes.min() >= -qmax          # symmetric; -8 never produced


def test_int4_packing_round_trip_and_nibble_order():
    q = torch.randint(-8, 8, (5, 10), generator=torch.Generator().manual_seed(1))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 5)
    assert torch.equal(unpack_int4(packed), q.to(torch.int8))
    assert (packed[0, 0] & 0xF) == q[0, 0] + 8 and (packed[0, 0] >> 4) == q[0, 1] + 8   # 2j low, 2j+1 high


@pytest.mark.parametrize("groups", [1, 2, 6, 48])
def test_row_groups_are_deepspeeds_reshape_groups(groups):
    w = weight()
    q, scales = quantize_row_groups(w, groups)
    assert q.dtype == torch.int8 and scales.shape == (48, 1)
    expected = w.reshape(groups, -1).abs().amax(-1) / 127                # DeepSpeed: weight.reshape(groups, -1)
    assert torch.allclose(scales.view(groups, -1), expected[:, None].expand(groups, 48 // groups))
    assert ((w - dequantize(q, scales, 8, 64)).abs() <= scales / 2 + 1e-7).all()


def test_row_groups_must_divide_the_rows():
    with pytest.raises(ValueError, match="quantize_groups=5 does not divide the 48 output rows"):
        quantize_row_groups(weight(), 5)


def test_mlp_extra_grouping_doubles_the_mlp_groups_only():
    spec = QuantSpec(8, row_groups=4, mlp_extra_grouping=True)
    assert spec.for_mlp().row_groups == 8 and spec.row_groups == 4
    assert QuantSpec(8, row_groups=4).for_mlp().row_groups == 4


@pytest.mark.parametrize("bits, group_size", [(8, 64), (4, 16)])
def test_quant_linear_is_the_float_matmul_of_the_dequantized_weight(bits, group_size):
    w, x = weight(), torch.randn(3, 64)
    q, scales = quantize(w, bits, group_size)
    bias = torch.randn(48)
    expected = F.linear(x, dequantize(q, scales, bits, group_size), bias)
    assert torch.allclose(quant_linear(x, q, scales, bits, group_size, bias), expected)
    err = rel_err(quant_linear(x, q, scales, bits, group_size), x @ w.t())        # vs fp32: measured 0.008 / 0.11
    assert err < (0.02 if bits == 8 else 0.2)


@pytest.mark.parametrize("quant", [QuantSpec(8), QuantSpec(8, row_groups=2), QuantSpec(4, group_size=16)])
def test_parallel_linears_quantize_their_shard(quant):
    x = torch.randn(2, 64)
    col = ColumnParallelLinear(64, 96, False, TensorParallel(1, 2), torch.float32, quant)
    full = weight(96, 64)
    col.load_float_weight(full)                       # rank 1 keeps rows 48..95
    assert not hasattr(col, "weight")
    assert col.qweight.tp_dim == 0 and col.scales.tp_dim == 0 and callable(col.qweight.weight_loader)
    assert rel_err(col(x), x @ full[48:].t()) < 0.2
    row = RowParallelLinear(64, 32, False, TensorParallel(0, 2), torch.float32, quant)
    full = weight(32, 64)
    row.load_float_weight(full)
    assert row.qweight.tp_dim == 1 and row.scales.tp_dim == 1
    assert rel_err(row._matmul(x[:, :32]), x[:, :32] @ full[:, :32].t()) < 0.2    # rank 0: columns 0..31


def test_each_part_of_a_fused_layer_is_quantized_on_its_own():
    """q, k, v get their own row groups (and scales) whether the checkpoint fuses them or not."""
    quant = QuantSpec(8, row_groups=1)
    qkv = QKVParallelLinear(64, 16, 4, 2, False, TensorParallel(), torch.float32, quant)
    parts = [weight(64, 64, 0), weight(32, 64, 1) * 10, weight(32, 64, 2) * 100]
    for part, name in zip(parts, "qkv"):
        qkv.load_float_weight(part, name)
    fused = QKVParallelLinear(64, 16, 4, 2, False, TensorParallel(), torch.float32, quant)
    fused.load_float_weight(torch.cat(parts))
    assert torch.equal(fused.qweight, qkv.qweight) and torch.equal(fused.scales, qkv.scales)
    assert [qkv.scales[i, 0].item() for i in (0, 64, 96)] == \
           [pytest.approx(p.abs().max().item() / 127) for p in parts]
    merged = MergedColumnParallelLinear(64, [32, 32], False, TensorParallel(), torch.float32, quant)
    merged.load_float_weight(torch.cat(parts[1:]))
    assert merged.scales[0, 0] != merged.scales[32, 0]


@pytest.mark.parametrize("layer, quant, match", [
    (lambda q: QKVParallelLinear(64, 16, 4, 2, False, TensorParallel(0, 2), torch.float32, q),
     QuantSpec(8, row_groups=3), "quantize_groups=3 does not divide the 32 output rows"),
    (lambda q: RowParallelLinear(192, 64, False, TensorParallel(0, 2), torch.float32, q),
     QuantSpec(4, group_size=128), "group_size=128 does not divide this rank's 96 input features"),
])
def test_groups_that_do_not_divide_name_the_layer_and_sizes(layer, quant, match):
    with pytest.raises(ValueError, match=match):
        layer(quant)


def test_float_layers_are_unchanged():
    layer = ColumnParallelLinear(64, 32, True, TensorParallel(), torch.float32)
    assert not hasattr(layer, "qweight") and layer.quant is None
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}


@pytest.mark.parametrize("quant,rows,path", [(None, 32, "streamed"), (None, 64, "streamed"), (None, 65, "torch"),
                                             (QuantSpec(4, 64), 16, "streamed"), (QuantSpec(4, 64), 32, "dequant"),
                                             (QuantSpec(8), 128, "streamed"), (QuantSpec(8), 129, "dequant")])
def test_kernel_dispatch_by_rows_and_format(quant, rows, path, monkeypatch):
    """On a GPU (use_triton patched in): float products up to SKINNY_MAX_ROWS rows (decode batches) go to
    the tuner, which may still pick cuBLAS; quantized ones below their DEQUANT_MIN_ROWS, past which one
    float copy of the weight feeds cuBLAS (int4 from 17 rows, int8 from 129)."""
    import kernels.linear as linear
    taken = []
    monkeypatch.setattr(linear, "use_triton", lambda x: True)
    monkeypatch.setattr(linear, "streamed_linear", lambda *args, **kw: taken.append("streamed"))
    monkeypatch.setattr(linear, "quant_linear", lambda *args, **kw: taken.append("dequant") or args[0])
    monkeypatch.setattr(linear.F, "linear", lambda *args, **kw: taken.append("torch") or args[0])
    layer = ColumnParallelLinear(128, 64, False, TensorParallel(), torch.float32, quant=quant)
    layer(torch.zeros(rows, 128))
    assert taken == [path]
