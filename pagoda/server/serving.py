"""/v1/chat/completions and /v1/completions: requests to SamplingParams, outputs to OpenAI bodies.

Both endpoints share one flow: validate, submit (engine errors raise before any byte is sent,
so they are proper 4xx), then either collect the final outputs or stream deltas as SSE.

Chat adds tools and reasoning: tools reach the model through its chat template (or, for a
template without a tools section, through the tool parser's system prompt); tool_choice
"required" or a named function constrains the output to the parser's call format; each choice's
text is split into reasoning, content and tool calls by ChoiceParser, delta by delta when streaming.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagoda.engine.async_engine import AsyncEngine, RequestStream
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.errors import InvalidRequestError
from pagoda.server.chat_output import ChoiceDelta, ChoiceParser, chat_message, finish_reason
from pagoda.server.errors import APIError
from pagoda.server.metrics import RequestTracker, ServerMetrics
from pagoda.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, _SamplingFields
from pagoda.server.reasoning_parsers import get_reasoning_parser
from pagoda.server.tool_parsers import arguments_object, coalesce, get_tool_parser
from pagoda.structured import StructuredOutputs
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


@dataclass
class ChatRun:
    """A submitted chat request, as every chat-shaped API follows it."""

    request_id: str
    streams: list[RequestStream]
    trackers: list[RequestTracker]
    tools: list[dict[str, Any]]
    forced_named: bool  # tool_choice named a function: the reply ends with "stop", as OpenAI's do
    n: int
    top_n: int | None  # top logprobs asked for (None: no logprobs)
    prompt_tokens: int
    model_name: str  # the served model's, or the LoRA adapter's the request named

    def finish_reason(self, reason: str | None, made_calls: bool) -> str | None:
        return finish_reason(reason, made_calls, self.forced_named)


@dataclass
class ChoiceStep:
    """One streamed step of one choice: the engine's output and what the parsers made of its text."""

    choice: CompletionOutput
    delta: ChoiceDelta
    parser: ChoiceParser
    output: RequestOutput  # the whole request's output this step came in (usage at the end)
    finish: str | None  # the API's finish reason once the choice ended


