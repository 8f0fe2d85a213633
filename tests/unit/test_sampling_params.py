"""SamplingParams: vLLM defaults, normalisation of loose client forms, and a named error per bad field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pagoda.engine.sampling_params import SamplingParams
from pagoda.errors import InvalidRequestError, PagodaError


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert p.logit_bias is None and p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.max_tokens, p.min_tokens, p.ignore_eos) == (16, 0, False)
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert not p.greedy and not p.has_penalties


def test_loose_forms_are_normalised() -> None:
    p = SamplingParams(stop="###", logit_bias={"50": 5, 7: -1.5}, temperature=1, stop_token_ids=(3, 4))
    assert p.stop == ["###"]
    assert p.logit_bias == {50: 5.0, 7: -1.5}
    assert isinstance(p.temperature, float)
    assert p.stop_token_ids == [3, 4]
    assert SamplingParams(stop=None).stop == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -1, "temperature must be >= 0 (got -1)"),
        ("temperature", 101.0, "temperature must be <= 100"),
        ("temperature", math.nan, "temperature must be finite"),
        ("temperature", "hot", "temperature must be a number"),
        ("temperature", True, "temperature must be a number"),
        ("top_p", 0.0, "top_p must be > 0 (got 0)"),
        ("top_p", 1.5, "top_p must be <= 1 (got 1.5)"),
        ("top_k", -2, "top_k must be >= -1 (got -2)"),
        ("top_k", 2.0, "top_k must be an integer"),
        ("top_k", True, "top_k must be an integer"),
        ("min_p", -0.1, "min_p must be >= 0"),
        ("min_p", 1.1, "min_p must be <= 1"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
        ("repetition_penalty", math.inf, "repetition_penalty must be finite"),
        ("frequency_penalty", 2.5, "frequency_penalty must be <= 2"),
        ("presence_penalty", -3, "presence_penalty must be >= -2 (got -3)"),
        ("n", 0, "n must be >= 1 (got 0)"),
        ("n", True, "n must be an integer"),
        ("max_tokens", 0, "max_tokens must be >= 1 (got 0)"),
        ("min_tokens", -1, "min_tokens must be >= 0"),
        ("min_tokens", 17, "min_tokens must be <= max_tokens"),
        ("logprobs", 21, "logprobs must be <= 20 (got 21)"),
        ("logprobs", -1, "logprobs must be >= 0"),
        ("prompt_logprobs", 21, "prompt_logprobs must be <= 20"),
        ("logit_bias", {1: 101}, "logit_bias values must be in [-100, 100]"),
        ("logit_bias", {1: math.nan}, "logit_bias values must be in [-100, 100]"),
        ("logit_bias", {-1: 1.0}, "logit_bias keys must be token ids"),
        ("logit_bias", {"a": 1.0}, "logit_bias keys must be token ids"),
        ("logit_bias", [1, 2], "logit_bias must be a mapping"),
        ("seed", 2**64, "seed must be <= "),
        ("seed", 1.0, "seed must be an integer"),
        ("stop", [""], "stop must not contain an empty string"),
        ("stop", [1], "stop must be a string or a list of strings"),
        ("stop_token_ids", [-1], "stop_token_ids must be token ids >= 0"),
        ("stop_token_ids", [True], "stop_token_ids must be token ids >= 0"),
        ("ignore_eos", "yes", "ignore_eos must be a boolean"),
        ("skip_special_tokens", 1, "skip_special_tokens must be a boolean"),
        ("include_stop_str_in_output", None, "include_stop_str_in_output must be a boolean"),
    ],
)
def test_bad_field_raises_naming_the_param(field: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert message in str(info.value)
    assert isinstance(info.value, PagodaError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"temperature": 100},
        {"top_p": 1.0},
        {"top_k": -1},
        {"top_k": 50},
        {"min_p": 1.0},
        {"frequency_penalty": -2, "presence_penalty": 2},
        {"repetition_penalty": 0.5},
        {"logprobs": 0, "prompt_logprobs": 20},
        {"max_tokens": None, "min_tokens": 500},
        {"max_tokens": 4, "min_tokens": 4},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"logit_bias": {0: -100, 5: 100}},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-7).greedy  # below GREEDY_EPS: dividing would overflow
    assert SamplingParams(top_k=1, temperature=1.3).greedy
    assert not SamplingParams(temperature=0.01).greedy
    assert not SamplingParams(top_k=2).greedy


def test_validate_catches_later_mutation() -> None:
    p = SamplingParams()
    p.top_p = 0.0
    with pytest.raises(InvalidRequestError) as info:
        p.validate()
    assert info.value.param == "top_p"


def test_validate_token_ids_against_vocab() -> None:
    SamplingParams(stop_token_ids=[9], logit_bias={9: 1.0}).validate_token_ids(10)
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop_token_ids=[10]).validate_token_ids(10)
    assert info.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logit_bias={12: 1.0}).validate_token_ids(10)
    assert info.value.param == "logit_bias"
