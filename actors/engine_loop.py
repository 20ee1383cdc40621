"""`EngineLoop`: an `LLMEngine` stepping in its own thread, so asyncio callers (a Ray actor, a Serve
replica) can add requests at any time; they join the running batch at the next step boundary.
Results come back whole (`generate`) or as token deltas (`stream`); a stream closed early or a
`generate` cancelled (client gone) aborts its sequences, which frees their KV blocks at the next step.

Failure ends every request in flight, never a hang: a step that raises, `fail()` (a rank died), or
a step still running after `step_timeout_s` (`watch_steps`: a rank stalled inside a collective)
delivers an `EngineError` to each request, queued or running, and the loop reports itself dead.

An idle TP group's followers wait for rank 0's next plan inside a collective, which fails after the
group's timeout: with `keepalive_s` the loop sends them an empty plan at least that often while idle
(watched like a step, so a rank that died or stalled is found while idle too)."""
import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from actors.llm_engine import LLMEngine
from actors.model_runner import KEEPALIVE, STOP
from actors.outputs import RequestOutput, request_outputs
from actors.sequence import RequestError, SamplingParams, Sequence

SAMPLING_EPS = 1e-5         # below this temperature, sampling overflows fp32 logits: use greedy


class EngineError(RuntimeError):
    """The engine loop failed (a step raised, a rank died or stalled): requests in flight end with it,
    new ones are refused, and the loop (with its TP group) must be rebuilt."""


@dataclass
class StreamDelta:
    index: int                      # sample number (0 .. n-1)
    token_ids: list[int]            # tokens new since the last delta of this sample
    finish_reason: str | None = None
    logprobs: list | None = None    # their `TokenLogprobs`, when the params asked


@dataclass(eq=False)                # identity: requests are kept in sets and lists
class _Request:
    prompts: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None          # whole results (generate)
    deltas: asyncio.Queue | None = None           # token deltas (stream)
    groups: list[list[Sequence]] = field(default_factory=list)
    sent: dict[int, int] = field(default_factory=dict)      # stream: tokens delivered per sample
    closed: set[int] = field(default_factory=set)           # stream: samples whose last delta went out
    interval: Callable[[], float] | None = None              # stream: seconds between deltas after the first
    next_at: float = 0.0                                     # stream: no delta before this (time.monotonic)

    def seqs(self) -> list[Sequence]:
        return [s for g in self.groups for s in g]

    def done(self) -> bool:
        return all(s.is_finished for s in self.seqs())

    def deliver(self, result=None, error: BaseException | None = None) -> None:
        """Thread-safe hand-off to the caller's event loop."""
        _hand_off(self.loop, self.settle, result, error)

    def settle(self, result=None, error: BaseException | None = None) -> None:
        """In the caller's event loop: the next delta, the whole result or the error."""
        if self.deltas is not None:
            self.deltas.put_nowait(error if error is not None else result)
        elif not self.future.done():
            self.future.set_exception(error) if error is not None else self.future.set_result(result)


