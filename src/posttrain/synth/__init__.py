"""Synthesised data: responses sampled from a model and turned into training records.

- :mod:`~posttrain.synth.label`: preference pairs from K samples per prompt, labelled by the verifiers
  (AutoIF's online DPO) or by a reward model; also the prompt reader that GRPO shares.
"""

from posttrain.synth.label import LabelSummary, Prompt, label_file, label_prompts, read_prompts

__all__ = ["LabelSummary", "Prompt", "label_file", "label_prompts", "read_prompts"]
