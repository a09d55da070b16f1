"""Synthesised data: responses sampled from a model and turned into training records.

- :mod:`~posttrain.synth.label`: preference pairs from K samples per prompt, labelled by the verifiers
  (AutoIF's online DPO) or by a reward model.

The prompts they sample from are read by :mod:`posttrain.data.prompts`.
"""

from posttrain.synth.label import LabelSummary, label_file, label_prompts

__all__ = ["LabelSummary", "label_file", "label_prompts"]
