"""A lazy view of one tensor in a safetensors file: narrow, split and transpose it like a tensor,
then `materialize()` reads only the bytes the view covers.

Tensor-parallel weight loaders take the *full* checkpoint tensor and keep their shard with
`.shape`, `.narrow`, `.split` and `.t()`; given a `LazyTensor` they never touch the other ranks' bytes,
with one exception on remote filesystems: a view of more than REMOTE_EXACT_RUNS separate runs (a
row-parallel shard: one run a row) is read as a few blocks spanning its runs, the other ranks' bytes
between them included, since one request a row (thousands a tensor) is what an object store serves
worst. A pre-sharded checkpoint (`save_mp_checkpoint_path`) reads exactly its bytes anywhere.
"""
import math
import mmap
import warnings
from dataclasses import dataclass, replace

import torch
from fsspec.implementations.local import LocalFileSystem

from actors.loader import CheckpointError
from actors.tensor_views import split_view

REMOTE_EXACT_RUNS = 64          # views of more runs than this are read as spanning blocks (not local files)
REMOTE_BLOCK_BYTES = 16 << 20   # the most a spanning block covers; a tensor's blocks go in one cat_ranges

# safetensors dtype names -> torch dtypes (those torch has)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}


class FileReader:
    """Byte ranges of files on one fsspec filesystem, counting every byte fetched and every range
    requested (a GET each on an object store; none for a local file's memory map)."""

    def __init__(self, fs):
        self.fs = fs
        self.bytes_read = 0
        self.requests = 0

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of `path` (the whole file by default); a short read is an error."""
        if start is None:
            self.requests += 1
            return self._fetch(path, lambda: self.fs.cat_file(path))
        return self.read_ranges(path, [start], [end])[0]

    def read_ranges(self, path: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """Several ranges of one file in a single `cat_ranges` call (remote filesystems overlap them)."""
        self.requests += len(starts)
        chunks = self._fetch(path, lambda: self.fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise"))
        for chunk, start, end in zip(chunks, starts, ends):
            if len(chunk) != end - start:
                raise CheckpointError(f"{path}: truncated: bytes [{start}, {end}) requested, {len(chunk)} read")
        return chunks

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def read_box(self, path: str, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
                 starts: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
        """A local file's box of the row-major tensor of `shape` stored at byte `offset`: one strided
        torch copy out of a read-only memory map (fsspec's `cat_ranges` opens the file once a range,
        which took a row-parallel shard's thousands of row pieces at ~0.1 GB/s)."""
        numel = math.prod(shape)
        end = offset + numel * dtype.itemsize

        def copy(buffer) -> torch.Tensor:       # the views die here, before the map closes
            with warnings.catch_warnings():     # read-only: only read here, by the copy
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                stored = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=offset)
            return stored.view(shape)[tuple(slice(s, s + n) for s, n in zip(starts, lengths))].clone()

        def fetch() -> torch.Tensor:
            with open(self.fs._strip_protocol(path), "rb") as f, \
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if end > len(m):
                    raise CheckpointError(f"{path}: truncated: a tensor ends at byte {end}, the file at {len(m)}")
                return copy(m)
        return self._fetch(path, fetch)

    def _fetch(self, path: str, fetch):
        try:
            data = fetch()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{path}: read failed: {e}") from None
        if isinstance(data, torch.Tensor):
            self.bytes_read += data.nbytes
        else:
            self.bytes_read += len(data) if isinstance(data, bytes) else sum(map(len, data))
        return data


