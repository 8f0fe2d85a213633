"""Plumbing shared by the OpenAI endpoints: submitting to the engine, following the streams,
aborting on disconnect, SSE framing, and logprob formatting.

The rule everything here keeps: a request the client no longer waits for is aborted, so its
KV pages are freed at the engine's next step rather than when generation would have ended.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagoda.engine.async_engine import AsyncEngine, RequestStream
from pagoda.engine.outputs import RequestOutput, TokenLogprob
from pagoda.engine.sampling_params import SamplingParams
from pagoda.errors import InvalidRequestError, ModelNotFoundError
from pagoda.server.errors import APIError, api_error_from, error_body
from pagoda.server.metrics import RequestTracker

MIN_LOGPROB = -9999.0  # JSON has no -Infinity; OpenAI clients expect a number


def make_params(fields: dict[str, Any], renames: dict[str, str] | None = None) -> SamplingParams:
    """SamplingParams from request fields (None = its default); errors keep the field the client sent."""
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except InvalidRequestError as e:
        raise rename_param(e, renames) from None


def rename_param(e: InvalidRequestError, renames: dict[str, str] | None) -> APIError:
    param = (renames or {}).get(e.param or "", e.param)
    if isinstance(e, ModelNotFoundError):  # e.g. a LoRA adapter unloaded since the model was resolved
        return APIError(404, e.message, param=param, code="model_not_found")
    return APIError(400, e.message, param=param)


async def submit(
    engine: AsyncEngine, prompts: list[str | list[int]], params: SamplingParams | None, request_id: str,
    priority: int, renames: dict[str, str] | None = None, pooling: str | None = None, lora: str | None = None,
) -> list[RequestStream]:
    """Queue one engine request per prompt (embedding requests with `pooling`; `lora`: the adapter
    they run with); if any is refused, the ones already queued are aborted."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(await engine.add_request(prompt, params, rid, priority, pooling, lora))
    except InvalidRequestError as e:
        abort_unfinished(engine, streams)
        raise rename_param(e, renames) from None
    except BaseException:
        abort_unfinished(engine, streams)
        raise
    return streams


async def _outputs(stream: RequestStream) -> AsyncIterator[RequestOutput]:
    """A stream's outputs up to and including the one that ends it."""
    async for output in stream:
        if output.finished:
            stream.finished = True
            yield output
            return
        yield output


def abort_unfinished(engine: AsyncEngine, streams: list[RequestStream]) -> None:
    for stream in streams:
        if not stream.finished:
            engine.abort(stream.request_id)


async def follow(
    engine: AsyncEngine, streams: list[RequestStream], trackers: list[RequestTracker]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all streams as they arrive; leaving early aborts the rest."""
    try:
        if len(streams) == 1:
            async for output in _outputs(streams[0]):
                trackers[0].on_output(output)
                yield 0, output
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for output in _outputs(streams[i]):
                    await queue.put((i, output))
            except Exception as e:  # handed to the consumer, which re-raises
                await queue.put((i, e))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        try:
            remaining = len(streams)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    trackers[i].on_output(item)
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
    finally:
        abort_unfinished(engine, streams)
        for tracker in trackers:
            tracker.abandon()


async def collect(
    engine: AsyncEngine, streams: list[RequestStream], trackers: list[RequestTracker], raw: Request
) -> list[RequestOutput]:
    """The final output of each stream; a client that hangs up meanwhile gets its requests aborted."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    watcher = asyncio.create_task(_abort_on_disconnect(engine, streams, raw))
    try:
        async for i, output in follow(engine, streams, trackers):
            finals[i] = output
    finally:
        watcher.cancel()
    return [f for f in finals if f is not None]


async def _abort_on_disconnect(engine: AsyncEngine, streams: list[RequestStream], raw: Request) -> None:
    """The body is already read, so the next ASGI message can only be the client going away."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            abort_unfinished(engine, streams)
            return


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def named_sse(event: str, data: dict[str, Any]) -> str:
    """An SSE event with its type line (Anthropic's and the Responses API's framing)."""
    return f"event: {event}\n{sse(data)}"


def openai_stream_error(e: APIError) -> str:
    return sse(error_body(e.message, e.type, e.param, e.code)) + SSE_DONE


async def sse_guard(events: AsyncIterator[str], on_error: Callable[[APIError], str]) -> AsyncIterator[str]:
    """Once the 200 is sent an error can only travel in the stream: the API's error event(s)."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        yield on_error(api_error_from(exc))
    finally:
        await events.aclose()  # type: ignore[attr-defined]


class SSEResponse(StreamingResponse):
    """Closes the event generator however the response ends (client gone, cancelled, finished),
    which runs its ``finally`` and so aborts the engine request. `on_error` writes a failure in the
    API's own events (OpenAI's: an error body, then [DONE])."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_error: Callable[[APIError], str] = openai_stream_error) -> None:
        super().__init__(sse_guard(events, on_error), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class TokenText:
    """Token id -> the text OpenAI shows for it (its decode alone), cached: vocabularies are fixed."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.cache[token_id] = text
        return text

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=False)


def clamp(logprob: float) -> float:
    return MIN_LOGPROB if math.isnan(logprob) or logprob < MIN_LOGPROB else float(logprob)


def chat_logprobs(entries: list[TokenLogprob], top_n: int, text: TokenText) -> dict[str, Any]:
    """Chat's shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        s = text(token_id)
        return {"token": s, "logprob": clamp(logprob), "bytes": list(s.encode("utf-8"))}

    return {"content": [
        {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:top_n]]} for e in entries
    ]}


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], top_n: int, text: TokenText, offset: int = 0, first_token: int | None = None
) -> dict[str, Any]:
    """Completions' shape: parallel lists; the first prompt token (``first_token``) has no logprob."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for e in entries:
        text_offset.append(offset)
        if e is None:  # the first prompt token: nothing precedes it
            s = "" if first_token is None else text(first_token)
            tokens.append(s)
            offset += len(s)
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        s = text(e.token_id)
        tokens.append(s)
        offset += len(s)
        token_logprobs.append(clamp(e.logprob))
        top = {text(t): clamp(lp) for t, lp in e.top[:top_n]}
        top.setdefault(s, clamp(e.logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def merge_completion_logprobs(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def usage(outputs: list[RequestOutput], completion_tokens: int | None = None) -> dict[str, Any]:
    """Usage over all prompts and choices (every choice's tokens count, as OpenAI bills them)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs) if completion_tokens is None \
        else completion_tokens
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
