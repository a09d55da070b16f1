"""FollowBench's metrics over multi-level prompts: HSR, SSR and CSL (Jiang et al., 2024).

A group is one query asked at levels 1..L, level k carrying k constraints; each response gets one pass/fail
per constraint. With ``s[level][j]`` the j-th constraint's verdict at that level:

* **HSR** (hard satisfaction rate) at a level: the share of groups whose response at that level meets
  every constraint;
* **SSR** (soft satisfaction rate) at a level: the share of all constraints met, over the groups;
* **CSL** (consistent satisfaction levels): per group, how many levels in a row from level 1 are met
  whole (all constraints), averaged over groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
