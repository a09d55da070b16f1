"""``posttrain synth autoif``: AutoIF end to end, each stage cached and resumable, each reporting what it kept and dropped.

Stages (Dong et al., 2024; the rules are :mod:`posttrain.synth.autoif`'s):

1. ``seeds``: instructions from a file (default: posttrain's own ``synth/data/autoif_seeds.txt``, 40
   format-only instructions written for this project); ``seed_share`` of ``n_instructions`` (default
   half) are drawn from them;
2. ``augment``: the teacher writes new instructions in the style of the pool until it holds
   ``n_instructions`` (at most four rounds), near-duplicates removed;
3. ``functions``: ``functions_per_instruction`` replies per instruction, each an ``evaluate`` function
   with three test cases;
4. ``compile``: the functions parsed out of the replies, deduplicated, compiled in the sandbox;
5. ``cross-validate``: cases and functions that agree (≥ 3 functions, ≥ 10 cases, accuracy ≥ 0.8);
6. ``back-translate``: the teacher restates the instruction from up to three kept functions and judges
   whether each restatement contradicts the instruction; any contradiction drops it;
7. ``queries``: ``queries_per_instruction`` queries per instruction (a file, one a line, or posttrain's
   everyday queries, training split), composed with it into one prompt;
8. ``responses``: ``responses_per_query`` responses per prompt from the student (default: the teacher);
9. ``verify``: each response's pass rate over the instruction's functions; kept above ``min_pass_rate``;
10. ``quality`` (``--quality``): the teacher scores each kept response 0-10; kept at ``quality_min``;
11. outputs: ``sft.jsonl`` (messages), ``dpo.jsonl`` (chosen pass rate ≥ 0.5, rejected 0),
    ``verifiers.jsonl`` (a verifier library: :mod:`posttrain.verify.code`), ``prompts.jsonl`` (the
    composed prompts in IFEval's format naming those verifiers, for ``label``, GRPO and ``eval``),
    ``funnel.json`` and ``report.html`` (:mod:`posttrain.synth.funnel`).

Each stage's result is saved in ``OUTPUT_DIR/stages/NAME.json`` under a key of the settings and the
stages before it, and reused when the key matches; the teacher's requests are cached as they finish
(:class:`~posttrain.synth.teacher.Teacher`), so a killed run redoes only unfinished requests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from posttrain.records import write_jsonl
from posttrain.synth import autoif
from posttrain.synth.funnel import Funnel, Step
from posttrain.synth.teacher import Teacher
from posttrain.verify.code import CodeCheck, check_id, write_library
from posttrain.verify.sandbox import Limits, Sandbox

STAGE_VERSION = 1  # bump when a stage's output for the same inputs changes

AUGMENT_PROMPT = """Here are instructions that each ask for one property of an answer's form, one a program can check:
{examples}
Write {m} new instructions of the same kind, each different from all of the above. One per line, numbered 1 to {m}. Write only the instructions."""

FUNCTION_PROMPT = """Write a Python function that checks whether a response follows this instruction:
{instruction}

