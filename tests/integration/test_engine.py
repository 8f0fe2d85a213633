"""The serving core end to end on a tiny random model (token-id prompts, no tokenizer)."""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def make_llm(tiny_config_path, **kw) -> LLM:
    options = dict(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.02, seed=1)
    options.update(kw)
    return LLM(**options)


def prompts(n: int, seed: int = 0, lo: int = 5, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(500) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def reference(tiny_config_path):
    """Each of 32 prompts generated alone, page size 16, no chunking, no prefix cache."""
    llm = make_llm(tiny_config_path, disable_prefix_cache=True, chunked_prefill_size=0)
    return [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts(32)]


@pytest.mark.parametrize(
    "options",
    [
        dict(page_size=16, chunked_prefill_size=0),
        dict(page_size=1, chunked_prefill_size=16),
        dict(page_size=16, chunked_prefill_size=16, max_batched_tokens=64),
        dict(page_size=4, disable_prefix_cache=True, max_running_requests=5),
    ],
)
def test_greedy_is_identical_alone_or_batched(tiny_config_path, reference, options) -> None:
    llm = make_llm(tiny_config_path, **options)
    assert tokens(llm.generate(prompts(32), GREEDY, use_tqdm=False)) == reference
    # again: now every prompt's full pages are prefix-cache hits
    assert tokens(llm.generate(prompts(32), GREEDY, use_tqdm=False)) == reference
    llm.engine.check_integrity()


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_config_path) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    llm = make_llm(tiny_config_path, page_size=1, chunked_prefill_size=16)
    alone = tokens(llm.generate([prompts(1)[0]], params, use_tqdm=False))[0]
    other = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    mixed = llm.generate(prompts(8), [params] + [other] * 7, use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    llm2 = make_llm(tiny_config_path, page_size=16, chunked_prefill_size=0)
    assert tokens(llm2.generate([prompts(1)[0]], params, use_tqdm=False))[0] == alone


def test_shared_prefix_computes_only_the_suffix(tiny_config_path) -> None:
    rng = random.Random(5)
    prefix = [rng.randrange(500) for _ in range(1000)]
    a, b = prefix + [1, 2, 3], prefix + [7, 8, 9, 10]
    llm = make_llm(tiny_config_path, page_size=16)
    llm.generate([a], GREEDY, use_tqdm=False)
    before = llm.engine.stats()
    out_b = llm.generate([b], GREEDY, use_tqdm=False)[0]
    after = llm.engine.stats()
    cached = after.prompt_tokens_cached - before.prompt_tokens_cached
    computed = after.prompt_tokens_computed - before.prompt_tokens_computed
    assert cached == 1000 // 16 * 16 and computed == len(b) - cached
    assert out_b.num_cached_tokens == cached
    off = make_llm(tiny_config_path, page_size=16, disable_prefix_cache=True)
    assert off.generate([b], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == out_b.outputs[0].token_ids
    assert off.engine.stats().prompt_tokens_cached == 0


def test_tiny_pool_preempts_and_completes_everything(tiny_config_path, reference) -> None:
    # 20 pages of 4 tokens: a handful of sequences fit at once, 64 are asked for.
    llm = make_llm(tiny_config_path, page_size=4, kv_cache_memory=20 * 4 * 2 * 2 * 2 * 16 * 4 / 2**30)
    assert llm.engine.allocator.num_pages == 20
    work = prompts(64, seed=0, lo=5, hi=40)
    outs = llm.generate(work, GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert llm.engine.stats().num_preemptions > 0
    expected = make_llm(tiny_config_path, disable_prefix_cache=True, chunked_prefill_size=0)
    assert tokens(outs) == tokens(expected.generate(work, GREEDY, use_tqdm=False))
    llm.engine.check_integrity()


def test_abort_mid_generation_frees_pages(tiny_config_path) -> None:
    llm = make_llm(tiny_config_path, page_size=4, kv_cache_memory=20 * 4 * 2 * 2 * 2 * 16 * 4 / 2**30)
    engine = llm.engine
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ids = [f"r{i}" for i in range(64)]
    for rid, p in zip(ids, prompts(64, lo=5, hi=30)):
        engine.add_request(rid, p, long)
    finished = {}
    for step in range(40):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if step == 10:
            for rid in ids[::2]:
                aborted = engine.abort(rid)
                if aborted is not None:
                    assert aborted.outputs[0].finish_reason in ("abort", "length")
    while engine.has_unfinished():
        for out in engine.step():
            finished[out.request_id] = out
    assert all(len(finished[r].outputs[0].token_ids) == 30 for r in ids[1::2])
    engine.check_integrity()


def test_n_choices_share_the_prompt_kv(tiny_config_path) -> None:
    llm = make_llm(tiny_config_path, page_size=4)
    prompt = prompts(1, lo=41, hi=42)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    stats = llm.engine.stats()
    assert stats.prompt_tokens_cached == 2 * (40 // 4 * 4)  # siblings reuse the leader's full pages


def test_stop_token_ids_max_and_min_tokens(tiny_config_path) -> None:
    llm = make_llm(tiny_config_path)
    p = prompts(1)[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    seq = free.outputs[0].token_ids
    stop_at = seq[5]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at]), use_tqdm=False)[0]
    first = seq.index(stop_at)
    assert out.outputs[0].token_ids == seq[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == seq[:3] and out.outputs[0].finish_reason == "length"
    banned = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, stop_token_ids=[seq[0]])
    out = llm.generate([p], banned, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8 and seq[0] not in out.outputs[0].token_ids


def test_prompt_logprobs_match_a_full_forward(tiny_config_path) -> None:
    llm = make_llm(tiny_config_path, chunked_prefill_size=7)
    p = prompts(1, lo=30, hi=31)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    lps = out.prompt_logprobs
    assert lps[0] is None and len(lps) == len(p)
    ref = make_llm(tiny_config_path, chunked_prefill_size=0)
    from tests.model_utils import prefill_logits

    logits = prefill_logits(ref.engine.runner, p)
    expected = torch.log_softmax(logits, -1)
    for i in range(1, len(p)):
        assert lps[i].token_id == p[i]
        assert lps[i].logprob == pytest.approx(expected[i - 1, p[i]].item(), abs=1e-4)
        assert len(lps[i].top) == 2 and lps[i].top[0][1] >= lps[i].top[1][1]


def test_logprobs_of_sampled_tokens(tiny_config_path) -> None:
    llm = make_llm(tiny_config_path)
    out = llm.generate([prompts(1)[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False)[0]
    lps = out.outputs[0].logprobs
    assert [lp.token_id for lp in lps] == out.outputs[0].token_ids
    for lp in lps:  # greedy: the chosen token is the top-1
        assert lp.top[0][0] == lp.token_id and lp.top[0][1] == pytest.approx(lp.logprob)
        assert sum(torch.tensor([v for _, v in lp.top]).exp()) <= 1.0 + 1e-6


def test_bad_requests_are_clear_errors(tiny_config_path) -> None:
    from pagoda.errors import InvalidRequestError

    llm = make_llm(tiny_config_path)
    with pytest.raises(InvalidRequestError, match="context length"):
        llm.generate([[1] * 4096], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="exceeds the context length"):
        llm.generate([[1] * 100], SamplingParams(max_tokens=4000), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[1, 99999]], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_stream_yields_increments_that_add_up_to_generate(tiny_config_path, tmp_path) -> None:
    from tests.tiny_tokenizer import write_tiny_tokenizer

    llm = make_llm(tiny_config_path, tokenizer=str(write_tiny_tokenizer(tmp_path)))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    whole = llm.generate("Hello there", params, use_tqdm=False)[0].outputs[0]
    outputs = list(llm.stream("Hello there", params))
    assert len(outputs) > 1 and outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert "".join(o.outputs[0].delta_text for o in outputs) == outputs[-1].outputs[0].text == whole.text
    assert [t for o in outputs for t in o.outputs[0].delta_token_ids] == whole.token_ids
    early = llm.stream("Hello there", params)
    next(early)
    early.close()  # leaving early aborts the request
    assert not llm.engine.has_unfinished()
