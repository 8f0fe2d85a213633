"""Long prompts: chunked prefill on the default model, and running beyond the trained length.

Fast (tiny models): ``--context-length`` past ``max_position_embeddings`` needs ``--rope-scaling``
(a clear ConfigError, one CLI line, otherwise); with it the model loads, generates past the
trained length, and its logits there match transformers given the same scaling.

Slow (the real SmolLM2-135M GGUF, context 8192), on one engine driven step by step:

- an 8,000-token prompt prefilled in 512-token chunks while a short request decodes: the
  short one gets a token in every step, no step exceeds the token budget, and no step takes
  more than a fraction of a whole-prompt prefill;
- the process's peak RSS grows by about the KV pages the prompt fills, nowhere near the
  8K x 8K x heads float32 score matrix (2.4 GB) that materialised attention would need;
- the last-position logits are the same with chunks of 512, 2048 or one 8K chunk (max abs
  difference <= 1e-4 in float32; measured 0), and match transformers on a 2K prompt.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tokenizers
import torch

from pagoda import LLM, SamplingParams
from pagoda.errors import ConfigError, InvalidRequestError
from tests.conftest import TINY_LLAMA
from tests.model_utils import prefill_logits

TRAINED = TINY_LLAMA["max_position_embeddings"]  # 4096


def _tiny(config_path: Path, **options) -> LLM:
    return LLM(model_config=str(config_path), load_format="dummy", kv_cache_memory=0.05, **options)


# ---- beyond the trained length (tiny models) -------------------------------------------------------------


def test_context_beyond_trained_length_needs_rope_scaling(tiny_config_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"context_length 8192 exceeds the model's {TRAINED} positions; "
                                          "pass --rope-scaling"):
        _tiny(tiny_config_path, context_length=8192)
    proc = subprocess.run(
        [sys.executable, "-m", "pagoda.cli", "generate", "--prompt", "hi", "--load-format", "dummy",
         "--model-config", str(tiny_config_path), "--context-length", "8192"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"pagoda: error: context_length 8192 exceeds the model's {TRAINED} positions; pass --rope-scaling to extend it"
    ]


def test_yarn_extends_the_context_and_generates(tiny_config_path: Path) -> None:
    llm = _tiny(tiny_config_path, context_length=2 * TRAINED, rope_scaling='{"rope_type": "yarn", "factor": 2}')
    assert llm.engine.context_length == 2 * TRAINED
    prompt = torch.randint(0, TINY_LLAMA["vocab_size"], (TRAINED + 1500,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.generate(prompt.tolist(), params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="exceeds the context length"):
        llm.generate([1] * (2 * TRAINED - 2), params, use_tqdm=False)


EXTENSIONS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    # YaRN's ramp must stay relative to the trained 256 positions, not the 512 asked for.
    "yarn": {"rope_type": "yarn", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}  # dynamic NTK is static here (vLLM's choice), while transformers rescales with the length: no parity


@pytest.mark.parametrize("name", list(EXTENSIONS))
def test_rope_scaling_override_matches_transformers_past_the_trained_length(name: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # head_dim 32, so that YaRN's ramp bounds differ between 256 and 512 original positions
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                tie_word_embeddings=False)
    torch.manual_seed(0)
    trained = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**base), dtype=torch.float32)
    trained.save_pretrained(tmp_path)  # a model that knows nothing of the scaling
    vocab = tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>")  # pagoda wants a tokenizer.json
    tokenizers.Tokenizer(vocab).save(str(tmp_path / "tokenizer.json"))
    scaled = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**base, rope_scaling=dict(EXTENSIONS[name])), dtype=torch.float32).eval()
    scaled.load_state_dict(trained.state_dict())

    llm = LLM(model=str(tmp_path), dtype="float32", context_length=512, rope_scaling=json.dumps(EXTENSIONS[name]),
              kv_cache_memory=0.01)
    ids = torch.randint(0, 128, (500,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = scaled(torch.tensor([ids])).logits[0]
    ours = prefill_logits(llm.engine.runner, ids)
    assert (ours - ref).abs().max().item() <= 1e-4


# ---- the real model: an 8K prompt -------------------------------------------------------------------------

WORDS = (
    "the a of to and in is was for on that with as by at from it this be are or an which his her their one "
    "river mountain harbor lantern orchard marble copper violin quantum tensor galaxy bread whisper winter "
    "engine kernel memory page token cache scheduler request budget chunk prefill decode latency throughput "
    "history empire treaty merchant voyage island monsoon silk porcelain tea ledger caravan festival temple "
    "sings builds carries measures remembers crosses divides returns opens gathers writes computes follows "
    "quickly slowly carefully quietly nearly always never often twice perhaps however therefore meanwhile "
    "red golden ancient modern narrow distant bright heavy hollow northern southern curious patient"
).split()


def varied_text(num_words: int, seed: int = 0) -> str:
    """Deterministic prose-like text: sentences of mixed words, numbers, names and punctuation."""
    rng = random.Random(seed)
    out = []
    while len(out) < num_words:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 99999)))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(["Hangzhou", "Lisbon", "Nairobi", "Qing", "Ada"]))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ",", "?", "!", ";", ":\n", ".\n\n"]))
    return " ".join(out)


LONG_TOKENS = 8000
SHORT_PROMPT = [{"role": "user", "content": "Count slowly from one to one hundred."}]
LOGITS_ATOL = 1e-4


@dataclass
class Run:
    """One request's prefill driven through Engine.step(), step by step."""

    last_logits: torch.Tensor | None = None  # after the long prompt's final chunk
    chunk_logits: list[torch.Tensor] = field(default_factory=list)  # after each of its chunks, in order
    step_seconds: list[float] = field(default_factory=list)
    step_chunks: list[dict[str, int]] = field(default_factory=list)  # request id -> tokens scheduled
    long_in_prefill: list[bool] = field(default_factory=list)
    short_deltas: list[int] = field(default_factory=list)  # tokens the short request got in each step
    peak_rss_growth: int | None = None  # bytes

    @property
    def prefill_seconds(self) -> float:
        return sum(self.step_seconds)


