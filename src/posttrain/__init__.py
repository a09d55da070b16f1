"""posttrain: instruction tuning end to end."""

import os

# oneDNN (torch's CPU bf16 matmuls) keeps a compiled primitive, with its buffers, for each of the last
# 1,024 shapes it met. Training meets a new shape with each row width, so over a DPO epoch that cache
# held ~350 MB; 256 shapes keep it to ~120 MB at the same speed (machine F in docs/PERFORMANCE.md). Set
# before the first matmul; a value the user set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
