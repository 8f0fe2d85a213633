"""Tensor parallelism on CPU: two ranks (gloo, two processes) against one.

The tiny checkpoints are written as safetensors here (random weights), so both sides load the
same tensors and each rank reads only its slices. Logits must agree within float32 round-off
(the all-reduce sums the halves of o_proj and down_proj in another order); greedy tokens
through the server must be identical for bf16, int4 and int8 weights and each KV-cache dtype;
a killed worker takes the server down with one line within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from pagoda.engine.llm import LLM
from pagoda.engine.sampling_params import SamplingParams
from pagoda.models.config import ModelConfig
from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.loader import dummy_tensors
from tests.conftest import TINY_LLAMA
from tests.server_utils import ServerProcess
from tests.tiny_tokenizer import write_tiny_tokenizer

PROMPTS = [[1, 5, 9, 200, 300, 17, 4, 8, 100, 2, 3] * 3, [7, 7, 8, 9], list(range(40, 80))]
# Qwen2 (QKV bias), one KV head (replicated over the ranks), tied embeddings and a vocabulary the
# ranks do not divide evenly.
VARIANT = {"architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 1, "tie_word_embeddings": True,
           "vocab_size": 515}


def write_checkpoint(directory: Path, overrides: dict | None = None, seed: int = 7) -> Path:
    cfg = {**TINY_LLAMA, **(overrides or {})}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(cfg), torch.float32, torch.device("cpu"))
    # std 0.1 rather than the dummy 0.02: logits with clear winners, so that greedy tokens test the
    # sharding and not which of two near-equal logits float32 round-off happens to favour.
    tensors = {n: t if n.endswith("norm.weight") else t * 5 for n, t in dummy_tensors(model._expected_weights(), seed)}
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(directory / "model.safetensors"))
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tp") / "tiny")


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tp") / "variant", VARIANT)


def step_logits(llm: LLM) -> torch.Tensor:
    """Every prompt token's logits (one prefill step of all prompts), then one decode step's."""
    runner = llm.engine.runner
    seqs, page = [], 1
    for ids in PROMPTS:
        pages = list(range(page, page + (len(ids) + 1 + 15) // 16))
        page += len(pages)
        seqs.append((ids, 0, pages))
    out = runner.forward(runner.prepare(seqs, all_logits=range(len(seqs))))
    prefill = torch.cat([out.all_logits[b] for b in range(len(seqs))])
    decode = runner.forward(runner.prepare([([5], len(ids), pages) for ids, _, pages in seqs])).last_logits
    return torch.cat([prefill, decode])


@pytest.mark.parametrize("which", ["tiny", "variant"])
def test_logits_match_one_rank(which: str, tiny_dir: Path, variant_dir: Path) -> None:
    path = str(tiny_dir if which == "tiny" else variant_dir)
    one = LLM(path, kv_cache_memory=0.01)
    expected = step_logits(one)
    two = LLM(path, kv_cache_memory=0.01, tensor_parallel_size=2)
    try:
        got = step_logits(two)
    finally:
        two.engine.close()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


def test_a_long_step_takes_two_messages(tiny_dir: Path) -> None:
    """A step whose description exceeds the channel's fixed buffer (1,500 tokens: ~4,600 words)
    goes as header + payload; the logits still match one rank's."""
    from pagoda.distributed.channel import CAPACITY

    ids = [(i * 37) % 500 for i in range(1500)]
    pages = list(range(1, 1 + (len(ids) + 15) // 16))
    assert 3 * len(ids) > CAPACITY

    def logits(llm: LLM) -> torch.Tensor:
        runner = llm.engine.runner
        return runner.forward(runner.prepare([(ids, 0, pages)])).last_logits

    expected = logits(LLM(str(tiny_dir), kv_cache_memory=0.01))
    two = LLM(str(tiny_dir), kv_cache_memory=0.01, tensor_parallel_size=2)
    try:
        got = logits(two)
    finally:
        two.engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("quantization", ["bf16", "int8", "int4"])
def test_quantized_logits_within_bf16_round_off(quantization: str, tiny_dir: Path) -> None:
    """Quantized layers compute on bfloat16 activations, and the all-reduce sums two partial
    outputs where one rank summed one: the same values up to bf16 rounding (2^-9 relative per
    rounding, compounded over the layers), and the same greedy choice wherever the top two
    logits are further apart than that. These random models have exact bf16 ties (margin 0), so
    a whole greedy sequence can legitimately part at a near-tie: the server test below holds
    int4 (whose choices here all have clear margins) and the float32 weights to identical tokens."""
    one = LLM(str(tiny_dir), kv_cache_memory=0.01, quantization=quantization)
    expected = step_logits(one)
    two = LLM(str(tiny_dir), kv_cache_memory=0.01, quantization=quantization, tensor_parallel_size=2)
    try:
        got = step_logits(two)
    finally:
        two.engine.close()
    bound = 0.06 * float(expected.std())
    assert (got - expected).abs().max() < bound
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * bound
    assert clear.sum() > len(clear) // 2
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


@pytest.mark.parametrize("flags", [
    ("--quantization", "int4"), ("--kv-cache-dtype", "int8"), ("--kv-cache-dtype", "bfloat16"),
    ("--kv-cache-dtype", "float32"),
], ids=lambda f: "-".join(f).strip("-"))
def test_greedy_tokens_through_the_server(flags: tuple[str, str], tiny_dir: Path) -> None:
    name = flags[0].removeprefix("--").replace("-", "_")
    one = LLM(str(tiny_dir), kv_cache_memory=0.01, **{name: flags[1]})
    expected = [o.outputs[0] for o in one.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert all(len(e.token_ids) == 16 for e in expected)
    server = ServerProcess("--model", str(tiny_dir), "--kv-cache-memory", "0.01", "--tp", "2", *flags, timeout=120)
    try:
        for prompt, want in zip(PROMPTS, expected):
            r = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["completion_tokens"] == 16
            assert body["choices"][0]["text"] == want.text  # the same 16 tokens, detokenized
        assert server.terminate(timeout=30) == 0
    finally:
        server.kill()


def _children(pid: int) -> list[int]:
    """Child processes of pid, whichever of its threads started them."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_killed_worker_takes_the_server_down(tiny_dir: Path) -> None:
    server = ServerProcess("--model", str(tiny_dir), "--kv-cache-memory", "0.01", "--tp", "2", timeout=120)
    try:
        workers = _children(server.proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        code = server.proc.wait(15)
        assert code == 1 and time.monotonic() - start < 5
        last = server.stderr_tail().strip().splitlines()[-1]
        assert last.startswith("pagoda: error: tensor-parallel worker rank 1 (pid ") and "exited with code -9" in last
    finally:
        server.kill()


@pytest.mark.slow
def test_default_model_logits_match_one_rank() -> None:
    """SmolLM2-135M (9 query heads, 3 KV heads: tp 3 is the size that divides them), float32."""
    from pagoda.weights.default_model import default_model_path

    path = str(default_model_path())
    options = {"kv_cache_memory": 0.05, "quantization": "none", "dtype": "float32"}
    expected = step_logits(LLM(path, **options))
    three = LLM(path, tensor_parallel_size=3, **options)
    try:
        got = step_logits(three)
    finally:
        three.engine.close()
    # 30 layers of float32 sums in another order: measured at most 2.7e-4 on logits of size ~10.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--quantization", "bf16"), ("--quantization", "int8"), ("--quantization", "int4"),
                                   ("--kv-cache-dtype", "int8")], ids=lambda f: "-".join(f).strip("-"))
def test_default_model_greedy_tokens_through_the_server(flags: tuple[str, str]) -> None:
    """The real model (tp 3): bf16, int8 and int4 weights and the int8 KV cache give one rank's
    tokens exactly, through the server, up to the first greedy choice that is a tie on one rank
    (two top logits within one bf16 step, 0.125 for logits of 16-32: "The three colors" goes on
    with " of" or " I" on a last-bit difference), where either token is right and the texts may
    part."""
    from pagoda.weights.default_model import default_model_path

    prompts = ["Name three colors and describe each in one sentence.", "Write a haiku about mountains."]
    name = flags[0].removeprefix("--").replace("-", "_")
    one = LLM(str(default_model_path()), kv_cache_memory=0.05, **{name: flags[1]})
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=2)
    expected = []
    for p in prompts:
        out = one.chat([{"role": "user", "content": p}], params, use_tqdm=False)[0].outputs[0]
        tie = next((i for i, lp in enumerate(out.logprobs) if lp.top[0][1] - lp.top[1][1] <= 0.13), None)
        expected.append((out.text, None if tie is None else one.tokenizer.decode(out.token_ids[:tie])))
    server = ServerProcess("--kv-cache-memory", "0.05", "--tp", "3", *flags, timeout=180)
    try:
        for prompt, (want, before_tie) in zip(prompts, expected):
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0})
            assert r.status_code == 200, r.text
            got = r.json()["choices"][0]["message"]["content"]
            assert got == want if before_tie is None else got.startswith(before_tie), (got, want)
    finally:
        server.kill()
