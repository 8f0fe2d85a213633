"""The layer rules of docs/ARCHITECTURE.md, enforced: who may import whom inside pagoda.

Models never import the cache, the engine or the server; kernels (ops/) never import models,
the engine, the cache or the server; the server and the CLI reach the engine only through its
frontends (AsyncEngine, LLM). Device APIs stay in platforms/ and the kernel wings
(test_platform_seam.py). Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "pagoda"
ENGINE_INTERNALS = ("pagoda.engine.engine", "pagoda.engine.scheduler", "pagoda.engine.model_runner")

RULES: dict[str, tuple[str, ...]] = {  # a file or folder under pagoda/ -> modules it must not import
    "models": ("pagoda.cache", "pagoda.engine", "pagoda.server", "pagoda.structured", "pagoda.cli"),
    "ops": ("pagoda.models", "pagoda.engine", "pagoda.cache", "pagoda.server", "pagoda.structured",
            "pagoda.tokenizer", "pagoda.weights"),
    "cache": ("pagoda.models", "pagoda.engine", "pagoda.server"),
    "platforms": ("pagoda.models", "pagoda.engine", "pagoda.cache", "pagoda.server"),
    # What a model may hold (parallel.py) imports nothing of pagoda's but errors; the rest of the
    # package runs ranks (loader, runner, KV pool) but never the server.
    "distributed/parallel.py": ("pagoda.models", "pagoda.engine", "pagoda.cache", "pagoda.server", "pagoda.ops"),
    "distributed": ("pagoda.server", "pagoda.cli", "pagoda.structured"),
    "server": (*ENGINE_INTERNALS, "pagoda.cache", "pagoda.models", "pagoda.ops"),
    "cli.py": (*ENGINE_INTERNALS, "pagoda.cache", "pagoda.models", "pagoda.ops"),
}


def imported_modules(source: str, module: str) -> set[str]:
    """Every module a source file imports (absolute names; relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(source: str, module: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        name for name in imported_modules(source, module)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_layer_rules_hold() -> None:
    offenders = []
    for where, forbidden in RULES.items():
        target = ROOT / where
        files = [target] if target.is_file() else sorted(target.rglob("*.py"))
        assert files, f"no files under {target}: a rule names a place that moved"
        for path in files:
            for name in violations(path.read_text(), _module_name(path), forbidden):
                offenders.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not offenders, "layer rules broken:\n" + "\n".join(offenders)


def test_a_planted_violation_is_caught() -> None:
    planted = "import torch\n\ndef f():\n    from pagoda.cache.kv_pool import KVPool\n    return KVPool\n"
    assert violations(planted, "pagoda.models.llama", RULES["models"]) == ["pagoda.cache.kv_pool",
                                                                         "pagoda.cache.kv_pool.KVPool"]
    relative = "from ..engine import scheduler\n"
    assert violations(relative, "pagoda.ops.cpu.linear", RULES["ops"]) == []  # pagoda.ops.engine: not the engine
    relative = "from ...engine import scheduler\n"
    assert violations(relative, "pagoda.ops.cpu.linear", RULES["ops"]) == ["pagoda.engine", "pagoda.engine.scheduler"]
    assert violations("from pagoda.engine.async_engine import AsyncEngine\n", "pagoda.server.app", RULES["server"]) == []
