"""Verifiers: one programmatic check per instruction type.

The same verifier filters synthetic data, labels preference pairs, rewards RL and scores evaluation.

- :mod:`~posttrain.verify.base`: the :class:`Verifier` contract, :class:`Verdict`, typed kwargs.
- :mod:`~posttrain.verify.registry`: verifiers by id (``get``, ``all_ids``, ``register``).
- :mod:`~posttrain.verify.ifeval`: IFEval's 25 instruction types.
- :mod:`~posttrain.verify.text`: sentence splitting, word counting and tokenization, language detection.
- :mod:`~posttrain.verify.scoring`: a verifiable prompt's verifiers (``verifiers_of``), IFEval's strict and loose
  scoring and its accuracies.
"""

from posttrain.verify.base import Kwargs, Verdict, Verifier, VerifierKwargsError
from posttrain.verify.registry import UnknownVerifierError, all_ids, get, register, verifier_class
from posttrain.verify.scoring import (
    IFEvalScores,
    InstructionScore,
    PromptRecord,
    ResponseScore,
    aggregate,
    loose_variants,
    read_prompt_records,
    read_responses,
    score_response,
    score_responses,
    verifiers_of,
)

__all__ = [
    "IFEvalScores",
    "InstructionScore",
    "Kwargs",
    "PromptRecord",
    "ResponseScore",
    "UnknownVerifierError",
    "Verdict",
    "Verifier",
    "VerifierKwargsError",
    "aggregate",
    "all_ids",
    "get",
    "loose_variants",
    "read_prompt_records",
    "read_responses",
    "register",
    "score_response",
    "score_responses",
    "verifier_class",
    "verifiers_of",
]
