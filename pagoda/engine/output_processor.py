"""Turns sampled tokens into text and decisions: detokenize, stop checks, output objects.

Stop strings are never emitted in part: text that could still become a stop string
is held back until it cannot (or the request ends). A structured-output request also stops
(finish reason "stop") once its grammar has ended, even with ignore_eos.
"""

from __future__ import annotations

import logging
import time

from pagoda.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from pagoda.engine.request import Request

log = logging.getLogger("pagoda.engine")


class OutputProcessor:
    def __init__(self, context_length: int) -> None:
        self.context_length = context_length

    def on_token(self, req: Request, token: int, logprob: TokenLogprob | None) -> str | None:
        """Record one sampled token; returns the finish reason if the request must stop."""
        params = req.params
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if logprob is not None:
            req.logprobs.append(logprob)
        reason = None
        if token in params.stop_token_ids:
            reason, req.stop_reason = "stop", token
        elif not params.ignore_eos and token in req.eos_ids:
            reason = "stop"
        elif req.grammar is not None:
            if not req.grammar.accept(token):  # the mask makes this unreachable; never run off-grammar
                log.warning("request %s: token %d rejected by its grammar; stopping it", req.request_id, token)
                reason = "stop"
            elif req.grammar.finished:
                reason = "stop"
        if req.detokenizer is not None:
            req.pending_text += req.detokenizer.add(token)
            if reason is None and params.stop and self._match_stop(req):
                reason = "stop"
        if reason is None and (len(req.output_ids) >= req.max_tokens or req.num_tokens >= self.context_length):
            reason = "length"
        if reason is None:
            self._release_safe_text(req)
        elif not isinstance(req.stop_reason, str):  # a stop string already settled the text
            if req.detokenizer is not None:
                req.pending_text += req.detokenizer.flush()
            req.text += req.pending_text
            req.pending_text = ""
        return reason

    def _match_stop(self, req: Request) -> bool:
        pending = req.pending_text
        hits = [(pending.find(s), s) for s in req.params.stop if s in pending]
        if not hits:
            return False
        idx, stop = min(hits)
        keep = idx + len(stop) if req.params.include_stop_str_in_output else idx
        req.text += pending[:keep]
        req.pending_text, req.stop_reason = "", stop
        return True

    def _release_safe_text(self, req: Request) -> None:
        """Emit pending text except the longest tail that is a prefix of a stop string."""
        pending = req.pending_text
        hold = 0
        for stop in req.params.stop:
            for n in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:n]):
                    hold = n
                    break
        req.text += pending[: len(pending) - hold]
        req.pending_text = pending[len(pending) - hold :]

    def build(self, group: list[Request], prompt: str | None) -> RequestOutput:
        """One RequestOutput for a request's n choices, with deltas since the last build."""
        outputs = []
        for req in group:
            tokens = req.output_ids
            want_lp = req.params.logprobs is not None
            outputs.append(
                CompletionOutput(
                    index=req.index,
                    text=req.text,
                    token_ids=list(tokens),
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                    logprobs=list(req.logprobs) if want_lp else None,
                    delta_text=req.text[req.sent_text :],
                    delta_token_ids=tokens[req.sent_tokens :],
                    delta_logprobs=req.logprobs[req.sent_tokens :] if want_lp else [],
                )
            )
            req.sent_text, req.sent_tokens = len(req.text), len(tokens)
        first = group[0]
        finish_times = [r.finish_time for r in group if r.finish_time is not None]
        return RequestOutput(
            request_id=first.group_id,
            prompt=prompt,
            prompt_token_ids=first.prompt_ids,
            outputs=outputs,
            finished=all(r.finished for r in group),
            num_cached_tokens=first.num_cached_prompt,
            prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None else None,
            metrics=RequestMetrics(
                first.arrival,
                min((r.first_token_time for r in group if r.first_token_time), default=None),
                max(finish_times) if len(finish_times) == len(group) else None,
            ),
            embedding=first.pooled if first.pooling is not None and first.finished else None,
        )
