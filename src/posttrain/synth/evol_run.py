"""``posttrain synth evol``: Evol-Instruct rounds over a user's instructions, every elimination counted, lineage kept, resumable.

Each round (Xu et al., 2023; rules in :mod:`posttrain.synth.evol`), for every instruction in the pool:
an operation is drawn (five in-depth, one in-breadth; seeded by the instruction's root and the round,
so a rerun draws the same), the teacher evolves the instruction, then answers the evolved one, then
judges whether the two are equal. The four elimination rules decide: a surviving evolution replaces
its instruction in the pool; an eliminated one is written to ``eliminated.jsonl`` with its rule, and the
instruction it came from stays in the pool for the next round (as WizardLM does).

Outputs: ``data.jsonl``, one record per surviving evolution of any round, in Alpaca's format (what
``posttrain sft`` reads) with ``meta.lineage``: the root instruction and every step (round, operation,
instruction) that led to it; ``eliminated.jsonl``; ``rejects.jsonl`` (requests whose replies never
parsed after retries); ``funnel.json`` and ``report.html`` with one stage per round. Every teacher
request is cached as it finishes, so a killed run asks again only for what never came back.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from posttrain.records import write_jsonl
from posttrain.synth import evol
from posttrain.synth.funnel import Funnel
from posttrain.synth.teacher import Teacher


class EvolConfig(BaseModel):
    """Settings of ``posttrain synth evol`` (see its ``--help``)."""

    model_config = ConfigDict(extra="forbid")
    teacher: str
    data: str
    rounds: int = Field(2, ge=1)
    limit: int | None = Field(None, ge=1, description="Only the first N instructions of the data.")
    operations: list[str] = Field(default_factory=lambda: list(evol.OPERATIONS))
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1)
    temperature: float = Field(0.7, ge=0)
    max_new_tokens: int = Field(256, ge=1, description="For an evolved instruction.")
    response_max_new_tokens: int = Field(512, ge=1)
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    bf16: bool | None = None
    template: str | None = None
    output_dir: str = "runs/evol"


def read_instructions(path: str, limit: int | None) -> list[str]:
    """The instruction of each record of any format posttrain reads (the last user turn), or ``{"prompt"}`` lines."""
    from posttrain.data.prompts import read_prompts

    texts = [p.text for p in read_prompts(path)]
    return [t for t in texts if t.strip()][:limit]


def run(cfg: EvolConfig, *, console: Any = None) -> dict[str, Any]:
    from rich.console import Console

    from posttrain.config import resolve_bf16

    unknown = [op for op in cfg.operations if op not in evol.OPERATIONS]
    if unknown:
        raise ValueError(f"unknown operations {unknown}; known: {', '.join(evol.OPERATIONS)}")
    console = console or Console(stderr=True)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    roots = read_instructions(cfg.data, cfg.limit)  # a bad file fails before any model loads
    if not roots:
        raise ValueError(f"{cfg.data}: no instructions")
    teacher = Teacher(_engine(cfg, root, console), cfg.teacher, root / "requests", bf16=resolve_bf16(cfg.bf16), chunk=cfg.batch_size, console=console)
    funnel = Funnel()
    pool = [{"instruction": text, "lineage": [], "root": text} for text in roots]
    records: list[dict[str, Any]] = []
    eliminated: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for round_ in range(1, cfg.rounds + 1):
        pool = _round(cfg, round_, pool, teacher, funnel, records, eliminated, rejects)
    write_jsonl(root / "data.jsonl", records)
    write_jsonl(root / "eliminated.jsonl", eliminated)
    write_jsonl(root / "rejects.jsonl", rejects)
    outputs = {"records": len(records), "eliminated": len(eliminated), "rejects": len(rejects)}
    title = f"Evol-Instruct: {cfg.teacher} as teacher, {len(roots)} instructions, {cfg.rounds} rounds"
    funnel.write(root, title, outputs)
    console.print(funnel.table(title))
    return {"outputs": outputs, "funnel": funnel.to_dict(), "dir": str(root), "requests": dict(teacher.counts)}


def _engine(cfg: EvolConfig, root: Path, console: Any) -> Any:
    if cfg.base_url:
        from posttrain.generate.client import OpenAIEngine

        return OpenAIEngine(cfg.base_url, cfg.teacher, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency, cache_dir=root / "requests" / "endpoint", console=console)
    from posttrain.generate.load import load_engine

    return load_engine(cfg.teacher, dtype="float32", batch_size=cfg.batch_size, template=cfg.template)


def _round(cfg, round_, pool, teacher, funnel, records, eliminated, rejects) -> list[dict[str, Any]]:
    step = funnel.step(f"round {round_}", "instructions", len(pool))
    operations = [random.Random(f"{cfg.seed}:{item['root']}:{round_}").choice(cfg.operations) for item in pool]
    evolved_replies = teacher.ask_parsed(
        [evol.evolve_prompt(item["instruction"], op) for item, op in zip(pool, operations)], lambda r: evol.clean_evolved(r.text) or None,
        what=f"round {round_}: evolve", temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + round_,
    )  # fmt: skip
    evolved = [value for value, _ in evolved_replies]
    # rule 4 needs no more requests: only evolutions that pass it are answered and judged
    early = [None if text is None else evol.elimination(text, None, None) for text in evolved]
    asked = [i for i, text in enumerate(evolved) if text is not None and early[i] is None]
    responses = teacher.ask([evolved[i] for i in asked], what=f"round {round_}: respond", max_new_tokens=cfg.response_max_new_tokens, seed=cfg.seed)
    judged = teacher.ask_parsed(
        [evol.equal_prompt(pool[i]["instruction"], evolved[i]) for i in asked], lambda r: evol.parse_equal(r.text),
        what=f"round {round_}: equal?", max_new_tokens=8, seed=cfg.seed, attempts=2,
    )  # fmt: skip
    answer = {i: (r[0], eq) for i, r, (eq, _) in zip(asked, responses, judged)}
    unclear = 0
    next_pool = []
    for i, item in enumerate(pool):
        op = operations[i]
        if evolved[i] is None:
            rejects.append({"round": round_, "instruction": item["instruction"], "operation": op, "reply": evolved_replies[i][1].text})
            step.drop("no evolved instruction in the reply after 3 tries", item["instruction"])
            next_pool.append(item)
            continue
        response, equal = answer.get(i, (None, None))
        unclear += i in answer and equal is None
        reason = early[i] or evol.elimination(evolved[i], None if response is None or response.truncated else response.text, equal)
        if reason is None and response is not None and response.truncated:
            reason = "the response was cut at its token budget"
        if reason:
            eliminated.append({"round": round_, "operation": op, "instruction": item["instruction"], "evolved": evolved[i], "reason": reason,
                               "response": response.text if response else None})  # fmt: skip
            step.drop(reason, f"{item['instruction']}\n-> ({op}) {evolved[i]}")
            next_pool.append(item)
            continue
        lineage = [*item["lineage"], {"round": round_, "operation": op, "instruction": evolved[i]}]
        step.keep(f"({op}) {evolved[i]}")
        records.append({"instruction": evolved[i], "input": "", "output": response.text, "meta": {"root": item["root"], "lineage": lineage}})
        next_pool.append({"instruction": evolved[i], "lineage": lineage, "root": item["root"]})
    step.note = f"{unclear} equality judgements said neither Equal nor Not Equal (not counted as Equal)"
    return next_pool