def _vm_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def drive(llm: LLM, prompt: list[int], chunk: int, budget: int, short: bool = False) -> Run:
    """Prefill `prompt` (one token generated) under the given chunk size and step budget; with
    `short`, a short chat request is already decoding when the long prompt arrives."""
    engine = llm.engine
    engine.scheduler.config = dataclasses.replace(
        engine.scheduler.config, chunked_prefill_size=chunk, max_batched_tokens=budget)
    run = Run()
    if short:
        engine.add_request("short", llm.tokenizer.encode_chat(SHORT_PROMPT),
                           SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        while not any(o.outputs[0].token_ids for o in engine.step()):
            pass
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=1))
    long_req = engine.groups["long"][0]
    schedule, forward = engine.scheduler.schedule, engine.runner.run
    seen: dict[str, object] = {}

    def spy_schedule():
        seen["out"] = out = schedule()
        seen["completing"] = [c.completes for c in out.chunks]  # before update() appends the new token
        return out

    def spy_forward(chunks):
        seen["result"] = forward(chunks)
        return seen["result"]

    engine.scheduler.schedule, engine.runner.run = spy_schedule, spy_forward
    measured = _reset_peak_rss()
    rss_before = _vm_kib("VmRSS")
    try:
        while not long_req.finished:
            in_prefill = long_req.in_prefill
            t = time.perf_counter()
            outputs = engine.step()
            run.step_seconds.append(time.perf_counter() - t)
            out = seen["out"]
            run.step_chunks.append({c.request.request_id: c.num_tokens for c in out.chunks})
            run.long_in_prefill.append(in_prefill)
            deltas = {o.request_id: len(o.outputs[0].delta_token_ids) for o in outputs}
            run.short_deltas.append(deltas.get("short", 0))
            for i, c in enumerate(out.chunks):
                if c.request is long_req:
                    run.chunk_logits.append(seen["result"].last_logits[i].clone())
                    if seen["completing"][i]:
                        run.last_logits = run.chunk_logits[-1]
        if measured:
            run.peak_rss_growth = (_vm_kib("VmHWM") - rss_before) * 1024
    finally:
        del engine.scheduler.schedule, engine.runner.run
        if short:
            engine.abort("short")
    engine.check_integrity()
    return run


@pytest.fixture(scope="module")
def real_llm() -> LLM:
    # No prefix cache: every run below must compute the whole prompt again. No step time budget:
    # these runs fix the chunk size themselves (tests/integration/test_step_budget.py cuts by time).
    return LLM(dtype="float32", kv_cache_memory=1.0, disable_prefix_cache=True, max_step_ms=0)


@pytest.fixture(scope="module")
def long_prompt(real_llm: LLM) -> list[int]:
    ids = real_llm.tokenizer.encode(varied_text(7000))
    assert len(ids) >= LONG_TOKENS
    return ids[:LONG_TOKENS]


