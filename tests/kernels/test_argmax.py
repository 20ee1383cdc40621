"""The split argmax against torch.argmax (TRITON_INTERPRET=1 on CPU): first index on ties, within a
part and across parts, rows of -inf (stop tokens masked), widths below, at and past one part."""
import pytest
import torch

from kernels import argmax
from kernels.argmax import PART


@pytest.mark.parametrize("rows,n", [(1, 50257), (3, 2 * PART), (2, 7), (4, PART + 1), (1, 1)])
def test_split_argmax_equals_torch(rows, n, monkeypatch):
    monkeypatch.setattr(argmax, "use_triton", lambda x: True)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=g)
    if n > 5:
        x[0, [5, n - 1]] = 100.0                                   # a tie: the first wins
    if rows > 1:
        x[1] = float("-inf")                                       # every token masked: index 0
    if rows > 2 and n > PART:
        x[2, [PART - 1, PART, n - 1]] = 50.0                        # a tie across two parts
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))


def test_split_argmax_reads_strided_rows_and_half(monkeypatch):
    monkeypatch.setattr(argmax, "use_triton", lambda x: True)
    x = torch.randn(3, 3000, generator=torch.Generator().manual_seed(1)).half()
    view = x[:, :2500]                                             # row stride 3000, 2500 columns
    assert torch.equal(argmax.argmax_rows(view), view.argmax(dim=-1))
