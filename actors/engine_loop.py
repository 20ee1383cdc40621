"""`EngineLoop`: an `LLMEngine` stepping in its own thread, so asyncio callers (a Ray actor, a Serve
replica) can add requests at any time; they join the running batch at the next step boundary."""
import asyncio
import queue
import threading
import time
from dataclasses import dataclass

from actors.llm_engine import LLMEngine
from actors.model_runner import STOP
from actors.outputs import RequestOutput, request_outputs
from actors.sequence import SamplingParams, Sequence


@dataclass
class _Pending:
    prompts: list[list[int]]
    groups: list[list[Sequence]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def done(self) -> bool:
        return all(s.is_finished for g in self.groups for s in g)


def _resolve(pending: _Pending, result=None, error: BaseException | None = None) -> None:
    def settle():
        if not pending.future.done():
            pending.future.set_exception(error) if error else pending.future.set_result(result)
    pending.loop.call_soon_threadsafe(settle)


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()   # callables run in the engine thread
        self.pending: list[_Pending] = []
        self.idle_calls: list = []                              # run once no request is running
        self.error: BaseException | None = None
        self.last_step = time.monotonic()
        self.steps = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, prompts: list[list[int]], params: SamplingParams,
                       position_offsets: list[int] | None = None) -> list[RequestOutput]:
        loop = asyncio.get_running_loop()
        pending = _Pending(prompts, [], loop, loop.create_future())

        def admit():
            for prompt in prompts:
                self.engine.check_prompt(prompt, params.max_new_tokens)
            offsets = position_offsets or [0] * len(prompts)
            pending.groups = [[self.engine.add_request(p, params, off, i) for i in range(params.n)]
                              for p, off in zip(prompts, offsets)]
            self.pending.append(pending)
        self._submit(admit, pending)
        return await pending.future

    async def call(self, fn):
        """Run `fn(engine)` in the engine thread once no request is running (e.g. forward_logits)."""
        loop = asyncio.get_running_loop()
        pending = _Pending([], [], loop, loop.create_future())

        def run_when_idle():
            try:
                _resolve(pending, fn(self.engine))
            except Exception as e:
                _resolve(pending, error=e)
        self._submit(lambda: self.idle_calls.append(run_when_idle), pending)
        return await pending.future

    def _submit(self, fn, pending: _Pending) -> None:
        if self.error is not None:
            raise RuntimeError(f"engine failed earlier: {self.error!r}")

        def guarded():
            try:
                fn()
            except Exception as e:                     # a bad request fails alone
                _resolve(pending, error=e)
        self.inbox.put(guarded)

    def health(self) -> dict:
        return {"alive": self._thread.is_alive() and self.error is None, "error": repr(self.error) if self.error else None,
                "steps": self.steps, "seconds_since_step": time.monotonic() - self.last_step,
                "running": len(self.engine.scheduler.running), "waiting": len(self.engine.scheduler.waiting),
                "kv_blocks_used": self.engine.block_manager.num_used,
                "kv_blocks_total": self.engine.block_manager.num_blocks}

    def shutdown(self) -> None:
        self._stopping = True
        self.inbox.put(lambda: None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain(block=not self.engine.scheduler.has_work() and not self.idle_calls)
                while self.idle_calls and not self.engine.scheduler.has_work():
                    self.idle_calls.pop(0)()
                if self.engine.scheduler.has_work():
                    self.engine.step()
                    self.steps += 1
                    self.last_step = time.monotonic()
                    self._settle_finished()
            self.engine.runner.signal(STOP)
        except BaseException as e:                     # the engine itself broke: fail everyone
            self.error = e
            for pending in self.pending:
                _resolve(pending, error=RuntimeError(f"engine failed: {e!r}"))
            self.pending.clear()

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

    def _settle_finished(self) -> None:
        still = []
        for pending in self.pending:
            if pending.done():
                _resolve(pending, request_outputs(pending.prompts, pending.groups))
            else:
                still.append(pending)
        self.pending = still
