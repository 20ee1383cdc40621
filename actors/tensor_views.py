"""Lazy tensor views that weight loaders narrow, split and transpose like tensors.

- `MappedTensor`: a tensor in a memory-mapped `.pt`/`.bin` file; narrowing is free, and
  `materialize()` counts the bytes it hands out (only those pages are ever read from disk).
- `ConcatTensor`: parts side by side along one dimension: a parameter saved as M shards seen as
  the full tensor. Narrowing it keeps only the parts the slice overlaps, so a rank touches only
  the files that hold its slice.
- `DeferredTensor`: a tensor of known shape whose file is opened only when its bytes are needed.

They share `LazyTensor`'s protocol (`shape`, `dtype`, `dim`, `numel`, `narrow`, `split`, `t`,
`materialize`), so `copy_checked` and the TP weight loaders take any of them.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch


def materialize(view) -> torch.Tensor:
    """A lazy view's tensor (read now), or the tensor itself."""
    return view.materialize() if hasattr(view, "materialize") else view


def split_view(view, sizes: int | list[int], dim: int) -> list:
    """`torch.split` for any view with `shape` and `narrow`."""
    total = view.shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, total - s) for s in range(0, total, sizes)]
    if sum(sizes) != total:
        raise ValueError(f"split sizes {list(sizes)} do not add up to dimension {dim} of size {total}")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [view.narrow(dim, start, size) for start, size in zip(starts, sizes)]


def _checked_narrow(shape: torch.Size, dim: int, start: int, length: int) -> int:
    size = shape[dim]                                # raises IndexError for a bad dim
    start = start + size if start < 0 else start
    if start < 0 or length < 0 or start + length > size:
        raise ValueError(f"narrow({dim}, {start}, {length}) outside dimension of size {size}")
    return start


class _View:
    """What every view derives from `shape` and `narrow`."""
    shape: torch.Size

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def split(self, sizes: int | list[int], dim: int = 0) -> list:
        return split_view(self, sizes, dim)


@dataclass(frozen=True)
class MappedTensor(_View):
    """A (memory-mapped) tensor; `counter.bytes_read` grows by what `materialize` hands out."""
    tensor: torch.Tensor
    counter: object

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def narrow(self, dim: int, start: int, length: int) -> "MappedTensor":
        return MappedTensor(self.tensor.narrow(dim, start, length), self.counter)

    def t(self) -> "MappedTensor":
        return MappedTensor(self.tensor.t(), self.counter)

    def materialize(self) -> torch.Tensor:
        """The view itself (no copy): the caller's copy reads just its pages."""
        self.counter.bytes_read += self.tensor.numel() * self.tensor.element_size()
        return self.tensor

    def __repr__(self) -> str:
        return f"MappedTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


class ConcatTensor(_View):
    """`torch.cat(parts, dim)`, read lazily: narrowing along `dim` keeps only overlapping parts."""

    def __init__(self, parts: list, dim: int):
        if not parts:
            raise ValueError("ConcatTensor needs at least one part")
        first = list(parts[0].shape)
        for part in parts[1:]:
            other = list(part.shape)
            if len(other) != len(first) or other[:dim] + other[dim + 1:] != first[:dim] + first[dim + 1:]:
                raise ValueError(f"cannot concatenate shapes {tuple(first)} and {tuple(other)} along dim {dim}")
        self.parts, self.cat_dim = list(parts), dim
        self.shape = torch.Size(first[:dim] + [sum(p.shape[dim] for p in parts)] + first[dim + 1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def narrow(self, dim: int, start: int, length: int):
        start = _checked_narrow(self.shape, dim, start, length)
        if dim != self.cat_dim:
            return ConcatTensor([p.narrow(dim, start, length) for p in self.parts], self.cat_dim)
        kept, offset = [], 0
        for part in self.parts:
            size = part.shape[dim]
            lo, hi = max(start, offset), min(start + length, offset + size)
            if lo < hi:
                kept.append(part.narrow(dim, lo - offset, hi - lo))
            offset += size
        if not kept:
            return self.parts[0].narrow(dim, 0, 0)
        return kept[0] if len(kept) == 1 else ConcatTensor(kept, dim)

    def t(self) -> "ConcatTensor":
        if self.dim() != 2:
            raise ValueError(f"t() expects a 2-D tensor, this one has {self.dim()} dimensions")
        return ConcatTensor([p.t() for p in self.parts], 1 - self.cat_dim)

    def materialize(self) -> torch.Tensor:
        tensors = [materialize(p) for p in self.parts]
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise ValueError(f"shards of one tensor have different dtypes: {sorted(map(str, dtypes))}")
        return torch.cat(tensors, self.cat_dim)

    def __repr__(self) -> str:
        return f"ConcatTensor({len(self.parts)} parts along {self.cat_dim}, shape={tuple(self.shape)})"


class DeferredTensor(_View):
    """A tensor of known `shape` fetched (file opened, shape checked by `fetch`) only when read.
    Narrows and transposes are recorded and replayed on the fetched view."""

    def __init__(self, shape, fetch: Callable[[], object], ops: tuple = ()):
        self.shape, self.fetch, self.ops = torch.Size(shape), fetch, ops

    @property
    def dtype(self) -> torch.dtype:
        return self.fetch().dtype

    def narrow(self, dim: int, start: int, length: int) -> "DeferredTensor":
        start = _checked_narrow(self.shape, dim, start, length)
        shape = list(self.shape)
        shape[dim] = length
        return DeferredTensor(shape, self.fetch, self.ops + (("narrow", dim, start, length),))

    def t(self) -> "DeferredTensor":
        if self.dim() != 2:
            raise ValueError(f"t() expects a 2-D tensor, this one has {self.dim()} dimensions")
        return DeferredTensor(self.shape[::-1], self.fetch, self.ops + (("t",),))

    def materialize(self) -> torch.Tensor:
        view = self.fetch()
        for op, *args in self.ops:
            view = view.narrow(*args) if op == "narrow" else view.t()
        return materialize(view)

    def __repr__(self) -> str:
        return f"DeferredTensor(shape={tuple(self.shape)})"
