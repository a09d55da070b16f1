"""``posttrain synth self-instruct``: new instructions and instances from seed tasks, every filter counted, resumable.

The loop (Wang et al., 2023; the rules are :mod:`posttrain.synth.self_instruct`'s):

1. ``instructions``: rounds of ``requests_per_round`` requests, each a list of 8 demonstrations (6 seed
   tasks, 2 instructions generated so far) for the teacher to continue (temperature 0.7, top-p 0.5, stop
   at item 16), until ``n`` new instructions are kept or ``max_requests`` were sent. Each item is
   filtered (length, keywords, "Write a program", leading punctuation or non-ASCII), then dropped when
   its ROUGE-L F with any pool instruction (seeds and kept ones) exceeds 0.7
   (:class:`~posttrain.synth.rouge.RougePool`). Departure: the last item of a reply cut at the token
   budget is dropped (Self-Instruct drops the whole reply), and case is kept (Self-Instruct capitalises);
2. ``classification``: the teacher says whether each instruction is a classification task (few-shot
   from the seed tasks' own labels, greedy);
3. ``instances``: the teacher writes instances, input first or for classification label first (greedy,
   as Self-Instruct; at most 3 instances, where Self-Instruct stops at 5); Self-Instruct's instance
   filters, and the last instance of a reply cut at its token budget dropped;
4. outputs: ``data.jsonl`` in Alpaca's format (what ``posttrain sft`` reads), ``instructions.jsonl``
   (the kept instructions), ``rejects.jsonl`` (every
   request whose reply never parsed, after retries), ``funnel.json`` and ``report.html``.

``style="alpaca"``: 20 instructions with inputs and outputs a request, 3 seed demonstrations, temperature
1.0, Alpaca's keyword list; no separate classification and instance steps.

Resumable: demonstrations are drawn from a generator seeded by (seed, request number) and the pool's
state, which the cached replies rebuild exactly, so a killed run asks again only for what never came
back (:class:`~posttrain.synth.teacher.Teacher`). A reply that does not parse is asked again (sampled,
a new seed) twice before it is counted and written to the rejects file; nothing becomes an empty record.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from posttrain.records import write_jsonl
from posttrain.synth import self_instruct as si
from posttrain.synth.funnel import Funnel, Step
from posttrain.synth.rouge import THRESHOLD, RougePool
from posttrain.synth.teacher import Reply, Teacher


class SelfInstructConfig(BaseModel):
    """Settings of ``posttrain synth self-instruct`` (see its ``--help``)."""

    model_config = ConfigDict(extra="forbid")
    teacher: str
    seed_tasks: str
    n: int = Field(100, ge=1)
    style: Literal["self-instruct", "alpaca"] = "self-instruct"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1)
    requests_per_round: int = Field(8, ge=1)
    max_requests: int | None = Field(None, ge=1, description="Default: 10 × n / items a request can hold, at least 16.")
    temperature: float | None = Field(None, ge=0, description="Default: 0.7 (self-instruct), 1.0 (alpaca).")
    top_p: float | None = Field(None, gt=0, le=1, description="Default: 0.5 (self-instruct), 1.0 (alpaca).")
    max_new_tokens: int | None = Field(None, ge=1, description="Per instruction request. Default: 256 (self-instruct), 1536 (alpaca).")
    instance_max_new_tokens: int = Field(256, ge=1)
    rouge_threshold: float = Field(THRESHOLD, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    bf16: bool | None = None
    template: str | None = None
    output_dir: str = "runs/self-instruct"


def read_seed_tasks(path: str) -> list[si.SeedTask]:
    """Self-Instruct's seed-task format; every bad line named with its number, all at once."""
    from posttrain.data.sources import read_jsonl

    tasks, problems = [], []
    for item in read_jsonl(Path(path)):
        if item.problem is not None:
            problems.append(str(item.problem))
            continue
        try:
            tasks.append(si.seed_task(item.value))
        except ValueError as error:
            problems.append(f"{item.location}: {error}")
    if problems:
        raise ValueError(f"{len(problems)} bad lines in {path}:\n" + "\n".join(problems[:20]))
    if not tasks:
        raise ValueError(f"{path}: no seed tasks")
    return tasks


