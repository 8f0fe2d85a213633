"""The FastAPI app: OpenAI routes, tokenizer utilities, health, metrics and the web chat page.

Bodies are read and validated here rather than by FastAPI's signature parsing, so every failure
(bad JSON, wrong type, oversize) is an OpenAI error body with the offending `param`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from pagoda import __version__
from pagoda.engine.async_engine import AsyncEngine
from pagoda.server.anthropic_api import AnthropicMessages, CountTokensRequest, MessagesRequest
from pagoda.server.embeddings import EmbeddingRequest, Embeddings
from pagoda.server.errors import APIError, GuardMiddleware, error_response, install_exception_handlers, validation_error
from pagoda.server.metrics import CONTENT_TYPE, ServerMetrics
from pagoda.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from pagoda.server.responses_api import Responses, ResponsesRequest
from pagoda.server.serving import OpenAIServing

MAX_BODY_BYTES = 16 * 1024 * 1024
# A router in front (sglang-router) probes /health and the info routes without a key.
OPEN_PATHS = ("/health", "/metrics", "/", "/favicon.ico", "/version", "/docs", "/openapi.json",
              "/model_info", "/get_model_info", "/server_info", "/get_server_info")
WEB_FILES = {"index.html": "text/html", "chat.js": "text/javascript", "chat.css": "text/css"}

M = TypeVar("M", bound=BaseModel)


class AuthMiddleware:
    """Bearer-token check for everything but health, metrics and the page itself (whose script
    sends the key it is given)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith("/web/") \
                or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth, api_key = headers.get(b"authorization", b""), headers.get(b"x-api-key")  # x-api-key: Anthropic's
        scheme, _, token = auth.partition(b" ")
        if api_key is not None:
            scheme, token = b"bearer", api_key
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            message = "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'" \
                if not (auth or api_key) else "incorrect API key"
            await error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                                 path=scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def parse(request: Request, model: type[M]) -> M:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


def create_app(
    engine: AsyncEngine, served_model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
    tool_call_parser: str = "hermes", reasoning_parser: str | None = None, pooling: str = "last",
) -> FastAPI:
    """Build the app around a running AsyncEngine (the caller owns its lifetime)."""
    app = FastAPI(title="pagoda", version=__version__, docs_url="/docs", redoc_url=None)
    metrics = ServerMetrics(engine)
    serving = OpenAIServing(engine, served_model_name, metrics, tool_call_parser, reasoning_parser)
    app.state.engine, app.state.metrics, app.state.draining = engine, metrics, False
    created = int(time.time())
    install_exception_handlers(app)
    if api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key)
    # Browser clients on other origins (as vLLM allows); the key, if any, is still required.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(GuardMiddleware, max_body_bytes=max_body_bytes)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serving.chat(await parse(request, ChatCompletionRequest), request)

    messages_api = AnthropicMessages(serving)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await messages_api.create(await parse(request, MessagesRequest), request)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict[str, Any]:
        return await messages_api.count_tokens(await parse(request, CountTokensRequest))

    responses_api = Responses(serving)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await responses_api.create(await parse(request, ResponsesRequest), request)

    embeddings_api = Embeddings(serving, pooling)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        return await embeddings_api.create(await parse(request, EmbeddingRequest), request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serving.completions(await parse(request, CompletionRequest), request)

    def model_card(lora: tuple[str, str] | None = None) -> dict[str, Any]:
        card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "pagoda",
                "root": served_model_name, "parent": None, "max_model_len": engine.model_info.context_length}
        if lora is not None:  # an adapter: vLLM's card, its base as parent
            card.update(id=lora[0], root=lora[1], parent=served_model_name)
        return card

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(), *(model_card(a) for a in engine.lora_adapters())]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        lora = serving.resolve_model(model)
        return model_card(None if lora is None else next(a for a in engine.lora_adapters() if a[0] == lora))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        req = await parse(request, LoadLoRAAdapterRequest)
        if req.lora_name == served_model_name:
            raise APIError(400, f"'{req.lora_name}' is the base model's name", param="lora_name")
        await engine.load_lora(req.lora_name, req.lora_path)
        return JSONResponse({"object": "lora_adapter", "lora_name": req.lora_name, "status": "loaded",
                             "message": f"Success: LoRA adapter '{req.lora_name}' added successfully."})

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        req = await parse(request, UnloadLoRAAdapterRequest)
        if req.lora_name not in {name for name, _ in engine.lora_adapters()}:
            raise APIError(404, f"the LoRA adapter '{req.lora_name}' does not exist", param="lora_name",
                           code="lora_not_found")
        in_use = await engine.unload_lora(req.lora_name)
        if in_use:
            return JSONResponse({"object": "lora_adapter", "lora_name": req.lora_name, "status": "unloading",
                                 "message": f"LoRA adapter '{req.lora_name}' is in use by {in_use} request(s): "
                                            "new requests are refused and it unloads when the last one ends."})
        return JSONResponse({"object": "lora_adapter", "lora_name": req.lora_name, "status": "unloaded",
                             "message": f"Success: LoRA adapter '{req.lora_name}' removed successfully."})

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return error_response(503, "the engine thread has stopped", "server_error", code="engine_dead")
        if app.state.draining:
            return error_response(503, "the server is shutting down", "server_error", code="shutting_down")
        return JSONResponse({"status": "ok"})

    # The probes sglang-router sends a worker as it registers it (it tries the new name, then the
    # old one): the model's name, whether it is generative, and the server's settings. A worker
    # that does not answer them is still registered, but as model "unknown".
    def model_info_body() -> dict[str, Any]:
        info = engine.model_info
        return {"model_path": served_model_name, "tokenizer_path": served_model_name,
                "is_generation": True, "architecture": info.architecture,
                "max_model_len": info.context_length, "vocab_size": info.vocab_size}

    def server_info_body() -> dict[str, Any]:
        info = engine.model_info
        return {"version": __version__, "engine": "pagoda", "served_model_name": served_model_name,
                "context_length": info.context_length, "max_total_num_tokens": info.kv_tokens,
                "dp_size": 1, "tp_size": info.tensor_parallel_size}

    for path in ("/model_info", "/get_model_info"):
        app.add_api_route(path, model_info_body, methods=["GET"])
    for path in ("/server_info", "/get_server_info"):
        app.add_api_route(path, server_info_body, methods=["GET"])

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await parse(request, TokenizeRequest)
        serving.check_model(req.model)
        tok = engine.tokenizer
        if isinstance(req.prompt, list):
            tokens = req.prompt
            engine.check_token_ids(tokens, "prompt")
        elif tok is None:
            raise APIError(400, "this model has no tokenizer: only token ids can be used",
                           param="prompt" if req.prompt is not None else "messages")
        elif req.prompt is not None:
            tokens = await asyncio.to_thread(tok.encode, req.prompt, req.add_special_tokens)
        else:
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
            tokens = await serving.encode_chat(req.messages or [], tools, req.add_generation_prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.model_info.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await parse(request, DetokenizeRequest)
        serving.check_model(req.model)
        engine.check_token_ids(req.tokens, "tokens")
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so tokens cannot be turned into text", param="tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> Response:
        return web_file("index.html")

    @app.get("/web/{name}")
    async def web(name: str) -> Response:
        return web_file(name)

    return app


def web_file(name: str) -> Response:
    """The chat page's files, read from the installed package (no build step, no CDN)."""
    if name not in WEB_FILES:
        raise APIError(404, f"no such file: /web/{name}", code="not_found")
    data = resources.files("pagoda.server").joinpath("web", name).read_bytes()
    return Response(data, media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})
