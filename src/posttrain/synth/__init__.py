"""Synthesised data: verifiable prompts built from tables, and responses sampled from a model turned into training records.

- :mod:`~posttrain.synth.verifiable`: verifiable prompts, everyday queries x instructions the verifiers
  check, split so that held-out prompts use queries and phrasings never trained on.
- :mod:`~posttrain.synth.label`: preference pairs from K samples per prompt, labelled by the verifiers
  (AutoIF's online DPO) or by a reward model.

The prompts they sample from are read by :mod:`posttrain.data.prompts`.
"""

from posttrain.synth.label import LabelSummary, label_file, label_prompts

__all__ = ["LabelSummary", "label_file", "label_prompts"]
