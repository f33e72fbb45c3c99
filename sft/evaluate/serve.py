"""`hf_sft_eval.py serve`: an OpenAI-compatible HTTP server for any checkpoint the evaluator loads.

    python hf_sft_eval.py serve --model outputs/demo                  # http://127.0.0.1:8000/v1
    python hf_sft_eval.py serve --model outputs/lora_run --api_key s3cret --port 8080

    GET  /v1/models             the one served model
    POST /v1/chat/completions   messages (+ tools) rendered by the training renderer; stream, stop, seed, usage
    POST /v1/completions        raw text prompt
    GET  /health                liveness and queue counters (no key needed)

FastAPI + uvicorn. Generation runs one request at a time on a worker thread (sft.evaluate.generation_worker);
a client that disconnects cancels its generation; SIGTERM lets in-flight requests finish for up to
--shutdown_seconds, then cancels them. Every error is an OpenAI-style JSON body.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sft.config import parse_args
from sft.evaluate import openai_api as api
from sft.evaluate.cli import configure_model_command
from sft.evaluate.generation_worker import Finished, GenerationWorker, Job
from sft.evaluate.inference import load_for_inference, prompt_ids
from sft.evaluate.options import ModelChoice, ServeOptions

logger = logging.getLogger(__name__)

API_KEY_ENV = "SFT_SERVE_API_KEY"


@dataclass
class ServedModel:
    """What the app serves: the loaded model and how its prompts are rendered and bounded."""

    name: str
    model: Any
    tokenizer: Any
    template: str = "auto"
    system_prompt: str | None = None
    default_max_tokens: int = 256
    max_context: int = 2048


# -------------------------------------------------------------------------------- the app


def create_app(served: ServedModel, options: ServeOptions) -> FastAPI:
    """The FastAPI app for one loaded model (tests and serve_main both build it here)."""
    worker = GenerationWorker(served.model, served.tokenizer, options.max_queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        worker.close()  # after uvicorn's graceful wait: queued jobs are dropped, the running one stops

    app = FastAPI(title="sft serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    _install_errors(app)
    app.add_middleware(BodyLimit, max_bytes=options.max_request_bytes)
    key = options.api_key

    async def authorized(request: Request) -> None:
        sent = request.headers.get("authorization", "").encode()
        if key and not secrets.compare_digest(sent, f"Bearer {key}".encode()):  # constant time: no key guessing
            raise api.ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>` (the server's "
                               "--api_key or $" + API_KEY_ENV + ")", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "closing" if worker.closing else "ok", "model": served.name, **asdict(worker.stats)}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "sft"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(request: Request):
        body = await _parse_body(request, api.ChatRequest)
        _check_model(body.model, served)
        api.check_common(body)
        conv = api.chat_conversation(body, options.max_messages)
        try:
            ids = prompt_ids(conv, served.tokenizer, served.template, served.system_prompt)
        except ValueError as err:
            raise api.ApiError(400, f"messages: {err}", "messages") from err
        job = _job(body, ids, body.max_completion_tokens or body.max_tokens, served, options)
        job.hold_tool_calls = bool(conv.tools)
        worker.admit()
        if body.stream:
            return _sse(_chat_stream(worker, job, served.name, len(ids), bool(conv.tools), _include_usage(body)), job)
        done = await _run_watching(worker, job, request)
        return api.chat_response(api.new_id("chatcmpl"), served.name, done.text, done.finish, len(ids),
                                 done.num_tokens, bool(conv.tools))

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        body = await _parse_body(request, api.CompletionRequest)
        _check_model(body.model, served)
        api.check_common(body)
        ids = served.tokenizer(api.completion_prompt(body))["input_ids"]
        if not ids:
            raise api.ApiError(400, "prompt: empty; send some text to continue", "prompt")
        job = _job(body, ids, body.max_tokens, served, options)
        worker.admit()
        if body.stream:
            return _sse(_completion_stream(worker, job, served.name, len(ids), _include_usage(body)), job)
        done = await _run_watching(worker, job, request)
        return api.completion_response(api.new_id("cmpl"), served.name, done.text, done.finish, len(ids),
                                       done.num_tokens)

    return app


async def _parse_body(request: Request, schema):
    """The JSON body as `schema`: 400 when it is not JSON (whatever the Content-Type), 422 on wrong types."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise api.ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object",
                           code="invalid_json") from err
    if not isinstance(data, dict):
        raise api.ApiError(400, f"the request body is a JSON {type(data).__name__}; send a JSON object",
                           code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from err


def _check_model(name: str, served: ServedModel) -> None:
    if name != served.name:
        raise api.ApiError(404, f"model {name!r} is not served here; this server serves {served.name!r} "
                           "(see GET /v1/models)", "model", "model_not_found")


def _include_usage(body) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def _job(body, ids: list[int], max_tokens: int | None, served: ServedModel, options: ServeOptions) -> Job:
    """Checks the token budget (OpenAI's context_length_exceeded) and builds the generation job."""
    if max_tokens is not None and max_tokens > options.max_tokens_limit:
        raise api.ApiError(400, f"max_tokens={max_tokens}: at most {options.max_tokens_limit} on this server "
                           "(--max_tokens_limit)", "max_tokens", "max_tokens_too_large")
    room = served.max_context - len(ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise api.ApiError(400, f"the prompt is {len(ids)} tokens and max_tokens is {max_tokens}: more than the "
                           f"{served.max_context}-token context; shorten the messages or lower max_tokens",
                           "messages", "context_length_exceeded")
    budget = max_tokens if max_tokens is not None else min(served.default_max_tokens, room)
    return Job(ids=ids, max_new_tokens=budget, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
               stop_strings=api.stop_sequences(body), ignore_eos=body.ignore_eos)


async def _run_watching(worker: GenerationWorker, job: Job, request: Request) -> Finished:
    """Await a non-streamed job, polling for a client disconnect (which cancels it)."""
    task = asyncio.ensure_future(worker.run(job))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel.set()
                logger.info("client disconnected: generation cancelled")
                return await task
    except BaseException:  # this handler was cancelled (shutdown timeout): the generation must stop too
        job.cancel.set()
        raise


# ------------------------------------------------------------------------------------ streaming


class _JobStream(StreamingResponse):
    """A streamed response that cancels its job however the response ends. Starlette does not close the event
    iterator when the response is cancelled (client gone, shutdown timeout) while it waits in send() on a
    client that stopped reading, so the iterator's own cleanup cannot be relied on."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.cancel.is_set():
                self.job.cancel.set()  # a no-op when the generation has already ended


def _sse(events: AsyncIterator[dict], job: Job) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return _JobStream(lines(), job)


async def _stream_job(worker: GenerationWorker, job: Job) -> AsyncIterator[str | Finished]:
    """Text deltas as they are generated, then the Finished result. Closing the iterator (the client went
    away: Starlette cancels the response) cancels the job."""
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(worker.run(job, on_text=queue.put_nowait))
    task.add_done_callback(lambda _t: queue.put_nowait(None))
    try:
        while True:
            delta = await queue.get()
            if delta is None:
                break
            yield delta
        while not queue.empty():  # deltas that raced with the end
            delta = queue.get_nowait()
            if delta is not None:
                yield delta
        yield task.result()
    finally:
        if not task.done():
            job.cancel.set()
            logger.info("stream closed before the end: generation cancelled")


async def _chat_stream(worker, job: Job, model: str, prompt_tokens: int, tools: bool,
                       include_usage: bool) -> AsyncIterator[dict]:
    rid, created = api.new_id("chatcmpl"), int(time.time())
    yield api.chat_chunk(rid, model, created, {"role": "assistant", "content": ""})
    async for item in _stream_job(worker, job):
        if isinstance(item, str):
            yield api.chat_chunk(rid, model, created, {"content": item})
            continue
        finish = item.finish
        if tools and api.TOOL_CALL_START in item.text:  # the text from the first block on was held back
            rest, calls = api.parse_tool_calls(item.text[item.text.index(api.TOOL_CALL_START):])
            if rest:  # text around the blocks, or a block that is not a valid call
                yield api.chat_chunk(rid, model, created, {"content": rest})
            if calls:
                finish = "tool_calls"
                yield api.chat_chunk(rid, model, created, {"tool_calls": [
                    {"index": k, **call} for k, call in enumerate(calls)]})
        yield api.chat_chunk(rid, model, created, {}, finish)
        if include_usage:
            yield {**api.chat_chunk(rid, model, created, {}), "choices": [],
                   "usage": api.usage(prompt_tokens, item.num_tokens)}


async def _completion_stream(worker, job: Job, model: str, prompt_tokens: int,
                             include_usage: bool) -> AsyncIterator[dict]:
    rid, created = api.new_id("cmpl"), int(time.time())
    async for item in _stream_job(worker, job):
        if isinstance(item, str):
            yield api.completion_chunk(rid, model, created, item)
            continue
        yield api.completion_chunk(rid, model, created, "", item.finish)
        if include_usage:
            yield {**api.completion_chunk(rid, model, created, ""), "choices": [],
                   "usage": api.usage(prompt_tokens, item.num_tokens)}


# ------------------------------------------------------------------------------ errors and limits


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(api.ApiError)
    async def api_error(_request, err: api.ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        problems = err.errors()
        where = ".".join(str(part) for part in problems[0].get("loc", ()) if part != "body")
        text = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body') or 'body'}: {p.get('msg')}"
                         for p in problems[:5])
        return JSONResponse(api.ApiError(422, f"invalid request: {text}", where or None, "invalid_type").body(),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        return JSONResponse(api.ApiError(err.status_code, str(err.detail), code="not_found"
                                         if err.status_code == 404 else None).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def crashed(_request, err: Exception):
        logger.exception("request failed")
        return JSONResponse(api.ApiError(500, f"internal error: {type(err).__name__}: {err}",
                                         kind="server_error").body(), status_code=500)


class BodyLimit:
    """ASGI middleware: a request body over max_bytes is refused with 413 before it is parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(int(declared), send)
        if declared is not None:
            return await self.app(scope, receive, send)
        body, more = b"", True  # chunked upload: read it here, up to the limit
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(len(body), send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, size: int, send) -> None:
        response = JSONResponse(api.ApiError(413, f"the request body is {size} bytes, more than this server's "
                                             f"{self.max_bytes} (--max_request_bytes)", code="request_too_large"
                                             ).body(), status_code=413)
        await response({"type": "http"}, None, send)


# ------------------------------------------------------------------------------------ entry point


def _context_limit(model, tokenizer, configured: int | None) -> int:
    limits = [configured, getattr(model.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**7]  # tokenizers say 1e30 for "unknown"
    return min(limits) if limits else 2048


def _use_gpu(device: str) -> None:
    """hf_sft_eval.py hides the GPUs from CPU jobs; `serve --device cuda` asks for one, so give back the user's
    CUDA_VISIBLE_DEVICES (CUDA is not initialized yet, so torch reads it afresh) and fail clearly without a GPU."""
    import torch

    if os.environ.pop("SFT_EVAL_GPUS_HIDDEN", None):
        users = os.environ.pop("SFT_EVAL_CUDA_VISIBLE_DEVICES", None)
        if users is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = users
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device on this machine (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); serve on the CPU with --device cpu")


def serve_main(argv: list[str]) -> int:
    """Load the model once and serve it until SIGTERM/Ctrl-C."""
    import uvicorn

    args, options = parse_args(
        (ModelChoice, ServeOptions), argv, prog="hf_sft_eval.py serve",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API (FastAPI + uvicorn).")
    options.api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    if options.device.startswith("cuda"):
        _use_gpu(options.device)
    dtype = configure_model_command("serve", args, options.device)
    model, tokenizer = load_for_inference(args.model, base_model=args.base_model, dtype=dtype, device=options.device)
    served = ServedModel(options.served_name or args.model, model, tokenizer, args.template, args.system_prompt,
                         options.default_max_tokens, _context_limit(model, tokenizer, options.max_context))
    prompt_ids(api.chat_conversation(api.ChatRequest(model="x", messages=[{"role": "user", "content": "hi"}]), 1),
               tokenizer, served.template, served.system_prompt)  # a template that cannot render fails now
    if options.host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        logger.warning("serving on %s without --api_key: anyone who reaches this port can use the model",
                       options.host)
    # log_config=None: uvicorn's own logging.config.dictConfig would first close every handler the process has
    # (logging.shutdown); its records go to our root handler instead.
    config = uvicorn.Config(create_app(served, options), host=options.host, port=options.port, log_level="info",
                            timeout_graceful_shutdown=options.shutdown_seconds, access_log=False, log_config=None)
    server = uvicorn.Server(config)
    print(f"serving {served.name!r} on http://{options.host}:{options.port}/v1 (context {served.max_context} "
          f"tokens{', API key required' if options.api_key else ''})", flush=True)
    server.run()
    return 0
