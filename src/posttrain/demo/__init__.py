"""``posttrain demo``: AutoIF-style self-alignment of a small model on CPU, from verifiable prompts to a report."""
