"""The real default model (SmolLM2-135M-Instruct GGUF): pagoda vs transformers on the same file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.weights.default_model import default_model_path

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "List three primes."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Explain what a CPU cache is in one sentence."}],
    [{"role": "user", "content": "Translate 'good morning' into Chinese: "}],
    [{"role": "user", "content": "def fibonacci(n):\n    # complete this Python function"}],
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_greedy_chat_matches_transformers(llm: LLM, hf_model) -> None:
    params = SamplingParams(temperature=0, max_tokens=32)
    outputs = llm.chat(CHATS, params, use_tqdm=False)
    for chat, out in zip(CHATS, outputs):
        ids = llm.tokenizer.encode_chat(chat)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        assert len(out.outputs[0].token_ids) >= 8
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist(), chat


def test_answers_sensibly(llm: LLM) -> None:
    out = llm.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_default_serves_the_q4_gguf_as_int4_and_answers_sensibly() -> None:
    default = LLM()  # --quantization auto: the file's own Q4_1 layers (int4), bf16 KV; float32 parity is --dtype float32
    assert default.engine.loaded.quantization == "int4"
    assert default.engine.kv_pool.k[0].dtype == torch.bfloat16
    out = default.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_bf16_linears_answer_sensibly() -> None:
    # A completion with a clear answer (" Paris" leads by ~2.4 nats): asked as a chat, this small
    # model's first token is a near-tie ("The" / "L" / "La" within one bf16 logit step), which
    # any change of rounding in the kernels may flip.
    bf16 = LLM(quantization="bf16")
    out = bf16.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert out[0].outputs[0].text.startswith(" Paris")


def test_prefill_logits_match_transformers(llm: LLM, hf_model) -> None:
    from tests.model_utils import prefill_logits

    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 20)
    ours = prefill_logits(llm.engine.runner, ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 2e-3  # float32, 30 layers: accumulated rounding only


def test_stop_strings_are_never_emitted(llm: LLM) -> None:
    base = llm.chat(CHATS[3], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0].text
    word = base.split()[3]
    params = SamplingParams(temperature=0, max_tokens=40, stop=[word])
    out = llm.chat(CHATS[3], params, use_tqdm=False)[0].outputs[0]
    assert word not in out.text and base.startswith(out.text) and out.stop_reason == word
    both = SamplingParams(temperature=0, max_tokens=40, stop=[word], include_stop_str_in_output=True)
    assert llm.chat(CHATS[3], both, use_tqdm=False)[0].outputs[0].text.endswith(word)


def test_cli_generate_streams_text() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pagoda.cli", "generate", "--prompt", "What is the capital of France?", "--chat",
         "--temperature", "0", "--max-tokens", "20"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "tok/s" in proc.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "/no/such/model.gguf"], "does not exist"),
        (["--page-size", "0"], "page_size must be a positive integer"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--device", "tpu"], "unknown device"),
        (["--load-format", "dummy"], "needs --model-config"),
    ],
)
def test_cli_errors_are_one_line(argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pagoda.cli", "generate", "--prompt", "hi", *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