The function is `def evaluate(response):` and returns True when the string `response` follows the instruction, False otherwise, using the standard library only. Also give three test cases: example responses with the output the function should give for each.
Answer with one JSON object and nothing else, in this shape (newlines in the code written as \\n):
{{"func": "def evaluate(response):\\n    ...", "cases": [{{"input": "...", "output": true}}, {{"input": "...", "output": false}}, {{"input": "...", "output": true}}]}}"""

BACK_PROMPT = """This Python function checks whether a response follows an instruction:
```python
{function}
```
State the instruction it checks, in one sentence, and nothing else."""

JUDGE_PROMPT = """Instruction A: {a}
Instruction B: {b}
Do these two instructions contradict each other, so that no answer could follow both? Reply with one word: yes or no."""

QUALITY_PROMPT = """Rate how well the response answers the query while following the instruction.
Instruction: {instruction}
Query: {query}
Response: {response}
A response that follows the instruction but ignores the query is poor. Explain briefly, then end with a line "Score: N", N from 0 (unrelated) to 10 (helpful and on topic)."""


class AutoIFConfig(BaseModel):
    """Settings of ``posttrain synth autoif`` (the CLI's options; see ``--help``)."""

    model_config = ConfigDict(extra="forbid")
    teacher: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1)
    student: str | None = None
    seeds: str | None = None
    queries: str | None = None
    n_instructions: int = Field(50, ge=1)
    seed_share: float = Field(0.5, gt=0, le=1, description="Share of n_instructions drawn from the seeds (rounded up); the teacher writes the rest.")
    functions_per_instruction: int = Field(8, ge=1)
    min_functions: int = Field(autoif.MIN_FUNCTIONS, ge=1)
    min_cases: int = Field(autoif.MIN_CASES, ge=1)
    min_accuracy: float = Field(autoif.MIN_ACCURACY, ge=0, le=1)
    back_translation: bool = True
    queries_per_instruction: int = Field(4, ge=1)
    responses_per_query: int = Field(4, ge=1)
    min_pass_rate: float = Field(0.5, ge=0, lt=1)
    quality: bool = False
    quality_min: float = Field(autoif.QUALITY_MIN_SCORE, ge=0, le=10)
    temperature: float = Field(0.7, ge=0)
    response_temperature: float = Field(0.8, ge=0)
    max_new_tokens: int = Field(384, ge=1)
    response_max_new_tokens: int = Field(256, ge=1)
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    bf16: bool | None = None
    template: str | None = None
    timeout_s: float = Field(5.0, gt=0)
    unsafe_exec: bool = False
    output_dir: str = "runs/autoif"

    def key(self) -> dict[str, Any]:
        """What changes results (not where they go, how fast, or how the code is isolated)."""
        return self.model_dump(exclude={"output_dir", "concurrency", "batch_size", "unsafe_exec", "api_key_env"})


# -- the stage runner ---------------------------------------------------------------------------


class _Stages:
    """Runs stages in order; a stage whose saved key matches is read back instead of run."""

    def __init__(self, root: Path, base: dict[str, Any], funnel: Funnel, console: Any):
        self.root, self.funnel, self.console = root / "stages", funnel, console
        self.key = hashlib.sha256(json.dumps({"version": STAGE_VERSION, **base}, sort_keys=True).encode()).hexdigest()

    def __call__(self, name: str, work: Callable[[Step], Any], *, unit: str) -> Any:
        self.key = hashlib.sha256(f"{self.key}:{name}".encode()).hexdigest()
        path = self.root / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == self.key:
                self.funnel.steps.append(Step(**saved["step"]))
                self.console.print(f"[dim]{name}: reused ({path})[/]")
                return saved["payload"]
        step = self.funnel.step(name, unit)
        with step.timed():
            payload = work(step)
        self.root.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.part")
        partial.write_text(json.dumps({"key": self.key, "step": step.__dict__, "payload": payload}, ensure_ascii=False))
        os.replace(partial, path)
        self.console.print(f"{name}: {step.count_in} {unit} in, {step.count_out} out ({step.seconds:.1f} s)", highlight=False)
        return payload


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_seeds(path: str | None) -> list[str]:
    text = Path(path).read_text(encoding="utf-8") if path else files("posttrain.synth").joinpath("data", "autoif_seeds.txt").read_text(encoding="utf-8")
    return _lines(text)


def read_queries(path: str | None) -> list[str]:
    """One query a line (``.txt``), or JSON lines with a ``query`` or string ``prompt``; default: posttrain's training-split queries."""
    if path is None:
        from posttrain.synth.verifiable import split_queries

        return list(split_queries()["train"])
    if not path.endswith((".jsonl", ".json")):
        return _lines(Path(path).read_text(encoding="utf-8"))
    from posttrain.data.sources import read_jsonl

    found, problems = [], []
    for item in read_jsonl(Path(path)):
        value = item.value if item.problem is None else None
        text = value.get("query", value.get("prompt")) if isinstance(value, dict) else None
        if isinstance(text, str) and text.strip():
            found.append(text.strip())
        else:
            problems.append(str(item.problem) if item.problem else f"{item.location}: field 'query': expected a non-empty string")
    if problems:
        raise ValueError(f"{len(problems)} bad lines in {path}:\n" + "\n".join(problems[:20]))
    return found


# -- the run ------------------------------------------------------------------------------------


