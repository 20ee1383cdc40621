"""A sampled next token per row in one kernel: the Gumbel-max trick. argmax_i (l_i / T + G_i), G_i
i.i.d. Gumbel(0, 1), picks token i with probability softmax(l / T)_i; restricted to tokens whose logit
reaches the row's top-k floor (its k-th largest), it samples the top-k renormalised distribution. So
temperature and top-k need no softmax, sort or second pass, where the torch path takes about eight
kernels a step (actors/sampler.py). Top-p needs the sorted cumulative probabilities and stays there."""
import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_pick_kernel(logits_ptr, inv_temp_ptr, floor_ptr, out_ptr, vocab, stride, seed, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    inv_temp = tl.load(inv_temp_ptr + row)
    floor = tl.load(floor_ptr + row)
    best = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)
    best_index = tl.argmax(tl.zeros((BLOCK,), tl.float32), axis=0)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        logits = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=mask, other=float("-inf"))
        uniform = tl.maximum(tl.rand(seed, row * vocab + cols), 1e-30)            # [0, 1) -> (0, 1)
        score = tl.where(mask & (logits >= floor), logits * inv_temp - tl.log(-tl.log(uniform)), float("-inf"))
        top = tl.max(score, axis=0)
        index = start + tl.argmax(score, axis=0)
        best_index = tl.where(top > best, index, best_index)
        best = tl.maximum(top, best)
    tl.store(out_ptr + row, best_index.to(tl.int64))


def gumbel_pick(logits: torch.Tensor, temperatures: torch.Tensor, floors: torch.Tensor, seed: int) -> torch.Tensor:
    """One token per row of fp32 logits [rows, vocab]: drawn from softmax(logits / temperature) over the
    tokens whose logit is at least the row's floor (-inf: all of them). temperatures, floors: [rows]
    fp32 on the logits' device; `seed` picks the random stream (the same seed, the same draws)."""
    rows, vocab = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1, "logits: fp32, contiguous rows"
    assert temperatures.shape == floors.shape == (rows,), f"temperatures and floors must be [{rows}]"
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _gumbel_pick_kernel[(rows,)](logits, 1.0 / temperatures, floors, out, vocab, logits.stride(0), seed,
                                     BLOCK=min(4096, triton.next_power_of_2(vocab)), num_warps=8)
    return out
