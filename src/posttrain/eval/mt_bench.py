"""MT-Bench: two-turn questions, each turn graded 1-10 by a judge (FastChat ``llm_judge``'s single-answer grading).

Zheng et al. (2023, arXiv 2306.05685): 80 questions in 8 categories, two user turns each. The model
answers turn 1, then turn 2 with the whole conversation before it. Each turn is judged on its own:
turn 1 with ``single-v1`` (question, answer), turn 2 with ``single-v1-multi-turn`` (both questions and
both answers, the judge told to grade the second). For math, reasoning and coding questions that carry
a reference answer, the reference-guided prompts (``single-math-v1``, ``single-math-v1-multi-turn``) are
used instead, as FastChat does. Answers are sampled at FastChat's per-category temperatures (writing and
roleplay 0.7, STEM and humanities 0.1, extraction, math, coding and reasoning 0: greedy).

The score is the mean rating over every judged turn; per turn and per category beside it, each with a
95% bootstrap interval. A judgement whose rating cannot be read (:mod:`posttrain.eval.judging`) is not
scored: it is counted, per model, and shown. Questions are FastChat's ``question.jsonl`` format
(``question_id``, ``category``, ``turns``, optional ``reference``); judge prompts its
``judge_prompts.jsonl`` (:func:`posttrain.eval.judge.read_judge_prompts`), or ours without one.
Our own harness, which runs any model and any judge this package can load or reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.eval.judge import Judge, JudgePrompt, json_objects
from posttrain.eval.results import Metric, Results, mean_metric

#: FastChat's answer temperatures by category (``common.temperature_config``); others get 0.7.
TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
#: Categories graded against their reference answers (FastChat's ``NEED_REF_CATS``).
NEED_REF = ("math", "reasoning", "coding")


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] = ()

    @property
    def temperature(self) -> float:
        return TEMPERATURES.get(self.category, DEFAULT_TEMPERATURE)

    @property
    def reference_guided(self) -> bool:
        return self.category in NEED_REF and bool(self.reference)


def read_questions(path: str | Path, *, limit: int | None = None) -> list[Question]:
    """Questions from FastChat's format; every bad line named (file:line and field) in one error."""
    path = Path(path)
    questions: list[Question] = []
    problems: list[str] = []
    for number, row in json_objects(path, problems):
        turns, reference = row.get("turns"), row.get("reference", [])
        if not isinstance(turns, list) or not 1 <= len(turns) <= 2 or not all(isinstance(t, str) and t.strip() for t in turns):
            problems.append(f"{path}:{number}: field turns must be a list of one or two non-empty texts")
            continue
        if not isinstance(reference, list) or not all(isinstance(t, str) for t in reference):
            problems.append(f"{path}:{number}: field reference must be a list of texts")
            continue
        if "question_id" not in row:
            problems.append(f"{path}:{number}: missing field question_id")
            continue
        questions.append(Question(str(row["question_id"]), str(row.get("category") or "general"), tuple(turns), tuple(reference)))
    if problems:
        raise ValueError(f"{len(problems)} bad question line(s):\n" + "\n".join(problems[:20]))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions[:limit]


def answer(teacher: Any, questions: Sequence[Question], *, max_new_tokens: int = 1024, seed: int = 0) -> list[list[str]]:
    """Each question's answers, turn by turn: turn 2 is asked with the conversation so far; cached per request."""
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        todo = [i for i, q in enumerate(questions) if turn < len(q.turns)]
        for temperature in sorted({questions[i].temperature for i in todo}):
            batch = [i for i in todo if questions[i].temperature == temperature]
            chats = []
            for i in batch:
                chat: list[dict[str, str]] = []
                for t in range(turn):
                    chat += [{"role": "user", "content": questions[i].turns[t]}, {"role": "assistant", "content": answers[i][t]}]
                chats.append(chat + [{"role": "user", "content": questions[i].turns[turn]}])
            replies = teacher.ask(chats, what=f"answers, turn {turn + 1}, T={temperature:g}", temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
            for i, reply in zip(batch, replies):
                answers[i].append(reply[0].text)
    return answers


def _request(judge: Judge, q: Question, answers: Sequence[str], turn: int) -> tuple[JudgePrompt, dict[str, str]]:
    ref = q.reference_guided
    if turn == 0:
        prompt = judge.prompt("single-math-v1", "single-ref") if ref else judge.prompt("single-v1", "single")
        fields = {"question": q.turns[0], "answer": answers[0]}
    else:
        prompt = judge.prompt("single-math-v1-multi-turn", "single-ref-multi-turn") if ref else judge.prompt("single-v1-multi-turn", "single-multi-turn")
        fields = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_1": answers[0], "answer_2": answers[1]}
    if ref:
        fields |= {f"ref_answer_{k + 1}": text for k, text in enumerate(q.reference)}
        fields.setdefault("ref_answer_2", "")
    return prompt, fields


def grade(judge: Judge, questions: Sequence[Question], answers: Sequence[Sequence[str]], *, model: str) -> list[dict[str, Any]]:
    """One judged item per (question, turn): its rating (None when unparsable), the judge's text and prompt."""
    slots = [(q, a, t) for q, a in zip(questions, answers) for t in range(len(q.turns))]
    judgements = judge([_request(judge, q, a, t) for q, a, t in slots], what=f"judge {model}")
    return [
        {
            "model": model, "question_id": q.id, "category": q.category, "turn": t + 1, "question": q.turns[t], "answer": a[t],
            "reference_guided": q.reference_guided, "rating": j.verdict.value, "reason": j.verdict.reason, "judge_prompt": j.prompt,
            "judgement": j.text,
        }
        for (q, a, t), j in zip(slots, judgements)
    ]


def results(items_by_model: dict[str, list[dict[str, Any]]], *, judge: str, settings: dict[str, Any] | None = None) -> Results:
    """MT-Bench figures per model: the score over every judged turn, per turn, per category, and unparsable counts."""
    out = Results("mt-bench", settings={**(settings or {}), "judge": judge}, plot_metric="score")
    for model, items in items_by_model.items():
        rated = [i for i in items if i["rating"] is not None]
        out.models[model] = {
            "score": mean_metric([i["rating"] for i in rated]),
            **{f"turn {t}": mean_metric([i["rating"] for i in rated if i["turn"] == t]) for t in (1, 2) if any(i["turn"] == t for i in items)},
            "unparsable judgements": Metric(float(len(items) - len(rated)), n=len(items), count=True),
        }
        categories = list(dict.fromkeys(i["category"] for i in items))
        out.groups[model] = {
            c: {
                "score": mean_metric([i["rating"] for i in rated if i["category"] == c]),
                "unparsable": Metric(float(sum(i["rating"] is None for i in items if i["category"] == c)), n=sum(i["category"] == c for i in items), count=True),
            }
            for c in categories
        }
        out.items += items
        failed = len(items) - len(rated)
        if failed:
            reasons: dict[str, int] = {}
            for i in items:
                if i["rating"] is None:
                    reasons[i["reason"]] = reasons.get(i["reason"], 0) + 1
            top = "; ".join(f"{r} ({n})" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
            out.notes.append(f"{model}: {failed} of {len(items)} judgements had no readable rating and are not scored ({top}).")
    out.notes.append(
        "Score: the judge's mean 1-10 rating over every judged turn (turn 2 judged with the whole conversation), "
        "math/reasoning/coding graded against the reference answer where the question has one. Intervals: percentile "
        "bootstrap over judged turns. A judge's rating is only as good as the judge: a small judge rates noisily and "
        "favours fluent text; compare models under the same judge only."
    )
    return out
