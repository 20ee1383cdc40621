"""Block manager and scheduler: pure Python, no model."""
from actors.block_manager import BlockManager
from actors.scheduler import Scheduler
from actors.sequence import SamplingParams, Sequence, SequenceStatus

PARAMS = SamplingParams(max_new_tokens=8)


def seq(n: int) -> Sequence:
    return Sequence(list(range(n)), PARAMS)


def test_block_manager_allocates_per_token_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(5)
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 2 and bm.num_free == 2
    s.append(1), s.append(2), s.append(3)            # 8 tokens: still two blocks
    bm.append(s)
    assert len(s.block_table) == 2
    s.append(4)                                      # 9th token needs a third block
    bm.append(s)
    assert len(s.block_table) == 3 and bm.num_free == 1
    bm.deallocate(s)
    assert bm.num_free == 4 and s.block_table == []


def test_prefill_admission_by_free_blocks_and_token_budget():
    bm = BlockManager(num_blocks=5, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=12)
    for n in (8, 4, 4, 8):
        sched.add(seq(n))
    batch, is_prefill = sched.schedule()
    assert is_prefill and [len(s) for s in batch] == [8, 4]     # a third prompt would pass 12 tokens
    batch, is_prefill = sched.schedule()
    assert is_prefill and [len(s) for s in batch] == [4]         # the 8-token prompt needs 2 blocks, 1 free
    batch, is_prefill = sched.schedule()
    assert not is_prefill and len(batch) == 3


def test_long_prompt_runs_alone_over_token_budget():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=4)
    sched.add(seq(10))
    batch, is_prefill = sched.schedule()
    assert is_prefill and len(batch) == 1


def test_decode_preempts_newest_when_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(2), seq(2)
    sched.add(a), sched.add(b)
    assert sched.schedule() == ([a, b], True)
    a.append(9), b.append(9)                          # both need a new block, none is free
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [a]
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and sched.waiting[0] is b
    sched.finish(a)
    assert bm.num_free == 2 and a.status == SequenceStatus.FINISHED
    assert sched.schedule() == ([b], True)            # recomputed from its tokens


def test_max_num_seqs_caps_the_running_batch():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=1024)
    for _ in range(3):
        sched.add(seq(3))
    batch, _ = sched.schedule()
    assert len(batch) == 2 and len(sched.waiting) == 1
