"""IFEval end to end: find the prompts, get responses (from a file or a model), score, report.

Scoring is :mod:`posttrain.verify.scoring`; generation is :mod:`posttrain.generate.engine` (or an
OpenAI-compatible endpoint, :mod:`posttrain.generate.client`). This module
only joins them and writes what people read: the four accuracies, a per-instruction-type table, a bar
chart, and one JSON line per prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.records import write_jsonl
from posttrain.verify.scoring import IFEvalScores, PromptRecord, prefetch, ResponseScore, aggregate, read_prompt_records, read_responses, score_response

DATA_NAMES = ("ifeval_input_data.jsonl", "input_data.jsonl")
WHERE_TO_GET = (
    "IFEval's 541 prompts are not bundled with posttrain. Get input_data.jsonl from "
    "google-research/instruction_following_eval (data/input_data.jsonl) or the google/IFEval dataset, "
    "and pass it with --data, or set POSTTRAIN_IFEVAL_DATA to its path."
)


def find_data(data: str | Path | None, near: str | Path | None = None) -> Path:
    """The IFEval prompts file: ``data``; else $POSTTRAIN_IFEVAL_DATA; else one beside ``near``."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file. {WHERE_TO_GET}")
        return path
    if os.environ.get("POSTTRAIN_IFEVAL_DATA"):
        return find_data(os.environ["POSTTRAIN_IFEVAL_DATA"])
    if near is not None:
        for name in DATA_NAMES:
            candidate = Path(near).parent / name
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(WHERE_TO_GET)


@dataclass
class IFEvalResult:
    records: list[PromptRecord]
    responses: list[str]
    scores: list[ResponseScore]
    summary: IFEvalScores
    note: str = ""

    def per_item(self) -> list[dict[str, Any]]:
        """One dict per prompt: ``prompt``, ``instruction_id_list``, ``strict`` and ``loose`` (one boolean per instruction)."""
        return [
            {
                "key": r.key,
                "prompt": r.prompt,
                "instruction_id_list": r.instruction_id_list,
                "strict": [i.strict for i in s.instructions],
                "loose": [i.loose for i in s.instructions],
                "reasons": [i.reason for i in s.instructions],
                "response": response,
            }
            for r, s, response in zip(self.records, self.scores, self.responses)
        ]


def responses_file_records(path: Path) -> list[PromptRecord] | None:
    """The prompt records carried by a responses file itself (lines with instruction_id_list), else None."""
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        has_ids = "instruction_id_list" in json.loads(first)
    except json.JSONDecodeError:
        return None
    return read_prompt_records(path) if has_ids else None


def score_file(responses: str | Path, data: str | Path | None = None, limit: int | None = None) -> IFEvalResult:
    """Score an IFEval-format responses file (``prompt``, ``response`` per line) against the prompts.

    Responses are matched to prompts by exact prompt text. A response to a prompt that is not in the
    data is an error; prompts without a response are left out, and ``result.note`` says how many.
    """
    responses = Path(responses)
    by_prompt = read_responses(responses)
    records = responses_file_records(responses) if data is None else None
    if records is None:
        records = read_prompt_records(find_data(data, near=responses))
    known = {r.prompt for r in records}
    unknown = [p for p in by_prompt if p not in known]
    if unknown:
        raise ValueError(f"{responses}: {len(unknown)} responses answer prompts that are not in the IFEval data (first: {unknown[0][:60]!r}...)")
    covered = [r for r in records if r.prompt in by_prompt]
    if not covered:
        raise ValueError(f"{responses}: no response matches any IFEval prompt")
    note = "" if len(covered) == len(records) else f"the responses cover {len(covered)} of the {len(records)} prompts; only those are scored"
    if limit is not None:
        covered = covered[:limit]
    result = score(covered, [by_prompt[r.prompt] for r in covered])
    result.note = note
    return result


def score(records: list[PromptRecord], responses: list[str]) -> IFEvalResult:
    prefetch(zip(records, responses))  # code verifiers: one sandbox round trip each
    scores = [score_response(r, text) for r, text in zip(records, responses)]
    return IFEvalResult(records, responses, scores, aggregate(scores))


