"""Requests as the engine sees them: `SamplingParams` (validated at the door) and `Sequence`."""
import itertools
from enum import Enum, auto
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_LOGPROBS = 20


class RequestError(ValueError):
    """A request the engine cannot run; the message says what was wrong."""


class SamplingParams(BaseModel):
    """How one sequence is decoded. Greedy unless `do_sample` (and temperature > 0)."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    min_new_tokens: int = Field(0, ge=0, description="stop tokens are masked until this many are generated")
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0, description="0 = no top-k filter")
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, description="HF/CTRL-style penalty on seen tokens")
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = Field(None, description="per-request RNG seed for reproducible sampling")
    n: int = Field(1, ge=1, description="samples per prompt")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="return each generated token's log-probability and this many most "
                                             "likely alternatives' (the model's distribution: before penalties, "
                                             "temperature and filters)")

    @model_validator(mode="after")
    def _check(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")
        return self

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def build(cls, **kwargs) -> "SamplingParams":
        """Like the constructor, but bad values raise `RequestError` naming the field."""
        try:
            return cls(**kwargs)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'sampling'}: {err['msg']}"
                                 for err in e.errors())
            raise RequestError(f"invalid sampling parameters: {problems}") from None


class TokenLogprobs(NamedTuple):
    """A generated token, its log-probability and the `SamplingParams.logprobs` most likely tokens'
    (id, log-probability), most likely first."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


class Sequence:
    """One prompt being generated: its tokens, its KV-cache blocks and its progress."""

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, position_offset: int = 0):
        self.seq_id = next(_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.position_offset = position_offset    # first token's position (HF forward on left-padded rows)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0                 # tokens whose keys/values are in the cache
        self.finish_reason: str | None = None
        self.seed: int | None = None               # a sampled draw's seed (params.seed + the sample's index)
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None   # per output token

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
