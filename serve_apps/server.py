"""`LLMServer`: the OpenAI semantics over an engine, with no HTTP and no Serve in it (the
deployment in `llm.py` wraps it), so CPU tests can drive it with a small engine.

Every request runs as token streams from the engine loop; `TextStream` (serve_apps/text_stream.py)
turns token deltas into text, holds back what could still become a stop string, and ends a sample
at the first stop string (its sequence is aborted, which frees its KV blocks). Non-streaming answers
collect the same streams.

The queue is bounded: a request reserves room for its sequences when it is admitted (synchronously,
so concurrent arrivals cannot all pass one check) and gives it back as each prompt starts generating
or ends; beyond `max_queued_requests` waiting sequences it is refused (HTTP 503 + Retry-After)."""
import asyncio
import math
import time
from dataclasses import dataclass
from typing import AsyncIterator

from actors.engine_loop import SAMPLING_EPS, join_runs
from actors.sequence import RequestError, SamplingParams
from cluster.generation import token_list
from serve_apps.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, SamplingFields, TokenizeRequest,
                                 new_id, now)
from serve_apps.responses import chat_logprobs, completion_logprobs, empty_choices, usage
from serve_apps.text_stream import TextStream, text_encoder, window_decoder


# A non-streamed answer needs its tokens only when a sample ends, or, to end a sample at a stop string
# (aborting its sequence), every so often: this often.
STOP_CHECK_S = 0.05


def _unary_pace(stops: list[str]):
    """The engine's pace of deltas for a non-streamed answer (`EngineLoop.stream`'s `interval`): with
    stop strings every STOP_CHECK_S, so a stop costs at most that much extra generation; without, only
    the first delta (which gives back the queue reservation) and each sample's last."""
    interval = STOP_CHECK_S if stops else math.inf
    return lambda: interval


class Unsupported(RequestError):
    """A valid OpenAI field this server does not implement."""


@dataclass
class Chunk:
    choice: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: list | None = None    # `TokenLogprobs` of the tokens up to this text, when asked


