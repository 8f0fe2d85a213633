"""Speculative decoding end to end: exactly the output of plain decoding, and clean KV books."""

from __future__ import annotations

import json
import random

import pytest

from pagoda import LLM, SamplingParams
from tests.conftest import TINY_LLAMA


def make_llm(tiny_config_path, **kw) -> LLM:
    options = dict(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.02, seed=1)
    options.update(kw)
    return LLM(**options)


def spec_llm(tiny_config_path, **kw) -> LLM:
    """Speculating in every step of these small batches (the auto-off threshold has its own test)."""
    kw.setdefault("speculative_max_batch", 16)
    return make_llm(tiny_config_path, speculative_algorithm="ngram", **kw)


def copy_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a span (and a random model that tends to loop): plenty to look up."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        span = [rng.randrange(500) for _ in range(rng.randrange(8, 30))]
        out.append([rng.randrange(500) for _ in range(rng.randrange(1, 10))] + span * rng.randrange(2, 5))
    return out


def token_ids(outputs) -> list[list[int]]:
    return [c.token_ids for o in outputs for c in o.outputs]


def run_checked(llm: LLM, prompts, params) -> list:
    """Generate by stepping the engine, checking the page books after every step."""
    engine = llm.engine
    ids = []
    for i, p in enumerate(prompts):
        rid = engine.new_request_id()
        engine.add_request(rid, p, params[i] if isinstance(params, list) else params)
        ids.append(rid)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
        for req in engine.scheduler.running:  # a sequence never holds pages past its known tokens
            assert len(req.pages) <= max(engine.scheduler.pages_needed(req.num_tokens), req.num_shared_pages)
            assert req.num_computed < req.num_tokens
    engine.check_integrity()
    assert engine.allocator.num_free() + engine.scheduler.tree.cached_pages() == engine.allocator.num_pages
    return [done[r] for r in ids]


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_config_path) -> LLM:
    return make_llm(tiny_config_path)


@pytest.mark.parametrize("options", [
    dict(),
    dict(page_size=1, speculative_num_draft_tokens=3, speculative_ngram_max_match=2),
    dict(page_size=4, chunked_prefill_size=16, max_batched_tokens=40, speculative_num_draft_tokens=12),
])
def test_greedy_is_identical_with_ngram_speculation(tiny_config_path, plain, options) -> None:
    prompts = copy_prompts(12)
    want = token_ids(plain.generate(prompts, GREEDY, use_tqdm=False))
    llm = spec_llm(tiny_config_path, **options)
    assert token_ids(run_checked(llm, prompts[:1], GREEDY)) == want[:1]  # alone
    assert token_ids(run_checked(llm, prompts, GREEDY)) == want  # batched, and now with cached prefixes
    s = llm.stats()
    assert s.spec_num_steps > 0 and s.spec_num_accepted_tokens > 0
    assert 1.0 < s.spec_mean_acceptance_length and 0 < s.spec_acceptance_rate <= 1


def test_stops_lengths_logprobs_and_penalties_are_unchanged(tiny_config_path, plain) -> None:
    prompts = copy_prompts(6, seed=3)
    first = token_ids(plain.generate(prompts[:1], GREEDY, use_tqdm=False))[0]
    params = [
        SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[first[9]], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, min_tokens=12, stop_token_ids=[first[3]], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, frequency_penalty=0.2, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=25, logit_bias={first[5]: 2.0}, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
    ]
    prompts = [prompts[0]] * 3 + prompts[3:]
    want = plain.generate(prompts, params, use_tqdm=False)
    got = run_checked(spec_llm(tiny_config_path), prompts, params)
    for w, g in zip(want, got):
        a, b = w.outputs[0], g.outputs[0]
        assert (a.token_ids, a.finish_reason, a.stop_reason) == (b.token_ids, b.finish_reason, b.stop_reason)
        if a.logprobs is not None:
            # the same tokens and alternatives; values to float32 rounding (a chunk's rows vs a decode row)
            assert [[t for t, _ in lp.top] for lp in a.logprobs] == [[t for t, _ in lp.top] for lp in b.logprobs]
            flat = [[lp.logprob] + [v for _, v in lp.top] for lp in a.logprobs]
            assert flat == [pytest.approx([lp.logprob] + [v for _, v in lp.top], abs=1e-4) for lp in b.logprobs]
    assert got[1].outputs[0].finish_reason == "stop" and len(got[5].outputs[0].token_ids) == 3
    assert got[0].outputs[0].token_ids == first[:17]