def run(cfg: SelfInstructConfig, *, console: Any = None) -> dict[str, Any]:
    from rich.console import Console

    from posttrain.config import resolve_bf16

    console = console or Console(stderr=True)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    seeds = read_seed_tasks(cfg.seed_tasks)  # a bad file fails before any model loads
    alpaca = cfg.style == "alpaca"
    teacher = Teacher(_engine(cfg, root, console), cfg.teacher, root / "requests", bf16=resolve_bf16(cfg.bf16), chunk=cfg.batch_size, console=console)
    funnel, rejects = Funnel(), []
    if alpaca:
        with funnel.step("instructions (alpaca)", "instructions").timed() as step:
            records, kept = _alpaca(cfg, seeds, teacher, step, rejects)
    else:
        with funnel.step("instructions", "instructions").timed() as step:
            kept = _instructions(cfg, seeds, teacher, step)
        with funnel.step("classification", "instructions").timed() as step:
            classes = _classification(cfg, seeds, [k["instruction"] for k in kept], teacher, step, rejects)
        with funnel.step("instances", "instructions").timed() as step:
            records = _instances(cfg, seeds, kept, classes, teacher, step, rejects)
    write_jsonl(root / "instructions.jsonl", kept)
    write_jsonl(root / "data.jsonl", records)
    write_jsonl(root / "rejects.jsonl", rejects)
    outputs = {"instructions": len(kept), "records": len(records), "rejects": len(rejects)}
    title = f"{'Alpaca' if alpaca else 'Self-Instruct'}: {cfg.teacher} as teacher, {len(seeds)} seed tasks"
    funnel.write(root, title, outputs)
    console.print(funnel.table(title))
    retries = {k: v for k, v in teacher.counts.items() if k.endswith("retries")}
    if retries:
        console.print("asked again after an unparsable reply: " + ", ".join(f"{k} {v}" for k, v in retries.items()), highlight=False)
    return {"outputs": outputs, "funnel": funnel.to_dict(), "dir": str(root), "requests": dict(teacher.counts)}


def _engine(cfg: SelfInstructConfig, root: Path, console: Any) -> Any:
    if cfg.base_url:
        from posttrain.generate.client import OpenAIEngine

        return OpenAIEngine(cfg.base_url, cfg.teacher, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency, cache_dir=root / "requests" / "endpoint", console=console)
    from posttrain.generate.load import load_engine

    return load_engine(cfg.teacher, dtype="float32", batch_size=cfg.batch_size, template=cfg.template)


