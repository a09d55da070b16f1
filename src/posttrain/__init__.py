"""posttrain: instruction tuning end to end."""
