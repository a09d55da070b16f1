"""A torchrun entry point that runs ``posttrain.cli`` and records every collective this process calls.

    python -m torch.distributed.run ... tests/collective_probe.py sft --config CFG.yaml

Each call of a ``torch.distributed`` collective made through the module's functions (ours, DDP's Python
side, FSDP2's all-gathers and reduce-scatters, torch.distributed.checkpoint's object gathers) is
recorded as ``[name, device of its tensors or null]``; at exit the list goes to
``$POSTTRAIN_PROBE_DIR/rank-<RANK>.json`` with the device the group's tensors must live on (the CUDA
device under NCCL, the CPU under gloo). Tests compare the ranks' lists (the same calls in the same
order) and check every device.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier", "all_gather_single", "reduce_scatter_single",
    "all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
    "_broadcast_coalesced",  # DDP's buffer broadcast before each forward, when it is on
)  # fmt: skip

calls: list[list[str | None]] = []


def _devices(args, kwargs) -> str | None:
    found = set()
    for value in [*args, *kwargs.values()]:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.Tensor):
                found.add(item.device.type)
    return ",".join(sorted(found)) or None


def _record(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls.append([name, _devices(args, kwargs)])
        return fn(*args, **kwargs)

    return wrapper


for _name in COLLECTIVES:
    setattr(dist, _name, _record(_name, getattr(dist, _name)))


def _write() -> None:
    out = Path(os.environ["POSTTRAIN_PROBE_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.json"
    group_device = "cuda" if torch.cuda.is_available() else "cpu"
    out.write_text(json.dumps({"group_device": group_device, "calls": calls}))


atexit.register(_write)

if __name__ == "__main__":
    from posttrain.cli import main

    sys.argv = ["posttrain", *sys.argv[1:]]
    main()