class EngineLoop:
    def __init__(self, engine: LLMEngine, keepalive_s: float | None = None):
        self.engine, self.keepalive_s = engine, keepalive_s
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()   # callables run in the engine thread
        self.requests: list[_Request] = []                     # admitted: their sequences are in the engine
        self.pending: set[_Request] = set()                     # submitted, still in the inbox
        self.idle_calls: list = []                              # run once no request is running
        self.error: BaseException | None = None
        self.last_step = time.monotonic()
        self.steps = 0
        self._busy_since: float | None = None                   # start of the step (or idle call) running now
        self._last_busy = time.monotonic()                      # end of the last step, idle call or keepalive
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # -- callers (any thread with an event loop) ---------------------------------------------

    async def generate(self, prompts: list[list[int]], params: SamplingParams,
                       position_offsets: list[int] | None = None) -> list[RequestOutput]:
        loop = asyncio.get_running_loop()
        request = _Request(prompts, loop, future=loop.create_future())
        self._submit(lambda: self._admit(request, params, position_offsets), request)
        try:
            return await request.future
        except asyncio.CancelledError:                  # the caller left: free its blocks
            self.inbox.put(lambda: self._abort(request))
            raise

    async def stream(self, prompt: list[int], params: SamplingParams,
                     interval: Callable[[], float] | None = None) -> AsyncIterator[StreamDelta]:
        """Token deltas of each of the prompt's `params.n` samples as they are generated. With `interval`
        (read by the engine thread at each hand-off), the first delta comes at once and the next ones
        at most once per `interval()` seconds, each holding every token since the one before, or as soon
        as a sample ends: a caller that needs no per-token pace (a non-streamed answer, a stream that
        sends chunks only so often) then costs its event loop a wake-up per interval, not per step."""
        loop = asyncio.get_running_loop()
        request = _Request([prompt], loop, deltas=asyncio.Queue(), interval=interval)
        self._submit(lambda: self._admit(request, params, None), request)
        unfinished = params.n
        try:
            while unfinished:
                items = [await request.deltas.get()]
                while not request.deltas.empty():       # what came while the caller was busy: joined
                    items.append(request.deltas.get_nowait())
                for delta in _joined(items):
                    if isinstance(delta, BaseException):
                        raise delta
                    unfinished -= delta.finish_reason is not None
                    yield delta
        finally:
            if unfinished:                              # the caller left early: free its blocks
                self.inbox.put(lambda: self._abort(request))

    async def call(self, fn):
        """Run `fn(engine)` in the engine thread once no request is running (e.g. forward_logits)."""
        loop = asyncio.get_running_loop()
        request = _Request([], loop, future=loop.create_future())

        def run_when_idle():
            with self._lock:
                self.pending.discard(request)
            try:
                request.deliver(fn(self.engine))
            except Exception as e:
                request.deliver(error=e)
        self._submit(lambda: self.idle_calls.append(run_when_idle), request)
        return await request.future

    def explain(self, error: BaseException) -> BaseException:
        """The error requests see when a step raises; a TP group replaces this to name a dead rank."""
        return EngineError(f"engine failed: {error!r}")

    def fail(self, error: BaseException) -> None:
        """End every request in flight, queued or running, with the first error (e.g. a rank of the TP
        group died); the loop stops stepping and refuses new requests."""
        with self._lock:
            self.error = self.error or error
            requests = self.requests + list(self.pending)
            self.requests, self.pending = [], set()
        for request in requests:
            request.deliver(error=self.error)

    def watch_steps(self, timeout_s: float | None) -> None:
        """Fail the loop when one step (or idle call) runs longer than `timeout_s`: a rank stalled inside a
        collective never returns on its own, so without this its requests would wait forever."""
        if timeout_s:
            threading.Thread(target=self._watch, args=(timeout_s,), name="engine-watchdog", daemon=True).start()

    def _watch(self, timeout_s: float) -> None:
        while not self._stopping and self.error is None:
            time.sleep(min(1.0, timeout_s / 4))
            started = self._busy_since
            if started is not None and time.monotonic() - started > timeout_s:
                self.fail(EngineError(f"engine step still running after step_timeout_s={timeout_s:g}s: "
                                      "a rank is stalled (or the step hangs)"))

    def health(self) -> dict:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        return {"alive": self._thread.is_alive() and self.error is None,
                "error": repr(self.error) if self.error else None, "steps": self.steps,
                "seconds_since_step": time.monotonic() - self.last_step, "running": len(scheduler.running),
                "waiting": len(scheduler.waiting), "kv_blocks_used": blocks.num_used,
                "kv_blocks_total": blocks.num_blocks}

    def shutdown(self) -> None:
        self._stopping = True
        self.inbox.put(lambda: None)
        self._thread.join(timeout=30 if self.error is None else 1)     # a failed loop may sit in a collective

    # -- the engine thread -------------------------------------------------------------------

    def _submit(self, fn, request: _Request) -> None:
        with self._lock:                                # with fail(): a request is failed or run, never lost
            if self.error is not None:
                raise EngineError(f"engine failed earlier: {self.error}")
            self.pending.add(request)

        def guarded():
            try:
                fn()
            except Exception as e:                      # a bad request fails alone
                with self._lock:
                    self.pending.discard(request)
                request.deliver(error=e)
        self.inbox.put(guarded)

    def _admit(self, request: _Request, params: SamplingParams, offsets: list[int] | None) -> None:
        check_sampling(params, self.engine.model.spec.vocab_size)
        for prompt in request.prompts:
            self.engine.check_prompt(prompt, params.max_new_tokens)
        offsets = offsets or [0] * len(request.prompts)
        request.groups = [[self.engine.add_request(p, params, off, i, checked=True) for i in range(params.n)]
                          for p, off in zip(request.prompts, offsets)]
        with self._lock:
            self.pending.discard(request)
            if self.error is not None:                  # failed while this waited in the inbox
                raise self.error
            self.requests.append(request)

    def _abort(self, request: _Request) -> None:
        for seq in request.seqs():
            self.engine.abort(seq)
        with self._lock:
            if request in self.requests:
                self.requests.remove(request)

    def _run(self) -> None:
        try:
            while not self._stopping and self.error is None:
                self._drain(block=not self.engine.scheduler.has_work() and not self.idle_calls)
                while self.idle_calls and not self.engine.scheduler.has_work():
                    self._timed(self.idle_calls.pop(0))
                if self.engine.scheduler.has_work() and self.error is None:
                    self._timed(self.engine.step)
                    self.steps += 1
                    self.last_step = time.monotonic()
                    self._publish()
                elif self.keepalive_s and time.monotonic() - self._last_busy > self.keepalive_s:
                    self._timed(lambda: self.engine.runner.signal(KEEPALIVE))
            if self.error is None:                      # a failed group may not answer a collective
                self.engine.runner.signal(STOP)
        except BaseException as e:                      # the engine itself broke: fail everyone
            self.fail(self.explain(e))

    def _timed(self, fn) -> None:
        self._busy_since = time.monotonic()
        try:
            fn()
        finally:
            self._busy_since, self._last_busy = None, time.monotonic()

    def _drain(self, block: bool) -> None:
        try:
            fn = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        fn()
        while True:
            try:
                self.inbox.get_nowait()()
            except queue.Empty:
                return

    def _publish(self) -> None:
        """Send stream deltas; settle finished requests. What goes to one event loop goes in one
        hand-off a step (a wake-up of that loop each, not one per request)."""
        with self._lock:
            requests = list(self.requests)
        handoffs: dict[asyncio.AbstractEventLoop, list] = {}
        now = time.monotonic()
        for request in requests:
            done = request.done()
            if request.deltas is not None and (done or now >= request.next_at or _a_sample_ended(request)):
                deltas = self._new_deltas(request)
                if deltas and request.interval is not None:
                    request.next_at = now + request.interval()
                handoffs.setdefault(request.loop, []).extend((request.settle, delta) for delta in deltas)
            if done:
                if request.future is not None:
                    handoffs.setdefault(request.loop, []).append(
                        (request.settle, request_outputs(request.prompts, request.groups)))
                with self._lock:
                    self.requests.remove(request)
        for loop, calls in handoffs.items():
            if calls:
                _hand_off(loop, _settle_all, calls)

    @staticmethod
    def _new_deltas(request: _Request) -> list[StreamDelta]:
        deltas = []
        for i, seq in enumerate(request.groups[0]):
            if i in request.closed:
                continue
            sent = request.sent.get(i, 0)
            new = seq.output_token_ids[sent:]
            if new or seq.is_finished:
                deltas.append(StreamDelta(i, new, seq.finish_reason if seq.is_finished else None,
                                          None if seq.logprobs is None else seq.logprobs[sent:]))
                request.sent[i] = len(seq.output_token_ids)
                if seq.is_finished:
                    request.closed.add(i)
        return deltas


