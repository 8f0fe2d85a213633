"""LoRA adapters against transformers + PEFT on tiny random models (float32), and the
adapter pool's rules. Adapters are made by PEFT in the test, with random A and B."""

from __future__ import annotations

import json

import pytest
import torch

from pagoda.errors import InvalidRequestError
from pagoda.lora import LoRAManager
from pagoda.models.config import ModelConfig
from pagoda.models.llama import LlamaForCausalLM
from tests.lora_utils import ALL_MODULES, gguf_adapter_from_peft, peft_adapter
from tests.model_utils import DEVICE, TINY, make_runner, pages_for

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

ATOL = 3e-5
CASES = {
    "llama": (transformers.LlamaConfig, dict(TINY, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, dict(TINY, tie_word_embeddings=True)),  # QKV bias
}


def _base(name: str):
    cls, kwargs = CASES[name]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cls(**kwargs), dtype=torch.float32).eval()
    return hf


def _ours(hf, slots: int = 4, max_rank: int = 16):
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()), torch.float32, DEVICE)
    model.load_weights(hf.state_dict().items())
    return model, LoRAManager(model, slots, max_rank), make_runner(model, num_pages=128)


def _logits(runner, ids: list[int], slot: int, first_page: int = 1) -> torch.Tensor:
    pages = pages_for(len(ids), runner.page_size, first_page)
    out = runner.forward(runner.prepare([(ids, 0, pages)], all_logits=[0], lora_slots=[slot]))
    return out.all_logits[0].cpu()


def _ref(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


IDS = torch.randint(0, 128, (21,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("rank,modules,rslora", [
    (1, ALL_MODULES, False), (4, ALL_MODULES, True), (8, ALL_MODULES, False), (16, ["q_proj", "v_proj"], False),
    (8, ["k_proj", "up_proj", "down_proj"], False),
])
def test_peft_adapter_matches_transformers_peft(tmp_path, name, rank, modules, rslora) -> None:
    hf = _base(name)
    ref_model = peft_adapter(hf, tmp_path / "a", rank, seed=rank, modules=modules, rslora=rslora)
    _, lora, runner = _ours(hf)
    lora.add(lora.read("a", str(tmp_path / "a")))
    slot = lora.acquire("a")
    got = _logits(runner, IDS, slot)
    ref = _ref(ref_model, IDS)
    assert (got - ref).abs().max().item() <= ATOL
    base = _logits(runner, IDS, -1, first_page=40)
    assert (base - _ref(hf, IDS)).abs().max().item() <= ATOL
    assert (got - base).abs().max().item() > 1e-2  # the adapter did something


def test_gguf_adapter_matches_peft(tmp_path) -> None:
    hf = _base("llama")
    ref_model = peft_adapter(hf, tmp_path / "a", 8, seed=5)
    path = gguf_adapter_from_peft(tmp_path / "a", tmp_path / "a.gguf", 4, 2)
    _, lora, runner = _ours(hf)
    lora.add(lora.read("g", str(path)))
    got = _logits(runner, IDS, lora.acquire("g"))
    assert (got - _ref(ref_model, IDS)).abs().max().item() <= ATOL


def test_mixed_batch_gives_each_row_what_it_gets_alone(tmp_path) -> None:
    """Four adapters and base rows in one step (prefill chunks and decodes, interleaved)."""
    hf = _base("qwen2")
    _, lora, runner = _ours(hf)
    for i, rank in enumerate((2, 4, 8, 16)):
        peft_adapter(hf, tmp_path / f"a{i}", rank, seed=10 + i)
        lora.add(lora.read(f"a{i}", str(tmp_path / f"a{i}")))
    slots = [lora.acquire(f"a{i}") for i in range(4)]
    gen = torch.Generator().manual_seed(7)
    rows = [-1, slots[2], slots[0], -1, slots[3], slots[1], slots[2], -1]
    prompts = [torch.randint(0, 128, (int(n),), generator=gen).tolist() for n in torch.randint(2, 20, (8,), generator=gen)]
    alone = []
    for b, (ids, slot) in enumerate(zip(prompts, rows)):
        alone.append(_logits(runner, ids, slot, first_page=1 + 8 * b))
    # together: even rows decode their last token over a cached prefix, odd rows prefill whole
    seqs = []
    for b, ids in enumerate(prompts):
        pages = pages_for(len(ids), runner.page_size, 1 + 8 * b)
        seqs.append((ids[-1:], len(ids) - 1, pages) if b % 2 == 0 else (ids, 0, pages))
    out = runner.forward(runner.prepare(seqs, lora_slots=rows)).last_logits.cpu()
    for b in range(8):
        assert torch.allclose(out[b], alone[b][-1], atol=1e-5, rtol=0), b  # float32 GEMMs block by batch size


def test_pool_evicts_least_recently_used_and_refuses_bad_adapters(tmp_path) -> None:
    hf = _base("llama")
    _, lora, _ = _ours(hf, slots=2, max_rank=8)
    for i in range(3):
        peft_adapter(hf, tmp_path / f"a{i}", 4, seed=i)
        lora.add(lora.read(f"a{i}", str(tmp_path / f"a{i}")))
    s0, s1 = lora.acquire("a0"), lora.acquire("a1")
    assert s0 != s1
    assert lora.acquire("a2") is None  # both slots pinned
    lora.release("a0")
    assert lora.acquire("a2") == s0 and set(lora.resident) == {"a1", "a2"}
    lora.release("a1"), lora.release("a2")
    lora.acquire("a1"), lora.release("a1")
    assert lora.acquire("a0") == s0  # a2 was least recently used
    lora.release("a0")
    lora.check_integrity(idle=True)
    # in use: unloading waits for the last request
    lora.ref("a1")
    assert lora.remove("a1").deferred == 1 and "a1" not in lora.names()
    with pytest.raises(InvalidRequestError):
        lora.ref("a1")
    lora.unref("a1")
    assert "a1" not in lora.adapters
    # refusals
    peft_adapter(hf, tmp_path / "big", 16, seed=9)
    with pytest.raises(InvalidRequestError, match="rank 16 exceeds"):
        lora.read("big", str(tmp_path / "big"))
    with pytest.raises(InvalidRequestError, match="does not exist"):
        lora.read("x", str(tmp_path / "nowhere"))
    cfg = json.loads((tmp_path / "a0" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "lm_head"]
    (tmp_path / "a0" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidRequestError, match="lm_head"):
        lora.read("y", str(tmp_path / "a0"))
    with pytest.raises(InvalidRequestError, match="already loaded"):
        lora.add(lora.read("a2", str(tmp_path / "a2")))
