"""The tuner of kernels/gemv.py: which kernel and tile (or cuBLAS, for float weights) runs each
product, timed once per shape on the device at the engine's start-up, as decode runs it, and remembered
per GPU model and Triton version on disk (tables measured on the project's benchmark machines ship
in kernels/tuned/). `streamed_linear` runs the product the way the tuner chose."""
import contextlib
import functools
import itertools
import json
import os
import tempfile
from dataclasses import asdict, replace

import torch
import triton

from kernels.gemv import Tile, pick_tile, skinny_linear

FMA_MAX_ROWS = 2                                         # products the CUDA-core kernel is offered for
TUNED_MAX_ROWS = 64                                      # products of more rows (prefill) are never timed
SWAP_SHAPES = [(64, 128, 4), (64, 256, 3), (128, 128, 4), (128, 64, 6)]   # (block_n, block_k, stages)
HALF_SHAPES = [(16, 512, 4), (32, 256, 4), (16, 1024, 8), (32, 512, 8)]   # (block_n, block_k, warps), int4 fp16
# int8's: the same 32-bit words per row (four columns a word instead of eight)
HALF_SHAPES_INT8 = [(block_n, block_k // 2, warps) for block_n, block_k, warps in HALF_SHAPES]
ROWS_L2_BYTES = 1 << 20                                  # `rows` tiles' L2 request: a row's whole K slice
# Products of smaller weights are never timed (`_untuned`): at 3 TB/s 2 MiB stream in 0.7 us, so the best
# tile saves a microsecond at most, and timing one shape compiles dozens of tiles (the 320-id LM head
# of serve_apps' demo vocabulary cost seven shapes' worth of start-up, bench/results/*-serve-tp1.json).
# The tests set it to 0, so that their tiny models' products still run (and check) the tuned kernels.
TUNE_MIN_BYTES = int(os.environ.get("RAYSPEED_GEMV_TUNE_MIN_BYTES", str(2 << 20)))


def candidates(m: int, k: int, bits: int, group_size: int, x_dtype: torch.dtype) -> list[Tile]:
    """Tiles the tuner times for an m-row product (few compile variants: split-K is a run-time value).
    Up to FMA_MAX_ROWS rows also the CUDA-core kernel, tiles of 4 to 16 KB of weights with at most
    8k stored elements (bytes at 4 bits), and for int4 and int8 against fp16 x its packed-fp16 `half`
    tiles, in the shapes whose sm_90 builds keep the loop in registers (fewer columns than threads;
    tests/kernels/test_sm90_builds.py), and `rows` tiles (`rows_candidates`). Quantized weights also
    get wide tensor-core tiles dequantized in registers, which may span K-groups."""
    tiles = []
    if m <= FMA_MAX_ROWS:
        for block_k, block_n in itertools.product((256, 512, 1024, 2048, 4096), (2, 4, 8)):
            stored = block_n * block_k // (2 if bits == 4 else 1)          # weight elements in memory
            if block_k > k or not 4096 <= stored * max(1, bits // 8) <= 16384 or stored > 8192:
                continue
            for split_k in (1, 2, 4):
                if split_k == 1 or k >= 2 * block_k * split_k:
                    tiles.append(Tile(1, block_n, block_k, split_k, fma=True))
        vector = 32 if bits == 4 else 16                 # columns in 16 bytes of weights
        half_ok = bits in (4, 8) and x_dtype == torch.float16 and k % vector == 0
        for block_n, block_k, num_warps in (HALF_SHAPES if bits == 4 else HALF_SHAPES_INT8) if half_ok else ():
            sub = min(block_k, group_size)
            if block_k > k or sub % vector or block_k % sub or group_size % sub:
                continue
            for split_k in (1, 2, 4):
                if split_k == 1 or k >= 2 * block_k * split_k:
                    tiles.append(Tile(1, block_n, block_k, split_k, num_warps, fma=True, half=True))
        tiles += rows_candidates(k, bits, group_size, x_dtype)
    block_m = 16 if m <= 16 else min(64, triton.next_power_of_2(m))
    shapes = [(32, 128, False), (64, 128, False), (32, 256, False), (64, 256, False)]
    if bits < 16:
        shapes += [(32, 256, True), (64, 256, True), (32, 512, True)]
    for block_n, block_k, in_tile in shapes:
        if group_size < k and group_size % block_k and not in_tile:
            continue
        for split_k in (1, 2, 4, 8, 16):
            if k >= block_k * split_k:
                tiles.append(Tile(block_m, block_n, block_k, split_k, scale_in_tile=in_tile))
    if m > FMA_MAX_ROWS and bits in (16, 8):
        for block_n, block_k, stages in SWAP_SHAPES:
            if group_size < k and group_size % block_k:
                continue
            for split_k in (1, 2, 4, 8):
                if k >= block_k * split_k:
                    tiles.append(Tile(block_m, block_n, block_k, split_k, num_stages=stages, swap=True))
    return tiles


def rows_candidates(k: int, bits: int, group_size: int, x_dtype: torch.dtype) -> list[Tile]:
    """`rows` tiles (kernels/gemv_rows.py) for one-row products: 4 or 8 rows a thread, K tiles of one
    vector a thread for 1, 2 or 4 warps (two for 1 warp), split K 1-4; for int4 and int8 against fp16
    x also in packed fp16 arithmetic. Vectors are 8 columns (16 bytes of fp16, 8 of int8, 4 of int4)
    and 16 bytes in packed fp16."""
    tiles = []
    half_ok = bits in (4, 8) and x_dtype == torch.float16 and k % (32 if bits == 4 else 16) == 0
    for half in (False, True) if half_ok else (False,):
        vector = {(4, True): 32, (8, True): 16}.get((bits, half), 8)       # columns per thread vector
        for num_warps, block_k in ((1, 32 * vector), (1, 64 * vector), (2, 64 * vector), (4, 128 * vector)):
            sub = min(block_k, group_size)
            if block_k > k or sub % vector or block_k % sub or group_size % sub:
                continue
            for rows, split_k in itertools.product((4, 8), (1, 2, 4)):
                if split_k == 1 or k >= 2 * block_k * split_k:
                    tiles.append(Tile(1, rows, block_k, split_k, num_warps, half=half, rows=True))
    return tiles


def rows_twins(tile: Tile) -> list[Tile]:
    """What a winning `rows` tile is timed against once more: itself with its next tile prefetched,
    and with its K slice asked of L2 before the PDL wait."""
    return [replace(tile, prefetch=True), replace(tile, l2_rows=ROWS_L2_BYTES)]


CUBLAS = "cublas"                                        # the tuner's verdict when torch's matmul wins
_window = 0                                              # > 0 inside `tuning_window`


@contextlib.contextmanager
def tuning_window():
    """The only time the tuner times anything: the engine's start-up (ModelRunner.tune_kernels), so a
    request never waits on it; outside, a product without a cached choice runs the untuned default."""
    global _window
    _window += 1
    try:
        yield
    finally:
        _window -= 1


class _Choices:
    """Tuned choices by product, kept in memory and on disk per GPU model and Triton version
    ($RAYSPEED_CACHE/gemv/, default ~/.cache/rayspeed), so later starts time nothing. Tables
    measured on the project's benchmark machines ship in kernels/tuned/ and are read first."""

    def __init__(self):
        self.memory: dict[tuple, "Tile | str"] = {}
        self.disk: dict[str, dict] | None = None

    VERSION = 2                                          # bumped when the candidates change: old tables retire

    @classmethod
    def _name(cls, gpu: str) -> str:
        return f"{gpu.replace(' ', '-').replace('/', '-')}-triton-{triton.__version__}-v{cls.VERSION}.json"

    @classmethod
    def _path(cls, gpu: str) -> str:
        root = os.environ.get("RAYSPEED_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rayspeed"))
        return os.path.join(root, "gemv", cls._name(gpu))

    @classmethod
    def _read(cls, gpu: str) -> dict:
        table = {}
        paths = [cls._path(gpu)]
        if os.environ.get("RAYSPEED_GEMV_SHIPPED", "1") != "0":          # 0: time everything anew (bench/tune.py)
            paths.insert(0, os.path.join(os.path.dirname(__file__), "tuned", cls._name(gpu)))
        for path in paths:
            try:
                with open(path) as f:
                    table.update(json.load(f))
            except (OSError, ValueError):
                pass
        return table

    def get(self, key: tuple, gpu: str) -> "Tile | str | None":
        """`key`'s choice; its last element (the device) is left out on disk, `gpu` names the file."""
        if key in self.memory:
            return self.memory[key]
        if self.disk is None:
            self.disk = self._read(gpu)
        found = self.disk.get(repr(key[:-1]))
        if found is not None:
            try:
                self.memory[key] = CUBLAS if found == CUBLAS else Tile(**found)
            except TypeError:                            # written by another version of Tile: time again
                pass
        return self.memory.get(key)

    def put(self, key: tuple, gpu: str, choice: "Tile | str") -> None:
        self.memory[key] = choice
        if self.disk is None:
            self.disk = self._read(gpu)
        self.disk[repr(key[:-1])] = choice if choice == CUBLAS else asdict(choice)
        path = self._path(gpu)
        try:                  # atomic: TP ranks, and pods sharing the cache's volume, may write at once
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".")
            with os.fdopen(fd, "w") as f:
                json.dump(self.disk, f, indent=0)
            os.replace(tmp, path)
        except OSError:
            pass                                         # a read-only home only costs re-tuning


_choices = _Choices()


@functools.cache
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)   # 50 MB: H100, H200


