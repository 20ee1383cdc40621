"""The engine loop on one process: add requests, then step = schedule -> run -> sample -> postprocess.

Run-ahead (on by default on CUDA): while the whole running batch picks its tokens on the GPU (greedy
or sampled: actors/sampler.py `picks_on_device`) and nothing waits to be admitted, each step launches
the *next* decode (its input tokens are this step's picks, still on the GPU) before reading this
step's tokens, so the host's per-step work (stop checks, the next plan) overlaps the GPU instead of
idling it. A sequence that stops on a token it could not foresee
(EOS) has one extra token computed and dropped; one that is aborted in between, likewise."""
import itertools
import os
import time
from dataclasses import dataclass

import torch

from actors.block_manager import BlockManager
from actors.model_runner import DONE, STEP, ModelRunner, kv_cache_block_bytes
from actors.outputs import RequestOutput, request_outputs
from actors.sampler import logprob_rows, picks_on_device, sample, sample_on_device, token_logprobs
from actors.sampler import warm_up as warm_up_sampler
from actors.scheduler import Scheduler
from actors.sequence import RequestError, SamplingParams, Sequence, SequenceStatus
from kernels.model import CausalLM


def num_kv_blocks(model: CausalLM, config, device: torch.device) -> int:
    """KV-cache blocks: as configured, else what the memory budget holds (never more than
    max_num_seqs full-length sequences need)."""
    block_bytes = kv_cache_block_bytes(model, config.block_size, model.embed.weight.dtype)
    if config.kv_cache_blocks:
        available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else \
            os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if config.kv_cache_blocks * block_bytes > available:
            raise ValueError(f"kv_cache_blocks={config.kv_cache_blocks} needs "
                             f"{config.kv_cache_blocks * block_bytes / 2**30:.1f} GiB on {device}, more than is free "
                             f"({available / 2**30:.1f} GiB): ask for fewer blocks, or leave it unset to size the "
                             "cache from gpu_memory_utilization / cpu_kv_cache_bytes")
        return config.kv_cache_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - config.gpu_memory_utilization) * total
    else:
        budget = config.cpu_kv_cache_bytes
    per_seq = -(-min(config.max_out_tokens, model.spec.max_positions) // config.block_size)
    blocks = min(int(budget // block_bytes), per_seq * config.max_num_seqs)
    blocks = int(model.tp.all_reduce(torch.tensor([blocks], device=device), torch.distributed.ReduceOp.MIN))
    if blocks < per_seq:
        raise RuntimeError(f"memory for only {blocks} KV-cache blocks of {config.block_size} tokens; one "
                           f"sequence of max_out_tokens={config.max_out_tokens} needs {per_seq}")
    return blocks


@dataclass
class _Launched:
    """A step whose tokens, picked on the GPU, are on their way to the host."""
    seqs: list[Sequence]
    tokens: torch.Tensor                    # [seqs] int64 on the device
    host: torch.Tensor                      # their pinned host copy, complete once `ready` has passed
    ready: "torch.cuda.Event | None"

    @classmethod
    def pick(cls, seqs: list[Sequence], logits: torch.Tensor, ahead: int = 0) -> "_Launched":
        tokens = sample_on_device(logits, seqs, ahead)
        if not tokens.is_cuda:
            return cls(seqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(seqs, tokens, host, ready)

    def wait(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class LLMEngine:
    """Continuous batching over a paged KV cache for one model replica.

    Under tensor parallelism every rank holds an engine; rank 0 schedules and samples, and its
    runner broadcasts each step's plan. `generate` and `forward_logits` may be called on every
    rank at once (SPMD scripts under the launcher): ranks > 0 follow rank 0's steps and return
    rank 0's result."""

    def __init__(self, model: CausalLM, config, device: torch.device):
        self.model, self.config, self.device, self.tp = model, config, device, model.tp
        self.max_seq_len = min(config.max_out_tokens, model.spec.max_positions)
        blocks = num_kv_blocks(model, config, device)
        self.block_manager = BlockManager(blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        try:
            self.runner = ModelRunner(model, blocks, config.block_size, device)
        except (RuntimeError, MemoryError) as e:        # torch.OutOfMemoryError is a RuntimeError
            size = blocks * kv_cache_block_bytes(model, config.block_size, model.embed.weight.dtype) / 2**30
            raise ValueError(f"could not allocate the KV cache: {blocks} blocks of {config.block_size} tokens = "
                             f"{size:.1f} GiB on {device} ({type(e).__name__}); set kv_cache_blocks lower "
                             "(or cpu_kv_cache_bytes / gpu_memory_utilization)") from None
        self.startup: dict[str, float] = {}             # what start-up took after the load (seconds, MiB, counts)
        if device.type == "cuda":
            start = time.perf_counter()
            self.runner.tune_kernels()
            self.startup["tune_s"] = time.perf_counter() - start
        if device.type == "cuda" and config.enable_cuda_graph is not False:
            self.startup |= self.runner.capture_cudagraphs(config.max_num_seqs, self.max_seq_len,
                                                           config.prefill_graph_tokens)
        if device.type == "cuda":
            warm_up_sampler(model.spec.vocab_size, device)
        self.run_ahead = device.type == "cuda" if config.run_ahead is None else config.run_ahead
        self._ahead: _Launched | None = None     # the decode step launched ahead, tokens not read yet

    def check_prompt(self, prompt_token_ids: list[int], max_new_tokens: int = 0) -> None:
        if not prompt_token_ids:
            raise RequestError("empty prompt: at least one token is needed")
        vocab = self.model.spec.vocab_size
        if not all(map(isinstance, prompt_token_ids, itertools.repeat(int))) or \
                min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        needed = len(prompt_token_ids) + max_new_tokens
        if needed > self.max_seq_len:
            raise RequestError(
                f"prompt of {len(prompt_token_ids)} tokens + max_new_tokens={max_new_tokens} = {needed} exceeds "
                f"the {self.max_seq_len} tokens a sequence may hold (model max positions "
                f"{self.model.spec.max_positions}, max_out_tokens {self.config.max_out_tokens})")
        blocks = -(-needed // self.block_manager.block_size)
        if blocks > self.block_manager.num_blocks:
            raise RequestError(f"{needed} tokens need {blocks} KV-cache blocks; the cache has "
                               f"{self.block_manager.num_blocks}")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, position_offset: int = 0,
                    sample_index: int = 0, checked: bool = False) -> Sequence:
        """Queue one sequence; `checked`: the caller has run `check_prompt` on it (a batch is checked
        whole before any of it is queued; a second scan costs a long prompt tens of microseconds)."""
        if not checked:
            self.check_prompt(prompt_token_ids, params.max_new_tokens)
        seq = Sequence(prompt_token_ids, params, position_offset)
        if params.seed is not None and not params.greedy:
            seq.seed = params.seed + sample_index
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if not seq.is_finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One forward of the scheduled batch (or the step launched ahead last time); returns the
        sequences it advanced."""
        launched, self._ahead = self._ahead, None
        if launched is not None and all(s.is_finished for s in launched.seqs):
            launched = None                      # every sequence ended meanwhile: nothing to read
        if launched is None:
            seqs, is_prefill = self.scheduler.schedule()
            if not seqs:
                return []
            if not (self.run_ahead and all(picks_on_device(s) for s in seqs)):
                logits = self.runner.run(seqs, is_prefill)
                found = logprob_rows(logits, seqs)
                tokens = sample(logits, seqs)
                return self._advance(seqs, tokens, token_logprobs(found, seqs, tokens) if found else None)
            launched = _Launched.pick(seqs, self.runner.run(seqs, is_prefill))
        if self._can_run_ahead(launched.seqs):
            for seq in launched.seqs:
                self.block_manager.append(seq, ahead=1)
            logits = self.runner.run_ahead(launched.seqs, launched.tokens)
            self._ahead = _Launched.pick(launched.seqs, logits, ahead=1)
        return self._advance(launched.seqs, launched.wait())

    def _can_run_ahead(self, seqs: list[Sequence]) -> bool:
        """Whether the step after `seqs`' (in flight) may be launched now: the same batch, all of it
        running, picking its tokens on the GPU and sure to need that step (none at max_new_tokens),
        nothing waiting to be admitted, and a free block for each sequence that needs one."""
        if not self.run_ahead or self.scheduler.waiting or len(seqs) != len(self.scheduler.running):
            return False
        if not all(s.status == SequenceStatus.RUNNING and picks_on_device(s, 1) and
                   s.num_output_tokens + 1 < s.params.max_new_tokens for s in seqs):
            return False
        return sum(self.block_manager.blocks_to_append(s, ahead=1) for s in seqs) <= self.block_manager.num_free

    def _advance(self, seqs: list[Sequence], tokens: list[int], logprobs: dict | None = None) -> list[Sequence]:
        """Append each sequence's new token (and, row -> `TokenLogprobs`, its log-probabilities) and
        check its stop; sequences ended meanwhile (aborted, or stopped the step before one launched
        ahead) take none."""
        advanced = []
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.is_finished:
                continue
            seq.append(token)
            if logprobs and row in logprobs:
                seq.logprobs.append(logprobs[row])
            self._check_stop(seq, token)
            advanced.append(seq)
        return advanced

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        stopped = token in p.stop_token_ids and not p.ignore_eos and seq.num_output_tokens >= p.min_new_tokens
        if stopped or seq.num_output_tokens >= p.max_new_tokens:
            seq.finish_reason = "stop" if stopped else "length"
            self.scheduler.finish(seq)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 position_offsets: list[int] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; per prompt, its `params.n` completions."""
        return self._lead(self._generate, True, prompts, params, position_offsets)[0]

    def _generate(self, prompts, params, position_offsets) -> list[RequestOutput]:
        params = params if isinstance(params, list) else [params] * len(prompts)
        offsets = position_offsets or [0] * len(prompts)
        for prompt, p in zip(prompts, params):
            self.check_prompt(prompt, p.max_new_tokens)
        groups = [[self.add_request(prompt, p, off, i, checked=True) for i in range(p.n)]
                  for prompt, p, off in zip(prompts, params, offsets)]
        try:
            while self.scheduler.has_work():
                self.step()
        except BaseException:
            for seq in (s for g in groups for s in g):
                self.abort(seq)
            raise
        return request_outputs(prompts, groups)

    def forward_logits(self, prompts: list[list[int]], position_offsets: list[int]) -> list[torch.Tensor]:
        """Logits of every prompt token [len, vocab] (a stateless forward, as HF's model(input_ids))."""
        result, follower_logits = self._lead(self._forward_logits, False, prompts, position_offsets)
        return result if self.tp.rank == 0 else follower_logits

    def _forward_logits(self, prompts, position_offsets) -> list[torch.Tensor]:
        for prompt in prompts:
            self.check_prompt(prompt)
        if self.scheduler.has_work():
            raise RuntimeError("forward_logits needs an idle engine")
        params = SamplingParams(max_new_tokens=1)
        out = []
        for prompt, offset in zip(prompts, position_offsets):   # one at a time: any length fits the cache
            seq = Sequence(prompt, params, offset)
            self.block_manager.allocate(seq)
            try:
                out.append(self.runner.run([seq], is_prefill=True, all_logits=True))
            finally:
                self.block_manager.deallocate(seq)
        return out

    def _lead(self, call, share_result: bool, *args):
        """Rank 0 runs `call` and then ends the followers' call with its result (when
        `share_result`) or its error; ranks > 0 follow until then.
        Returns (rank 0's result, all-token logits this rank computed)."""
        if self.tp.rank > 0:
            return self.follow_call()
        try:
            result = call(*args)
        except Exception as e:
            self._end_call(e)
            raise
        self._end_call(result if share_result else None)
        return result, []

    def _end_call(self, result) -> None:
        if self.tp.size > 1:
            self.runner.signal(DONE)
            self.tp.broadcast_object(result)

    def follow_call(self) -> tuple[object, list[torch.Tensor]]:
        """Ranks > 0: run rank 0's steps until it ends its call; (its result, our all-token logits)."""
        logits = []
        while True:
            command, step_logits = self.runner.follow()
            if command != STEP:
                break
            if step_logits is not None:
                logits.append(step_logits)
        if command != DONE:
            return None, logits
        result = self.tp.broadcast_object()
        if isinstance(result, Exception):
            raise result
        return result, logits
