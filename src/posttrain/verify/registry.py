"""Verifiers by id: ``get("punctuation:no_comma")``, ``get("keywords:frequency", keyword="ai", ...)``."""

from __future__ import annotations

import difflib
from typing import Any

from posttrain.verify.base import Verifier
from posttrain.verify.ifeval import IFEVAL_VERIFIERS

_VERIFIERS: dict[str, type[Verifier]] = {}


class UnknownVerifierError(KeyError):
    """An id no verifier is registered under; the message suggests the nearest ids."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0])


def register(cls: type[Verifier]) -> type[Verifier]:
    """Add a verifier class under its ``id`` (usable as a decorator); ids must be unique."""
    verifier_id = getattr(cls, "id", None)
    if not isinstance(verifier_id, str) or not verifier_id:
        raise TypeError(f"{cls.__name__} has no id")
    existing = _VERIFIERS.get(verifier_id)
    if existing is not None and existing is not cls:
        raise ValueError(f"verifier id {verifier_id!r} is taken by {existing.__name__}")
    _VERIFIERS[verifier_id] = cls
    return cls


def verifier_class(verifier_id: str) -> type[Verifier]:
    try:
        return _VERIFIERS[verifier_id]
    except KeyError:
        near = difflib.get_close_matches(verifier_id, list(_VERIFIERS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else f"; known ids: {', '.join(all_ids())}"
        raise UnknownVerifierError(f"unknown verifier id {verifier_id!r}{hint}") from None


def get(verifier_id: str, /, **kwargs: Any) -> Verifier:
    """The verifier registered as ``verifier_id``, built from ``kwargs`` (``None`` values dropped, others validated)."""
    return verifier_class(verifier_id)(**kwargs)


def all_ids() -> list[str]:
    return sorted(_VERIFIERS)


for _cls in IFEVAL_VERIFIERS:
    register(_cls)
