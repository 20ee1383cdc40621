"""KV-cache block allocation: a free list of fixed-size blocks, handed to sequences on demand."""
from collections import deque

from actors.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def can_allocate(self, seq: Sequence) -> bool:
        return seq.num_blocks(self.block_size) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token the sequence holds (its prefill)."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        seq.block_table = [self.free_blocks.popleft() for _ in range(seq.num_blocks(self.block_size))]

    def deallocate(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def blocks_to_append(self, seq: Sequence, ahead: int = 0) -> int:
        """Fresh blocks the sequence needs to hold `ahead` tokens beyond the ones it has (0 or 1 for ahead <= 1)."""
        return max(0, -(-(len(seq) + ahead) // self.block_size) - len(seq.block_table))

    def can_append(self, seq: Sequence) -> bool:
        """Room for the sequence's newest token (a fresh block only when the last one is full)."""
        return self.blocks_to_append(seq) <= self.num_free

    def append(self, seq: Sequence, ahead: int = 0) -> None:
        """Blocks for the newest token (and `ahead` more: a step launched before its input token is known)."""
        for _ in range(self.blocks_to_append(seq, ahead)):
            seq.block_table.append(self.free_blocks.popleft())