def run(cfg: AutoIFConfig, *, console: Any = None) -> dict[str, Any]:
    """Run (or resume) every stage; returns the outputs' counts and where they are."""
    from rich.console import Console

    from posttrain.config import resolve_bf16

    console = console or Console(stderr=True)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    seeds, query_pool = read_seeds(cfg.seeds), read_queries(cfg.queries)  # bad files fail before any model loads
    if not query_pool:
        raise ValueError(f"no queries in {cfg.queries}")
    engines: dict[str, Any] = {}

    def teacher_for(name: str) -> Teacher:
        if name not in engines:
            engines[name] = _engine(cfg, name, root, console)
        return Teacher(engines[name], name, root / "requests", bf16=resolve_bf16(cfg.bf16), console=console)

    funnel = Funnel()
    stages = _Stages(root, cfg.key(), funnel, console)
    sandbox = Sandbox(limits=Limits(timeout_s=cfg.timeout_s), unsafe_exec=cfg.unsafe_exec)
    try:
        pool = stages("seeds", lambda step: _seeds(cfg, seeds, step), unit="instructions")
        pool = stages("augment", lambda step: _augment(cfg, pool, teacher_for(cfg.teacher), step), unit="instructions")
        replies = stages("functions", lambda step: _functions(cfg, pool, teacher_for(cfg.teacher), step), unit="replies")
        compiled = stages("compile", lambda step: _compile(replies, sandbox, step), unit="functions")
        checks = stages("cross-validate", lambda step: _cross_validate(cfg, compiled, sandbox, step), unit="instructions")
        if cfg.back_translation:
            checks = stages("back-translate", lambda step: _back_translate(checks, teacher_for(cfg.teacher), step), unit="instructions")
        prompts = stages("queries", lambda step: _queries(cfg, checks, query_pool, step), unit="prompts")
        student = cfg.student or cfg.teacher
        responses = stages("responses", lambda step: _responses(cfg, prompts, teacher_for(student), step), unit="responses")
        verified = stages("verify", lambda step: _verify(cfg, checks, responses, sandbox, step), unit="responses")
        if cfg.quality:
            verified = stages("quality", lambda step: _quality(cfg, verified, teacher_for(cfg.teacher), step), unit="responses")
        outputs = write_outputs(cfg, root, checks, prompts, verified, funnel)
    finally:
        sandbox.close()
    title = f"AutoIF: {cfg.teacher} as teacher" + (f", {cfg.student} as student" if cfg.student else "")
    funnel.write(root, title, outputs)
    console.print(funnel.table(title))
    empty = funnel.emptied_by()
    if empty is not None:
        console.print(f"[yellow]nothing came out of stage {empty.stage}:[/] {empty.count_in} {empty.unit} in, all dropped ({root / 'report.html'})")
    return {"outputs": outputs, "funnel": funnel.to_dict(), "emptied_by": empty.stage if empty else None, "dir": str(root)}


def _engine(cfg: AutoIFConfig, name: str, root: Path, console: Any) -> Any:
    if cfg.base_url:
        from posttrain.generate.client import OpenAIEngine

        return OpenAIEngine(cfg.base_url, name, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency, cache_dir=root / "requests" / "endpoint", console=console)
    from posttrain.generate.load import load_engine

    return load_engine(name, dtype="float32", batch_size=cfg.batch_size, template=cfg.template)


# -- stages -------------------------------------------------------------------------------------


def _seeds(cfg: AutoIFConfig, seeds: list[str], step: Step) -> list[str]:
    step.count_in = len(seeds)
    distinct: list[str] = []
    for text in seeds:
        if any(autoif.normalise(text) == autoif.normalise(other) for other in distinct):
            step.drop("repeated", text)
        else:
            distinct.append(text)
    take = min(len(distinct), math.ceil(cfg.n_instructions * cfg.seed_share))
    chosen = set(random.Random(cfg.seed).sample(range(len(distinct)), take))
    kept = []
    for index, text in enumerate(distinct):
        if index in chosen:
            step.keep(text)
            kept.append(text)
        else:
            step.drop(f"not drawn (seeds fill {cfg.seed_share:.0%} of n_instructions)", text)
    return kept


