"""The one place where records become ``(input_ids, labels)``.

Masks come from the chat template itself. With ``{% generation %}`` tags the template marks the
assistant's text; without them (most published templates) we render growing prefixes of the
conversation and diff them: for assistant turn *i*, the trained text is what rendering
``messages[:i+1]`` adds to rendering ``messages[:i]`` with the generation prompt. That is the
assistant's content and the end-of-turn token(s) the template writes after it, and excludes the
assistant header, which the generation prompt already holds. Whitespace a template writes after an
end-of-turn special token (ChatML's ``"\\n"`` after ``<|im_end|>``) is not trained: at inference the
model stops at the special token.

This only works when the template is *prefix-stable*: rendering a shorter conversation gives a prefix of
the longer one. Templates that rewrite earlier turns (moving the system prompt to the last user turn,
dropping earlier reasoning) are not; we check, and raise :class:`TemplateError` naming the turn.

Labels are aligned with ``input_ids`` (the token itself where trained, -100 where not); the shift
happens in the loss. Rendering is our own code (it is the product's core); the template engine and the
tokenizers are transformers'.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np

from posttrain.records import Record, kind_of

IGNORE = -100
TrainOn = Literal["all_assistant", "last_assistant", "all"]
Overlong = Literal["truncate", "drop"]
NAMED_TEMPLATES = ("chatml", "alpaca")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def generation_prompt(record: Record | list[dict] | str) -> tuple[list[dict] | str, list | None]:
    """What a prompt asks a model to continue: ``(messages, tools)`` for a chat, ``(text, None)`` for raw text.

    A string is one user message; a list is the messages; a canonical record gives its prompt (with its
    tools), which is raw text, given to the model as it is, only for prompt/completion and preference
    records with a text prompt (SFT and DPO train those without the template). The one reading of a
    prompt that :meth:`ChatRenderer.render_prompt` and the OpenAI client backend share.
    """
    if isinstance(record, str):
        return [{"role": "user", "content": record}], None
    if isinstance(record, list):
        return record, None
    prompt = record["prompt"]
    if kind_of(record) in ("prompt_completion", "preference") and isinstance(prompt, str):
        return prompt, None
    return ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt), record.get("tools")


class TemplateError(ValueError):
    """The chat template cannot give a trustworthy mask for a conversation."""


def load_template(template: str | None, tokenizer: Any) -> str:
    """The template text: the tokenizer's own (None), a built-in name, or a path to a .jinja file."""
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates; "default" is what apply_chat_template uses
            own = own.get("default")
        if not own:
            raise TemplateError(
                f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat template; "
                f"choose one with --template ({', '.join(NAMED_TEMPLATES)}, or a path to a .jinja file)"
            )
        return own
    if template in NAMED_TEMPLATES:
        return resources.files("posttrain.data.templates").joinpath(f"{template}.jinja").read_text(encoding="utf-8")
    path = Path(template)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise TemplateError(f"unknown template {template!r}: use one of {', '.join(NAMED_TEMPLATES)} or a path to a .jinja file")


@dataclass(frozen=True)
class RenderOptions:
    """What to train and how long examples may be.

    ``train_on``: ``all_assistant`` (every assistant turn, the default), ``last_assistant`` (only the final
    assistant message) or ``all`` (every token). ``overlong``: examples longer than ``max_length`` tokens
    are cut to length (``truncate``; dropped if nothing trained is left) or dropped (``drop``).
    """

    train_on: TrainOn = "all_assistant"
    max_length: int | None = None
    overlong: Overlong = "truncate"
    template: str | None = None

    def __post_init__(self) -> None:
        if self.train_on not in ("all_assistant", "last_assistant", "all"):
            raise ValueError(f"train_on must be all_assistant, last_assistant or all, not {self.train_on!r}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be truncate or drop, not {self.overlong!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, not {self.max_length}")


