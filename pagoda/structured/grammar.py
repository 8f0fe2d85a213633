"""xgrammar glue: the tokenizer's vocabulary as xgrammar sees it, a compile cache keyed by what
the request asked for, and one matcher per sequence.

Compiling a grammar walks the whole vocabulary (milliseconds to seconds for large schemas), so
each distinct schema/regex/grammar is compiled once and the CompiledGrammar is shared by every
request that asks for it; a matcher (the per-sequence parser state) is cheap.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future

import xgrammar as xgr

from pagoda.errors import InvalidRequestError
from pagoda.structured.params import StructuredOutputs
from pagoda.tokenizer import Tokenizer

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed check.
_LOG_PREFIX = re.compile(r"^\[\d{2}:\d{2}:\d{2}\] \S+:\d+: (Check failed: \(.*?\) is false: )?")

_WHAT = {
    "json_schema": "invalid JSON schema",
    "json_object": "cannot build the JSON grammar",
    "regex": "invalid regex",
    "grammar": "invalid grammar",
    "choice": "invalid choice",
    "structural_tag": "invalid structural tag",
}


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> xgr.TokenizerInfo:
    """The vocabulary as xgrammar needs it, sized to the model's logits (``vocab_size``, which may
    differ from the tokenizer's); ids without a token are never allowed."""
    backend = tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    encoded = [""] * vocab_size
    for token, idx in vocab.items():
        if idx < vocab_size:
            encoded[idx] = token
    stops = sorted(t for t in stop_token_ids if 0 <= t < vocab_size)
    # The same detection xgrammar's from_huggingface does, on the tokenizers.Tokenizer we hold
    # (its private helpers; should a release drop them, the public path through transformers).
    detect = getattr(xgr.TokenizerInfo, "_detect_metadata_from_hf", None)
    detect_type = getattr(xgr.TokenizerInfo, "_detect_vocab_type_from_vocab", None)
    if detect is None or detect_type is None:
        from transformers import PreTrainedTokenizerFast

        return xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=backend),
                                                  vocab_size=vocab_size, stop_token_ids=stops or None)
    meta = detect(backend.to_str())
    vocab_type = detect_type(vocab)
    if vocab_type is not None and vocab_type != meta["vocab_type"]:
        prefix = "▁" if vocab_type == xgr.VocabType.BYTE_FALLBACK else "Ġ"
        first = backend.encode("a", add_special_tokens=False).tokens[:1]
        meta = {"vocab_type": vocab_type, "add_prefix_space": bool(first) and first[0].startswith(prefix)}
    return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=stops or None,
                             add_prefix_space=meta["add_prefix_space"])


def parser_message(exc: Exception) -> str:
    """xgrammar's message without its log prefix: what the client should read."""
    text = str(exc).strip()
    lines = [_LOG_PREFIX.sub("", line).strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly the given strings (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCache:
    """StructuredOutputs -> CompiledGrammar, compiled once per distinct request (LRU-bounded).

    Thread-safe (the server compiles on worker threads): concurrent requests for the same spec
    wait for the one compile in flight, and a slow compile never blocks cache hits of others.
    """

    def __init__(self, info: xgr.TokenizerInfo, max_entries: int = 256) -> None:
        threads = max(1, min(8, os.cpu_count() or 1))
        # Our own LRU is the cache (it keys on the request's text); xgrammar's would hold a second copy.
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self.in_flight: dict[tuple[str, str], Future] = {}
        self.lock = threading.Lock()
        self.compiles = 0
        self.hits = 0

    def get(self, spec: StructuredOutputs) -> xgr.CompiledGrammar:
        key = spec.key
        with self.lock:
            compiled = self.entries.get(key)
            if compiled is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return compiled
            future = self.in_flight.get(key)
            owner = future is None
            if owner:
                future = self.in_flight[key] = Future()
        if not owner:
            return future.result()  # the same grammar, or the same InvalidRequestError
        try:
            compiled = self._compile(spec)
        except BaseException as e:
            with self.lock:
                del self.in_flight[key]
            future.set_exception(e)
            raise
        with self.lock:
            del self.in_flight[key]
            self.compiles += 1
            self.entries[key] = compiled
            if len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        future.set_result(compiled)
        return compiled

    def _compile(self, spec: StructuredOutputs) -> xgr.CompiledGrammar:
        kind, text = spec.key
        c = self.compiler
        try:
            if kind == "json_schema":
                return c.compile_json_schema(text, any_whitespace=False, strict_mode=True)
            if kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return c.compile_regex(text)
            if kind == "grammar":
                return c.compile_grammar(text)
            if kind == "choice":
                return c.compile_grammar(choice_grammar(spec.choice or []))
            return c.compile_structural_tag(text)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse errors
            raise InvalidRequestError(f"{_WHAT[kind]}: {parser_message(e)}", kind) from None


class GrammarState:
    """One sequence's position in its grammar: which tokens may come next, and whether it ended."""

    __slots__ = ("matcher",)

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advance with the sampled token; False if the grammar does not allow it."""
        return self.matcher.accept_token(token_id)

    @property
    def finished(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return self.matcher.is_terminated()
