"""Continuous batching: each step either prefills newly admitted prompts or decodes one token for
every running sequence. Admission is by free KV-cache blocks; when decoding runs out of blocks
the newest sequence is preempted (its blocks freed, recomputed later from its tokens)."""
from collections import deque

from actors.block_manager import BlockManager
from actors.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences to run this step and whether the step is a prefill."""
        prefills = self._admit()
        if prefills:
            return prefills, True
        return self._decodes(), False

    def _admit(self) -> list[Sequence]:
        admitted, num_tokens = [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            over_budget = num_tokens + len(seq) > self.max_num_batched_tokens
            if (admitted and over_budget) or not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            num_tokens += len(seq)
        return admitted

    def _decodes(self) -> list[Sequence]:
        scheduled = []
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:      # preempted earlier in this loop
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append(seq)
                scheduled.append(seq)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Free a finished (or aborted) sequence's blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