@dataclass
class RenderStats:
    """Counts for the user: nothing is dropped or cut without showing up here."""

    examples: int = 0
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_nothing_trained: int = 0
    dropped_with_partner: int = 0  # a pair's other half was dropped, so this one goes too
    turn_end_tokens: Counter = field(default_factory=Counter)

    def merge(self, other: RenderStats) -> None:
        for name in ("examples", "kept", "tokens", "trained_tokens", "truncated", "dropped_overlong", "dropped_nothing_trained", "dropped_with_partner"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.turn_end_tokens.update(other.turn_end_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "kept": self.kept,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "truncated": self.truncated,
            "dropped_overlong": self.dropped_overlong,
            "dropped_nothing_trained": self.dropped_nothing_trained,
            "dropped_with_partner": self.dropped_with_partner,
            "turn_end_tokens": dict(self.turn_end_tokens),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RenderStats:
        d = dict(d)
        d["turn_end_tokens"] = Counter(d.get("turn_end_tokens", {}))
        return cls(**d)


@dataclass
class Rendered:
    """A record as text with the character spans to train (before tokenization)."""

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool = False  # True for plain text (no template): the tokenizer adds BOS itself
    append_eos: bool = False


class ChatRenderer:
    """Turns canonical records into token ids and labels with a tokenizer and its chat template."""

    def __init__(self, tokenizer: Any, options: RenderOptions | None = None):
        from transformers.utils.chat_template_utils import render_jinja_template

        self.tokenizer = tokenizer
        self.options = options or RenderOptions()
        self.template = load_template(self.options.template, tokenizer)
        self.has_generation_tags = bool(_GENERATION_TAG.search(self.template))
        self._render_jinja = render_jinja_template
        self._template_vars = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.special_tokens = sorted(
            {t for t in tokenizer.all_special_tokens} | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
            key=len,
            reverse=True,
        )

    # -- text level -----------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], tools: list | None = None, *, add_generation_prompt: bool = False) -> str:
        texts, _ = self._render_jinja(
            conversations=[messages],
            tools=tools,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            **self._template_vars,
        )
        return texts[0]

    def to_text(self, record: Record) -> Rendered:
        """A canonical record as text plus the character spans to train."""
        kind = kind_of(record)
        if kind == "conversation":
            return self.conversation_record(record["messages"], record.get("tools"), 0)
        if kind == "prompt_completion":
            return self._pair(record["prompt"], record["completion"], record.get("tools"))
        if kind == "preference":
            raise ValueError("a preference record renders as two examples: use render_preference")
        raise ValueError("an IFEval prompt has no response to train on; render it with render_prompt")

    def _pair(self, prompt: str | list, completion: str | list, tools: list | None) -> Rendered:
        if isinstance(prompt, str):
            text = prompt + completion
            spans = [(0, len(text))] if self.options.train_on == "all" else [(len(prompt), len(text))]
            return Rendered(text, spans, add_special_tokens=True, append_eos=True)
        return self.conversation_record(prompt + completion, tools, len(prompt))

    def conversation_record(self, messages: list[dict], tools: list | None, trainable_from: int) -> Rendered:
        if self.options.train_on == "all":
            full = self.render_chat(messages, tools)
            return Rendered(full, [(0, len(full))])
        # With {% generation %} tags, one render gives both the text and the tagged spans.
        full, tagged = self._render_tagged(messages, tools) if self.has_generation_tags else (self.render_chat(messages, tools), None)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= trainable_from]
        if self.options.train_on == "last_assistant":
            turns = turns[-1:]
        spans = self._tagged_spans(messages, full, turns, tagged) if tagged is not None else None
        if spans is None:
            spans = [self._turn_span(messages, tools, full, i) for i in turns]
        for i, (start, end) in zip(turns, spans):
            content = (messages[i].get("content") or "").strip()
            if content and content not in full[start:end]:
                raise TemplateError(
                    f"turn {i} (assistant): its content is not inside the text the template gives that turn; "
                    "the template rewrites assistant messages, so a mask cannot be trusted"
                )
        return Rendered(full, spans)

    def _turn_span(self, messages: list[dict], tools: list | None, full: str, i: int) -> tuple[int, int]:
        head = self.render_chat(messages[:i], tools, add_generation_prompt=True)
        upto = self.render_chat(messages[: i + 1], tools)
        for name, prefix in (("the conversation before it, with the generation prompt", head), ("the conversation up to it", upto)):
            if not full.startswith(prefix):
                at = next((k for k, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
                raise TemplateError(
                    f"the chat template is not prefix-stable at turn {i} (assistant): rendering {name} "
                    f"is not a prefix of the whole conversation (they differ at character {at}: "
                    f"{prefix[at:at + 30]!r} vs {full[at:at + 30]!r}). Masks cannot be computed from this template; "
                    "use one that renders earlier turns the same whatever follows, or add {% generation %} tags"
                )
        if not upto.startswith(head):
            raise TemplateError(f"turn {i} (assistant): the generation prompt is not how the template starts an assistant turn")
        return len(head), self._trim_after_end_token(upto, len(head), len(upto))

    def _render_tagged(self, messages: list[dict], tools: list | None) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans its ``{% generation %}`` tags enclose."""
        texts, indices = self._render_jinja(
            conversations=[messages], tools=tools, chat_template=self.template, return_assistant_tokens_mask=True, **self._template_vars
        )
        return texts[0], indices[0]

    def _tagged_spans(self, messages: list[dict], full: str, turns: list[int], tagged: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(tagged) != len(assistants):
            return None  # tags do not line up one per assistant message: fall back to prefix diffs
        by_turn = dict(zip(assistants, tagged))
        return [self._extend_to_end_token(full, *by_turn[i]) for i in turns]

    def _extend_to_end_token(self, text: str, start: int, end: int) -> tuple[int, int]:
        # Templates often close {% generation %} before the end-of-turn token; the model must learn to stop.
        if not any(text[start:end].endswith(t) for t in self.special_tokens):
            for token in self.special_tokens:
                if text.startswith(token, end):
                    return start, end + len(token)
        return start, end

    def _trim_after_end_token(self, text: str, start: int, end: int) -> int:
        stripped = text[start:end].rstrip()
        if len(stripped) < end - start and any(stripped.endswith(t) for t in self.special_tokens):
            return start + len(stripped)
        return end

    def render_prompt(self, record: Record | list[dict] | str, tools: list | None = None) -> str:
        """Text to generate from: the prompt with the template's generation prompt (a raw-text prompt as it is)."""
        prompt, record_tools = generation_prompt(record)
        if isinstance(prompt, str):
            return prompt
        return self.render_chat(prompt, record_tools if isinstance(record, dict) else tools, add_generation_prompt=True)

    # -- token level ----------------------------------------------------------------------------

    def tokenize(self, rendered: list[Rendered], stats: RenderStats | None = None) -> list[dict[str, list[int]] | None]:
        """Tokenize in one batch and turn spans into labels; None for dropped examples (counted in stats)."""
        stats = stats if stats is not None else RenderStats()
        out: list[dict[str, list[int]] | None] = [None] * len(rendered)
        for special in (False, True):
            idx = [k for k, r in enumerate(rendered) if r.add_special_tokens == special]
            if not idx:
                continue
            enc = self.tokenizer(
                [rendered[k].text for k in idx], add_special_tokens=special, return_offsets_mapping=True, return_attention_mask=False
            )
            for k, ids, offsets in zip(idx, enc["input_ids"], enc["offset_mapping"]):
                out[k] = self._labels(rendered[k], ids, offsets, stats)
        return out

    def _labels(self, r: Rendered, ids: list[int], offsets: list[tuple[int, int]], stats: RenderStats) -> dict[str, list[int]] | None:
        stats.examples += 1
        eos = self.tokenizer.eos_token_id
        add_eos = r.append_eos and eos is not None and (not ids or ids[-1] != eos)
        # The example is ids (+ EOS), cut to max_length: decide the length first, so that nothing past the cut
        # (often most of a long conversation) is converted or masked.
        keep = len(ids) + add_eos
        limit = self.options.max_length
        truncated = limit is not None and keep > limit
        if truncated:
            if self.options.overlong == "drop":
                stats.dropped_overlong += 1
                return None
            keep = limit  # <= len(ids): a cut example never ends in the appended EOS
        n = min(keep, len(ids))
        ids_arr = np.asarray(ids[:n], dtype=np.int64)
        offs = np.fromiter(chain.from_iterable(offsets[:n]), dtype=np.int64, count=2 * n).reshape(-1, 2)
        trained = np.zeros(n, dtype=bool)
        for start, end in r.spans:
            # A token is trained if it overlaps the span; special tokens added by the tokenizer have (0, 0).
            trained |= (offs[:, 1] > start) & (offs[:, 0] < end) & (offs[:, 1] > offs[:, 0])
        if keep > n:
            ids_arr = np.append(ids_arr, eos)
            trained = np.append(trained, True)
        if truncated:
            stats.truncated += 1
        if not trained.any():
            stats.dropped_nothing_trained += 1
            return None
        labels = np.where(trained, ids_arr, IGNORE)
        # The last token of each trained run, after any truncation: what the model learns to end turns with.
        run_ends = np.flatnonzero(trained & ~np.append(trained[1:], False))
        stats.turn_end_tokens.update(self.tokenizer.convert_ids_to_tokens(ids_arr[run_ends].tolist()))
        stats.kept += 1
        stats.tokens += len(ids_arr)
        stats.trained_tokens += int(trained.sum())
        return {"input_ids": ids_arr.tolist(), "labels": labels.tolist()}

    def render(self, record: Record, stats: RenderStats | None = None) -> dict[str, list[int]] | None:
        """One canonical record -> ``{"input_ids", "labels"}``, or None if dropped (counted in stats)."""
        return self.tokenize([self.to_text(record)], stats)[0]

    def render_many(self, records: list[Record], stats: RenderStats | None = None) -> list[dict[str, list[int]] | None]:
        return self.tokenize([self.to_text(r) for r in records], stats)

    def to_texts(self, record: Record) -> list[Rendered]:
        """Every example a record makes: one, or (chosen, rejected) for a preference record."""
        if kind_of(record) == "preference":
            tools = record.get("tools")
            return [self._pair(record["prompt"], record["chosen"], tools), self._pair(record["prompt"], record["rejected"], tools)]
        return [self.to_text(record)]

    def render_preference(self, record: Record, stats: RenderStats | None = None) -> tuple[dict | None, dict | None]:
        """A preference record -> (chosen example, rejected example), each with only its response trained."""
        a, b = self.tokenize(self.to_texts(record), stats)
        return a, b
