"""A Ray Serve app for any supported causal LM: one replica = one TP group (the replica hosts rank 0
in bundle 0 of its placement group, the other ranks take the other bundles), OpenAI routes with SSE
streaming, `generate` / `generate_stream` for Python handles, autoscaling by whole TP groups.

    serve run serve_apps.llm:app model=s3://bucket/my-model tp_size=2
"""
import json
import os

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from actors.engine_loop import EngineError
from actors.sequence import RequestError
from cluster.tp_group import GroupError
from serve_apps.args import AppArgs
from serve_apps.metrics import ServerMetrics
from serve_apps.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_json,
                                 validation_message)
from serve_apps.server import OverloadedError, Unsupported, prepend, start_server

api = FastAPI(title="rayspeed", docs_url=None, redoc_url=None)


def _error(status: int, message: str, kind: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_json(message, kind, param, status), status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
    return _error(400, f"{param or 'body'}: {err.get('msg')}", "invalid_request_error", param)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    """Unknown routes and methods answer in OpenAI's error shape too."""
    return _error(exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers)


async def _sse(events) -> object:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`; an error mid-stream (a rank
    died, the engine failed) is sent as an error event (the HTTP status is already 200)."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
    except Exception as e:
        kind = "invalid_request_error" if isinstance(e, RequestError) else "server_error"
        yield f"data: {json.dumps(error_json(str(e) or type(e).__name__, kind))}\n\n"
    yield "data: [DONE]\n\n"


def _status_for(e: Exception) -> JSONResponse:
    if isinstance(e, ValidationError):
        message, param = validation_message(e)
        return _error(400, message, "invalid_request_error", param)
    if isinstance(e, LookupError):
        return _error(404, str(e), "invalid_request_error", "model", )
    if isinstance(e, Unsupported):
        return _error(400, str(e), "invalid_request_error")
    if isinstance(e, (RequestError, ValueError)):
        return _error(400, str(e), "invalid_request_error")
    if isinstance(e, OverloadedError):
        return _error(503, str(e), "server_overloaded", headers={"Retry-After": "1"})
    if isinstance(e, EngineError):                  # GroupError too: Serve replaces the replica
        return _error(503, str(e), "server_error", headers={"Retry-After": "5"})
    return _error(500, f"{type(e).__name__}: {e}", "server_error")


@serve.deployment
@serve.ingress(api)
class LLMDeployment:
    async def __init__(self, args: dict, checkpoint: str, model_name: str):
        self.args = AppArgs.parse(args)
        self.metrics = ServerMetrics(model_name)
        self.server = await start_server(self.args, checkpoint, model_name, ray.util.get_current_placement_group(),
                                         self.args.use_gpu(), self.metrics)
        self.group = self.server.engine

    # -- HTTP -----------------------------------------------------------------------------------

    def _refused(self, request: Request) -> JSONResponse | None:
        """The 401 answer when an API key is set and the request does not carry it, else None."""
        key = self.args.key
        if key is None or request.headers.get("authorization") == f"Bearer {key}":
            return None
        return _error(401, "missing or invalid API key (Authorization: Bearer ...)", "authentication_error")

    async def _run(self, request: Request, body_type, unary, streaming=None):
        if refused := self._refused(request):
            return refused
        raw = await self._body(request)
        if raw is None:
            return _error(413, f"request body exceeds max_body_bytes={self.args.max_body_bytes}",
                          "invalid_request_error")
        try:
            body = body_type.model_validate_json(raw)
            if streaming is not None and body.stream:
                events = streaming(body)
                first = await anext(events)            # errors before the first chunk get a status code
                return StreamingResponse(_sse(prepend(first, events)), media_type="text/event-stream")
            return JSONResponse(await unary(body))
        except Exception as e:
            return _status_for(e)

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None once it is over `max_body_bytes` (read no further than that)."""
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return None
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > limit:
                return None
        return bytes(raw)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._run(request, CompletionRequest, self.server.complete, self.server.complete_stream)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._run(request, ChatRequest, self.server.chat, self.server.chat_stream)

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self._run(request, TokenizeRequest, self.server.tokenize)

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self._run(request, DetokenizeRequest, self.server.detokenize)

    @api.get("/v1/models")
    async def models(self, request: Request):
        if refused := self._refused(request):
            return refused
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request):
        if refused := self._refused(request):
            return refused
        if model_id != self.server.model_name:
            return _error(404, f"model {model_id!r} is not served here; this server serves "
                               f"{self.server.model_name!r}", "invalid_request_error", "model")
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "rayspeed",
                "max_model_len": self.server.max_model_len}

    @api.get("/health")                                 # vLLM's name for it
    @api.get("/healthz")
    async def healthz(self):
        try:
            return self._health()
        except Exception as e:
            return _status_for(e)

    # -- Python handles and Serve --------------------------------------------------------------

    async def generate(self, prompt, **sampling) -> dict:
        """`handle.generate.remote("DeepSpeed is", max_new_tokens=50)` -> {"text", "token_ids", ...}."""
        return await self.server.generate(prompt, **sampling)

    async def generate_stream(self, prompt: str, max_tokens: int = 16, **fields):
        """`handle.options(stream=True).generate_stream.remote(prompt, ...)`: text deltas."""
        body = CompletionRequest(prompt=prompt, max_tokens=max_tokens, stream=True, **fields)
        async for event in self.server.complete_stream(body):
            for choice in event["choices"]:
                yield choice["text"]

    def ranks(self) -> list[dict]:
        """The TP group's load report, one dict per rank (rank, pid, device, kv_blocks, load_s, ...)."""
        return self.group.report["ranks"]

    def _health(self) -> dict:
        health = {**self.group.health(), "queued": self.server.queued}
        self.metrics.observe_engine(health)
        stalled = (health["running"] or health["waiting"]) and health["seconds_since_step"] > self.args.stall_timeout_s
        if stalled:
            raise GroupError(f"engine stalled: no step for {health['seconds_since_step']:.0f}s with work queued")
        return health

    async def check_health(self) -> None:
        """Serve's health check, from the engine loop's own state (not a request through the queue)."""
        self._health()

    async def __del__(self):
        await self.group.shutdown()


def resolve_model(model: str) -> str:
    """A local dir or fsspec URI as given; an HF hub id through the local HF cache (downloads only
    where the hub is reachable)."""
    if "://" in model or os.path.exists(model) or model.count("/") != 1:
        return model
    from huggingface_hub import snapshot_download
    return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])


def build_app(args: dict | AppArgs | None = None, default_model=None) -> serve.Application:
    """The application for `args`; `default_model()` gives the checkpoint when `model` is unset."""
    args = AppArgs.parse(args)
    checkpoint = resolve_model(args.model) if args.model else default_model(args)
    name = args.served_model_name or os.path.basename(checkpoint.rstrip("/"))
    options = args.deployment_options(args.use_gpu())
    return LLMDeployment.options(name="LLMDeployment", **options).bind(args.model_dump(), checkpoint, name)


def app(args: dict) -> serve.Application:
    """Builder for `serve run serve_apps.llm:app model=...` (model is required here)."""
    if not (args or {}).get("model"):
        raise ValueError("serve_apps.llm:app needs model=<dir, fsspec URI or hub id>")
    return build_app(args)
