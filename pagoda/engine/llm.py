"""LLM: the offline, synchronous entry point (vLLM's shape).

    from pagoda import LLM, SamplingParams
    llm = LLM()                                   # the default model
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(out[0].outputs[0].text)

Every prompt joins one continuous batch; outputs come back in input order.
"""

from __future__ import annotations

from typing import Any, Sequence

from tqdm import tqdm

from pagoda.config import EngineConfig
from pagoda.engine.engine import Engine
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling_params import SamplingParams
from pagoda.errors import ConfigError

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **engine_options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or token ids
        prompts = list(prompts)
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            rid = self.engine.new_request_id()
            self.engine.add_request(rid, prompt, p or SamplingParams(), priority[i] if priority else 0)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if self.engine.tokenizer is None:
            raise ConfigError("this model has no tokenizer, so it cannot chat")
        prompts = [
            self.engine.tokenizer.encode_chat(c, add_generation_prompt=add_generation_prompt, **template_kwargs)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(request_ids)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            try:
                while len(done) < len(wanted):
                    for output in self.engine.step():
                        if output.finished and output.request_id in wanted:
                            done[output.request_id] = output
                            bar.update(1)
            except BaseException:
                for rid in wanted - set(done):
                    self.engine.abort(rid)
                raise
        return [done[r] for r in request_ids]
