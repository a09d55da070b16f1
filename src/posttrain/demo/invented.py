"""Invented instructions in the loop: the code verifiers ``posttrain synth autoif`` made, in the pipeline's prompts.

With ``synth.autoif`` set to what ``posttrain synth autoif`` wrote (its output directory, or the
``verifiers.jsonl`` in it), the pipeline adds ``synth.n_train`` training prompts that pair the pipeline's
training queries with those instructions, and builds an ``invented`` evaluation split from the
development queries and the same instructions (the instructions were invented for training, so that
split measures following them on queries never trained on: development, not test). Each prompt names its
instruction's verifier id (``code:...``), so sampling, labelling, GRPO rewards and evaluation all check it
by running the model-written functions in the sandbox (:mod:`posttrain.verify.code`). The report lists
each verifier with where it came from (its provenance: the teacher that wrote it) and each model's pass
rate on it.

Own code: composing prompts from a verifier library is a few lines over :mod:`posttrain.synth.verifiable`'s queries.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from posttrain.verify.code import CodeCheck, load_library


def library_path(source: str | Path) -> Path:
    """The verifier library of a ``posttrain synth autoif`` run: ``source`` itself, or ``source/verifiers.jsonl``."""
    path = Path(source)
    found = path / "verifiers.jsonl" if path.is_dir() else path
    if not found.is_file():
        raise FileNotFoundError(
            f"synth.autoif: {source}: neither a verifier library nor a directory holding verifiers.jsonl (run `posttrain synth autoif`)"
        )
    return found


def load_checks(source: str | Path) -> list[CodeCheck]:
    """The library's verifiers, in file order; an empty library is an error (nothing to add)."""
    path = library_path(source)
    checks = load_library(path)
    if not checks:
        raise ValueError(f"synth.autoif: {path} holds no verifiers (every instruction was dropped by cross-validation?)")
    return checks


def invented_prompts(checks: list[CodeCheck], split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` IFEval-format prompts: queries of ``split`` (``train`` or ``heldout``), each with one invented instruction.

    Instructions are used in turn (each as often as the others, give or take one); queries in a seeded
    shuffled order, so the same arguments give the same records.
    """
    from posttrain.synth.verifiable import split_queries

    rng = random.Random(f"posttrain-invented:{split}:{seed}")
    queries = list(split_queries()[split])  # type: ignore[index]
    rng.shuffle(queries)
    order = list(range(len(checks)))
    rng.shuffle(order)
    records = []
    for index in range(n):
        check = checks[order[index % len(order)]]
        records.append(
            {
                "key": f"autoif-{split}-{seed}-{index:04d}",
                "prompt": f"{queries[index % len(queries)]} {check.instruction.strip()}",
                "instruction_id_list": [check.id],
                "kwargs": [{}],
            }
        )
    return records


def source_of(check: CodeCheck) -> str:
    """Where a verifier came from, in a few words: its provenance's teacher (the model that wrote it) and source."""
    p = check.provenance
    parts = [str(p[k]) for k in ("teacher", "source") if p.get(k)]
    return " · ".join(parts) or "unknown"


def verifier_rows(checks: list[CodeCheck], scores: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per verifier: id, instruction, source, prompts, and each model's loose pass rate on the ``invented`` split."""
    rows = []
    for check in checks:
        per_model = {label: s.get("invented", {}).get("per_type", {}).get(check.id) for label, s in scores.items()}
        count = next((v["count"] for v in per_model.values() if v), 0)
        rows.append(
            {
                "id": check.id,
                "instruction": check.instruction,
                "source": source_of(check),
                "prompts": count,
                "loose": {label: v["loose"] if v else None for label, v in per_model.items()},
            }
        )
    return rows
