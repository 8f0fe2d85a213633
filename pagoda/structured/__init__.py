"""Constrained decoding with xgrammar: JSON schemas, regexes, EBNF grammars, choices, structural tags.

``StructuredOutputs`` (the request side, plain data) is imported eagerly; the xgrammar-backed
machinery (``pagoda.structured.backend``) only when a request first asks for it.
"""

from __future__ import annotations

from pagoda.structured.params import StructuredOutputs

__all__ = ["StructuredOutputs"]
