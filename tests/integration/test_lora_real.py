"""LoRA on the default model (SmolLM2-135M-Instruct GGUF, float32): pagoda + an adapter made
here with PEFT (random A and B of rank 8 on every projection) against transformers + PEFT,
as a PEFT directory and as llama.cpp's GGUF LoRA file (Q/K rows permuted for its rope)."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM
from pagoda.weights.default_model import default_model_path
from tests.lora_utils import gguf_adapter_from_peft, peft_adapter
from tests.model_utils import pages_for

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    root = tmp_path_factory.mktemp("lora")
    ref = peft_adapter(hf, root / "peft", 8, seed=0, scale=0.05)
    cfg = hf.config
    gguf_path = gguf_adapter_from_peft(root / "peft", root / "lora.gguf", cfg.num_attention_heads,
                                       cfg.num_key_value_heads)
    llm = LLM(dtype="float32", lora_modules=[f"peft={root / 'peft'}", f"gguf={gguf_path}"], max_lora_rank=8)
    return hf, ref, llm


def _logits(llm: LLM, ids: list[int], lora: str | None) -> torch.Tensor:
    engine = llm.engine
    slot = -1 if lora is None else engine.lora.acquire(lora)
    try:
        runner = engine.runner
        pages = pages_for(len(ids), runner.page_size)
        return runner.forward(runner.prepare([(ids, 0, pages)], [0], [slot])).all_logits[0].cpu()
    finally:
        if lora is not None:
            engine.lora.release(lora)


def test_adapter_logits_match_transformers_peft(setup) -> None:
    hf, ref, llm = setup
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()
        base = hf(torch.tensor([ids])).logits[0].float()
    assert (want - base).abs().max().item() > 0.5  # the adapter matters
    for name in ("peft", "gguf"):
        got = _logits(llm, ids, name)
        assert (got - want).abs().max().item() <= 5e-4, name  # float32 over 30 layers, logits ~20
    assert (_logits(llm, ids, None) - base).abs().max().item() <= 5e-4
    llm.engine.check_integrity()