def test_stop_strings_are_unchanged(tiny_config_path, tmp_path) -> None:
    from tests.tiny_tokenizer import write_tiny_tokenizer

    tok = str(write_tiny_tokenizer(tmp_path))
    plain = make_llm(tiny_config_path, tokenizer=tok)
    prompt = "abc abc abc abc abc abc"
    text = plain.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    stop = text.outputs[0].text[10:13]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    want = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    got = run_checked(spec_llm(tiny_config_path, tokenizer=tok), [prompt], params)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
        want.text, want.token_ids, want.finish_reason, want.stop_reason)


def test_seeded_sampling_reproduces_with_or_without_speculation(tiny_config_path, plain) -> None:
    prompts = copy_prompts(6, seed=5)
    # a low temperature: the random model's flat distributions would reject nearly every proposal
    params = [SamplingParams(temperature=0.05, top_p=0.95, seed=100 + i, max_tokens=40, ignore_eos=True)
              for i in range(6)]
    want = token_ids(plain.generate(prompts, params, use_tqdm=False))
    llm = spec_llm(tiny_config_path)
    assert token_ids(run_checked(llm, prompts, params)) == want
    assert token_ids(run_checked(llm, prompts[2:3], params[2:3])) == want[2:3]  # alone
    assert llm.stats().spec_num_accepted_tokens > 0


def test_n_greater_than_one(tiny_config_path, plain) -> None:
    prompt = copy_prompts(1, seed=7)[0]
    params = SamplingParams(n=3, temperature=0.8, seed=3, max_tokens=30, ignore_eos=True)
    want = token_ids(plain.generate([prompt], params, use_tqdm=False))
    assert token_ids(run_checked(spec_llm(tiny_config_path), [prompt], params)) == want


def test_preemption_mid_speculation(tiny_config_path) -> None:
    prompts = copy_prompts(10, seed=9)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    small = dict(kv_cache_memory=0.0004, page_size=4)  # ~100 pages: sequences get preempted
    want = token_ids(make_llm(tiny_config_path, **small).generate(prompts, params, use_tqdm=False))
    llm = spec_llm(tiny_config_path, **small)
    assert token_ids(run_checked(llm, prompts, params)) == want
    assert llm.stats().num_preemptions > 0 and llm.stats().spec_num_steps > 0


def test_abort_mid_speculation_leaks_no_pages(tiny_config_path) -> None:
    llm = spec_llm(tiny_config_path, page_size=2)
    engine = llm.engine
    prompts = copy_prompts(4, seed=11)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(40):
        engine.step()
        engine.check_integrity()
        if engine.stats().spec_num_accepted_tokens > 0:
            break
    assert engine.stats().spec_num_accepted_tokens > 0
    for i in range(4):
        engine.abort(f"r{i}")
    assert not engine.has_unfinished() and not engine.scheduler.running
    engine.check_integrity()


def test_speculation_turns_off_for_large_batches(tiny_config_path) -> None:
    llm = spec_llm(tiny_config_path, speculative_max_batch=2)
    engine = llm.engine
    prompts = copy_prompts(5, seed=13)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=8 if i < 3 else 40, ignore_eos=True))
    on_with = []
    while engine.has_unfinished():
        running, before = len(engine.scheduler.running), engine.stats().spec_num_steps
        engine.step()
        if engine.stats().spec_num_steps > before:
            on_with.append(running)
    assert on_with and max(on_with) <= 2  # off while more than 2 decoded, back on once they finished


def test_constrained_rows_do_not_speculate_and_stay_exact(tiny_config_path, tmp_path) -> None:
    pytest.importorskip("xgrammar")
    from pagoda.structured.params import StructuredOutputs
    from tests.tiny_tokenizer import write_tiny_tokenizer

    tok = str(write_tiny_tokenizer(tmp_path))
    params = SamplingParams(temperature=0, max_tokens=30, structured=StructuredOutputs(regex="(ab ){3,8}c"))
    want = make_llm(tiny_config_path, tokenizer=tok).generate("ab ab ab ab", params, use_tqdm=False)[0].outputs[0]
    got = run_checked(spec_llm(tiny_config_path, tokenizer=tok), ["ab ab ab ab"], params)[0].outputs[0]
    assert (got.text, got.token_ids) == (want.text, want.token_ids)


@pytest.fixture(scope="module")
def draft_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("draft") / "config.json"
    path.write_text(json.dumps(dict(TINY_LLAMA, num_hidden_layers=1, hidden_size=32, intermediate_size=64)))
    return path


