"""A Jiutian-format Hugging Face directory end to end: built here with random weights and a
small Qwen-style byte-level BPE tokenizer (see tests/jiutian_utils.py), then loaded by
``LLM(model=dir)``, chatted with through its ChatML template, checked against the
independent from-the-formula reference of shared/JIUTIAN.md, and served through the API.

Tolerance: max |pagoda - reference| <= 1e-4 on float32 logits (weights stored in bfloat16,
both sides compute from the same upcast values)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.jiutian_utils import jiutian_reference, write_jiutian_dir
from tests.model_utils import make_runner, prefill_logits
from tests.server_utils import ServerProcess

ATOL = 1e-4
MESSAGES = [{"role": "user", "content": "你好！What is 九天, in one line?"}]
CHATML = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "<|im_start|>user\n你好！What is 九天, in one line?<|im_end|>\n<|im_start|>assistant\n")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def jiutian(tmp_path_factory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("jiutian")
    cfg, weights = write_jiutian_dir(root)
    return root, cfg, weights


@pytest.fixture(scope="module")
def llm(jiutian) -> LLM:
    return LLM(model=str(jiutian[0]), kv_cache_memory=0.01)


def _greedy_reference(cfg: dict, weights: dict[str, torch.Tensor], ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(jiutian_reference(cfg, weights, ids + out)[-1].argmax()))
    return out


def test_loads_as_jiutian(llm: LLM, jiutian) -> None:
    _, cfg, _ = jiutian
    mc = llm.engine.model_config
    assert mc.architecture == "JiutianForCausalLM" and mc.norm_variant == "jiutian"
    assert mc.qkv_bias and not mc.tie_word_embeddings and mc.rope_scaling is None
    assert llm.engine.context_length == cfg["max_position_embeddings"]
    tok = llm.tokenizer
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end == cfg["eos_token_id"] == tok.eos_token_id and tok.bos_token_id is None
    assert {im_end, tok.token_to_id("<|endoftext|>")} <= llm.engine.inputs.eos_ids
    # Qwen's layout: the special tokens right after the BPE merges, the model's vocabulary padded past them.
    assert tok.token_to_id("<|endoftext|>") + 2 == im_end == tok.vocab_size - 1 < cfg["vocab_size"]


def test_tokenizer_and_template_match_transformers(llm: LLM, jiutian) -> None:
    transformers = pytest.importorskip("transformers")
    root = jiutian[0]
    hf = transformers.Qwen2Tokenizer.from_pretrained(root)  # not Auto: config.json's auto_map wants remote code
    tok = llm.tokenizer
    assert tok.apply_chat_template(MESSAGES) == CHATML == hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    text = "Hello  world!\n\n九天 <|im_start|>user 42 isn't 12345 café\r\n\tend<|im_end|>"
    assert tok.encode(text) == hf.encode(text)
    assert tok.encode_chat(MESSAGES) == hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                               return_dict=False)
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_logits_match_the_independent_reference(llm: LLM, jiutian) -> None:
    _, cfg, weights = jiutian
    ids = llm.tokenizer.encode_chat(MESSAGES)
    runner = make_runner(llm.engine.loaded.model, num_pages=32, page_size=16)  # its own KV pool
    assert (prefill_logits(runner, ids) - jiutian_reference(cfg, weights, ids)).abs().max().item() <= ATOL


def test_chat_renders_the_template_and_generates_the_reference_tokens(llm: LLM, jiutian) -> None:
    _, cfg, weights = jiutian
    out = llm.chat(MESSAGES, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode(CHATML, add_special_tokens=False)
    completion = out.outputs[0]
    assert completion.token_ids == _greedy_reference(cfg, weights, out.prompt_token_ids, 8)
    assert completion.finish_reason == "length"


def test_generation_stops_at_im_end(llm: LLM) -> None:
    im_end = llm.tokenizer.token_to_id("<|im_end|>")
    params = SamplingParams(temperature=0, max_tokens=8, logit_bias={im_end: 100.0})
    out = llm.chat(MESSAGES, params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == ""


def test_serves_chat_completions(llm: LLM, jiutian) -> None:
    root = jiutian[0]
    expected = llm.chat(MESSAGES, GREEDY, use_tqdm=False)[0].outputs[0].text
    server = ServerProcess("--model", str(root), "--kv-cache-memory", "0.01", "--served-model-name", "jiutian-tiny")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["jiutian-tiny"]
        body = {"model": "jiutian-tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
                "extra_body": {"ignore_eos": True}}
        resp = client.chat.completions.create(**body)
        assert resp.choices[0].message.content == expected and resp.choices[0].finish_reason == "length"
        assert resp.usage.prompt_tokens == len(llm.tokenizer.encode_chat(MESSAGES))
        assert resp.usage.completion_tokens == 8
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                           if c.choices)
        assert streamed == expected
    finally:
        assert server.terminate() == 0
