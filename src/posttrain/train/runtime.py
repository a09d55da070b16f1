"""Where a training loop runs and how its processes work together: the one seam every loop goes through.

A :class:`Runtime` owns what differs between one process on a laptop's CPU and eight on a GPU node:

* the **device**: ``train.device``, else ``cuda:LOCAL_RANK`` where CUDA is present, else the CPU;
* the **process group**: started from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``, which torchrun sets for one node or many; we only read them), with
  the backend ``cpu:gloo,cuda:nccl`` on GPUs (``gloo`` on a CPU-only build) and ``train.dist_timeout_s``;
  under torchrun the group is started even for one process, so a one-GPU run takes the same NCCL path
  as eight;
* **collectives on the group's device**: every tensor a loop reduces is made on :attr:`Runtime.device`
  (NCCL takes CUDA tensors only), and several numbers go in one call;
* **the same collectives on every rank**: :meth:`Runtime.balance` gives every rank as many micro-batches
  as the busiest one, the missing ones a zero-weight repeat, so DDP's gradient reduction, FSDP's
  all-gathers and reduce-scatters, and KTO's reference point are called the same number of times
  everywhere (a short last step or an uneven eval split would otherwise hang the job);
* **wrapping**: :meth:`Runtime.wrap` returns the step module under DDP, or shards it in place with
  FSDP2 (``fully_shard`` on each decoder layer, then on the step module as the root; bf16
  ``MixedPrecisionPolicy`` when autocast is on; gradients *summed* over processes on every backend, as
  gloo does whatever it is told, so the loss scale is :attr:`Runtime.gradient_scale`);
* **autocast** (bf16 on CPU and CUDA) and the **attention** used for packed rows.

Our own code: a few dozen lines over ``torch.distributed``, because the invariants above (one device
for collectives, the same calls on every rank, one loss scale) are what multi-GPU training gets wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from posttrain.models.load import decoder_layers

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its environment)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@dataclass
class Runtime:
    """This process's place in a run and the one way to talk to the other processes (see the module docstring)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bf16: bool = False
    distributed: str = "ddp"
    group: bool = False  # a process group is running (torchrun, even with one process)
    owns_group: bool = False

    # -- starting and stopping -----------------------------------------------------------------

    @classmethod
    def start(cls, train: Any = None) -> Runtime:
        """Read torchrun's environment and start the process group there; one process on its own otherwise.

        ``train`` is a ``TrainConfig`` (``device``, ``bf16``, ``distributed``, ``dist_timeout_s``); None
        means defaults (the best device, fp32, DDP).
        """
        local = int(os.environ.get("LOCAL_RANK", "0"))
        wanted = getattr(train, "device", None)
        if wanted in (None, "cuda") and torch.cuda.is_available():
            wanted = f"cuda:{local}"  # one GPU per process under torchrun
        device = torch.device(wanted or "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = False
        if launched_by_torchrun() and not dist.is_initialized():
            timeout = timedelta(seconds=float(getattr(train, "dist_timeout_s", 1800)))
            if device.type == "cuda":
                dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=device)
            else:
                dist.init_process_group("gloo", timeout=timeout)
            owns = True
        group = dist.is_available() and dist.is_initialized()
        return cls(
            rank=dist.get_rank() if group else 0,  # the group's own numbering (a group started elsewhere too)
            world=dist.get_world_size() if group else 1,
            local_rank=local,
            device=device,
            bf16=bool(getattr(train, "bf16", False)),
            distributed=getattr(train, "distributed", "ddp"),
            group=group,
            owns_group=owns,
        )

    def close(self) -> None:
        """End the process group this runtime started (a group someone else started is theirs to end)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = self.group = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the processes (FSDP2) rather than replicated."""
        return self.group and self.distributed == "fsdp"

    @property
    def load_device(self) -> torch.device:
        """Where to load the weights: the CPU under FSDP (sharding moves each process's shard to its device), else the device."""
        return torch.device("cpu") if self.sharded else self.device

    @property
    def gradient_scale(self) -> float:
        """What to multiply a loss normalised over the *whole* step (all processes) by before ``backward``.

        DDP averages gradients over the processes, so × world makes the result their sum; FSDP here is
        set to sum them (:meth:`wrap`); one process needs nothing.
        """
        return float(self.world) if self.group and not self.sharded else 1.0

    # -- collectives (all on the group's device; every rank must make the same calls) ----------

    def sum(self, *values: float) -> tuple[float, ...]:
        """The sums over all processes of each of ``values``, in one collective (float64)."""
        if not self.group:
            return tuple(float(v) for v in values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return tuple(t.tolist())

    def total(self, value: float) -> float:
        """:meth:`sum` of one number."""
        return self.sum(value)[0]

    def max(self, value: int) -> int:
        """The largest of ``value`` over all processes."""
        if not self.group:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some process (a decision every rank then follows)."""
        return self.max(int(bool(flag))) > 0

    def all_finite(self, *tensors: torch.Tensor) -> bool:
        """Whether every value of ``tensors`` is finite on every process (so all stop together, or none)."""
        return not self.any(not all(bool(torch.isfinite(t).all()) for t in tensors))

    def sum_array(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over processes of a float array (e.g. each rank fills its own entries, zeros elsewhere)."""
        if not self.group:
            return np.asarray(array, dtype=np.float64)
        t = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float64), device=self.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def barrier(self) -> None:
        if self.group:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- sharing work ----------------------------------------------------------------------------

    def share(self, items: Sequence[T]) -> Sequence[T]:
        """This process's contiguous share of ``items`` (shares differ by at most one item)."""
        n = len(items)
        return items[self.rank * n // self.world : (self.rank + 1) * n // self.world]

    def balance(self, batches: Sequence[T], filler: T | None = None) -> list[tuple[T, float]]:
        """``(batch, weight)`` for as many batches as the process with the most has: weight 1 for this
        process's own, 0 for repeats that only keep its collectives in step with the others.

        A repeat is this process's first batch, or ``filler`` when it has none (e.g. fewer eval rows
        than processes). Multiply a repeat's loss by its weight (0) before ``backward``: it adds nothing
        to the gradients but makes the same collective calls as a real batch.
        """
        n = self.max(len(batches)) if self.group else len(batches)
        if len(batches) < n and not batches and filler is None:
            raise RuntimeError(f"rank {self.rank} has no batch to repeat while another process has {n}")
        spare = batches[0] if batches else filler
        return [(batches[k], 1.0) if k < len(batches) else (spare, 0.0) for k in range(n)]  # type: ignore[misc]

    def forwards(self, batches: Sequence[T], filler: T | None = None) -> list[tuple[T, float]]:
        """:meth:`balance` where the forward pass itself is a collective (FSDP gathers each layer); elsewhere the
        batches as they are, each with weight 1 (passes without a backward, e.g. evaluation)."""
        return self.balance(batches, filler) if self.sharded else [(b, 1.0) for b in batches]

    # -- the model -------------------------------------------------------------------------------

    def wrap(self, module: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
        """The module a loop calls for its forward pass, made ready for several processes.

        ``module`` computes a step's loss inputs from ``model`` (the transformers or peft model inside
        it). One process: ``module`` itself. DDP: ``DistributedDataParallel(module)`` (buffers are not
        re-broadcast each forward: the models' buffers are constants such as rotary frequencies).
        FSDP: ``module`` sharded in place (:func:`shard`), returned as is. Build the optimizer after
        this: under FSDP its parameters are the shards.
        """
        if not self.group:
            return module
        if self.sharded:
            shard(module, model, torch.device(self.device), self.bf16)
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def reshard(self, module: torch.nn.Module) -> None:
        """Under FSDP, free every gathered layer of ``module`` again, after passes without a backward
        (evaluation, a reference precompute): FSDP2 keeps the root's parameters gathered after a forward
        until a backward frees them, and a checkpoint or an optimizer built meanwhile would see the
        gathered tensors instead of the shards."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @staticmethod
    def unwrap(module: torch.nn.Module) -> torch.nn.Module:
        """The module inside a DDP wrapper (evaluation runs on it, so it makes no gradient collectives)."""
        return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module

    def no_sync(self, module: torch.nn.Module, last: bool):
        """DDP's ``no_sync`` for every micro-batch but a step's last (FSDP reduce-scatters each one: its
        unsharded gradients would cost the memory sharding saves)."""
        if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not last:
            return module.no_sync()
        return nullcontext()

    def clip_grad_norm(self, parameters: Any, max_norm: float | None) -> float:
        """The gradient norm over all processes' shards (before clipping), clipping to ``max_norm`` when given."""
        import math

        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm or math.inf)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    def gathered_state(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """Under FSDP, the whole (trainable, or every) state of ``model`` gathered on the main process's CPU
        (every process must call this; the others get an empty dict). None when nothing is sharded: the
        model's own tensors are whole."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=options)

    def peak_memory_gb(self) -> float:
        """This process's peak memory so far, GB: tensors allocated on its GPU, or its peak resident set on a CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB

    def autocast(self):
        """bf16 autocast for matmuls on CPU and CUDA when ``train.bf16``; a no-op context otherwise."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    @contextmanager
    def packed_attention(self, model: torch.nn.Module, packing: bool, attn_implementation: str) -> Iterator[bool]:
        """Attention for packed rows: on CPU with sdpa, our per-example causal attention (no T×T mask);
        elsewhere the model's own (transformers keeps packed examples apart from their position ids)."""
        from posttrain.train.packed_attention import packed_attention

        with packed_attention(model, enabled=packing and self.device.type == "cpu" and attn_implementation == "sdpa") as on:
            yield on


def shard(root: torch.nn.Module, model: torch.nn.Module, device: torch.device, bf16: bool) -> None:
    """FSDP2 in place: ``fully_shard`` each decoder layer of ``model``, then ``root`` (the step module, whose
    forward the loop calls, so the root's all-gather of the embeddings, final norm and head runs first).

    Parameters are split over the processes along their first dimension and moved to ``device`` (they
    may be loaded on the CPU: each layer is moved, then sharded). With ``bf16`` the layers compute in
    bf16 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); the fp32 shards stay the
    master weights. Gradients are reduce-scattered as a plain sum (no division by the world size) on
    every backend, so the loss scale does not depend on whether NCCL averages and gloo sums.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    weights = next(model.parameters()).dtype
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 and weights == torch.float32 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
