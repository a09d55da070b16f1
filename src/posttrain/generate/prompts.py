"""Prompts to token ids for generation: the chat template (the same renderer as training), end and stop tokens, seeds.

Every backend encodes prompts here, so a prompt is the same tokens whichever backend generates it and
whatever trained the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any


class PromptEncoder:
    """Prompts to token ids, and the token ids that end a turn, for one tokenizer.

    Chats go through :meth:`ChatRenderer.render_prompt` (the generation prompt appended) and are tokenized
    without added special tokens, since the template writes its own (as in training). Raw text
    (``apply_chat_template=False``) is tokenized with the tokenizer's special tokens (a BOS, if it has one),
    as the plain-text training path does.
    """

    def __init__(self, tokenizer: Any, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self._renderer: Any = None

    @property
    def renderer(self) -> Any:
        if self._renderer is None:
            from posttrain.data.chat import ChatRenderer, RenderOptions

            self._renderer = ChatRenderer(self.tokenizer, RenderOptions(template=self.template))
        return self._renderer

    def render(self, prompt: Any) -> str:
        return self.renderer.render_prompt(prompt)

    def encode(self, prompts: Sequence[Any], *, apply_chat_template: bool = True) -> list[list[int]]:
        if apply_chat_template:
            texts = [self.render(p) for p in prompts]
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"apply_chat_template=False takes plain strings; prompt(s) {bad[:5]} are {type(prompts[bad[0]]).__name__}")
        return self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]

    def encode_marked(
        self, prompts: Sequence[Any], instructions: Sequence[str | None], *, apply_chat_template: bool = True
    ) -> tuple[list[list[int]], list[tuple[int, int] | None]]:
        """Token ids as :meth:`encode` gives them, and each prompt's instruction as a token span ``[start, end)``.

        ``instructions[i]``: the instruction's text as it appears in prompt ``i`` (its last occurrence in the
        rendered prompt is taken), or None for a prompt without one. A token that overlaps the instruction's
        characters is part of it. InstABoost boosts attention to these tokens."""
        if len(instructions) != len(prompts):
            raise ValueError(f"{len(instructions)} instructions for {len(prompts)} prompts")
        if apply_chat_template:
            texts = [self.render(p) for p in prompts]
        else:
            self.encode(prompts, apply_chat_template=False)  # the same type checks
            texts = list(prompts)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"marking instruction tokens needs a fast tokenizer (offsets); {type(self.tokenizer).__name__} is not")
        encoded = self.tokenizer(texts, add_special_tokens=not apply_chat_template, return_offsets_mapping=True)
        spans: list[tuple[int, int] | None] = []
        for i, (text, instruction, offsets) in enumerate(zip(texts, instructions, encoded["offset_mapping"])):
            if not instruction:
                spans.append(None)
                continue
            start = text.rfind(instruction)
            if start < 0:
                raise ValueError(f"prompt {i}: its instruction {instruction[:60]!r} is not in the prompt {text[-200:]!r}")
            end = start + len(instruction)
            tokens = [k for k, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            spans.append((tokens[0], tokens[-1] + 1))
        return encoded["input_ids"], spans

    def preamble(self) -> list[int]:
        """The tokens every chat this template renders starts with (its default system prompt, if any), or []."""
        try:
            a, b = (self.encode([[{"role": "user", "content": text}]])[0] for text in ("Hello.", "Why is the sky blue?"))
        except Exception:  # noqa: BLE001 — a template that cannot render a one-message chat has no preamble to share
            return []
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[:n]

    def end_token_ids(self, model_eos: Any = None) -> set[int]:
        """Ids that end a completion: the tokenizer's EOS, ``model_eos`` (an id or ids), the template's end of turn."""
        ids = set()
        for value in (self.tokenizer.eos_token_id, model_eos):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        turn_end = self.turn_end_token()
        if turn_end is not None:
            ids.add(self.tokenizer.convert_tokens_to_ids(turn_end))
        return ids

    def turn_end_token(self) -> str | None:
        """The special token the chat template closes an assistant turn with, or None (no template, or none)."""
        from posttrain.data.chat import TemplateError

        try:
            rendered = self.renderer.to_text(
                {"messages": [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi there."}]}
            )
        except (TemplateError, ValueError, TypeError):
            return None
        start, end = rendered.spans[-1]
        trained = rendered.text[start:end]
        return next((t for t in self.renderer.special_tokens if trained.endswith(t)), None)

    def special_stop_ids(self, stop: Sequence[str]) -> tuple[list[str], set[int]]:
        """Split stop strings into (text stops, token ids): a special token is matched as its id."""
        specials = set(self.tokenizer.all_special_tokens) | {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        texts = [s for s in stop if s not in specials]
        ids = {self.tokenizer.convert_tokens_to_ids(s) for s in stop if s in specials}
        return texts, ids


def sample_seed(seed: int, prompt_ids: Sequence[int], copy: int, sample: int) -> int:
    """The seed of one sequence's random stream: fixed by the prompt's tokens, not its place in a batch."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{seed}:{copy}:{sample}:".encode())
    h.update(",".join(map(str, prompt_ids)).encode())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)
