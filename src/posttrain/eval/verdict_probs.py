"""A judge's verdict read from its next-token probabilities instead of its free text (``--judge-mode probs``).

Small judges rarely finish a written judgement with a verdict (SmolLM2-135M never did on MT-Bench's
prompts: it repeats itself until the budget runs out). Here the verdict is asked for directly, as
AlpacaEval 2's default annotator does with its judge's log-probs: the judge prompt is rendered with the
judge's chat template, the assistant turn is started with the verdict's opening (``Rating: [[`` or
``Verdict: [[``), and one forward pass gives the probabilities of what comes next:

* a rating: P of each of 1..10 (10 either one token or "1" then "0", read with one more step on the cache);
  the verdict is the expected rating under those probabilities renormalised;
* a pairwise choice: P of "A", "B" and "C" (a tie); the verdict is the soft preference for A,
  (P(A) + P(C)/2) / (P(A) + P(B) + P(C)), which :mod:`posttrain.eval.pairwise` averages over both orders.

When less than :data:`MIN_MASS` of the probability goes to the verdict tokens at all, the judge is not
answering the question asked: the verdict is unreadable and counted, never guessed. In-process judges
only (an endpoint does not hand back the probabilities of tokens it did not sample). Our own code: a
forward pass and a softmax over chosen token ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from posttrain.eval.judging import Verdict
from posttrain.synth.teacher import Teacher

MIN_MASS = 0.5
PREFIX = {"single": "Rating: [[", "pairwise": "Verdict: [["}


def _single_token(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


class VerdictProbs:
    """Verdicts from the next-token distribution of a :class:`~posttrain.synth.teacher.Teacher`'s in-process engine,
    cached in the teacher's request cache under its own keys."""

    def __init__(self, teacher: Teacher) -> None:
        engine = teacher.engine
        if not hasattr(engine, "model") or not hasattr(engine, "prompts"):
            raise ValueError("--judge-mode probs reads the judge's token probabilities, so the judge must run in this process (not at an endpoint)")
        self.teacher = teacher
        tok = engine.tokenizer
        self.digits = {d: _single_token(tok, str(d)) for d in range(1, 11)}
        if any(self.digits[d] is None for d in range(1, 10)):
            raise ValueError(f"{self.teacher.name}: the digits 1-9 are not single tokens of its tokenizer, so ratings cannot be read from probabilities")
        self.zero = _single_token(tok, "0")
        self.letters = {c: _single_token(tok, c) for c in "ABC"}
        if any(v is None for v in self.letters.values()):
            raise ValueError(f"{self.teacher.name}: A, B and C are not single tokens of its tokenizer")

    def __call__(self, kind: str, chats: Sequence[Sequence[Mapping[str, str]]]) -> list[tuple[Verdict, str]]:
        """(verdict, a text saying how it was read) per chat; ``kind`` "single" or "pairwise"; cached per chat."""
        cached, _ = self.teacher.cache.load(self.teacher.name)
        out = []
        for chat in chats:
            key = self.teacher.key(list(chat), {"verdict_probs": kind, "prefix": PREFIX[kind]})
            if key not in cached:
                probs = self._probs(kind, chat)
                cached[key] = {"key": key, "replies": [json.dumps(probs)], "truncated": [False]}
                self.teacher.cache.append(self.teacher.name, cached[key])
            out.append(self._verdict(kind, json.loads(cached[key]["replies"][0])))
        return out

    def _probs(self, kind: str, chat: Sequence[Mapping[str, str]]) -> dict[str, float]:
        import torch
        from transformers import DynamicCache

        from posttrain.models.load import cache_kwarg

        engine = self.teacher.engine
        text = engine.prompts.render(list(chat)) + PREFIX[kind]
        ids = torch.tensor([engine.tokenizer(text, add_special_tokens=False)["input_ids"]], device=engine.device)
        autocast = torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=self.teacher.bf16)
        cache = {cache_kwarg(engine.model): DynamicCache(config=engine.model.config), "use_cache": True} if kind == "single" else {}
        with torch.inference_mode(), autocast:
            step = engine.model(input_ids=ids, logits_to_keep=1, **cache)
            p = torch.softmax(step.logits[0, -1].float(), dim=-1)
            if kind == "pairwise":
                return {c: float(p[t]) for c, t in self.letters.items()}
            probs = {str(d): float(p[t]) for d, t in self.digits.items() if t is not None}
            if self.zero is not None:  # "10" as "1" then "0": one more step on the cache
                one = torch.tensor([[self.digits[1]]], device=engine.device)
                nxt = torch.softmax(engine.model(input_ids=one, logits_to_keep=1, **cache).logits[0, -1].float(), dim=-1)
                ten = probs["1"] * float(nxt[self.zero])
                probs["1"] -= ten
                probs["10"] = probs.get("10", 0.0) + ten
        return probs

    @staticmethod
    def _verdict(kind: str, probs: dict[str, float]) -> tuple[Verdict, str]:
        mass = sum(probs.values())
        shown = ", ".join(f"P({k})={v:.3f}" for k, v in probs.items())
        if mass < MIN_MASS:
            return Verdict(None, f"only {mass:.2f} of the judge's probability went to a verdict (below {MIN_MASS})"), shown
        if kind == "pairwise":
            value: float = (probs["A"] + 0.5 * probs["C"]) / mass
            return Verdict(value), f"preference for A {value:.3f} from {shown}"
        value = sum(int(k) * v for k, v in probs.items()) / mass
        return Verdict(value), f"expected rating {value:.2f} from {shown}"
