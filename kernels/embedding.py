"""Token embeddings, plus learned position embeddings where the family has them (GPT-2, GPT-Neo, OPT):
torch's two lookups and an add are three kernels at the head of every step; on CUDA one Triton
program per token reads both rows and writes their sum (rounded once, as torch's fp16 add is)."""
import torch
import triton
import triton.language as tl

from kernels.dispatch import use_triton


@triton.jit
def _embed_kernel(ids_ptr, positions_ptr, tokens_ptr, pos_table_ptr, out_ptr, width, position_offset,
                  HAS_POSITIONS: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    row = tl.load(ids_ptr + token)
    x = tl.load(tokens_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_POSITIONS:
        position = tl.load(positions_ptr + token) + position_offset
        x += tl.load(pos_table_ptr + position * width + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * width + cols, x.to(out_ptr.dtype.element_ty), mask=mask)


def embed_torch(input_ids: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor,
                pos_table: torch.Tensor | None, position_offset: int = 0) -> torch.Tensor:
    """Reference: tokens[input_ids] (+ pos_table[positions + position_offset]). input_ids, positions: [n]."""
    x = torch.nn.functional.embedding(input_ids, tokens)
    if pos_table is None:
        return x
    return x + torch.nn.functional.embedding(positions + position_offset if position_offset else positions,
                                             pos_table)


def embed_triton(input_ids: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor,
                 pos_table: torch.Tensor | None, position_offset: int = 0) -> torch.Tensor:
    """`embed_torch` in one kernel; tables contiguous and of one width."""
    width = tokens.shape[1]
    assert tokens.is_contiguous() and (pos_table is None or pos_table.is_contiguous()), "tables must be contiguous"
    assert pos_table is None or pos_table.shape[1] == width, f"position rows {pos_table.shape[1]} != token rows {width}"
    out = torch.empty(input_ids.shape[0], width, dtype=tokens.dtype, device=tokens.device)
    if input_ids.shape[0]:
        _embed_kernel[(input_ids.shape[0],)](input_ids, positions, tokens, tokens if pos_table is None else pos_table,
                                             out, width, position_offset, HAS_POSITIONS=pos_table is not None,
                                             BLOCK=triton.next_power_of_2(width))
    return out


def embed(input_ids: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor, pos_table: torch.Tensor | None,
          position_offset: int = 0) -> torch.Tensor:
    """[n, width] rows of `tokens` (+ rows of `pos_table`): one Triton kernel on CUDA, the torch
    reference elsewhere. Ids and positions must be in range (the engine checks prompts)."""
    if use_triton(tokens):
        return embed_triton(input_ids, positions, tokens, pos_table, position_offset)
    return embed_torch(input_ids, positions, tokens, pos_table, position_offset)
