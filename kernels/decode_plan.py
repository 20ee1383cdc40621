"""How decode attention runs a step (`kernels.attention.paged_decode_attention_triton`): how
many programs share each (head, sequence) pair's context, how many cache positions each reads a loop
step and when (before or after its PDL wait), in how many warps, and whether one chunk holds every
context. The choices and the measurements behind them; the kernel itself is in kernels/attention.py.
The narrow block-table widths the decode graphs capture (`NARROW_CONTEXTS`, actors/cuda_graphs.py)
are what let the host bound a step's contexts."""
import functools
import os
from typing import NamedTuple

import torch


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# chunk reads: in the loop / first before the wait / one ahead / first before the wait and the next
# L2_AHEAD_CHUNKS asked of the L2 then (Hopper)
DECODE_MODES = ("plain", "early", "prefetch", "early-l2")
L2_AHEAD_CHUNKS = 4
FEW_PAIRS = 32
WHOLE_CONTEXT = 128                     # host-known contexts in (64, 128]: one chunk of them all, read before the wait
SMALL_CHUNK_CONTEXTS = (128, 256)       # (exclusive, inclusive) bounds on a step's host-known context
NARROW_CONTEXTS = (WHOLE_CONTEXT // 2, WHOLE_CONTEXT, SMALL_CHUNK_CONTEXTS[1])   # the decode graphs' narrow tables
# the longest context read whole (`decode_chunk`): 128, 256 or 0 (never); RAYSPEED_WHOLE_CONTEXT sets it
WHOLE_UP_TO = int(os.environ.get("RAYSPEED_WHOLE_CONTEXT", str(SMALL_CHUNK_CONTEXTS[1])))
assert WHOLE_UP_TO in (0, WHOLE_CONTEXT, SMALL_CHUNK_CONTEXTS[1]), \
    f"RAYSPEED_WHOLE_CONTEXT must be 0, {WHOLE_CONTEXT} or {SMALL_CHUNK_CONTEXTS[1]}, got {WHOLE_UP_TO}"


def decode_chunk(programs: int, device: torch.device, l2_ahead: bool = False, pairs: int | None = None,
                 max_context: int | None = None, head_dim: int = 128) -> tuple[int, str, int]:
    """(cache positions per loop step, mode, warps) for `_paged_decode_kernel`, by grid size (`programs`,
    splits included; `pairs`: the step's (head, sequence) pairs; `max_context`: a host bound on its
    contexts, None if unknown). Timed in
    CUDA graphs on an H100 (bench/attention_sweep.py --decode-configs, *-decode-configs-attention*.json;
    GPT-Neo's 20 heads of 128, contexts 96 / 160 / 512, every chunk, mode and warp count): the first
    chunk read before the PDL wait and each next one after the current one is used ("early") beat
    reading every chunk in the loop at every batch and context, and matched or beat reading the next
    one ahead ("prefetch", ~80 more registers a thread) in 11 of 12 cases at batch 1 to 8. Grids of up
    to 3 programs per SM (batch 1 to ~19 at 20 heads) read 64 positions a step, early, with 4 warps
    (batch 1: 3.64 / 4.56 / 7.56 us a layer against 3.82 / 4.65 / 7.72 with prefetch; batch 8 6.74 /
    9.11 / 19.06 against 7.10 / 9.55 / 19.52); larger grids (batch 32) 16 positions in programs of 2
    warps: 13.9 / 21.5 / 67.7 us against 15.8 / 23.3 / 65.7 for 32 positions read in the loop by 4
    warps, the choice before (a decode step at batch 32 3.06-3.30 ms against 3.37-3.48,
    `*-neo-attn-*.json`), and splitting their contexts did not help (`*-attention-splits.json`).
    With `l2_ahead`, grids of at most one program per SM also ask the L2 for the chunks after the
    first before the wait ("early-l2", Hopper): GPT-Neo 2.7B's batch-1 decode graph at 100 / 150
    positions took 2.248 / 2.302 -> 2.224 / 2.263 ms in fp16 and 1.491 / 1.544 -> 1.474 / 1.517 in
    int8, but 1.607 / 1.665 -> 1.637 / 1.682 in int4 (`*-whatif-bs1-ctx*-configs.json`), whose split-K
    products end in a short reduction kernel, so the work before the wait is not hidden behind the
    product before attention (the model passes it for float and int8 weights); at batch 8 (160
    programs) it cost fp16 2.585 -> 2.594 and int8 2.222 -> 2.233 ms (`*-whatif-bs8-ctx120-configs.json`).
    Steps of at most FEW_PAIRS (head, sequence) pairs (batch 1 of up to 32 heads) whose contexts are
    known on the host to lie within SMALL_CHUNK_CONTEXTS (`max_context`: the narrow decode graphs of
    actors/cuda_graphs.py, or an eager step's table width) read 16 positions a step in programs of 2
    warps, early, which lets their contexts split over several programs (`SPLIT_MIN_CHUNKS` chunks of
    16). GPT-Neo 2.7B's batch-1 decode graph, 64 positions early-l2 with 4 warps unsplit (int4: early)
    against that, at 130 / 250 positions (`*-whatif-bs1-ctx40_130_250-configs.json`, H100): fp16 2.254
    / 2.357 -> 2.234 / 2.237 ms, int8+head 1.469 / 1.525 -> 1.460 / 1.464, int4+head 1.601 / 1.667 ->
    1.560 / 1.537; but at 40 / 100 positions fp16 2.188 / 2.219 -> 2.223 / 2.229 and int8+head 1.381 /
    1.442 -> 1.437 / 1.458 (`*-whatif-bs1-ctx40_100-configs.json`), so shorter contexts keep the one
    64-position chunk, and longer ones (whose tables the host does not bound) the split 64-position
    reads. Those same few-pair steps with contexts known to lie within (64, WHOLE_UP_TO] (heads of up
    to 128) read the whole context as one chunk before the wait (WHOLE: 128 positions in 4 warps; 256
    in 16, with `l2_ahead`): after the wait only the query and this step's key and value are read,
    where 64-position chunks put a dependent read of the block table and the cache on every program's
    path per chunk. Decode graph replays at 100 positions (H100, `*-whatif-bs1-ctx100_150-configs-
    whole-*.json`), 128 in 8 warps: int8+head 1.4435 -> 1.4105 ms, fp16 2.2224 -> 2.1806, int4+head
    1.5686 -> 1.5280; in 4 warps (184 registers, no spills) int8+head 1.409 -> 1.393
    (`*-whatif-bs1-ctx60_100-configs.json`, ninth session); at 60 positions, which one 64-position
    chunk holds, 128 lost (1.382 -> 1.398, 1.352 -> 1.389 in 4 warps), hence the graphs' 64-position
    bound. 256 in 16 warps at 150 / 200 positions: int8+head 1.448 / 1.453 -> 1.434 / 1.439, fp16
    2.236 -> 2.230 at 150 (`*-ctx100_150_200-configs-whole-cfaee54.json`; 8 warps, 196 registers, lost:
    1.539), and decode attention added 5.33 us a layer to the step against 5.94 for the 16-position
    splits (bench/profile_step.py --graph, 150 positions); int4's lost (1.573 -> 1.589), so it needs
    `l2_ahead`. RAYSPEED_WHOLE_CONTEXT (0, 128 or 256) bounds it.
    RAYSPEED_DECODE_CONFIG="chunk,mode,warps" sets it."""
    forced = os.environ.get("RAYSPEED_DECODE_CONFIG")
    if forced:
        chunk, mode, warps = forced.split(",")
        assert mode in DECODE_MODES, f"RAYSPEED_DECODE_CONFIG mode must be one of {DECODE_MODES}, got {mode}"
        return int(chunk), mode, int(warps)
    if device.type != "cuda":
        return 64, "early", 4
    low, high = SMALL_CHUNK_CONTEXTS
    if pairs is not None and pairs <= FEW_PAIRS and max_context is not None:
        longest = min(WHOLE_UP_TO, high if l2_ahead else WHOLE_CONTEXT)   # int4's 256 in 16 warps lost
        if WHOLE_CONTEXT // 2 < max_context <= longest and head_dim <= 128:
            whole = WHOLE_CONTEXT if max_context <= WHOLE_CONTEXT else high
            return whole, "early-l2" if l2_ahead else "early", 4 if whole == WHOLE_CONTEXT else 16
        if low < max_context <= high:
            return 16, "early", 2
    sms = sm_count(device.index or 0)
    if programs <= 3 * sms:
        return 64, "early-l2" if l2_ahead and programs <= sms else "early", 4
    return 16, "early", 2


MAX_SPLITS = 16
SPLIT_MIN_CHUNKS = 4      # a context of at most this many loop steps stays with one program


def decode_splits(pairs: int, device: torch.device) -> int:
    """Programs per (head, sequence): a power of two that brings a grid of `pairs` programs up to
    two per SM (at batch 1 a model's heads alone leave most SMs idle, each walking its whole context);
    RAYSPEED_DECODE_SPLITS sets it (1: off)."""
    forced = os.environ.get("RAYSPEED_DECODE_SPLITS")
    if forced:
        splits = int(forced)
        assert splits >= 1 and splits & (splits - 1) == 0 and splits <= MAX_SPLITS, \
            f"RAYSPEED_DECODE_SPLITS must be a power of two from 1 to {MAX_SPLITS}, got {forced}"
        return splits
    if device.type != "cuda":
        return 1
    target, splits = 2 * sm_count(device.index or 0), 1
    while pairs * splits * 2 <= target and splits < MAX_SPLITS:
        splits *= 2
    return splits


class DecodePlan(NamedTuple):
    splits: int     # programs per (head, sequence)
    chunk: int      # cache positions a loop step
    mode: str       # one of DECODE_MODES
    warps: int
    whole: bool     # every context is the one chunk read before the wait (the kernel's WHOLE)


def decode_plan(pairs: int, device: torch.device, l2_ahead: bool, max_context: int | None, head_dim: int,
                block_size: int, can_split: bool = True) -> DecodePlan:
    """How `paged_decode_attention_triton` runs a step of `pairs` (head, sequence) pairs: `decode_splits`
    programs a pair unless no context (at most `max_context`, None: unknown) spans more than
    SPLIT_MIN_CHUNKS chunks of the split grid's configuration, then `decode_chunk`'s configuration for
    the grid kept. The same `l2_ahead` decides both: asked without it, a step meant to read its 256
    positions whole in 16 warps was split 8 ways and read them in a loop instead, 160 programs of 16
    warps for 132 SMs (+0.25 ms an int8+head step on 0313bee, when 256 was not yet the default)."""
    splits = decode_splits(pairs, device) if can_split else 1
    if splits > 1 and max_context is not None:        # no context long enough to split: no idle programs
        chunk = max(block_size, decode_chunk(pairs * splits, device, l2_ahead, pairs, max_context, head_dim)[0])
        splits = 1 if max_context <= SPLIT_MIN_CHUNKS * chunk else splits
    chunk, mode, warps = decode_chunk(pairs * splits, device, l2_ahead, pairs, max_context, head_dim)
    chunk = max(block_size, chunk)
    whole = splits == 1 and mode in ("early", "early-l2") and max_context is not None and max_context <= chunk
    return DecodePlan(splits, chunk, mode, warps, whole)