class OpenAIServing:
    def __init__(
        self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics, tool_call_parser: str = "hermes",
        reasoning_parser: str | None = None,
    ) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.text = TokenText(engine.tokenizer)
        self.tool_parser = get_tool_parser(tool_call_parser)
        self.reasoning_parser = get_reasoning_parser(reasoning_parser) if reasoning_parser else None
        template = engine.tokenizer.chat_template if engine.tokenizer is not None else None
        self.template_knows_tools = "tools" in (template or "")

    def check_model(self, model: str | None) -> None:
        self.resolve_model(model)

    def resolve_model(self, model: str | None, lora_path: str | None = None) -> str | None:
        """The LoRA adapter a request names (None: the base model): `model` is the served model
        or an adapter's name; SGLang's `lora_path` names the adapter beside the base's name."""
        adapters = {name for name, _ in self.engine.lora_adapters()}
        if lora_path is not None:
            if lora_path not in adapters:
                raise APIError(404, f"the LoRA adapter '{lora_path}' does not exist", param="lora_path",
                               code="model_not_found")
            if model not in (None, self.model_name, lora_path):
                raise APIError(400, f"model '{model}' and lora_path '{lora_path}' name different models",
                               param="model")
            return lora_path
        if model is None or model == self.model_name:
            return None
        if model in adapters:
            return model
        known = f"'{self.model_name}'" + (f" and its LoRA adapters {', '.join(sorted(adapters))}" if adapters else "")
        raise APIError(404, f"the model '{model}' does not exist; this server serves {known}",
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

    def trackers(self, request_id: str, count: int) -> list[RequestTracker]:
        return [self.metrics.tracker(request_id if count == 1 else f"{request_id}-{i}") for i in range(count)]

    @staticmethod
    def _structured(req: _SamplingFields, renames: dict[str, str]) -> StructuredOutputs | None:
        """The request's structured output; its errors (and the engine's compile errors, via
        `renames`) name the field the client sent."""
        try:
            spec, field = req.structured_outputs()
        except InvalidRequestError as e:
            field = req.structured_fields()[0]
            raise APIError(400, e.message, param=renames.get(field, field)) from None
        if spec is not None and field is not None:
            renames[spec.kind] = renames.get(field, field)
        return spec

    async def encode_chat(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]], add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The chat prompt's token ids (chat completions and /tokenize render alike)."""
        tok = self.engine.tokenizer
        rendered = self._chat_messages(messages, tools)
        template_tools = tools if tools and self.template_knows_tools else None
        encode = functools.partial(tok.encode_chat, rendered, add_generation_prompt, template_tools,
                                   **(template_kwargs or {}))
        return await asyncio.to_thread(encode)

    def _chat_messages(self, chat: list[ChatMessage], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages for the template; a template without a tools section gets the parser's rendering."""
        messages = [m.to_template() for m in chat]
        tool_turns = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if (tools or tool_turns) and not self.template_knows_tools:
            return self.tool_parser.render_without_template_support(messages, tools)
        for m in messages:  # templates print arguments as objects; OpenAI sends them as JSON text
            for call in m.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    call["function"] = {**fn, "arguments": arguments_object(fn.get("arguments"))}
        return messages

    def _choice_parser(self, tools: list[dict[str, Any]]) -> ChoiceParser:
        return ChoiceParser(self.reasoning_parser, self.tool_parser if tools else None)

    # ---- chat: the one path behind chat completions, Responses and Messages -----------

    async def start_chat(
        self, req: ChatCompletionRequest, request_id: str, renames: dict[str, str] | None = None
    ) -> ChatRun:
        """Validate, render and submit a chat request (errors raise here, before any byte is sent).
        The other chat-shaped APIs translate their requests into a ChatCompletionRequest first, and
        `renames` their names for the fields errors name (e.g. max_tokens -> max_output_tokens)."""
        lora = self.resolve_model(req.model, req.lora_path)
        max_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        renames = {"max_tokens": max_name, "logprobs": "top_logprobs", **(renames or {})}
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        tools = req.active_tools
        structured = self._structured(req, renames)
        if tools and req.forces_tool_call:
            tag = self.tool_parser.structural_tag(tools, req.forced_function, req.parallel_tool_calls)
            structured, renames["structural_tag"] = StructuredOutputs(structural_tag=tag), "tools"
        params = make_params({**self._common(req), "max_tokens": req.effective_max_tokens, "logprobs": top_n,
                              "structured": structured}, renames)
        if self.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat: use /v1/completions with token ids",
                           param="messages")
        prompt_ids = await self.encode_chat(req.messages, tools, req.add_generation_prompt, req.chat_template_kwargs)
        streams = await submit(self.engine, [prompt_ids], params, request_id, req.priority, renames, lora=lora)
        return ChatRun(request_id, streams, self.trackers(request_id, 1), tools,
                       bool(tools) and req.forced_function is not None, req.n, top_n, len(prompt_ids),
                       lora or self.model_name)

    async def collect_chat(self, run: ChatRun, raw: Request) -> tuple[RequestOutput, list[ChoiceDelta]]:
        """The final output and each choice parsed whole (by the machine that parses streams)."""
        (final,) = await collect(self.engine, run.streams, run.trackers, raw)
        return final, [self._choice_parser(run.tools).parse(c.text) for c in final.outputs]

    async def chat_steps(self, run: ChatRun) -> AsyncIterator[ChoiceStep]:
        """Each choice's parsed deltas as they arrive; the pieces add up to ``collect_chat``'s."""
        outputs = follow(self.engine, run.streams, run.trackers)
        try:
            done = [False] * run.n
            parsers = [self._choice_parser(run.tools) for _ in range(run.n)]
            async for _, output in outputs:
                for c in output.outputs:
                    if done[c.index] or not (c.delta_text or c.delta_token_ids or c.finished):
                        continue
                    done[c.index] = c.finished
                    parser = parsers[c.index]
                    parsed = parser.feed(c.delta_text) if c.delta_text else ChoiceDelta()
                    if c.finished:
                        parsed += parser.finish()
                    finish = run.finish_reason(c.finish_reason, parser.num_calls > 0)
                    yield ChoiceStep(c, parsed, parser, output, finish)
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        run = await self.start_chat(req, f"chatcmpl-{req.request_id or uuid.uuid4().hex}")
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._chat_events(run, created, include_usage))
        final, parsed = await self.collect_chat(run, raw)
        choices = []
        for c, p in zip(final.outputs, parsed):
            choices.append({
                "index": c.index, "message": chat_message(p, self.reasoning_parser is not None),
                "logprobs": chat_logprobs(c.logprobs or [], run.top_n, self.text) if run.top_n is not None else None,
                "finish_reason": run.finish_reason(c.finish_reason, bool(p.calls)), "stop_reason": c.stop_reason,
            })
        return JSONResponse({"id": run.request_id, "object": "chat.completion", "created": created,
                             "model": run.model_name, "choices": choices, "usage": usage([final])})

    async def _chat_events(self, run: ChatRun, created: int, include_usage: bool) -> AsyncIterator[str]:
        base = {"id": run.request_id, "object": "chat.completion.chunk", "created": created, "model": run.model_name}
        extra = {"usage": None} if include_usage else {}
        top_n = run.top_n

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None,
                  stop_reason: Any = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop_reason
            return sse({**base, "choices": [choice], **extra})

        steps = self.chat_steps(run)
        try:
            for i in range(run.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            final: RequestOutput | None = None
            async for step in steps:
                final, c, parsed = step.output, step.choice, step.delta
                lp = chat_logprobs(c.delta_logprobs, top_n, self.text) if top_n is not None else None
                delta = self._delta(parsed)
                if parsed.content or not (delta or c.finished or step.parser.active):
                    delta["content"] = parsed.content
                if not (delta or lp or c.finished):
                    continue  # text a parser holds back (a call's head being written, a partial marker)
                yield chunk(c.index, delta, lp, step.finish, c.stop_reason)
            if include_usage and final is not None:
                yield sse({**base, "choices": [], "usage": usage([final])})
            yield SSE_DONE
        finally:
            await steps.aclose()  # type: ignore[attr-defined]

    @staticmethod
    def _delta(parsed: ChoiceDelta) -> dict[str, Any]:
        """Reasoning and tool-call pieces of one streamed chunk (OpenAI's delta shape; content is
        added by the caller): a call's first entry has its id, type and name, later ones arguments."""
        delta: dict[str, Any] = {}
        if parsed.reasoning:
            delta["reasoning_content"] = parsed.reasoning
        if parsed.calls:
            delta["tool_calls"] = [d.to_openai() for d in coalesce(parsed.calls)]
        return delta

    # ---- completions -----------------------------------------------------------------

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        lora = self.resolve_model(req.model, req.lora_path)
        model_name = lora or self.model_name
        score_only = req.max_tokens == 0  # echo + max_tokens 0: prompt logprobs only (lm-eval)
        best_of = req.best_of if req.best_of is not None and req.best_of > req.n else None
        logprobs = req.logprobs if req.logprobs is not None or best_of is None else 0
        fields = {**self._common(req), "n": best_of or req.n, "max_tokens": 1 if score_only else req.max_tokens,
                  "logprobs": logprobs,
                  "prompt_logprobs": req.logprobs if req.echo and req.logprobs is not None else None}
        renames = {"n": "best_of"} if best_of else {}
        fields["structured"] = self._structured(req, renames)
        params = make_params(fields, renames)
        request_id = f"cmpl-{req.request_id or uuid.uuid4().hex}"
        streams = await submit(self.engine, req.prompts, params, request_id, req.priority, renames, lora=lora)
        trackers = self.trackers(request_id, len(streams))
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._completion_events(follow(self.engine, streams, trackers), req, request_id, created,
                                              score_only, include_usage, model_name)
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
                             "model": model_name, "choices": choices,
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
        created: int, score_only: bool, include_usage: bool, model_name: str,
    ) -> AsyncIterator[str]:
        base = {"id": request_id, "object": "text_completion", "created": created, "model": model_name}
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