class LLMServer:
    """OpenAI completions / chat over `engine` (anything with `.loop` -> EngineLoop and `.health()`)."""

    def __init__(self, engine, tokenizer, model_name: str, generation_config, max_model_len: int,
                 max_queued_requests: int | None = None, metrics=None, stream_interval_s: float = 0.0,
                 stream_events_per_s: float | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.decode, self.encode_text = window_decoder(tokenizer), text_encoder(tokenizer)
        self.eos = tuple(token_list(generation_config.eos_token_id))
        self.max_model_len = max_model_len
        self.max_queued_requests = max_queued_requests
        self.metrics = metrics
        self.stream_interval_s = stream_interval_s      # streamed chunks after the first: at most this often
        self.stream_events_per_s = stream_events_per_s  # ... and at most about this many from all streams
        self.open_streams = 0                            # samples of the streams open now
        self.queued = 0                  # sequences admitted here that have not started generating

    # -- requests -> engine params -----------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise LookupError(f"model {name!r} is not served here; this server serves {self.model_name!r}")

    def params(self, req: SamplingFields, max_tokens: int | None) -> SamplingParams:
        if req.presence_penalty or req.frequency_penalty:
            raise Unsupported("presence_penalty / frequency_penalty are not supported; use repetition_penalty")
        if isinstance(req, CompletionRequest) and req.suffix:
            raise Unsupported("suffix (insertion) is not supported")
        if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
            raise Unsupported("echo with logprobs (the prompt's log-probabilities) is not supported")
        return SamplingParams.build(
            max_new_tokens=max_tokens or 16, min_new_tokens=req.min_tokens, do_sample=req.temperature >= SAMPLING_EPS,
            temperature=req.temperature or 1.0, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos, stop_token_ids=self.eos, n=req.n,
            logprobs=req.top_logprobs_wanted)

    def encode(self, prompt, special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each prompt (text, or ids as given); `special_tokens`: text gets the tokenizer's
        special tokens (a BOS, say), as HF's `tokenizer(text)` adds them."""
        prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        ids = [self.encode_text(p, special_tokens) if isinstance(p, str) else list(p) for p in prompts]
        for p in ids:
            if len(p) >= self.max_model_len:
                raise RequestError(f"prompt of {len(p)} tokens leaves no room in the model's "
                                   f"{self.max_model_len}-token context")
        return ids

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        return self.encode(self.chat_text(req.messages), special_tokens=False)[0]   # the template writes its BOS

    def chat_text(self, messages, generation_prompt: bool = True) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise Unsupported(f"model {self.model_name!r} has no chat template; use /v1/completions")
        return self.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def echoed(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """Per prompt, the text an `echo` answer starts with: the prompt as given, or decoded from ids."""
        if not req.echo:
            return [""] * len(prompts)
        if isinstance(req.prompt, str):
            return [req.prompt]
        if isinstance(req.prompt, list) and isinstance(req.prompt[0], str):
            return list(req.prompt)
        return [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]

    # -- running ------------------------------------------------------------------------------

    def admit(self, num_prompts: int, n: int) -> "Reservation":
        """Reserve queue room for `num_prompts` x `n` sequences, or refuse: HTTP 503 while the queue is
        full (never unbounded memory), 400 for a request larger than the whole queue."""
        size, limit = num_prompts * n, self.max_queued_requests
        if limit is not None and self.queued + size > limit:
            if size > limit:
                raise RequestError(f"{num_prompts} prompt(s) x n={n} = {size} sequences exceed the queue limit "
                                   f"max_queued_requests={limit}")
            raise OverloadedError(f"server overloaded: {self.queued} sequences already queued (limit {limit}); "
                                  "retry later")
        self.queued += size
        return Reservation(self, {i: n for i in range(num_prompts)})

    def stream_interval(self) -> float:
        """Seconds between a stream's chunks after its first: `stream_interval_s`, or longer while so many
        streams are open that all of them would send more than `stream_events_per_s` events a second."""
        if not self.stream_events_per_s:
            return self.stream_interval_s
        return max(self.stream_interval_s, self.open_streams / self.stream_events_per_s)

    async def chunks(self, prompts: list[list[int]], params: SamplingParams, stops: list[str],
                     streaming: bool = False) -> AsyncIterator[Chunk]:
        """Text chunks of every (prompt, sample) as they come; choice = prompt * n + sample. What has
        come by the time the caller asks for more goes as one chunk per choice. `streaming`: the first
        chunk goes at once and later ones at most once per `stream_interval()` (fewer, larger stream
        events: Serve's proxy costs about the same per event whatever its size), or as soon as a
        sample ends (its last text and finish reason are not held back)."""
        reservation = self.admit(len(prompts), params.n)
        queue, ending = asyncio.Queue(), asyncio.Event()       # ending: a sample's last chunk (or an error) came
        pace = self.stream_interval if streaming else _unary_pace(stops)
        tasks = [asyncio.ensure_future(self._one(i, p, params, stops, queue, ending, reservation, pace, streaming))
                 for i, p in enumerate(prompts)]
        clock, unfinished, sent = asyncio.get_running_loop(), len(prompts) * params.n, None
        self.open_streams += unfinished if streaming else 0
        try:
            while unfinished:
                items = [await queue.get()]
                wait = self.stream_interval() if streaming and sent is not None else 0
                if sent is not None and sent + wait > clock.time() and not ending.is_set():
                    try:
                        await asyncio.wait_for(ending.wait(), sent + wait - clock.time())
                    except asyncio.TimeoutError:
                        pass
                ending.clear()
                while not queue.empty():
                    items.append(queue.get_nowait())
                for chunk in _merge(items):
                    if isinstance(chunk, BaseException):
                        raise chunk
                    unfinished -= chunk.finish_reason is not None
                    yield chunk
                sent = clock.time()
        finally:
            self.open_streams -= len(prompts) * params.n if streaming else 0
            reservation.release()
            for task in tasks:
                task.cancel()

    async def _one(self, index: int, prompt: list[int], params: SamplingParams, stops: list[str],
                   queue: asyncio.Queue, ending: asyncio.Event, reservation: "Reservation", pace,
                   streaming: bool) -> None:
        """One prompt's samples: the engine's deltas into text chunks on `queue`, at most one per `pace()`
        seconds after the first; `streaming`, every step's until each sample has shown text (a first
        token may decode to none yet, or be held back as the start of a stop string: the time to first
        text must not wait for the pace)."""
        started, last = time.perf_counter(), None
        streams = [TextStream(self.decode, stops) for _ in range(params.n)]
        counts = [0] * params.n
        held = [[] for _ in range(params.n)]          # log-probabilities of tokens whose text is held back
        shown = set()                                 # samples whose first text went out
        try:
            async for delta in self.engine.loop.stream(prompt, params,
                                                       lambda: 0.0 if streaming and len(shown) < params.n else pace()):
                reservation.release(index)
                s = streams[delta.index]
                if s.stopped:
                    continue
                counts[delta.index] += len(delta.token_ids)
                held[delta.index] += delta.logprobs or []
                text = s.push(delta.token_ids, final=delta.finish_reason is not None)
                reason = "stop" if s.stopped else delta.finish_reason
                last = self._observe(started, last, len(delta.token_ids))
                if text or reason:
                    shown.add(delta.index)
                    logprobs = held[delta.index] if params.logprobs is not None else None
                    held[delta.index] = []
                    queue.put_nowait(Chunk(index * params.n + delta.index, text, reason, counts[delta.index],
                                           logprobs))
                if reason:
                    ending.set()
                if all(st.stopped for st in streams):
                    return                                  # leaving the stream aborts the sequences
        except Exception as e:
            reservation.release(index)
            queue.put_nowait(e)
            ending.set()

    def _observe(self, started: float, last: float | None, num_tokens: int) -> float:
        t = time.perf_counter()
        if self.metrics is not None and num_tokens:
            self.metrics.observe_tokens(num_tokens, first=last is None, since=t - (last or started))
        return t

    async def complete(self, req: CompletionRequest) -> dict:
        self.check_model(req.model)
        prompts, params = self.encode(req.prompt), self.params(req, req.max_tokens)
        _, reasons, tokens = empty_choices(prompts, params)
        texts = [echo for echo in self.echoed(req, prompts) for _ in range(params.n)]
        logprobs = [[] for _ in texts]
        async for c in self.chunks(prompts, params, req.stop):
            texts[c.choice] += c.text
            reasons[c.choice], tokens[c.choice] = c.finish_reason, c.completion_tokens
            logprobs[c.choice] += c.logprobs or []
        wanted = params.logprobs is not None
        choices = [{"index": i, "text": t, "finish_reason": r,
                    "logprobs": completion_logprobs(self.tokenizer, lp, 0)[0] if wanted else None}
                   for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": self.model_name,
                "choices": choices, "usage": usage(prompts, params, tokens)}

    async def complete_stream(self, req: CompletionRequest) -> AsyncIterator[dict]:
        self.check_model(req.model)
        prompts, params = self.encode(req.prompt), self.params(req, req.max_tokens)
        rid, created, tokens, opened, offsets = new_id("cmpl"), now(), {}, set(), {}
        echoes = [echo for echo in self.echoed(req, prompts) for _ in range(params.n)]
        async for c in self.chunks(prompts, params, req.stop, streaming=True):
            tokens[c.choice] = c.completion_tokens
            text = c.text if c.choice in opened else echoes[c.choice] + c.text      # an echo opens the choice
            opened.add(c.choice)
            logprobs = None
            if params.logprobs is not None:
                logprobs, offsets[c.choice] = completion_logprobs(self.tokenizer, c.logprobs,
                                                                  offsets.get(c.choice, 0))
            yield {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                   "choices": [{"index": c.choice, "text": text, "finish_reason": c.finish_reason,
                                "logprobs": logprobs}]}
        if req.include_usage:
            yield {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                   "choices": [], "usage": usage(prompts, params, [tokens.get(i, 0) for i in range(len(tokens))])}

    async def chat(self, req: ChatRequest) -> dict:
        self.check_model(req.model)
        prompt, params = self.chat_prompt(req), self.params(req, req.max_completion_tokens or req.max_tokens)
        texts, reasons, tokens = empty_choices([prompt], params)
        logprobs = [[] for _ in texts]
        async for c in self.chunks([prompt], params, req.stop):
            texts[c.choice] += c.text
            reasons[c.choice], tokens[c.choice] = c.finish_reason, c.completion_tokens
            logprobs[c.choice] += c.logprobs or []
        wanted = params.logprobs is not None
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                    "logprobs": chat_logprobs(self.tokenizer, lp) if wanted else None}
                   for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": self.model_name,
                "choices": choices, "usage": usage([prompt], params, tokens)}

    async def chat_stream(self, req: ChatRequest) -> AsyncIterator[dict]:
        self.check_model(req.model)
        prompt, params = self.chat_prompt(req), self.params(req, req.max_completion_tokens or req.max_tokens)
        rid, created, tokens = new_id("chatcmpl"), now(), {}
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        chunks = self.chunks([prompt], params, req.stop, streaming=True)
        first = await anext(chunks)              # refusals (queue full, bad request) before the first byte
        for i in range(params.n):
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
        async for c in prepend(first, chunks):
            tokens[c.choice] = c.completion_tokens
            delta = {"content": c.text} if c.text else {}
            choice = {"index": c.choice, "delta": delta, "finish_reason": c.finish_reason}
            if params.logprobs is not None:
                choice["logprobs"] = chat_logprobs(self.tokenizer, c.logprobs)
            yield {**head, "choices": [choice]}
        if req.include_usage:
            yield {**head, "choices": [], "usage": usage([prompt], params, [tokens.get(i, 0) for i in range(params.n)])}

    async def generate(self, prompt, **sampling) -> dict:
        """For Python handles: one prompt (text or ids) -> {"text", "token_ids", "finish_reason"} (and with
        `logprobs=k`, "logprobs": per token {"token_id", "logprob", "top": [[id, logprob], ...]})."""
        ids = self.encode(prompt)[0]
        sampling.setdefault("stop_token_ids", self.eos)
        params = SamplingParams.build(**sampling)
        reservation = self.admit(1, params.n)
        token_ids, reason, logprobs = [], None, []
        try:                                     # a stream: a cancelled call aborts its sequences
            async for delta in self.engine.loop.stream(ids, params, _unary_pace([])):
                reservation.release()
                if delta.index == 0:
                    token_ids += delta.token_ids
                    reason = delta.finish_reason or reason
                    logprobs += delta.logprobs or []
        finally:
            reservation.release()
        out = {"text": self.tokenizer.decode(token_ids, skip_special_tokens=True), "token_ids": token_ids,
               "finish_reason": reason, "prompt_token_ids": ids}
        if params.logprobs is not None:
            out["logprobs"] = [{"token_id": t.token_id, "logprob": t.logprob, "top": [list(p) for p in t.top]}
                               for t in logprobs]
        return out

    # -- /tokenize and /detokenize (vLLM's) ------------------------------------------------------

    async def tokenize(self, req: TokenizeRequest) -> dict:
        """Token ids as a completion (prompt) or a chat completion (messages) would see them; no length limit."""
        self.check_model(req.model)
        if req.messages is not None:
            ids = self.encode_text(self.chat_text(req.messages, req.add_generation_prompt), bool(req.add_special_tokens))
        else:
            ids = self.encode_text(req.prompt, req.add_special_tokens is not False)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        """The text of token ids, special tokens included; ids the tokenizer lacks (a model's vocabulary
        may be padded past it) read as nothing, as in generated text."""
        self.check_model(req.model)
        bad = next((t for t in req.tokens if not 0 <= t < 2**31), None)
        if bad is not None:
            raise RequestError(f"tokens: {bad} is not a token id (0 to 2**31 - 1)")
        return {"prompt": self.tokenizer.decode(req.tokens)}


async def start_server(args, checkpoint: str, model_name: str, pg=None, use_gpu: bool = False,
                       metrics=None) -> LLMServer:
    """The TP group `args` (`AppArgs`) describe, started with rank 0 in this process (the other ranks in
    `pg`'s bundles), and an `LLMServer` over it with the app's queue and stream settings."""
    from actors.sharded_checkpoint import open_any
    from cluster.tp_group import TPGroup
    config = args.inference_config(checkpoint, use_gpu)
    group = TPGroup(config, pg, args.step_timeout_s)
    await group.start(checkpoint)
    ckpt = open_any(checkpoint, config.storage_options, 0, config.tp_size)
    return LLMServer(group, ckpt.tokenizer(), model_name, ckpt.generation_config(), group.rank0.engine.max_seq_len,
                     args.max_queued_requests, metrics, args.stream_interval_ms / 1e3,
                     args.max_stream_events_per_s or None)


class OverloadedError(RuntimeError):
    """The engine's queue is full; answered with HTTP 503 and Retry-After."""


@dataclass
class Reservation:
    """Queue room held for one request's prompts (index -> sequences) until each starts generating."""
    server: LLMServer
    held: dict[int, int]

    def release(self, prompt: int | None = None) -> None:
        """Give back one prompt's room (all of it when `prompt` is None); repeated calls are no-ops."""
        for i in ([prompt] if prompt is not None else list(self.held)):
            self.server.queued -= self.held.pop(i, 0)


async def prepend(first, rest):
    yield first
    async for item in rest:
        yield item


def _merge(items: list) -> list:
    """Chunks of the same choice joined (in order of each choice's first); an error ends the list."""
    return join_runs(items, lambda c: c.choice,
                     lambda a, b: Chunk(b.choice, a.text + b.text, b.finish_reason, b.completion_tokens,
                                        None if a.logprobs is None else a.logprobs + b.logprobs))