@pytest.fixture(scope="module")
def chunked_run(real_llm: LLM, long_prompt: list[int]) -> Run:
    """The default chunk (512) under a 2048-token budget, with a short request decoding alongside."""
    real_llm.generate([long_prompt[:64]], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up
    return drive(real_llm, long_prompt, chunk=512, budget=2048, short=True)


@pytest.fixture(scope="module")
def one_chunk_run(real_llm: LLM, long_prompt: list[int], chunked_run: Run) -> Run:
    return drive(real_llm, long_prompt, chunk=0, budget=8192)


@pytest.mark.slow
def test_short_request_decodes_in_every_step_of_a_long_prefill(chunked_run: Run, one_chunk_run: Run) -> None:
    prefill_steps = [i for i, p in enumerate(chunked_run.long_in_prefill) if p]
    assert len(prefill_steps) == -(-LONG_TOKENS // 512) == len(chunked_run.step_seconds)
    for i in prefill_steps:
        chunks = chunked_run.step_chunks[i]
        assert chunks["short"] == 1 and chunks["long"] <= 512, chunks
        assert sum(chunks.values()) <= 2048
        assert chunked_run.short_deltas[i] == 1, f"step {i}: the short request got no token"
    # The short request's inter-token gap is one step, bounded by the chunk, not the prompt: a step
    # costs ~1/12 of the whole prompt in one chunk; /2 leaves room for a noisy, shared machine.
    assert max(chunked_run.step_seconds) < one_chunk_run.prefill_seconds / 2, (
        chunked_run.step_seconds, one_chunk_run.prefill_seconds)


@pytest.mark.slow
def test_peak_memory_grows_with_the_kv_pages_not_the_prompt_squared(real_llm: LLM, chunked_run: Run,
                                                                   one_chunk_run: Run) -> None:
    if chunked_run.peak_rss_growth is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    mc = real_llm.engine.model_config
    kv_bytes = LONG_TOKENS * 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 4  # 352 MiB
    scores_bytes = mc.num_attention_heads * LONG_TOKENS * LONG_TOKENS * 4  # one layer's scores: 2.1 GiB
    # The first long prefill of the process touches the prompt's KV pages; the rest is one chunk's activations.
    growth = chunked_run.peak_rss_growth
    assert growth < kv_bytes + (384 << 20), f"peak RSS grew {growth / 2**20:.0f} MiB (KV {kv_bytes / 2**20:.0f} MiB)"
    # Even one 8K chunk (KV pages already resident) never materialises the score matrix.
    assert one_chunk_run.peak_rss_growth < scores_bytes / 2, f"{one_chunk_run.peak_rss_growth / 2**20:.0f} MiB"


@pytest.mark.slow
def test_chunked_prefill_logits_match_one_chunk(real_llm: LLM, long_prompt: list[int], chunked_run: Run,
                                                one_chunk_run: Run) -> None:
    assert len(one_chunk_run.step_seconds) == 1
    ref = one_chunk_run.last_logits
    big = drive(real_llm, long_prompt, chunk=2048, budget=2048)
    assert len(big.step_seconds) == -(-LONG_TOKENS // 2048)
    for run in (chunked_run, big):
        assert (run.last_logits - ref).abs().max().item() <= LOGITS_ATOL
        assert run.last_logits.argmax() == ref.argmax()


@pytest.mark.slow
def test_first_2k_positions_match_transformers(long_prompt: list[int], chunked_run: Run) -> None:
    """The logits after each of the first four 512-token chunks are those of the 2K prompt
    long_prompt[:2048] at positions 511, 1023, 1535 and 2047 (causal attention)."""
    transformers = pytest.importorskip("transformers")
    from pagoda.weights.default_model import default_model_path

    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    positions = [511, 1023, 1535, 2047]
    assert [chunk["long"] for chunk in chunked_run.step_chunks[:4]] == [512] * 4
    with torch.no_grad():
        hidden = hf.eval().model(torch.tensor([long_prompt[:2048]])).last_hidden_state[0, positions]
        ref = hf.lm_head(hidden)
    ours = torch.stack(chunked_run.chunk_logits[:4])
    assert (ours - ref).abs().max().item() < 5e-3  # float32, 30 layers, 2K positions: rounding only
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_rope_scaling_override_applies_to_jiutian(tmp_path) -> None:
    """Jiutian's config class forces rope_scaling off, but a user's --rope-scaling still wins."""
    import json

    from pagoda import LLM, SamplingParams

    cfg = {"architectures": ["JiutianForCausalLM"], "model_type": "jiutian", "vocab_size": 128, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "qkv_bias": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    llm = LLM(model_config=str(path), load_format="dummy", context_length=512, kv_cache_memory=0.01,
              rope_scaling='{"rope_type": "yarn", "factor": 2.0}')
    assert llm.engine.model_config.rope_scaling["rope_type"] == "yarn"
    assert llm.engine.model_config.rope_scaling["original_max_position_embeddings"] == 256
    out = llm.generate([[1] * 300], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