def test_draft_model_random_and_self(tiny_config_path, draft_config, plain) -> None:
    prompts = copy_prompts(4, seed=17)
    want = token_ids(plain.generate(prompts, GREEDY, use_tqdm=False))
    # a small random draft: mostly rejected, output unchanged
    small = make_llm(tiny_config_path, speculative_algorithm="draft", speculative_draft_model=str(draft_config),
                     speculative_num_draft_tokens=4, speculative_max_batch=16)
    assert token_ids(run_checked(small, prompts, GREEDY)) == want
    assert small.stats().spec_num_steps > 0
    # the model as its own draft: every proposal accepted
    selfd = make_llm(tiny_config_path, speculative_algorithm="draft", speculative_draft_model=str(tiny_config_path),
                     speculative_num_draft_tokens=4, speculative_max_batch=16)
    assert token_ids(run_checked(selfd, prompts, GREEDY)) == want
    assert selfd.stats().spec_acceptance_rate > 0.95
    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=30, ignore_eos=True)
    assert token_ids(run_checked(selfd, prompts, seeded)) == token_ids(plain.generate(prompts, seeded, use_tqdm=False))


def test_draft_vocabulary_must_match(tiny_config_path, tmp_path) -> None:
    from pagoda.errors import ConfigError

    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(TINY_LLAMA, vocab_size=256, eos_token_id=255)))
    with pytest.raises(ConfigError, match="vocabulary"):
        make_llm(tiny_config_path, speculative_algorithm="draft", speculative_draft_model=str(other))


def test_metrics_expose_speculation(tiny_config_path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from pagoda.server.metrics import _EngineCollector

    llm = spec_llm(tiny_config_path)
    llm.generate(copy_prompts(2, seed=19), GREEDY, use_tqdm=False)

    class Front:  # what the collector reads of an AsyncEngine
        num_in_flight = 0

        def stats(self):
            return llm.stats()

    registry = CollectorRegistry()
    registry.register(_EngineCollector(Front()))
    text = generate_latest(registry).decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("pagoda_spec")}
    s = llm.stats()
    assert values["pagoda_spec_decode_num_accepted_tokens_total"] == s.spec_num_accepted_tokens > 0
    assert values["pagoda_spec_decode_num_draft_tokens_total"] == s.spec_num_draft_tokens
    assert values["pagoda_spec_decode_num_drafts_total"] == s.spec_num_steps
    assert values["pagoda_spec_decode_mean_acceptance_length"] == pytest.approx(s.spec_mean_acceptance_length)
    assert values["pagoda_spec_decode_acceptance_rate"] == pytest.approx(s.spec_acceptance_rate)


# ---- the real default model ------------------------------------------------------------

COPY_TEXT = (
    "The committee met on Tuesday to review the harbour accounts. The treasurer reported that the new crane had "
    "cost less than planned, and that the fishing fleet had paid its mooring fees on time. The chair thanked "
    "the volunteers who repaired the sea wall after the storm in March."
)


@pytest.fixture(scope="module")
def real_plain() -> LLM:
    return LLM()


@pytest.mark.slow
def test_real_model_greedy_is_identical_with_ngram(real_plain) -> None:
    chat = [{"role": "user", "content": f"{COPY_TEXT}\n\n{COPY_TEXT}\n\nRepeat the text above exactly."}]
    prompt = real_plain.tokenizer.encode_chat(chat)
    params = SamplingParams(temperature=0, max_tokens=96)
    want = real_plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    spec = LLM(speculative_algorithm="ngram")
    got = run_checked(spec, [prompt], params)[0].outputs[0]
    assert (got.token_ids, got.text) == (want.token_ids, want.text)
    assert spec.stats().spec_mean_acceptance_length > 2.0


@pytest.mark.slow
def test_real_model_as_its_own_draft(real_plain) -> None:
    from pagoda.weights.default_model import default_model_path

    prompt = real_plain.tokenizer.encode_chat([{"role": "user", "content": "Write a haiku about autumn leaves."}])
    params = SamplingParams(temperature=0, max_tokens=40)
    want = real_plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    spec = LLM(speculative_algorithm="draft", speculative_draft_model=str(default_model_path()),
               speculative_num_draft_tokens=4)
    got = run_checked(spec, [prompt], params)[0].outputs[0]
    assert got.token_ids == want.token_ids
    assert spec.stats().spec_acceptance_rate > 0.9
