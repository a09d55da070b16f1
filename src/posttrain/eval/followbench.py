"""FollowBench's multi-level protocol and metrics (Jiang et al., 2024, arXiv 2310.20410), built on posttrain's verifiers.

A group is one query asked at levels 1..L, level k carrying k constraints; each response gets one pass/fail
per constraint. With ``s[level][j]`` the j-th constraint's verdict at that level:

* **HSR** (hard satisfaction rate) at a level: the share of groups whose response at that level meets
  every constraint;
* **SSR** (soft satisfaction rate) at a level: the share of all constraints met, over the groups;
* **CSL** (consistent satisfaction levels): per group, how many levels in a row from level 1 are met
  whole (all constraints), averaged over groups.

:func:`build_levels` makes the groups and :func:`run_followbench` answers and scores them. Own code, not
FollowBench's: its data mixes rule-checked constraints with ones an LLM judges, in categories of its own;
ours are only rule-checked IFEval-type constraints (:mod:`posttrain.synth.verifiable`'s types, checked by
:mod:`posttrain.verify.ifeval`), added one per level to posttrain's everyday queries as FollowBench adds
one per level to its seeds, so the protocol and metrics are the paper's and the figures are not comparable
to its tables. Scoring goes through the verifier registry, so a group may also name code verifiers
(:mod:`posttrain.verify.code`, once their library is registered): :func:`run_followbench` scores them like
any id. :func:`build_levels` draws only from the IFEval types, because only those come with phrasings, kwargs
samplers and a conflict table.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from posttrain.eval.results import Metric, Results, mean_metric
from posttrain.synth import verifiable as vp
from posttrain.synth.teacher import Teacher
from posttrain.verify.scoring import PromptRecord, prefetch, score_response

Group = Mapping[int, Sequence[bool]]  # level -> one verdict per constraint at that level


def hsr(groups: Sequence[Group], level: int) -> float:
    rows = [g[level] for g in groups if level in g]
    return sum(all(r) for r in rows) / len(rows) if rows else float("nan")


def ssr(groups: Sequence[Group], level: int) -> float:
    verdicts = [v for g in groups if level in g for v in g[level]]
    return sum(verdicts) / len(verdicts) if verdicts else float("nan")


def csl(group: Group) -> int:
    """Levels met whole in a row from level 1."""
    count = 0
    for level in sorted(group):
        if level != count + 1 or not all(group[level]):
            break
        count += 1
    return count


def mean_csl(groups: Sequence[Group]) -> float:
    return sum(csl(g) for g in groups) / len(groups) if groups else float("nan")


# -- building the levels -------------------------------------------------------------------------


@cache
def _completable(chosen: frozenset[str], needed: int) -> bool:
    """Whether ``needed`` more instruction types, conflicting with none of ``chosen`` nor each other, exist."""
    if needed <= 0:
        return True
    free = [t for t in vp.TYPE_BY_ID if not any(vp.conflicts(t, c) for c in chosen)]
    return len(free) >= needed and any(_completable(chosen | {t}, needed - 1) for t in free)


def build_levels(n_queries: int, levels: int = 5, *, split: vp.Split = "heldout", seed: int = 0) -> list[dict[str, Any]]:
    """``n_queries`` groups: a query of ``split`` asked at levels 1..``levels``, level k with the first k of its constraints.

    Each group gets ``levels`` instruction types, no two conflicting (:func:`posttrain.synth.verifiable.conflicts`),
    each a least-used type so far (ties broken at random) among those that still leave room for the rest, then
    put in order, each level taking the type least used at that level so far. Each constraint is phrased once (a phrasing of
    ``split``, used in turn as :func:`~posttrain.synth.verifiable.build_prompts` does, kwargs sampled clear of
    the earlier constraints' words), so level k+1's prompt is level k's plus one sentence. Queries come in a
    seeded shuffled order (reused in turn past the split's size). A group is ``{"id", "split", "query",
    "levels"}``, ``levels[k - 1]`` an IFEval-format record (``key`` ``f"{id}-L{k}"``, ``prompt``,
    ``instruction_id_list``, ``kwargs``, plus ``level``) that :class:`PromptRecord` reads. Deterministic for
    a seed; a build of n groups is the first n of any longer build.
    """
    problems = []
    if split not in vp.SPLITS:
        problems.append(f"split must be one of {vp.SPLITS}, got {split!r}")
    if n_queries < 0:
        problems.append(f"n_queries must be >= 0, got {n_queries}")
    if levels < 1:
        problems.append(f"levels must be >= 1, got {levels}")
    elif not _completable(frozenset(), levels):
        problems.append(f"levels={levels}: no {levels} instruction types are free of conflicts with each other")
    if problems:
        raise ValueError("build_levels: " + "; ".join(problems))

    rng = random.Random(f"posttrain-followbench:{split}:{seed}")  # a str seed hashes the same everywhere
    pool = list(vp.split_queries()[split])
    rng.shuffle(pool)
    uses = Counter({t: 0 for t in vp.TYPE_BY_ID})
    at_level = [Counter({t: 0 for t in vp.TYPE_BY_ID}) for _ in range(levels)]
    turn = {t: rng.randrange(len(kind.phrasings(split))) for t, kind in vp.TYPE_BY_ID.items()}
    groups = []
    for index in range(n_queries):
        query = pool[index % len(pool)]
        picked: list[str] = []
        for slot in range(levels):
            allowed = [
                t for t in vp.TYPE_BY_ID
                if not any(vp.conflicts(t, p) for p in picked) and _completable(frozenset((*picked, t)), levels - slot - 1)
            ]  # fmt: skip
            low = min(uses[t] for t in allowed)
            picked.append(rng.choice([t for t in allowed if uses[t] == low]))
            uses[picked[-1]] += 1
        # The set is chosen for balance overall; its order for balance per level. Without this, types that conflict
        # with many (JSON) are least used whenever a group starts, and level 1 would be mostly them.
        for slot in range(levels):
            low = min(at_level[slot][t] for t in picked[slot:])
            pick = rng.choice([t for t in picked[slot:] if at_level[slot][t] == low])
            picked.remove(pick)
            picked.insert(slot, pick)
            at_level[slot][pick] += 1
        phrases, all_kwargs, avoid = [], [], frozenset[str]()
        for type_id in picked:
            kind = vp.TYPE_BY_ID[type_id]
            kwargs = kind.sample(rng, query, avoid)
            avoid |= vp.kwarg_words(kwargs)
            phrasings = kind.phrasings(split)
            phrases.append(vp.render(phrasings[turn[type_id] % len(phrasings)], kwargs))
            turn[type_id] += 1
            all_kwargs.append(kwargs)
        group_id = f"fb-{split}-{seed}-{index:04d}"
        records = [
            {
                "key": f"{group_id}-L{k}",
                "level": k,
                "prompt": " ".join([query, *phrases[:k]]),
                "instruction_id_list": picked[:k],
                "kwargs": all_kwargs[:k],
            }
            for k in range(1, levels + 1)
        ]
        groups.append({"id": group_id, "split": split, "query": query, "levels": records})
    return groups


# -- answering and scoring -----------------------------------------------------------------------


def run_followbench(
    teacher: Teacher, model_name: str, groups: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 256, limit: int | None = None
) -> Results:
    """Greedy answers from ``teacher`` (one model; merge several models' Results yourself) to every level of the first
    ``limit`` groups, each constraint checked by its verifier, and FollowBench's metrics over them.

    Verdicts are strict (the response as given, FollowBench's rule check); loose ones (IFEval's) are kept in
    the items. Per level: HSR and SSR in percent, each with a 95% bootstrap interval over groups (a group's
    HSR is 0 or 1, its SSR the share of its constraints met: FollowBench's pooled SSR when every group has k
    constraints at level k, as :func:`build_levels` makes them). Headline: HSR and SSR averaged over levels
    (per group, then over groups) and mean CSL, each with its interval. Answers are cached by ``teacher``,
    so a second run asks for nothing it has.
    """
    chosen = list(groups if limit is None else groups[:limit])
    if not chosen:
        raise ValueError("run_followbench: no groups to run")
    asked = [(group, level, PromptRecord.model_validate(record)) for group in chosen for level, record in enumerate(group["levels"], 1)]
    replies = [r[0] for r in teacher.ask([p.prompt for _, _, p in asked], what="followbench answers", max_new_tokens=max_new_tokens)]
    prefetch((record, reply.text) for (_, _, record), reply in zip(asked, replies))  # code verifiers: one sandbox round trip

    verdicts: dict[str, dict[int, list[bool]]] = {group["id"]: {} for group in chosen}
    items = []
    for (group, level, record), reply in zip(asked, replies):
        score = score_response(record, reply.text)
        verdicts[group["id"]][level] = [s.strict for s in score.instructions]
        items.append({
            "model": model_name, "group": group["id"], "key": record.key, "level": level, "prompt": record.prompt, "response": reply.text,
            "truncated": reply.truncated, "instruction_id_list": record.instruction_id_list, "kwargs": record.kwargs,
            "strict": [s.strict for s in score.instructions], "loose": [s.loose for s in score.instructions],
            "reasons": [s.reason for s in score.instructions], "followed_all": score.strict,
        })  # fmt: skip

    scored = list(verdicts.values())
    top = max(level for g in scored for level in g)
    per_level: dict[str, dict[str, Metric]] = {}
    for level in range(1, top + 1):
        rows = [g[level] for g in scored if level in g]
        per_level[f"level {level}"] = {
            "HSR": mean_metric([float(all(r)) for r in rows], scale=100),
            "SSR": mean_metric([sum(r) / len(r) for r in rows], scale=100),
        }
    headline = {
        "HSR (mean over levels)": mean_metric([sum(all(r) for r in g.values()) / len(g) for g in scored], scale=100),
        "SSR (mean over levels)": mean_metric([sum(sum(r) / len(r) for r in g.values()) / len(g) for g in scored], scale=100),
        "CSL": mean_metric([csl(g) for g in scored]),
    }
    splits = sorted({str(group.get("split", "unknown")) for group in chosen})
    cut = sum(reply.truncated for reply in replies)
    return Results(
        benchmark="followbench",
        settings={
            "model": model_name,
            "groups": len(chosen),
            "levels": top,
            "split": splits,
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
        },
        models={model_name: headline},
        groups={model_name: per_level},
        items=items,
        notes=[
            (
                "FollowBench's protocol and metrics (Jiang et al., 2024), not its data: the constraints are posttrain's rule-checked "
                "IFEval-type verifiers, one more per level, so the figures are not comparable to the paper's."
            ),
            f"Queries: the {' and '.join(splits)} split of posttrain's built-in everyday queries (synth/data/queries.txt), with its phrasings.",
            (
                f"Verdicts are strict (the response as given); loose verdicts are in the items. Intervals: 95% bootstrap over the {len(chosen)} "
                f"groups. {cut} of {len(replies)} answers were cut at max_new_tokens={max_new_tokens}."
            ),
        ],
        plot_metric="HSR",
    )