@dataclass(frozen=True)
class LazyTensor:
    """A box inside a row-major tensor stored at byte `offset` of `path`, seen through a permutation.

    `starts`/`lengths` give the box in storage coordinates; view dim i is storage dim `perm[i]`.
    """
    reader: FileReader
    path: str
    offset: int                       # byte offset of element 0 of the stored tensor
    dtype: torch.dtype
    storage_shape: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    perm: tuple[int, ...]

    @classmethod
    def stored(cls, reader: FileReader, path: str, offset: int, dtype: torch.dtype, shape) -> "LazyTensor":
        """The whole tensor as stored."""
        shape = tuple(shape)
        return cls(reader, path, offset, dtype, shape, (0,) * len(shape), shape, tuple(range(len(shape))))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.lengths[p] for p in self.perm)

    def dim(self) -> int:
        return len(self.perm)

    def numel(self) -> int:
        return math.prod(self.lengths)

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def narrow(self, dim: int, start: int, length: int) -> "LazyTensor":
        size = self.shape[dim]                       # raises IndexError for a bad dim
        start = start + size if start < 0 else start
        if start < 0 or length < 0 or start + length > size:
            raise ValueError(f"narrow({dim}, {start}, {length}) outside dimension of size {size}")
        d = self.perm[dim]
        starts, lengths = list(self.starts), list(self.lengths)
        starts[d] += start
        lengths[d] = length
        return replace(self, starts=tuple(starts), lengths=tuple(lengths))

    def split(self, sizes: int | list[int], dim: int = 0) -> list["LazyTensor"]:
        """Like `torch.split`: an int is a chunk size, a list gives every part's size."""
        return split_view(self, sizes, dim)

    def t(self) -> "LazyTensor":
        if self.dim() > 2:
            raise ValueError(f"t() expects a tensor with <= 2 dimensions, this one has {self.dim()}")
        return replace(self, perm=self.perm[::-1])

    def materialize(self) -> torch.Tensor:
        """Read the view's bytes into a CPU tensor: from a local file in one strided copy out of a memory
        map, from any other filesystem as one byte range per contiguous run in storage, or, past
        REMOTE_EXACT_RUNS runs, as blocks spanning them (`_spanning_read`)."""
        if self.numel() == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        if self.reader.local:
            box = self.reader.read_box(self.path, self.offset, self.dtype, self.storage_shape, self.starts,
                                       self.lengths)
            return box.permute(self.perm)
        starts, run = self._runs()
        if len(starts) > REMOTE_EXACT_RUNS:
            data = self._spanning_read(starts, run)
        else:
            data = bytearray(b"".join(self.reader.read_ranges(self.path, starts, [s + run for s in starts])))
        box = torch.frombuffer(data, dtype=self.dtype).view(self.lengths)
        return box.permute(self.perm)

    def _spanning_read(self, starts: list[int], run: int) -> bytearray:
        """The runs (ascending byte offsets, `run` bytes each) read as blocks of consecutive runs, each
        block one range from its first run's start to its last run's end (at most REMOTE_BLOCK_BYTES, or
        one run), all in one `cat_ranges` call; the runs are then cut out of the blocks."""
        bounds = [0]                                       # each block's first run, then len(starts)
        for i in range(1, len(starts)):
            if starts[i] + run - starts[bounds[-1]] > REMOTE_BLOCK_BYTES:
                bounds.append(i)
        bounds.append(len(starts))
        firsts = [starts[lo] for lo in bounds[:-1]]
        chunks = self.reader.read_ranges(self.path, firsts, [starts[hi - 1] + run for hi in bounds[1:]])
        out, pos = bytearray(len(starts) * run), 0
        for first, chunk, lo, hi in zip(firsts, chunks, bounds, bounds[1:]):
            view = memoryview(chunk)
            for start in starts[lo:hi]:
                out[pos:pos + run] = view[start - first:start - first + run]
                pos += run
        return out

    def _runs(self) -> tuple[list[int], int]:
        """Byte offsets of the view's contiguous runs in the file, and the bytes in each run.

        Dims after the last partially covered one are whole, so a run spans them; the dims
        before it enumerate the runs: a dim-0 narrow is one run, a dim-1 narrow one per row.
        """
        partial = [d for d in range(len(self.lengths)) if self.lengths[d] != self.storage_shape[d]]
        k = partial[-1] if partial else 0
        strides = [math.prod(self.storage_shape[d + 1:]) for d in range(len(self.storage_shape))]
        offsets = torch.tensor(0, dtype=torch.int64)
        for d in range(k):                           # [lengths[0], ..., lengths[k-1]] element offsets
            index = torch.arange(self.starts[d], self.starts[d] + self.lengths[d])
            offsets = offsets.unsqueeze(-1) + index * strides[d]
        first = (self.starts[k] * strides[k]) if self.lengths else 0
        run = (self.lengths[k] * strides[k]) if self.lengths else 1
        size = self.dtype.itemsize
        return [self.offset + (o + first) * size for o in offsets.flatten().tolist()], run * size

    def __repr__(self) -> str:
        return f"LazyTensor({self.path}, shape={tuple(self.shape)}, dtype={self.dtype})"
