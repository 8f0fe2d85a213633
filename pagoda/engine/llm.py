"""LLM: the offline, synchronous entry point (vLLM's shape).

    from pagoda import LLM, SamplingParams
    llm = LLM()                                   # the default model
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(out[0].outputs[0].text)

Every prompt joins one continuous batch; outputs come back in input order. ``stream``
yields one request's outputs as they settle (the CLI's path).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Sequence

from tqdm import tqdm

from pagoda.config import EngineConfig
from pagoda.engine.engine import Engine, EngineStats, ModelInfo
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling_params import SamplingParams
from pagoda.errors import ConfigError

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    def __init__(
        self, model: str | None = None, *, config: EngineConfig | None = None, show_progress: bool = False,
        **engine_options: Any,
    ) -> None:
        """Engine options by name (``LLM(model, kv_cache_memory=1)``), or a whole ``config``."""
        if config is not None and (model is not None or engine_options):
            raise ConfigError("pass either config or engine options, not both")
        config = config or EngineConfig.from_kwargs(model=model, **engine_options)
        self.engine = Engine(config, show_progress)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self.engine.model_info

    def queue_depth(self) -> int:
        """Sequences waiting for a slot."""
        return self.engine.queue_depth()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """`lora`: the LoRA adapter every prompt runs with, or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or token ids
        prompts = list(prompts)
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts):
            raise ConfigError(f"got {len(loras)} LoRA adapters for {len(prompts)} prompts")
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            rid = self.engine.new_request_id()
            self.engine.add_request(rid, prompt, p or SamplingParams(), priority[i] if priority else 0, loras[i])
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

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, priority: int = 0,
        lora: str | None = None,
    ) -> Iterator[RequestOutput]:
        """One request's incremental outputs (``delta_text`` is each one's new text), the last
        one finished. The request is queued when iteration starts; leaving early aborts it."""
        request_id = self.engine.new_request_id()
        self.engine.add_request(request_id, prompt, sampling_params or SamplingParams(), priority, lora)
        yield from self._follow([request_id])

    def load_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter (a PEFT directory or a GGUF LoRA file) that prompts may then name."""
        self.engine.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        """Unload an adapter (offline, nothing is in flight between calls)."""
        self.engine.unload_lora(name)

    def lora_adapters(self) -> list[str]:
        return [name for name, _ in self.engine.lora_adapters()]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        outputs = self._follow(request_ids)
        with tqdm(total=len(request_ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            try:
                for output in outputs:
                    if output.finished:
                        done[output.request_id] = output
                        bar.update(1)
            finally:
                outputs.close()
        return [done[r] for r in request_ids]

    def _follow(self, request_ids: list[str]) -> Iterator[RequestOutput]:
        """Step the engine until these requests have finished, yielding each of their outputs;
        an error, or closing this early, aborts the ones still running."""
        pending = set(request_ids)
        try:
            while pending:
                for output in self.engine.step():
                    if output.request_id in pending:
                        if output.finished:
                            pending.discard(output.request_id)
                        yield output
        finally:
            for rid in pending:
                self.engine.abort(rid)