def _augment(cfg: AutoIFConfig, pool: list[str], teacher: Teacher, step: Step) -> list[str]:
    pool = list(pool)
    step.count_in = len(pool)
    for text in pool:
        step.keep(text)
    rounds = requests = lines = 0
    while len(pool) < cfg.n_instructions and rounds < 4 and pool:
        need = cfg.n_instructions - len(pool)
        rng = random.Random(f"{cfg.seed}:augment:{rounds}")
        prompts = []
        for _ in range(math.ceil(need / 5)):
            examples = "\n".join(f"{i + 1}. {text}" for i, text in enumerate(rng.sample(pool, min(6, len(pool)))))
            prompts.append(AUGMENT_PROMPT.format(examples=examples, m=10))
        replies = [r[0].text for r in teacher.ask(prompts, what="augment", temperature=max(cfg.temperature, 0.7), max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + rounds)]
        parsed = autoif.parse_instructions(replies, pool)
        requests, rounds = requests + len(prompts), rounds + 1
        lines += len(parsed.kept) + sum(len(v) for v in parsed.dropped.values())
        for reason, texts in parsed.dropped.items():
            for text in texts:
                step.drop(reason, text)
        for text in parsed.kept:
            if len(pool) < cfg.n_instructions:
                pool.append(text)
                step.keep(text)
            else:
                step.drop("more than n_instructions", text)
    step.count_in += lines
    step.note = f"{requests} requests in {rounds} rounds gave {lines} candidate lines; the pool holds {len(pool)} of {cfg.n_instructions}"
    return pool