def generate_responses(
    records: list[PromptRecord],
    model: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    bf16: bool,
    progress: bool = True,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    cache_dir: str | Path | None = None,
    steering: Any = None,
    steer_mode: str = "adjust",
    steer_weight: float | None = None,
    instaboost: float = 1.0,
    instructions: list[str | None] | None = None,
) -> list[str]:
    """Greedy responses of ``model`` to each prompt, with its chat template (lm-eval's IFEval setting).

    With ``base_url``, ``model`` is the endpoint's name for it and the responses come from there
    (:class:`~posttrain.generate.client.OpenAIEngine`: ``concurrency`` requests at a time, finished ones
    cached in ``cache_dir``, default ``$POSTTRAIN_CACHE/requests``, so a killed run re-sends only the
    rest); ``batch_size`` and ``bf16`` are then the server's business.

    ``steering`` (a :class:`~posttrain.steer.vectors.SteeringSet`): each prompt is steered toward those
    of its instruction types the file has (at each type's chosen layer; ``steer_mode`` and
    ``steer_weight`` as in :meth:`SteeringSet.steering`); ``instaboost``: InstABoost's m on each prompt's
    instruction, whose text ``instructions`` gives (prompts store it apart when built with ``parts``).
    """
    from posttrain.generate.params import SamplingParams

    if instaboost != 1 and (instructions is None or len(instructions) != len(records) or not all(instructions)):
        missing = len(records) if instructions is None else sum(not i for i in instructions)
        raise ValueError(
            f"InstABoost needs each prompt's instruction stored apart ('instruction' in the prompt file); {missing} of "
            f"{len(records)} prompts have none (IFEval's own prompts do not; posttrain's built-in verifiable prompts do)"
        )
    interventions = None
    if steering is not None or instaboost != 1:
        interventions = prompt_interventions(records, steering, steer_mode, steer_weight, instaboost, instructions)
    if interventions is not None and base_url is not None:
        raise ValueError("steering and InstABoost run in this process: drop --base-url (or start the server with `posttrain serve --steer`)")

    if base_url is not None:
        from posttrain.generate.client import OpenAIEngine

        engine: Any = OpenAIEngine(base_url, model, api_key_env=api_key_env, concurrency=concurrency, cache_dir=cache_dir)
    else:
        from posttrain.generate.engine import Engine

        engine = Engine.from_name(model, batch_size=batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, bf16=bf16)
    if interventions is None:
        outputs = engine.generate([r.prompt for r in records], params, progress=progress)
    else:
        marks = instructions if instaboost != 1 else None
        outputs = engine.generate([r.prompt for r in records], params, progress=progress, intervention=interventions, instructions=marks)
    return [completions[0].text for completions in outputs]


def prompt_interventions(
    records: Sequence[PromptRecord], steering: Any, mode: str, weight: float | None, boost: float, instructions: Sequence[str | None] | None
) -> list[Any]:
    """Each prompt's intervention: steering toward those of its types that ``steering`` (a SteeringSet, or None)
    has, and InstABoost's ``boost`` where the prompt's instruction is given in ``instructions``."""
    from posttrain.generate.intervene import Intervention

    out = []
    for i, r in enumerate(records):
        steerings = ()
        if steering is not None:
            steerings = tuple(steering.steering(t, mode=mode, weight=weight) for t in r.instruction_id_list if t in steering.directions)
        out.append(Intervention(steerings, boost if instructions is not None and instructions[i] else 1.0))
    return out


def write_per_item(path: str | Path, result: IFEvalResult) -> None:
    write_jsonl(path, result.per_item())


def plot(result: IFEvalResult, path: str | Path, title: str) -> Path:
    """Bar chart of strict and loose accuracy per instruction type, worst first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result.summary.per_type.items(), key=lambda kv: -kv[1].loose)  # barh draws upwards: worst on top
    names = [name for name, _ in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.6), dpi=110)
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [100 * t.strict for _, t in rows], height=0.4, label="strict")
    ax.barh([i - 0.2 for i in y], [100 * t.loose for _, t in rows], height=0.4, label="loose")
    ax.set_yticks(list(y), [f"{n} ({t.count})" for n, (_, t) in zip(names, rows)], fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("instructions followed (%)")
    s = result.summary
    ax.set_title(f"{title}\nprompt strict {100 * s.prompt_strict:.1f} · inst strict {100 * s.inst_strict:.1f} · prompt loose {100 * s.prompt_loose:.1f} · inst loose {100 * s.inst_loose:.1f}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
