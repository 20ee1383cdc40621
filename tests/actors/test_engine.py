"""The engine loop on a tiny model: stopping, batching under KV-cache pressure, sampling."""
import pytest
import torch

import rayspeed
from tests.helpers import EOS, byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def hf():
    return tiny_model("llama")


def engine(hf, **config):
    return rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True,
                                   tokenizer=byte_tokenizer(), **config)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_eos_stops_one_sequence_and_the_batch_continues(hf):
    e = engine(hf)
    ps = prompts(4)
    free_run = e.generate(ps, max_new_tokens=12, ignore_eos=True)
    stop_at = free_run[1].outputs[0].token_ids[3]     # make sequence 1's 4th token a stop token
    out = e.generate(ps, max_new_tokens=12, stop_token_ids=[stop_at])
    first_hit = free_run[1].outputs[0].token_ids.index(stop_at)
    assert out[1].outputs[0].token_ids == free_run[1].outputs[0].token_ids[:first_hit + 1]
    assert out[1].outputs[0].finish_reason == "stop"
    for i in (0, 2, 3):
        toks = free_run[i].outputs[0].token_ids
        cut = toks.index(stop_at) + 1 if stop_at in toks else len(toks)
        assert out[i].outputs[0].token_ids == toks[:cut]


def test_small_kv_cache_queues_and_preempts_without_changing_results(hf):
    ps = prompts(12, seed=1)
    roomy = engine(hf).generate(ps, max_new_tokens=24, ignore_eos=True)
    tight = engine(hf, kv_cache_blocks=8, block_size=8, max_num_seqs=5, max_out_tokens=64)
    out = tight.generate(ps, max_new_tokens=24, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in roomy]
    assert tight.backend.block_manager.num_free == 8      # every block back


def test_top_k_1_sampling_equals_greedy(hf):
    e = engine(hf)
    ps = prompts(3, seed=2)
    greedy = e.generate(ps, max_new_tokens=16, ignore_eos=True)
    topk1 = e.generate(ps, max_new_tokens=16, ignore_eos=True, do_sample=True, top_k=1, temperature=0.7)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in topk1]


def test_seeded_sampling_reproducible_with_n_samples(hf):
    e = engine(hf)
    run = lambda seed: [[c.token_ids for c in o.outputs] for o in e.generate(
        prompts(2, seed=3), max_new_tokens=16, ignore_eos=True, do_sample=True, temperature=1.5, seed=seed, n=3)]
    a, b, c = run(11), run(11), run(12)
    assert a == b and a != c
    assert len(a[0]) == 3 and len({tuple(t) for t in a[0]}) > 1     # the n samples differ


def test_string_prompts_use_the_tokenizer(hf):
    e = engine(hf)
    out = e.generate(["DeepSpeed is", "héllo"], max_new_tokens=5, ignore_eos=True)
    assert out[0].prompt == "DeepSpeed is" and out[0].prompt_token_ids == list(b"DeepSpeed is")
    assert out[1].prompt_token_ids == list("héllo".encode())
    assert isinstance(out[0].outputs[0].text, str) and len(out[0].outputs[0].token_ids) == 5


