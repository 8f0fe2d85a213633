"""/v1/chat/completions and /v1/completions: requests to SamplingParams, outputs to OpenAI bodies.

Both endpoints share one flow: validate, submit (engine errors raise before any byte is sent,
so they are proper 4xx), then either collect the final outputs or stream deltas as SSE.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.server.errors import APIError
from pagoda.server.metrics import RequestTracker, ServerMetrics
from pagoda.server.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from pagoda.server.streaming import (
    SSE_DONE,
    SSEResponse,
    TokenText,
    chat_logprobs,
    collect,
    completion_logprobs,
    follow,
    make_params,
    merge_completion_logprobs,
    sse,
    submit,
    usage,
)


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.text = TokenText(engine.tokenizer)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    @staticmethod
    def _common(req: _SamplingFields) -> dict[str, Any]:
        return dict(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty, logit_bias=req.logit_bias, seed=req.seed, stop=req.stop,
            stop_token_ids=req.stop_token_ids, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
        )

    def _trackers(self, request_id: str, count: int) -> list[RequestTracker]:
        return [self.metrics.tracker(request_id if count == 1 else f"{request_id}-{i}") for i in range(count)]

    # ---- chat ------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        max_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        renames = {"max_tokens": max_name, "logprobs": "top_logprobs"}
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        params = make_params({**self._common(req), "max_tokens": req.effective_max_tokens, "logprobs": top_n},
                             renames)
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat: use /v1/completions with token ids",
                           param="messages")
        messages = [m.to_template() for m in req.messages]
        encode = functools.partial(tok.encode_chat, messages, req.add_generation_prompt, req.tools,
                                   **(req.chat_template_kwargs or {}))
        prompt_ids = await asyncio.to_thread(encode)
        request_id = f"chatcmpl-{req.request_id or uuid.uuid4().hex}"
        streams = await submit(self.engine, [prompt_ids], params, request_id, req.priority, renames)
        trackers = self._trackers(request_id, 1)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._chat_events(follow(self.engine, streams, trackers), request_id, created,
                                                 req.n, top_n, include_usage))
        (final,) = await collect(self.engine, streams, trackers, raw)
        choices = [
            {"index": c.index, "message": {"role": "assistant", "content": c.text},
             "logprobs": chat_logprobs(c.logprobs or [], top_n, self.text) if top_n is not None else None,
             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            for c in final.outputs
        ]
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created,
                             "model": self.model_name, "choices": choices, "usage": usage([final])})

    async def _chat_events(
        self, outputs: AsyncIterator[tuple[int, RequestOutput]], request_id: str, created: int, n: int,
        top_n: int | None, include_usage: bool,
    ) -> AsyncIterator[str]:
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None,
                  stop_reason: Any = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop_reason
            return sse({**base, "choices": [choice], **extra})

        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            done = [False] * n
            final: RequestOutput | None = None
            async for _, output in outputs:
                final = output
                for c in output.outputs:
                    if done[c.index] or not (c.delta_text or c.delta_token_ids or c.finished):
                        continue
                    done[c.index] = c.finished
                    lp = chat_logprobs(c.delta_logprobs, top_n, self.text) if top_n is not None else None
                    delta = {"content": c.delta_text} if c.delta_text or not c.finished else {}
                    yield chunk(c.index, delta, lp, c.finish_reason, c.stop_reason)
            if include_usage and final is not None:
                yield sse({**base, "choices": [], "usage": usage([final])})
            yield SSE_DONE
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    # ---- completions -----------------------------------------------------------------

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        score_only = req.max_tokens == 0  # echo + max_tokens 0: prompt logprobs only (lm-eval)
        best_of = req.best_of if req.best_of is not None and req.best_of > req.n else None
        logprobs = req.logprobs if req.logprobs is not None or best_of is None else 0
        fields = {**self._common(req), "n": best_of or req.n, "max_tokens": 1 if score_only else req.max_tokens,
                  "logprobs": logprobs,
                  "prompt_logprobs": req.logprobs if req.echo and req.logprobs is not None else None}
        params = make_params(fields, {"n": "best_of"} if best_of else None)
        request_id = f"cmpl-{req.request_id or uuid.uuid4().hex}"
        streams = await submit(self.engine, req.prompts, params, request_id, req.priority)
        trackers = self._trackers(request_id, len(streams))
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._completion_events(follow(self.engine, streams, trackers), req, request_id, created,
                                              score_only, include_usage)
            return SSEResponse(events)
        finals = await collect(self.engine, streams, trackers, raw)
        choices: list[dict[str, Any]] = []
        for p, final in enumerate(finals):
            outs = final.outputs
            if best_of:
                outs = sorted(outs, key=lambda c: -sum(e.logprob for e in c.logprobs or []))[: req.n]
            for j, c in enumerate(outs):
                choices.append(self._completion_choice(final, c, p * req.n + j, req, score_only, first=True,
                                                       whole=True))
        completion_tokens = 0 if score_only else None
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created,
                             "model": self.model_name, "choices": choices,
                             "usage": usage(finals, completion_tokens)})

    def _prompt_text(self, output: RequestOutput) -> str:
        return output.prompt if output.prompt is not None else self.text.decode(output.prompt_token_ids)

    def _completion_choice(
        self, output: RequestOutput, c: CompletionOutput, index: int, req: CompletionRequest, score_only: bool,
        first: bool, whole: bool,
    ) -> dict[str, Any]:
        """One choice: the whole text (non-streaming) or this output's delta (streaming)."""
        text, lp = "", None
        if req.echo and first:
            text = self._prompt_text(output)
            if req.logprobs is not None and output.prompt_logprobs is not None:
                lp = completion_logprobs(output.prompt_logprobs, req.logprobs, self.text,
                                         first_token=output.prompt_token_ids[0])
        if not score_only:
            text += c.text if whole else c.delta_text
            if req.logprobs is not None:
                entries = (c.logprobs or []) if whole else c.delta_logprobs
                offset = len(text) - len(c.text if whole else c.delta_text)
                lp = merge_completion_logprobs(lp, completion_logprobs(entries, req.logprobs, self.text, offset))
        elif req.logprobs is not None and lp is None:
            lp = completion_logprobs([], req.logprobs, self.text)
        finish = ("length" if score_only else c.finish_reason) if c.finished else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish,
                "stop_reason": None if score_only else c.stop_reason}

    async def _completion_events(
        self, outputs: AsyncIterator[tuple[int, RequestOutput]], req: CompletionRequest, request_id: str,
        created: int, score_only: bool, include_usage: bool,
    ) -> AsyncIterator[str]:
        base = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name}
        extra = {"usage": None} if include_usage else {}
        started: set[int] = set()
        done: set[int] = set()
        finals: dict[int, RequestOutput] = {}
        try:
            async for p, output in outputs:
                finals[p] = output
                for c in output.outputs:
                    index = p * req.n + c.index
                    first = index not in started
                    if index in done or not (first or c.delta_text or c.delta_token_ids or c.finished):
                        continue
                    started.add(index)
                    if c.finished:
                        done.add(index)
                    choice = self._completion_choice(output, c, index, req, score_only, first, whole=False)
                    if choice["text"] or choice["logprobs"] or c.finished or c.delta_token_ids:
                        yield sse({**base, "choices": [choice], **extra})
            if include_usage:
                ordered = [finals[p] for p in sorted(finals)]
                yield sse({**base, "choices": [], "usage": usage(ordered, 0 if score_only else None)})
            yield SSE_DONE
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]