def _a_sample_ended(request: _Request) -> bool:
    """Whether one of a stream's samples finished and its last delta has not gone out."""
    return any(seq.is_finished and i not in request.closed for i, seq in enumerate(request.groups[0]))


def join_runs(items: list, key, join) -> list:
    """`items` in order, those of one key (`key(item)`) joined by `join(earlier, later)` at the place of
    the first until one with a finish_reason closes that key; an exception ends the list."""
    out, open_at = [], {}                          # key -> index in `out` of its unfinished item
    for item in items:
        if isinstance(item, BaseException):
            return out + [item]
        k = key(item)
        if k in open_at:
            out[open_at[k]] = join(out[open_at[k]], item)
        else:
            open_at[k] = len(out)
            out.append(item)
        if item.finish_reason is not None:
            del open_at[k]
    return out


def _joined(items: list) -> list:
    """Stream deltas with each sample's joined into one until its last; an error ends the list."""
    return join_runs(items, lambda d: d.index,
                     lambda a, b: StreamDelta(b.index, a.token_ids + b.token_ids, b.finish_reason,
                                              None if a.logprobs is None else a.logprobs + b.logprobs))


def _hand_off(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """`fn(*args)` in `loop`; nothing when that loop has closed (its callers are gone, and a closed
    caller must not break the engine for everyone else)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise


def _settle_all(calls: list) -> None:
    for settle, result in calls:
        settle(result)


def check_sampling(params: SamplingParams, vocab_size: int) -> None:
    """Refuse sampling values that would break a step in fp32 (inf/nan probabilities, int64 overflow),
    and with it every request in the batch; raises `RequestError` naming the fields."""
    problems = []
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        problems.append(f"stop_token_ids must lie in [0, {vocab_size})")
    if not params.greedy and params.temperature < SAMPLING_EPS:
        problems.append(f"temperature={params.temperature:g} is below {SAMPLING_EPS:g}: use 0 (greedy)")
    if not 1e-3 <= params.repetition_penalty <= 1e3:
        problems.append(f"repetition_penalty={params.repetition_penalty:g} is outside [0.001, 1000]")
    if params.top_k >= 2**63:
        problems.append("top_k must be below 2**63")
    if params.seed is not None and not -2**63 <= params.seed <= 2**64 - 1 - params.n:
        problems.append("seed must fit in 64 bits")
    if problems:
        raise RequestError("invalid sampling parameters: " + "; ".join(problems))
