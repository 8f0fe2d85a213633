"""POST /v1/embeddings: vectors from the served model itself.

Each input is one engine request with ``pooling`` set (Engine.make_requests): it is prefilled in the
same continuous batch as generation (and, with last-token pooling, through the prefix cache), nothing
is sampled, and its output carries the pooled final hidden state. Here that vector is cut to
``dimensions`` (if asked) and L2-normalised, then sent as floats or as base64 of little-endian
float32 (what the openai SDK asks for by default).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

import torch
from pydantic import field_validator
from starlette.requests import Request

from pagoda.server.errors import APIError
from pagoda.server.protocol import _is_token, _Strict
from pagoda.server.serving import OpenAIServing
from pagoda.server.streaming import collect, submit

MAX_INPUTS = 2048  # inputs per request, as OpenAI allows


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input_shape(cls, value: Any) -> list[str | list[int]]:
        """The four OpenAI forms as a batch: str, [str], [int], [[int]]."""
        bad = "input must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not value:
            raise ValueError(bad if not isinstance(value, list) else "input must not be an empty list")
        if all(_is_token(t) for t in value):
            batch: list[Any] = [value]
        elif all(isinstance(p, str) for p in value) or \
                all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in value):
            batch = list(value)
        else:
            raise ValueError(bad)
        if len(batch) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request (got {len(batch)})")
        return batch

    @field_validator("dimensions")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"dimensions must be >= 1 (got {value})")
        return value


def encode(vector: torch.Tensor, dimensions: int | None, fmt: str) -> list[float] | str:
    """Cut to `dimensions` (Matryoshka-style), L2-normalise, then floats or base64 float32."""
    v = vector.detach().float().cpu()
    if dimensions is not None:
        v = v[:dimensions]
    v = torch.nn.functional.normalize(v, dim=0)
    if fmt == "base64":
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


class Embeddings:
    def __init__(self, serving: OpenAIServing, pooling: str = "last") -> None:
        self.serving, self.pooling = serving, pooling
        self.hidden_size = serving.engine.model_info.hidden_size

    async def create(self, req: EmbeddingRequest, raw: Request) -> dict[str, Any]:
        self.serving.check_model(req.model)
        if req.dimensions is not None and req.dimensions > self.hidden_size:
            raise APIError(400, f"dimensions ({req.dimensions}) is more than this model's {self.hidden_size}",
                           param="dimensions")
        request_id = f"embd-{uuid.uuid4().hex}"
        engine = self.serving.engine
        streams = await submit(engine, req.input, None, request_id, 0, {"prompt": "input"}, pooling=self.pooling)
        finals = await collect(engine, streams, self.serving.trackers(request_id, len(streams)), raw)
        data = [{"object": "embedding", "index": i, "embedding": encode(f.embedding, req.dimensions,
                                                                         req.encoding_format)}
                for i, f in enumerate(finals)]
        tokens = sum(len(f.prompt_token_ids) for f in finals)
        return {"object": "list", "data": data, "model": self.serving.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

