"""What a request asks its output to match: one JSON schema, JSON object, regex, EBNF grammar,
list of choices or structural tag. Plain data, validated up front (shapes only: whether a schema
or regex actually compiles is known once the grammar backend tries, see backend.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagoda.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice", "structural_tag")


@dataclass
class StructuredOutputs:
    """Exactly one field set. vLLM's names: json_schema (dict or JSON text), json_object (any JSON
    object), regex, grammar (EBNF in xgrammar's GBNF dialect), choice (the output is one of these
    strings), structural_tag (xgrammar's structural-tag JSON; the server builds these for tool calls).
    """

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    structural_tag: dict[str, Any] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        for name in ("json_schema", "structural_tag"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except ValueError as e:
                    raise InvalidRequestError(f"{name} is not valid JSON: {e}", name) from None
        self.validate()

    @property
    def kind(self) -> str:
        """The one field that is set (also the `param` of errors about it)."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def validate(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise InvalidRequestError(
                f"structured output takes exactly one of {', '.join(KINDS)} (got {what})", given[-1] if given else None
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("json_schema", "structural_tag"):
            if not isinstance(value, dict):
                raise InvalidRequestError(f"{kind} must be a JSON object (got {type(value).__name__})", kind)
        elif kind == "json_object":
            if value is not True:
                raise InvalidRequestError(f"json_object must be a boolean (got {value!r})", kind)
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise InvalidRequestError(f"{kind} must be a non-empty string (got {value!r})", kind)
        elif kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise InvalidRequestError(f"choice must be a non-empty list of non-empty strings (got {value!r})", kind)

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar: (kind, canonical text). Key order of a schema is kept:
        it is the order the properties are generated in."""
        kind = self.kind
        value = getattr(self, kind)
        if kind in ("json_schema", "structural_tag", "choice"):
            return kind, json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return kind, "" if kind == "json_object" else value