def _max_requests(cfg: SelfInstructConfig, per_request: int) -> int:
    return cfg.max_requests or max(16, 10 * -(-cfg.n // per_request))


def _keep(pool: RougePool, text: str, cfg: SelfInstructConfig, step: Step, keywords: tuple[str, ...]) -> dict[str, Any] | None:
    """Filter one instruction; add it to the pool when it stays."""
    problem = si.instruction_problem(text, keywords)
    if problem:
        step.drop(problem, text)
        return None
    match = pool.most_similar(text, cfg.rouge_threshold)
    if match is not None:
        step.drop(f"ROUGE-L > {cfg.rouge_threshold:g} with an instruction in the pool", text)
        return None
    pool.add(text)
    step.keep(text)
    return {"instruction": text}


# -- Self-Instruct ------------------------------------------------------------------------------


def _instructions(cfg: SelfInstructConfig, seeds: list[si.SeedTask], teacher: Teacher, step: Step) -> list[dict[str, Any]]:
    pool = RougePool([t.instruction for t in seeds])
    kept: list[dict[str, Any]] = []
    sent, limit = 0, _max_requests(cfg, 7)
    while len(kept) < cfg.n and sent < limit:
        prompts = []
        for k in range(min(cfg.requests_per_round, limit - sent)):
            rng = random.Random(f"{cfg.seed}:request:{sent + k}")
            machine = rng.sample([x["instruction"] for x in kept], min(si.DEMOS - si.SEED_DEMOS, len(kept)))
            demos = machine + rng.sample([t.instruction for t in seeds], min(si.DEMOS - len(machine), len(seeds)))
            rng.shuffle(demos)
            prompts.append(si.bootstrap_prompt(demos))
        replies = teacher.ask(
            prompts, what="instructions", temperature=cfg.temperature if cfg.temperature is not None else 0.7,
            top_p=cfg.top_p or 0.5, max_new_tokens=cfg.max_new_tokens or 256, seed=cfg.seed + sent, stop=("\n16.",),
        )  # fmt: skip
        sent += len(prompts)
        for reply in replies:
            items = si.split_instructions(reply[0].text)
            if not items:
                step.count_in += 1
                step.drop("a reply with no list items", reply[0].text)
            elif reply[0].truncated:
                step.count_in += 1
                step.drop("cut at the token budget (the last item of a reply)", items.pop())
            for text in items:
                step.count_in += 1
                if len(kept) >= cfg.n:
                    step.drop("more than n", text)
                elif (entry := _keep(pool, text, cfg, step, si.SELF_INSTRUCT_KEYWORDS)) is not None:
                    kept.append(entry)
    step.note = f"{sent} requests; {len(kept)} of the {cfg.n} asked for" + ("" if len(kept) >= cfg.n else f" (stopped at max_requests {limit})")
    return kept


def _classification(cfg, seeds, instructions, teacher, step, rejects) -> list[bool]:
    rng = random.Random(f"{cfg.seed}:classification")
    yes = [t for t in seeds if t.is_classification]
    no = [t for t in seeds if not t.is_classification]
    shots = rng.sample(yes, min(4, len(yes))) + rng.sample(no, min(4, len(no)))
    rng.shuffle(shots)
    step.count_in = len(instructions)
    answers = teacher.ask_parsed(
        [si.classification_prompt(text, shots) for text in instructions], lambda r: si.parse_yes_no(r.text),
        what="classification", max_new_tokens=4, seed=cfg.seed, attempts=2,
    )  # fmt: skip
    out, unanswered = [], 0
    for text, (value, reply) in zip(instructions, answers):
        if value is None:  # labelled, not dropped: the instruction goes on as Self-Instruct's default, not classification
            unanswered += 1
            rejects.append({"stage": "classification", "instruction": text, "reply": reply.text})
            step.keep(f"{text} -> no yes or no ({reply.text!r}): not classification")
        else:
            step.keep(f"{text} -> {'classification' if value else 'not classification'}")
        out.append(bool(value))
    step.note = f"{sum(out)} classification tasks; {unanswered} replies with no yes or no after 2 tries, taken as not classification"
    return out


def _instances(cfg, seeds, kept, classes, teacher, step, rejects) -> list[dict[str, Any]]:
    step.count_in = len(kept)
    prompts = []
    for entry, clf in zip(kept, classes):
        rng = random.Random(f"{cfg.seed}:instances:{entry['instruction']}")
        same = [t for t in seeds if t.is_classification == clf and t.instances] or [t for t in seeds if t.instances]
        prompts.append(si.instance_prompt(entry["instruction"], clf, rng.sample(same, min(3, len(same)))))

    records: list[dict[str, Any]] = []
    filtered = 0
    for clf in (False, True):
        idx = [i for i, c in enumerate(classes) if c == clf]
        if not idx:
            continue
        answers = teacher.ask_parsed(
            [prompts[i] for i in idx], lambda r, clf=clf: _instances_or_none(r, clf), what="instances" + (" (classification)" if clf else ""),
            max_new_tokens=cfg.instance_max_new_tokens, seed=cfg.seed, stop=("\nTask:", f"\nExample {si.MAX_INSTANCES + 1}"),
        )  # fmt: skip
        for i, (value, reply) in zip(idx, answers):
            text = kept[i]["instruction"]
            if value is None:
                rejects.append({"stage": "instances", "instruction": text, "reply": reply.text})
                step.drop("no usable instance after 3 tries", f"{text}\n-> {reply.text}")
                continue
            instances, dropped = value
            filtered += sum(dropped.values())
            step.keep(f"{text}\n" + "\n".join(f"  input: {g!r} -> output: {o!r}" for g, o in instances[:2]))
            for given, output in instances:
                records.append({"instruction": text, "input": given, "output": output, "meta": {"classification": clf, "source": "self-instruct"}})
    step.note = f"{len(records)} instances; {filtered} dropped by the instance filters (empty, equal to the input, duplicates, conflicting)"
    return records


def _instances_or_none(reply: Reply, clf: bool) -> tuple[list[tuple[str, str]], dict[str, int]] | None:
    pairs = si.parse_instances(reply.text, clf)
    if reply.truncated:
        pairs = pairs[:-1]  # the last instance of a reply cut at its token budget is cut too
    kept, dropped = si.clean_instances(pairs)
    return (kept, dropped) if kept else None


# -- Alpaca --------------------------------------------------------------------------------------


def _alpaca(cfg, seeds, teacher, step, rejects) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pool = RougePool([t.instruction for t in seeds])
    kept: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    sent, limit = 0, _max_requests(cfg, si.ALPACA_PER_CALL - si.ALPACA_DEMOS)
    while len(kept) < cfg.n and sent < limit:
        prompts = []
        for k in range(min(cfg.requests_per_round, limit - sent)):
            rng = random.Random(f"{cfg.seed}:alpaca:{sent + k}")
            prompts.append(si.alpaca_prompt(rng.sample(seeds, min(si.ALPACA_DEMOS, len(seeds)))))
        replies = teacher.ask(
            prompts, what="instructions", temperature=cfg.temperature if cfg.temperature is not None else 1.0, top_p=cfg.top_p or 1.0,
            max_new_tokens=cfg.max_new_tokens or 1536, seed=cfg.seed + sent, stop=(f"\n{si.ALPACA_PER_CALL + 1}.",),
        )  # fmt: skip
        sent += len(prompts)
        for reply in replies:
            items = si.parse_alpaca(reply[0].text, si.ALPACA_DEMOS + 1, reply[0].truncated)
            if not items:
                rejects.append({"stage": "alpaca", "reply": reply[0].text})
            for item in items:
                step.count_in += 1
                if isinstance(item, str):
                    step.drop(item, reply[0].text[:300])
                    continue
                instruction, given, output = item
                if len(kept) >= cfg.n:
                    step.drop("more than n", instruction)
                elif not output:
                    step.drop("empty output", instruction)
                elif (entry := _keep(pool, instruction, cfg, step, si.ALPACA_KEYWORDS)) is not None:
                    kept.append(entry)
                    records.append({"instruction": instruction, "input": given, "output": output, "meta": {"source": "alpaca-style"}})
    step.note = f"{sent} requests; {len(kept)} of the {cfg.n} asked for"
    return records, kept