def time_in_graph(launch, copies: int, reps: int = 32) -> float:
    """Milliseconds per call of `launch(i)`, i cycling over `copies` (of the weights), the way decode
    runs a product: `reps` calls captured in one CUDA graph, so each kernel launches (with programmatic
    dependent launch where it uses it) behind the previous one, whose weights just left L2."""
    for i in range(copies):                              # compiles, and raises for a tile that does not fit
        launch(i)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(reps):
            launch(r % copies)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[1]


def _untuned(m: int, n: int, k: int, bits: int, group: int, float_weights: bool) -> "Tile | str":
    """The choice without timing: cuBLAS for float weights past FMA_MAX_ROWS rows or under
    TUNE_MIN_BYTES, else the heuristic tile."""
    return CUBLAS if float_weights and (m > FMA_MAX_ROWS or _small(n, k, bits)) else pick_tile(m, n, k, bits, group)


def _small(n: int, k: int, bits: int) -> bool:
    """Whether an [n, k] weight of `bits` is under TUNE_MIN_BYTES (never timed)."""
    return n * k * bits // 8 < TUNE_MIN_BYTES


def tuned_tile(x: torch.Tensor, weight: torch.Tensor, bias, scales, bits: int, group_size: int | None,
               activation: str | None, residual, torch_path=None) -> "Tile | str":
    """The fastest way to run this product, measured once per (rows rounded up to a power of two,
    shape, format, epilogue) as decode runs it (`time_in_graph`, over enough copies of the
    weights that none is in L2): a tile, or `CUBLAS` when `torch_path(x, weight)` (the same product
    in torch, offered for float weights) is faster. A CUDA-core winner is timed once more with
    `prefetch`, then the better of the two with `x_per_row` (one compile each instead of doubling the
    grid); a `rows` winner with `prefetch` and with its K slice asked of L2 (`l2_rows`); a
    swapped-operand winner once more with its rows' first two K tiles asked of L2 before its PDL
    wait (`l2_rows`). More than TUNED_MAX_ROWS rows (prefill) are never timed: the heuristic tile.
    Outside `tuning_window`, while a CUDA graph is being captured, with RAYSPEED_GEMV_TUNE=0, or for a
    weight under TUNE_MIN_BYTES, nothing is timed: the cached choice, else `_untuned`."""
    k = x.shape[-1]
    m, n = x.numel() // k, weight.shape[0]
    group = group_size or k
    if m > TUNED_MAX_ROWS:                               # prefill sizes vary: never time on the request path
        return _untuned(m, n, k, bits, group, torch_path is not None)
    key = (triton.next_power_of_2(m), n, k, bits, group, str(x.dtype), bias is not None, activation,
           residual is not None, x.device)
    gpu = _gpu_name(x.device)
    cached = _choices.get(key, gpu)
    if cached is not None:
        return cached
    if not _window or os.environ.get("RAYSPEED_GEMV_TUNE", "1") == "0" or torch.cuda.is_current_stream_capturing() \
            or _small(n, k, bits):
        return _untuned(m, n, k, bits, group, torch_path is not None)
    tiles = candidates(m, k, bits, group, x.dtype) or [pick_tile(m, n, k, bits, group)]   # small K: none fit
    nbytes = weight.numel() * weight.element_size()
    copies = max(1, min(16, -(-2 * _l2_bytes(x.device) // nbytes)))       # twice L2 streamed per cycle
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    scale_copies = [scales] + [None if scales is None else scales.clone() for _ in range(copies - 1)]
    timings = {}

    def measure(choice, launch) -> None:
        try:
            timings[choice] = time_in_graph(launch, copies)
        except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError):
            pass                                         # a tile too large for this GPU's shared memory

    def measure_tile(tile: Tile) -> None:
        measure(tile, lambda i: skinny_linear(x, weights[i], bias, scale_copies[i], bits, group_size, tile,
                                              activation, residual))

    for tile in tiles:
        measure_tile(tile)
    if torch_path is not None:
        measure(CUBLAS, lambda i: torch_path(x, weights[i]))
    choice = min(timings, key=timings.get)
    if choice != CUBLAS and choice.fma:                  # the winner again with its next tile prefetched
        measure_tile(replace(choice, prefetch=True))
        choice = min(timings, key=timings.get)
        measure_tile(replace(choice, x_per_row=True))    # and with x loaded in the weights' layout
        choice = min(timings, key=timings.get)
    if choice != CUBLAS and choice.rows:               # a rows winner prefetching, and with its slice in L2
        for twin in rows_twins(choice):
            measure_tile(twin)
        choice = min(timings, key=timings.get)
    if choice != CUBLAS and choice.swap:
        measure_tile(replace(choice, l2_rows=2 * choice.block_k * bits // 8))
        choice = min(timings, key=timings.get)
    _choices.put(key, gpu, choice)
    return choice


def streamed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    scales: torch.Tensor | None = None, bits: int = 16, group_size: int | None = None,
                    activation: str | None = None, residual: torch.Tensor | None = None, torch_path=None,
                    norm=None):
    """`skinny_linear` with the tuner's tile, or `torch_path(x, weight)` (the same product in torch,
    offered for float weights) where the tuner measured that faster. `norm` (a `NormFold`) only
    where the tile takes it (`_Linear.norm_fold` asks first)."""
    tile = tuned_tile(x, weight, bias, scales, bits, group_size, activation, residual, torch_path)
    if tile == CUBLAS:
        assert norm is None, "cuBLAS does not take the norm before it"
        return torch_path(x, weight)
    return skinny_linear(x, weight, bias, scales, bits, group_size, tile, activation, residual, norm)
