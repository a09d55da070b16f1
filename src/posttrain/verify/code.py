"""Verifiers whose check is model-written code: AutoIF's ``evaluate(response) -> bool`` functions, run in the sandbox.

A :class:`CodeCheck` is one instruction with the functions that check it (those that survived
cross-validation), their test cases, their accuracies and where they came from. A verifier library is a
JSONL file of them (``posttrain synth autoif`` writes ``verifiers.jsonl``); :func:`load_library`
registers each under its id (``code:<12 hex digits>``, a hash of the instruction and functions), so a
verifiable prompt (IFEval's record format) names it in ``instruction_id_list`` like any IFEval type, and
``label --verifiers``, GRPO's ``grpo.verifiers``, ``eval ifeval --verifiers`` and the pipeline's
``prompts.verifiers`` all judge with the same object.

Verdict: a response follows the instruction when **more than half** of the functions return ``True``
(AutoIF's paper keeps responses whose pass rate is above 0.5; a function that raises, times out or
returns a non-bool counts as not ``True``). Functions run in :mod:`posttrain.verify.sandbox` (one
process-wide pool, :func:`sandbox`); verdicts are memoised per response, and
:meth:`CodeVerifier.check_many` checks many responses in one sandbox round trip (IFEval's loose scoring
asks about eight variants of each response).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from posttrain.data.sources import read_jsonl
from posttrain.verify.base import NoKwargs, Verdict, Verifier
from posttrain.verify.registry import register, verifier_class
from posttrain.verify.sandbox import Limits, Sandbox

PASS_SHARE = 0.5  # a response passes when the share of functions returning True is above this
MEMO_LIMIT = 100_000  # verdicts remembered per verifier before the memo starts over


class Case(BaseModel):
    """A test case: an input and whether it follows the instruction."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    input: str
    output: bool


class CodeCheck(BaseModel):
    """One line of a verifier library."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=r"^code:[A-Za-z0-9_.-]+$")
    instruction: str = Field(min_length=1)
    functions: list[str] = Field(min_length=1)
    cases: list[Case] = Field(default_factory=list)
    accuracy: list[float] | None = None  # each function's accuracy on the kept cases
    provenance: dict[str, Any] = Field(default_factory=dict)


def check_id(instruction: str, functions: Sequence[str]) -> str:
    """``code:`` and 12 hex digits of the SHA-256 of the instruction and its functions."""
    digest = hashlib.sha256(json.dumps([instruction, list(functions)]).encode()).hexdigest()
    return f"code:{digest[:12]}"


# -- the shared sandbox -------------------------------------------------------------------------

_sandbox: Sandbox | None = None
_settings: dict[str, Any] = {}
_lock = threading.Lock()


def configure(*, unsafe_exec: bool = False, timeout_s: float | None = None, workers: int = 0) -> None:
    """Settings for the process-wide sandbox (before its first use; a change closes the running one)."""
    global _sandbox
    with _lock:
        _settings.update(unsafe_exec=unsafe_exec, timeout_s=timeout_s, workers=workers)
        if _sandbox is not None:
            _sandbox.close()
            _sandbox = None


def sandbox() -> Sandbox:
    """The process-wide sandbox that code verifiers run in, started on first use and closed at exit."""
    global _sandbox
    with _lock:
        if _sandbox is None:
            limits = Limits(timeout_s=_settings["timeout_s"]) if _settings.get("timeout_s") else Limits()
            _sandbox = Sandbox(workers=_settings.get("workers", 0), limits=limits, unsafe_exec=_settings.get("unsafe_exec", False))
            atexit.register(_sandbox.close)
        return _sandbox


# -- the verifier -------------------------------------------------------------------------------


class CodeVerifier(Verifier[NoKwargs]):
    """A verifier whose check is :attr:`spec`'s functions; one subclass per library line (:func:`verifier_for`)."""

    spec: ClassVar[CodeCheck]
    _memo: ClassVar[dict[str, Verdict]]

    def description(self) -> str:
        return self.spec.instruction

    def check(self, response: str) -> Verdict:
        return self.check_many([response])[0]

    def check_many(self, responses: Sequence[str]) -> list[Verdict]:
        memo = type(self)._memo
        todo = list(dict.fromkeys(r for r in responses if r not in memo))
        if todo:
            if len(memo) + len(todo) > MEMO_LIMIT:
                memo.clear()
            per_function = sandbox().run_many([(function, todo) for function in self.spec.functions])
            for index, response in enumerate(todo):
                memo[response] = verdict([results[index] for results in per_function])
        return [memo[r] for r in responses]


def verdict(results: Sequence[Any]) -> Verdict:
    """The verdict from each function's :class:`~posttrain.verify.sandbox.CheckResult` on one response."""
    passed = sum(r.passed for r in results)
    errors = [r.error for r in results if r.error]
    reason = f"{passed} of {len(results)} functions return True (needs more than {PASS_SHARE:.0%})"
    if errors:
        reason += f"; {len(errors)} failed, first: {errors[0]}"
    return Verdict(passed > PASS_SHARE * len(results), reason)


def verifier_for(spec: CodeCheck) -> type[CodeVerifier]:
    """A :class:`CodeVerifier` subclass for ``spec``, registered under ``spec.id`` (the same class again for the same spec)."""
    clash = _clash(spec)
    if clash:
        raise ValueError(clash)
    try:
        return verifier_class(spec.id)  # type: ignore[return-value]  # the same check, registered before
    except KeyError:
        pass
    cls = type(f"CodeVerifier_{spec.id[5:]}", (CodeVerifier,), {"id": spec.id, "spec": spec, "_memo": {}})
    register(cls)
    return cls


def load_library(path: str | Path) -> list[CodeCheck]:
    """Read a verifier library and register every check in it; every bad line is reported at once, with its number.

    Nothing is registered unless the whole file is good.
    """
    checks, problems = [], []
    for item in read_jsonl(Path(path)):
        if item.problem is not None:
            problems.append(str(item.problem))
            continue
        try:
            spec = CodeCheck.model_validate(item.value)
        except ValidationError as error:
            for e in error.errors():
                field = ".".join(str(p) for p in e["loc"]) or "(line)"
                problems.append(f"{item.location}: field '{field}': {e['msg']}")
            continue
        clash = _clash(spec)
        if clash:
            problems.append(f"{item.location}: {clash}")
            continue
        checks.append(spec)
    if problems:
        raise ValueError(f"{len(problems)} problems in verifier library {path}:\n" + "\n".join(problems[:20]))
    for spec in checks:
        verifier_for(spec)
    return checks


def _clash(spec: CodeCheck) -> str | None:
    try:
        existing = verifier_class(spec.id)
    except KeyError:
        return None
    same = issubclass(existing, CodeVerifier) and existing.spec.instruction == spec.instruction and existing.spec.functions == spec.functions
    return None if same else f"verifier id {spec.id} is already registered for another check"


def load_libraries(paths: Sequence[str | Path]) -> list[CodeCheck]:
    return [spec for path in paths for spec in load_library(path)]


def write_library(path: str | Path, checks: Sequence[CodeCheck]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for spec in checks:
            f.write(json.dumps(spec.model_dump(), ensure_ascii=False) + "\n")
