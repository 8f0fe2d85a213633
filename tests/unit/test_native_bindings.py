"""The ctypes table (pagoda/ops/cpu/native.py) agrees with the C declarations (csrc/kernels.h):
every exported function with the same argument types and result, and the shared constants."""

from __future__ import annotations

import ctypes
import re

import torch

from pagoda.ops.cpu import native

HEADER = (native.CSRC / "kernels.h").read_text()
C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float}
RESULTS = {"void": None, "int": ctypes.c_int}


def _declarations(header: str) -> dict[str, tuple[object, list[object]]]:
    """name -> (ctypes result, ctypes argument types) of each function declared in the header."""
    text = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    out = {}
    for result, name, args in re.findall(r"^(void|int)\s+(\w+)\s*\(([^)]*)\)\s*;", text, flags=re.M):
        types = []
        for arg in (a.strip() for a in args.split(",")):
            if arg in ("", "void"):
                continue
            types.append(ctypes.c_void_p if "*" in arg else C_TYPES[arg.replace("const ", "").split()[0]])
        out[name] = (RESULTS[result], types)
    return out


def _compare(header: str) -> list[str]:
    declared = _declarations(header)
    problems = [f"{name}: bound in native.py but not declared in kernels.h"
                for name in native.SIGNATURES if name not in declared]
    for name, (result, types) in declared.items():
        if name not in native.SIGNATURES:
            problems.append(f"{name}: declared in kernels.h but not bound in native.py")
            continue
        if native.SIGNATURES[name] != types:
            problems.append(f"{name}: kernels.h says {[t.__name__ for t in types]}, "
                            f"native.py {[t.__name__ for t in native.SIGNATURES[name]]}")
        if native.RESTYPES.get(name) is not result:
            problems.append(f"{name}: result {result} in kernels.h, {native.RESTYPES.get(name)} in native.py")
    return problems


def test_every_binding_matches_its_declaration() -> None:
    assert _declarations(HEADER), "no declarations parsed from kernels.h"
    assert not _compare(HEADER)


def test_a_mismatch_is_caught() -> None:
    wrong = HEADER.replace("void argmax_rows(const void *x, int x_bf16, int64_t rows,",
                           "void argmax_rows(const void *x, int64_t x_bf16, int64_t rows,")
    assert wrong != HEADER
    assert any(p.startswith("argmax_rows: kernels.h says") for p in _compare(wrong))


def test_shared_constants_match() -> None:
    enum = dict((name, int(value)) for name, value in re.findall(r"\b(KV_\w+)\s*=\s*(\d+)", HEADER))
    assert enum == {"KV_F32": native.KV_KIND[torch.float32], "KV_BF16": native.KV_KIND[torch.bfloat16],
                    "KV_INT8": native.KV_KIND[torch.int8]}
    slots = re.search(r"#define\s+STACK_LAYER_SLOTS\s+(\d+)", HEADER)
    assert slots and int(slots.group(1)) == native.STACK_LAYER_SLOTS
    lora = re.search(r"#define\s+STACK_LORA_SLOTS\s+(\d+)", HEADER)
    assert lora and int(lora.group(1)) == native.STACK_LORA_SLOTS
