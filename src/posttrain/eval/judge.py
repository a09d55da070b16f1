"""An LLM judge: any generation backend, asked with a judge prompt, every request cached, every verdict parsed or counted.

The backend is a :class:`~posttrain.synth.teacher.Teacher`: an in-process model or an OpenAI-compatible
endpoint, each finished request appended to a cache so a killed evaluation resumes where it stopped.
Judge prompts are FastChat's format (``llm_judge/data/judge_prompts.jsonl``: name, type ``single`` or
``pairwise``, system_prompt, prompt_template with ``{question}``/``{answer}``/``{answer_a}``... fields,
output_format); pass that file to use MT-Bench's own prompts. Without one, :data:`DEFAULT_PROMPTS` are
ours, written for this package, in the same format: a 1-10 rating in ``[[x]]`` and a pairwise
``[[A]]``/``[[B]]``/``[[C]]`` choice. Verdicts are read by :mod:`posttrain.eval.judging`, which never
guesses: an unparsable judgement has ``value None`` and its reason, and callers count it.

Judges answer greedily (temperature 0, as FastChat and AlpacaEval ask theirs), so a judgement is a
function of its prompt and the cache is exact. Our own code: the glue between a backend and a prompt
file is the product's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.eval.judging import Verdict, parse_choice, parse_rating
from posttrain.synth.teacher import Teacher

PROMPT_FIELDS = ("name", "type", "system_prompt", "prompt_template", "output_format")


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str  # "single" (a 1-10 rating) or "pairwise" (A, B or a tie)
    system_prompt: str
    prompt_template: str
    output_format: str = ""
    category: str = "general"

    def render(self, fields: Mapping[str, str]) -> list[dict[str, str]]:
        """The chat sent to the judge: the system prompt (when not empty) and the filled template."""
        try:
            text = self.prompt_template.format(**fields)
        except KeyError as e:
            raise ValueError(f"judge prompt {self.name!r} needs the field {e.args[0]!r}; given {sorted(fields)}") from None
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        return messages + [{"role": "user", "content": text}]


DEFAULT_PROMPTS: dict[str, JudgePrompt] = {
    "single": JudgePrompt(
        "single",
        "single",
        "You are a careful, impartial grader of AI assistants.",
        "Grade how well the assistant's answer serves the user: whether it does what was asked, follows every "
        "instruction in the question, and is correct, clear and complete. Length is not a merit in itself. "
        "Explain your grade in two or three sentences, then give it on a line of its own as a number from 1 to "
        "10 in double brackets, like this: Rating: [[6]]\n\n"
        "[Question]\n{question}\n\n[Answer]\n{answer}\n[End of answer]",
        "[[rating]]",
    ),
    "single-ref": JudgePrompt(
        "single-ref",
        "single",
        "You are a careful, impartial grader of AI assistants.",
        "Grade the assistant's answer for correctness above all, using the reference answer as the key: an answer whose "
        "result disagrees with the reference is wrong however well it reads. Explain your grade in two or three sentences, "
        "then give it on a line of its own as a number from 1 to 10 in double brackets, like this: Rating: [[6]]\n\n"
        "[Question]\n{question}\n\n[Reference answer]\n{ref_answer_1}\n[End of reference answer]\n\n"
        "[Answer]\n{answer}\n[End of answer]",
        "[[rating]]",
        "math",
    ),
    "single-multi-turn": JudgePrompt(
        "single-multi-turn",
        "single",
        "You are a careful, impartial grader of AI assistants.",
        "Below is a two-turn conversation. Grade only the assistant's second answer: whether it does what the second "
        "question asks, in the context of the first turn, and is correct, clear and complete. Length is not a merit in "
        "itself. Explain your grade in two or three sentences, then give it on a line of its own as a number from 1 to 10 "
        "in double brackets, like this: Rating: [[6]]\n\n"
        "[User, turn 1]\n{question_1}\n\n[Assistant, turn 1]\n{answer_1}\n\n[User, turn 2]\n{question_2}\n\n"
        "[Assistant, turn 2]\n{answer_2}\n[End of conversation]",
        "[[rating]]",
    ),
    "single-ref-multi-turn": JudgePrompt(
        "single-ref-multi-turn",
        "single",
        "You are a careful, impartial grader of AI assistants.",
        "Below is a two-turn conversation and a reference answer for each turn. Grade only the assistant's second answer, "
        "for correctness above all, using the second reference answer as the key. Explain your grade in two or three "
        "sentences, then give it on a line of its own as a number from 1 to 10 in double brackets, like this: Rating: [[6]]\n\n"
        "[User, turn 1]\n{question_1}\n\n[Reference answer, turn 1]\n{ref_answer_1}\n\n[Assistant, turn 1]\n{answer_1}\n\n"
        "[User, turn 2]\n{question_2}\n\n[Reference answer, turn 2]\n{ref_answer_2}\n\n[Assistant, turn 2]\n{answer_2}\n"
        "[End of conversation]",
        "[[rating]]",
        "math",
    ),
    "pairwise": JudgePrompt(
        "pairwise",
        "pairwise",
        "You are a careful, impartial grader of AI assistants.",
        "Two assistants answered the same question. Decide which answer serves the user better: which does what "
        "was asked, follows every instruction in the question, and is correct, clear and complete. Neither the "
        "order of the answers nor their length is a merit. Explain your choice in two or three sentences, then "
        'give it on a line of its own: "[[A]]" if answer A is better, "[[B]]" if answer B is better, "[[C]]" '
        "for a tie.\n\n[Question]\n{question}\n\n[Answer A]\n{answer_a}\n[End of answer A]\n\n"
        "[Answer B]\n{answer_b}\n[End of answer B]",
        "[[A]]",
    ),
}


def json_objects(path: Path, problems: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each JSON object line of ``path``; a line that is not one is added to ``problems``."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{number}: not JSON ({e.msg})")
            continue
        if isinstance(row, dict):
            rows.append((number, row))
        else:
            problems.append(f"{path}:{number}: not a JSON object")
    return rows


def read_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """FastChat-format judge prompts by name; every bad line is named (file:line and field) in one error."""
    path = Path(path)
    prompts: dict[str, JudgePrompt] = {}
    problems: list[str] = []
    for number, row in json_objects(path, problems):
        missing = [f for f in PROMPT_FIELDS if not isinstance(row.get(f), str)]
        if missing:
            problems.append(f"{path}:{number}: missing or non-text field(s) {', '.join(missing)}")
            continue
        if row["type"] not in ("single", "pairwise"):
            problems.append(f"{path}:{number}: field type is {row['type']!r}, not 'single' or 'pairwise'")
            continue
        prompts[row["name"]] = JudgePrompt(
            row["name"], row["type"], row["system_prompt"], row["prompt_template"], row["output_format"], row.get("category") or "general"
        )
    if problems:
        raise ValueError(f"{len(problems)} bad judge prompt line(s):\n" + "\n".join(problems[:20]))
    if not prompts:
        raise ValueError(f"{path}: no judge prompts")
    return prompts


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    text: str  # the judge's whole reply
    prompt: str  # the judge prompt's name

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.verdict.value, "reason": self.verdict.reason, "prompt": self.prompt, "text": self.text}


MODES = ("text", "probs")


@dataclass
class Judge:
    """Judgements from ``teacher`` with ``prompts`` (name -> :class:`JudgePrompt`), ``max_new_tokens`` per reply.

    ``mode``: ``text``, the judge writes its judgement and the verdict is parsed from it (FastChat's way);
    ``probs``, the verdict is read from the judge's next-token probabilities after the verdict's opening
    (:mod:`posttrain.eval.verdict_probs`; in-process judges; what a small judge can give)."""

    teacher: Teacher
    prompts: Mapping[str, JudgePrompt]
    max_new_tokens: int = 512
    mode: str = "text"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"judge mode is one of {MODES}, not {self.mode!r}")
        self._probs: Any = None

    @property
    def name(self) -> str:
        return self.teacher.name

    def prompt(self, *names: str) -> JudgePrompt:
        """The first of ``names`` that the prompt set has."""
        for name in names:
            if name in self.prompts:
                return self.prompts[name]
        raise ValueError(f"the judge prompts have none of {list(names)}; they have {sorted(self.prompts)}")

    def __call__(self, requests: Sequence[tuple[JudgePrompt, Mapping[str, str]]], *, what: str) -> list[Judgement]:
        """One judgement per (prompt, fields): a ``single`` prompt's verdict is a rating; a ``pairwise`` one's "A", "B" or "tie"
        (text mode) or the probability that A is the better (probs mode)."""
        chats = [prompt.render(fields) for prompt, fields in requests]
        if self.mode == "probs":
            return self._by_probs(requests, chats)
        replies = self.teacher.ask(chats, what=what, temperature=0.0, max_new_tokens=self.max_new_tokens)
        out = []
        for (prompt, _), reply in zip(requests, replies):
            text = reply[0].text
            verdict = parse_rating(text) if prompt.type == "single" else parse_choice(text)
            if not verdict.ok and reply[0].truncated:
                verdict = Verdict(None, verdict.reason + f" (the reply was cut at {self.max_new_tokens} tokens)")
            out.append(Judgement(verdict, text, prompt.name))
        return out

    def _by_probs(self, requests: Sequence[tuple[JudgePrompt, Mapping[str, str]]], chats: list[list[dict[str, str]]]) -> list[Judgement]:
        from posttrain.eval.verdict_probs import VerdictProbs

        if self._probs is None:
            self._probs = VerdictProbs(self.teacher)
        out: list[Judgement | None] = [None] * len(requests)
        for kind in ("single", "pairwise"):
            todo = [i for i, (prompt, _) in enumerate(requests) if prompt.type == kind]
            for i, (verdict, text) in zip(todo, self._probs(kind, [chats[i] for i in todo])):
                out[i] = Judgement(verdict, text, requests[i][0].name)
        return out  # type: ignore[return-value]

    def rate(self, questions: Sequence[str], answers: Sequence[str], *, what: str = "judge ratings") -> list[Judgement]:
        """Single-answer ratings (1-10) with the general single prompt (FastChat's ``single-v1``, else ours)."""
        prompt = self.prompt("single-v1", "single")
        return self([(prompt, {"question": q, "answer": a}) for q, a in zip(questions, answers)], what=what)

    def compare(self, questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str], *, what: str = "judge choices") -> list[Judgement]:
        """Pairwise choices with the general pairwise prompt (FastChat's ``pair-v2``, else ours), in the order given."""
        prompt = self.prompt("pair-v2", "pairwise")
        return self([(prompt, {"question": q, "answer_a": a, "answer_b": b}) for q, a, b in zip(questions, answers_a, answers_b)], what=what)


def open_backend(
    name: str,
    cache_dir: str | Path,
    *,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    batch_size: int = 32,
    bf16: bool = False,
    template: str | None = None,
    engines: dict[str, Any] | None = None,
    console: Any = None,
) -> Teacher:
    """A cached backend for ``name``: the endpoint's model with ``base_url``, else the model loaded in this process.

    ``engines``: loaded engines by name, shared between calls, so a model that is both answerer and judge
    loads once."""
    engines = engines if engines is not None else {}
    key = f"{base_url or ''}|{name}"
    if key not in engines:
        if base_url:
            from posttrain.generate.client import OpenAIEngine

            engines[key] = OpenAIEngine(base_url, name, api_key_env=api_key_env, concurrency=concurrency, cache_dir=Path(cache_dir) / "endpoint", console=console)
        else:
            from posttrain.generate.load import load_engine

            engines[key] = load_engine(name, dtype="float32", batch_size=batch_size, template=template)
    return Teacher(engines[key], name, Path(cache_dir), bf16=bf16, chunk=batch_size, console=console)


def question_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """What a judge is shown as the question: the text, a lone user message, or the conversation as a transcript."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m.get("role") != "system"]
    if len(turns) == 1:
        return str(turns[0].get("content") or "")
    return "\n\n".join(f"[{m.get('role', 'user')}]\n{m.get('content') or ''}" for m in turns)


def judge_scorer(judge: Judge) -> Any:
    """A ``posttrain label`` scorer: the judge's 1-10 rating of each (prompt, response), NaN where unreadable (RLAIF)."""

    def score(prompts: list[Any], responses: list[str]) -> list[float]:
        judgements = judge.rate([question_text(p) for p in prompts], responses, what="judge labels")
        return [float(j.verdict.value) if j.ok else math.nan for j in judgements]

    return score
