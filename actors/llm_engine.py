"""The engine loop on one process: add requests, then step = schedule -> run -> sample -> postprocess."""
import torch

from actors.block_manager import BlockManager
from actors.model_runner import ModelRunner, kv_cache_block_bytes
from actors.sampler import sample
from actors.scheduler import Scheduler
from actors.sequence import RequestError, SamplingParams, Sequence
from kernels.model import CausalLM


def num_kv_blocks(model: CausalLM, config, device: torch.device) -> int:
    """KV-cache blocks: as configured, else what the memory budget holds (never more than
    max_num_seqs full-length sequences need)."""
    if config.kv_cache_blocks:
        return config.kv_cache_blocks
    block_bytes = kv_cache_block_bytes(model, config.block_size, model.embed.weight.dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - config.gpu_memory_utilization) * total
    else:
        budget = config.cpu_kv_cache_bytes
    per_seq = -(-min(config.max_out_tokens, model.spec.max_positions) // config.block_size)
    blocks = min(int(budget // block_bytes), per_seq * config.max_num_seqs)
    if blocks < per_seq:
        raise RuntimeError(f"memory for only {blocks} KV-cache blocks of {config.block_size} tokens; one "
                           f"sequence of max_out_tokens={config.max_out_tokens} needs {per_seq}")
    return blocks


class LLMEngine:
    """Continuous batching over a paged KV cache for one model replica (one process)."""

    def __init__(self, model: CausalLM, config, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.max_seq_len = min(config.max_out_tokens, model.spec.max_positions)
        blocks = num_kv_blocks(model, config, device)
        self.block_manager = BlockManager(blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, blocks, config.block_size, device)

    def check_prompt(self, prompt_token_ids: list[int], max_new_tokens: int = 0) -> None:
        if not prompt_token_ids:
            raise RequestError("empty prompt: at least one token is needed")
        vocab = self.model.spec.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_token_ids):
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
                    sample_index: int = 0) -> Sequence:
        self.check_prompt(prompt_token_ids, params.max_new_tokens)
        seq = Sequence(prompt_token_ids, params, position_offset)
        if params.seed is not None and not params.greedy:
            seq.generator = torch.Generator().manual_seed(params.seed + sample_index)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if not seq.is_finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def step(self) -> list[Sequence]:
        """One forward of the scheduled batch; returns the sequences it advanced."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        tokens = sample(self.runner.run(seqs, is_prefill), seqs)
        for seq, token in zip(seqs, tokens):
            seq.append(token)
            self._check_stop(seq, token)
        return seqs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        stopped = token in p.stop_token_ids and not p.ignore_eos and seq.num_output_tokens >= p.min_new_tokens
        if stopped or seq.num_output_tokens >= p.max_new_tokens:
            seq.finish_reason = "stop" if stopped else "length"
            self.scheduler.finish(seq)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 position_offsets: list[int] | None = None) -> list[list[Sequence]]:
        """Run prompts to completion; per prompt, its `params.n` finished sequences."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        offsets = position_offsets or [0] * len(prompts)
        for prompt, p in zip(prompts, params):
            self.check_prompt(prompt, p.max_new_tokens)
        groups = [[self.add_request(prompt, p, off, i) for i in range(p.n)]
                  for prompt, p, off in zip(prompts, params, offsets)]
        try:
            while self.scheduler.has_work():
                self.step()
        except BaseException:
            for seq in (s for g in groups for s in g):
                self.abort(seq)
            raise
        return groups

    def forward_logits(self, prompts: list[list[int]], position_offsets: list[int]) -> list[torch.Tensor]:
        """Logits of every prompt token [len, vocab] (a stateless forward, as HF's model(input_ids))."""
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