def test_default_stop_is_the_model_eos(hf):
    e = engine(hf)
    assert e.module.generation_config.eos_token_id == EOS
    first = e.generate([[1, 2, 3]], max_new_tokens=8, ignore_eos=True)[0].outputs[0].token_ids[0]
    e.module.generation_config.eos_token_id = first
    out = e.generate([[1, 2, 3]], max_new_tokens=8)[0].outputs[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"


def test_start_up_tuning_steps_every_row_bucket_inside_the_window(hf, monkeypatch):
    """ModelRunner.tune_kernels (run at start-up on CUDA; here on CPU with the kernel dispatch patched
    in): one decode-shaped step of 1, 2, 4, ... TUNED_MAX_ROWS rows through every product, inside the
    tuner's window, writing only the KV cache's padding block; generation after it is unchanged."""
    import kernels.gemv_tuner as tuner
    import kernels.linear as linear
    e = engine(hf, kv_cache_blocks=16, block_size=8)
    before = e.generate(prompts(3), max_new_tokens=8, ignore_eos=True)
    runner = e.backend.runner
    caches = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    seen = []

    def streamed(x, weight, *args, norm=None):         # args[-1]: the product in torch
        seen.append((x.shape[0], tuner._window))
        return args[-1](x, weight)
    monkeypatch.setattr(linear, "use_triton", lambda x: True)
    monkeypatch.setattr(linear, "FOLD_NORMS", False)   # the fold would ask the tuner itself, on CPU tensors
    monkeypatch.setattr(linear, "streamed_linear", streamed)
    runner.tune_kernels()
    assert sorted({rows for rows, _ in seen}) == [1 << i for i in range(tuner.TUNED_MAX_ROWS.bit_length())]
    assert all(window == 1 for _, window in seen) and tuner._window == 0
    pad = runner.pad_block
    for (k, v), (k0, v0) in zip(runner.kv_caches, caches):
        assert torch.equal(torch.cat([k[:pad], k[pad + 1:]]), torch.cat([k0[:pad], k0[pad + 1:]]))
        assert torch.equal(torch.cat([v[:pad], v[pad + 1:]]), torch.cat([v0[:pad], v0[pad + 1:]]))
    monkeypatch.undo()
    after = e.generate(prompts(3), max_new_tokens=8, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in before]


def test_step_inputs_match_the_per_token_formulas(hf):
    """prepare_prefill / prepare_decode build their six inputs in one staged copy (int64 and int32
    views), slots from whole block tables: the same values as token-by-token arithmetic, for sequences with
    a cached prefix ending mid-block, scattered block tables and position offsets; every view starts
    16 bytes into its buffer's alignment."""
    from actors.sequence import SamplingParams, Sequence
    runner = engine(hf, kv_cache_blocks=32, block_size=8).backend.runner
    seqs = []
    for length, cached, table, offset in ((21, 0, [5, 2, 9], 0), (30, 13, [1, 7, 3, 4], 4), (3, 0, [6], 0)):
        seq = Sequence(list(range(3, 3 + length)), SamplingParams(max_new_tokens=4), offset)
        seq.block_table, seq.num_cached_tokens = table, cached
        seqs.append(seq)

    def slot(seq, p):
        return seq.block_table[p // 8] * 8 + p % 8
    ids, positions, meta = runner.prepare_prefill(seqs)
    new = [(s, p) for s in seqs for p in range(s.num_cached_tokens, len(s))]
    assert ids.tolist() == [s.token_ids[p] for s, p in new]
    assert positions.tolist() == [p + s.position_offset for s, p in new]
    assert meta.slot_mapping.tolist() == [slot(s, p) for s, p in new]
    assert meta.block_tables.tolist() == [[5, 2, 9, 0], [1, 7, 3, 4], [6, 0, 0, 0]]
    assert meta.context_lens.tolist() == [21, 30, 3] and meta.cu_seqlens_q.tolist() == [0, 21, 38, 41]
    assert meta.max_query_len == 21 and not meta.fresh_prefill
    assert ids.dtype == positions.dtype == meta.slot_mapping.dtype == torch.int64
    assert meta.block_tables.dtype == meta.context_lens.dtype == meta.cu_seqlens_q.dtype == torch.int32
    for t in (ids, positions, meta.slot_mapping, meta.block_tables, meta.context_lens, meta.cu_seqlens_q):
        assert t.storage_offset() * t.element_size() % 16 == 0
    ids, positions, meta = runner.prepare_decode(seqs, ahead=1)
    assert ids is None and meta.slot_mapping.tolist() == [slot(s, len(s)) for s in seqs]
    assert positions.tolist() == [len(s) + s.position_offset for s in seqs] and meta.max_query_len == 1
    assert meta.context_lens.tolist() == [22, 31, 4] and meta.cu_seqlens_q.tolist() == [0, 1, 2, 3]


def test_prefill_bucket_inputs_share_one_layout_with_their_host_copy():
    """A prefill graph bucket's inputs are views of one buffer that a host buffer of the same layout
    fills in one copy (`send`); made inside inference mode (a step's first use), they still take
    copies outside it."""
    from actors.cuda_graphs import _PrefillInputs
    with torch.inference_mode():
        inputs = _PrefillInputs(32, 4, torch.device("cpu"))
    ids, positions, slots, cu = inputs.host()
    ids[:], positions[:], slots[:], cu[:] = range(32), range(100, 132), range(200, 232), [0, 5, 9, 32, 32]
    inputs.send()
    assert inputs.input_ids.tolist() == list(range(32)) and inputs.positions.tolist() == list(range(100, 132))
    assert inputs.slots.tolist() == list(range(200, 232)) and inputs.cu_seqlens.tolist() == [0, 5, 9, 32, 32]
    assert inputs.input_ids.dtype == inputs.slots.dtype == torch.int64 and inputs.cu_seqlens.dtype == torch.int32
    inputs.positions.zero_()