def _functions(cfg: AutoIFConfig, pool: list[str], teacher: Teacher, step: Step) -> list[dict[str, Any]]:
    prompts = [FUNCTION_PROMPT.format(instruction=text) for text in pool]
    answers = teacher.ask(prompts, what="functions", n=cfg.functions_per_instruction, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    out = []
    for instruction, replies in zip(pool, answers):
        parsed = []
        for reply in replies:
            step.count_in += 1
            p = autoif.parse_function_reply(reply.text)
            if p.function is None:
                step.drop(("cut at max_new_tokens: " if reply.truncated else "") + (p.problem or "unparsable"), reply.text)
                continue
            step.keep(p.function)
            parsed.append({"function": p.function, "cases": [list(c) for c in p.cases], "bad_cases": p.bad_cases})
        out.append({"instruction": instruction, "replies": parsed})
    return out


def _compile(replies: list[dict[str, Any]], sandbox: Sandbox, step: Step) -> list[dict[str, Any]]:
    unique = list(dict.fromkeys(r["function"] for item in replies for r in item["replies"]))
    errors = dict(zip(unique, sandbox.compile_errors(unique)))
    out = []
    for item in replies:
        seen: set[str] = set()
        functions, cases, bad = [], [], 0
        for r in item["replies"]:
            step.count_in += 1
            cases += [tuple(c) for c in r["cases"]]
            bad += r["bad_cases"]
            if r["function"] in seen:
                step.drop("the same function again", r["function"])
            elif errors[r["function"]] is not None:
                step.drop(errors[r["function"]].split(":")[0].split(" (")[0], f"{errors[r['function']]}\n\n{r['function']}")
            else:
                step.keep(r["function"])
                functions.append(r["function"])
            seen.add(r["function"])
        out.append({"instruction": item["instruction"], "functions": functions, "cases": [list(c) for c in dict.fromkeys(cases)], "bad_cases": bad})
    step.note = f"{sum(o['bad_cases'] for o in out)} test cases without a string input and a true/false output were left out"
    return out


def _cross_validate(cfg: AutoIFConfig, compiled: list[dict[str, Any]], sandbox: Sandbox, step: Step) -> list[dict[str, Any]]:
    step.count_in = len(compiled)
    kept, functions_kept, cases_kept = [], 0, 0
    for item in compiled:
        cv = autoif.cross_validate(
            item["instruction"], item["functions"], [(text, bool(label)) for text, label in item["cases"]], sandbox,
            min_functions=cfg.min_functions, min_cases=cfg.min_cases, min_accuracy=cfg.min_accuracy,
        )  # fmt: skip
        if cv.dropped is not None:
            if len(cv.functions) < cfg.min_functions:
                reason = f"fewer than {cfg.min_functions} distinct compiling functions"
            elif len(cv.cases) < cfg.min_cases:
                reason = f"fewer than {cfg.min_cases} distinct test cases"
            else:
                reason = f"no function reaches accuracy {cfg.min_accuracy:g}"
            step.drop(reason, f"{item['instruction']}: {cv.dropped}")
            continue
        step.keep(item["instruction"])
        functions_kept, cases_kept = functions_kept + len(cv.kept), cases_kept + len(cv.kept_cases)
        kept.append({"instruction": item["instruction"], "functions": [f for f, _ in cv.kept], "accuracy": [a for _, a in cv.kept], "cases": [list(c) for c in cv.kept_cases]})
    step.note = f"{functions_kept} functions and {cases_kept} cases kept"
    return kept


def _back_translate(checks: list[dict[str, Any]], teacher: Teacher, step: Step) -> list[dict[str, Any]]:
    step.count_in = len(checks)
    asks = [(i, f) for i, c in enumerate(checks) for f in c["functions"][:3]]
    restated = [r[0].text.strip() for r in teacher.ask([BACK_PROMPT.format(function=f) for _, f in asks], what="back-translate", max_new_tokens=96)]
    judged = teacher.ask([JUDGE_PROMPT.format(a=checks[i]["instruction"], b=b) for (i, _), b in zip(asks, restated)], what="consistency", max_new_tokens=16)
    verdicts: dict[int, list[tuple[str, bool | None]]] = {}
    for (i, _), back, judgement in zip(asks, restated, judged):
        verdicts.setdefault(i, []).append((back, autoif.parse_contradiction(judgement[0].text)))
    kept, unclear = [], 0
    for i, check in enumerate(checks):
        pairs = verdicts.get(i, [])
        unclear += sum(v is None for _, v in pairs)
        contradicting = [b for b, v in pairs if v is True]
        if contradicting:
            step.drop("a restatement contradicts it", f"{check['instruction']}\n  restated: {contradicting[0]}")
            continue
        step.keep(check["instruction"])
        kept.append({**check, "back_translations": [b for b, _ in pairs]})
    step.note = f"{len(asks)} restatements judged, {unclear} judgements neither yes nor no (not a contradiction)"
    return kept


def _queries(cfg: AutoIFConfig, checks: list[dict[str, Any]], query_pool: list[str], step: Step) -> list[dict[str, Any]]:
    step.count_in = len(checks) * cfg.queries_per_instruction
    prompts = []
    for index, check in enumerate(checks):
        rng = random.Random(f"{cfg.seed}:queries:{check['instruction']}")
        for query in rng.sample(query_pool, min(cfg.queries_per_instruction, len(query_pool))):
            text = autoif.compose(query, check["instruction"])
            prompts.append({"check": index, "query": query, "prompt": text})
            step.keep(text)
    for _ in range(step.count_in - len(prompts)):
        step.drop("fewer queries than queries_per_instruction")
    return prompts


def _responses(cfg: AutoIFConfig, prompts: list[dict[str, Any]], student: Teacher, step: Step) -> list[dict[str, Any]]:
    answers = student.ask(
        [p["prompt"] for p in prompts], what="responses", n=cfg.responses_per_query, temperature=cfg.response_temperature,
        max_new_tokens=cfg.response_max_new_tokens, seed=cfg.seed,
    )  # fmt: skip
    out = []
    for p, replies in zip(prompts, answers):
        for reply in replies:
            step.count_in += 1
            if not reply.text.strip():
                step.drop("empty")
            elif reply.truncated:
                step.drop("cut at max_new_tokens", reply.text)
            else:
                step.keep(reply.text)
                out.append({**p, "response": reply.text})
    return out


def _verify(cfg: AutoIFConfig, checks: list[dict[str, Any]], responses: list[dict[str, Any]], sandbox: Sandbox, step: Step) -> list[dict[str, Any]]:
    step.count_in = len(responses)
    by_check: dict[int, list[int]] = {}
    for index, r in enumerate(responses):
        by_check.setdefault(r["check"], []).append(index)
    jobs = [(f, [responses[i]["response"] for i in idx]) for c, idx in by_check.items() for f in checks[c]["functions"]]
    results = iter(sandbox.run_many(jobs))
    rates: dict[int, float] = {}
    for c, idx in by_check.items():
        per_function = [next(results) for _ in checks[c]["functions"]]
        rates.update(zip(idx, autoif.pass_rates(per_function)))
    out = []
    for index, r in enumerate(responses):
        rate = rates[index]
        out.append({**r, "pass_rate": rate, "kept": rate > cfg.min_pass_rate})
        if rate > cfg.min_pass_rate:
            step.keep(r["response"])
        else:
            step.drop("no function passes it" if rate == 0 else f"pass rate {rate:.2f}, not above {cfg.min_pass_rate}", r["response"])
    return out


def _quality(cfg: AutoIFConfig, verified: list[dict[str, Any]], teacher: Teacher, step: Step) -> list[dict[str, Any]]:
    candidates = [i for i, r in enumerate(verified) if r["kept"]]
    step.count_in = len(candidates)
    prompts = []
    for i in candidates:
        r = verified[i]
        prompts.append(QUALITY_PROMPT.format(instruction=r["prompt"], query=r["query"], response=r["response"]))
    replies = teacher.ask(prompts, what="quality", max_new_tokens=192)
    out = [dict(r) for r in verified]
    for i, reply in zip(candidates, replies):
        score = autoif.parse_score(reply[0].text)
        out[i]["quality"] = score
        if score is None:
            out[i]["kept"] = False
            step.drop("no Score: N in the judgement", reply[0].text)
        elif score < cfg.quality_min:
            out[i]["kept"] = False
            step.drop(f"score below {cfg.quality_min:g}", out[i]["response"])
        else:
            step.keep(out[i]["response"])
    return out


def write_outputs(
    cfg: AutoIFConfig, root: Path, checks: list[dict[str, Any]], prompts: list[dict[str, Any]], verified: list[dict[str, Any]], funnel: Funnel
) -> dict[str, int]:
    library = [
        CodeCheck(
            id=check_id(c["instruction"], c["functions"]), instruction=c["instruction"], functions=c["functions"],
            cases=[{"input": t, "output": bool(o)} for t, o in c["cases"]], accuracy=c["accuracy"],
            provenance={"source": "posttrain synth autoif", "teacher": cfg.teacher, "back_translations": c.get("back_translations", [])},
        )  # fmt: skip
        for c in checks
    ]
    write_library(root / "verifiers.jsonl", library)
    verifiable = [
        {"key": i, "prompt": p["prompt"], "instruction_id_list": [library[p["check"]].id], "kwargs": [{}]} for i, p in enumerate(prompts)
    ]
    write_jsonl(root / "prompts.jsonl", verifiable)
    sft, seen = [], set()
    for r in verified:
        if r["kept"] and (r["prompt"], r["response"]) not in seen:
            seen.add((r["prompt"], r["response"]))
            meta = {"instruction_id": library[r["check"]].id, "pass_rate": r["pass_rate"], **({"quality": r["quality"]} if "quality" in r else {})}
            sft.append({"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}], "meta": meta})
    write_jsonl(root / "sft.jsonl", sft)
    step = funnel.step("dpo pairs", "prompts", len(prompts))
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for r in verified:
        by_prompt.setdefault(r["prompt"], []).append(r)
    dpo, rng = [], random.Random(f"{cfg.seed}:dpo")
    for p in prompts:
        scored = [(r["response"], r["pass_rate"]) for r in by_prompt.get(p["prompt"], [])]
        pairs = autoif.dpo_pairs(scored, rng)
        if not pairs:
            has_good = any(rate >= autoif.CHOSEN_MIN_RATE for _, rate in scored)
            step.drop("no response passes half the functions" if not has_good else "no response fails every function", p["prompt"])
            continue
        step.keep(p["prompt"])
        meta = {"instruction_id": library[p["check"]].id}
        dpo += [
            {"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}], "meta": meta}  # fmt: skip
            for c, r in pairs
        ]
    step.note = f"{len(dpo)} pairs"
    write_jsonl(root / "dpo.jsonl", dpo)
    return {"verifiers": len(library), "prompts": len(verifiable), "sft": len(sft), "dpo": len(dpo)}
