"""The vLLM backend: the same interface as :class:`~posttrain.generate.engine.Engine` on vLLM's offline ``LLM.generate``.

Used when vllm is installed (CUDA machines); prompts are rendered and tokenized by posttrain's
:class:`~posttrain.generate.prompts.PromptEncoder` and passed as token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain.generate.params import Completion, FinishReason, SamplingParams
from posttrain.generate.prompts import PromptEncoder, sample_seed


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMEngine:
    """The same interface on vLLM's offline ``LLM.generate(prompts, SamplingParams)``.

    Prompts are rendered and tokenized by posttrain (the same :class:`PromptEncoder` as :class:`Engine`)
    and passed as token ids, so both backends see identical prompts. End-of-turn tokens are passed as
    ``stop_token_ids``. Each prompt's request gets its own seed (:func:`sample_seed`), so its samples do
    not depend on the batch; vLLM draws the ``n`` samples of a request from that one seed. ``bf16`` is
    not a per-call switch in vLLM: choose the dtype when building the engine (``dtype="bfloat16"``).
    """

    def __init__(self, name: str, *, template: str | None = None, **llm_kwargs: Any):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("the vLLM backend needs vllm (`pip install vllm`, CUDA machines); use Engine for transformers") from err
        from posttrain.models.load import load_tokenizer, resolve

        path = resolve(name)
        self.tokenizer = load_tokenizer(name)
        self.prompts = PromptEncoder(self.tokenizer, template)
        self.llm = LLM(model=path, **llm_kwargs)
        self.end_token_ids = self.prompts.end_token_ids(_generation_eos(path))

    def encode(self, prompts: Sequence[Any], *, apply_chat_template: bool = True) -> list[list[int]]:
        return self.prompts.encode(prompts, apply_chat_template=apply_chat_template)

    def generate(
        self,
        prompts: Sequence[Any],
        params: SamplingParams | None = None,
        *,
        apply_chat_template: bool = True,
        progress: bool = True,
        batch_size: int | None = None,
    ) -> list[list[Completion]]:
        """As :meth:`Engine.generate`; ``batch_size`` is ignored (vLLM schedules its own batches)."""
        return self.generate_ids(self.encode(prompts, apply_chat_template=apply_chat_template), params, progress=progress)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        *,
        progress: bool = True,
        batch_size: int | None = None,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams

        params = params or SamplingParams()
        if params.scores:
            raise ValueError("logprobs and top_logprobs are not supported by the vLLM backend here; use the transformers Engine")
        prompt_ids = [list(p) for p in prompt_ids]
        text_stops, special_stops = self.prompts.special_stop_ids(params.stop)
        user_stop_ids = set(params.stop_token_ids) | special_stops
        copies: dict[tuple[int, ...], int] = {}
        requests, sampling = [], []
        for ids in prompt_ids:
            copy = copies.get(tuple(ids), 0)
            copies[tuple(ids)] = copy + 1
            requests.append({"prompt_token_ids": ids})
            sampling.append(
                VLLMSamplingParams(
                    n=params.n,
                    max_tokens=params.max_new_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k or -1,  # -1 is "off" in every vLLM release (0 only in recent ones)
                    seed=None if params.greedy else sample_seed(params.seed, ids, copy, 0),
                    stop=list(text_stops) or None,
                    stop_token_ids=sorted(user_stop_ids | self.end_token_ids) or None,
                    skip_special_tokens=True,
                )
            )
        outputs = self.llm.generate(requests, sampling, use_tqdm=progress)
        results = []
        for ids, request in zip(prompt_ids, outputs):
            ordered = sorted(request.outputs, key=lambda o: o.index)
            results.append([self._completion(o, ids, user_stop_ids, text_stops) for o in ordered])
        return results

    def _completion(self, out: Any, prompt_ids: list[int], user_stop_ids: set[int], text_stops: list[str]) -> Completion:
        # vLLM says "stop" for EOS, stop tokens and stop strings alike; stop_reason tells them apart
        # (None: EOS; an int: that stop token id; a str: that stop string).
        reason: FinishReason
        if out.finish_reason == "length":
            reason = "length"
        elif isinstance(out.stop_reason, str) or (isinstance(out.stop_reason, int) and out.stop_reason in user_stop_ids):
            reason = "stop"
        else:
            reason = "eos"
        token_ids = list(out.token_ids)
        return Completion(out.text, token_ids, reason, len(token_ids), prompt_ids)


def _generation_eos(path: str) -> Any:
    """The EOS id(s) in a model's generation_config.json, if it has one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        return None
