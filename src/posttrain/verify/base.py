"""The verifier contract: one programmatic check per instruction type.

A verifier is built from typed, validated keyword arguments (its *kwargs*, IFEval's name for them),
says what it asks for (:meth:`Verifier.description`, the instruction text a prompt carries) and judges
a response (:meth:`Verifier.check` → :class:`Verdict`, with the measured reason). The same object
filters synthetic data, labels preference pairs, rewards RL and scores evaluation.

Kwargs arrive as IFEval's data writes them: one dict per instruction holding every kwarg of every
instruction type, the unused ones ``None``. ``None`` values are dropped before validation; anything
else a verifier does not take is an error, and all problems are reported at once.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement: ``passed``, and ``reason`` saying what was measured against what."""

    passed: bool
    reason: str


class Kwargs(BaseModel):
    """Base of every verifier's kwargs model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoKwargs(Kwargs):
    """For verifiers that take no arguments."""


class VerifierKwargsError(ValueError):
    """Kwargs a verifier cannot be built from; the message lists every problem."""

    def __init__(self, verifier_id: str, problems: list[str], accepted: list[str]) -> None:
        self.verifier_id = verifier_id
        self.problems = problems
        takes = ", ".join(accepted) if accepted else "no kwargs"
        super().__init__(f"{verifier_id}: invalid kwargs: " + "; ".join(problems) + f" (it takes: {takes})")


K = TypeVar("K", bound=Kwargs)

#: IFEval's two comparisons. "less than" is ``<``, "at least" is ``>=``.
Relation = Literal["less than", "at least"]
RELATIONS: tuple[Relation, ...] = ("less than", "at least")


def compare(count: int, relation: Relation, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


class Verifier(ABC, Generic[K]):
    """One instruction type's check, configured by validated kwargs.

    Subclasses set ``id`` (``"group:name"``, IFEval's ids for IFEval's types) and ``Kwargs`` (a
    :class:`Kwargs` model), and implement :meth:`description` and :meth:`check`; those that take
    kwargs also implement :meth:`random_kwargs` so prompts can be built as IFEval built its own.
    Instruction types that depend on the prompt (repeating it, say) take what they need as a kwarg,
    as IFEval does (``prompt_to_repeat``).
    """

    id: ClassVar[str]
    Kwargs: ClassVar[type[Kwargs]] = NoKwargs

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs: K = self.validate_kwargs(kwargs)

    @classmethod
    def validate_kwargs(cls, kwargs: Mapping[str, Any]) -> K:
        """The typed kwargs model for ``kwargs``, ``None`` values dropped; :class:`VerifierKwargsError` if invalid."""
        given = {key: value for key, value in kwargs.items() if value is not None}
        try:
            return cls.Kwargs.model_validate(given)  # type: ignore[return-value]
        except ValidationError as error:
            problems = [_describe(problem) for problem in error.errors()]
            raise VerifierKwargsError(cls.id, problems, list(cls.Kwargs.model_fields)) from None

    @abstractmethod
    def description(self) -> str:
        """The instruction text that asks for what :meth:`check` verifies."""

    @abstractmethod
    def check(self, response: str) -> Verdict:
        """Judge ``response`` as it is (no stripping or other normalisation beyond the check's own)."""

    def check_many(self, responses: Sequence[str]) -> list[Verdict]:
        """:meth:`check` on each response; verifiers whose checks cost a round trip (code run in a sandbox) batch them."""
        return [self.check(response) for response in responses]

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        """Kwargs drawn as IFEval draws them when it builds a prompt; ``prompt`` for prompt-dependent types."""
        return {}

    @classmethod
    def build(cls, rng: random.Random, *, prompt: str | None = None) -> Self:
        """A verifier with random kwargs: ``build(rng).description()`` is a ready instruction."""
        return cls(**cls.random_kwargs(rng, prompt=prompt))

    def kwargs_dict(self) -> dict[str, Any]:
        """The kwargs as plain data, as they would be stored beside a prompt."""
        return self.kwargs.model_dump()

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.kwargs_dict().items())
        return f"{type(self).__name__}({args})"


def _describe(problem: Mapping[str, Any]) -> str:
    field = ".".join(str(part) for part in problem["loc"]) or "(kwargs)"
    kind = problem["type"]
    if kind == "extra_forbidden":
        return f"unexpected kwarg {field!r}"
    if kind == "missing":
        return f"missing kwarg {field!r}"
    return f"{field!r}: {problem['msg']} (got {problem['input']!r})"
