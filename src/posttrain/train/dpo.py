"""Direct preference optimisation and its variants, one loop read top to bottom.

Each step: pairs → chosen and rejected sequences of a micro-batch packed into rows (no padding between
them) → ONE forward pass over them (on CPU the decoder runs each sequence alone inside it, see
:class:`SequenceLogps`) → summed (or per-token averaged) response log-probs → the variant's loss from
:mod:`posttrain.train.losses` → backward → step → log.

The reference model costs no memory while training: by default its log-probs are computed once
before the first step, with the initial weights, and cached under a content hash of (tokenized
pairs, model weights, precision); with LoRA/DoRA it can instead be the same model with the adapter
disabled; a frozen copy is the last resort. Reference-free variants (SimPO, ORPO) never compute one.
The precompute packs the whole data set at once (best fit, longest first), so its rows carry almost no
padding. Pairs labelled by ``posttrain label --reference-logps`` from this same model carry the
log-probs the sampler measured while generating them (``meta["reference"]``); the precompute takes those
(``dpo.sampler_reference``) for every sequence it renders to exactly the tokens they were measured on,
in the same precision, and computes only the rest (:func:`sampler_reference`); under torchrun the
processes split the precompute between them. KTO's reference point z₀ is estimated over each step's
mismatched sequences on every process, in a pass without gradients before the step's update.
Plumbing (checkpoints, exact resume, metrics) is :mod:`posttrain.train.loop`'s and processes (DDP,
FSDP2) :mod:`posttrain.train.runtime`'s, as for SFT.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from posttrain.config import DPOConfig
from posttrain.data.cache import TokenizedData, prepare
from posttrain.data.chat import IGNORE, RenderOptions
from posttrain.data.packing import Batch, best_fit_decreasing, collate_packed
from posttrain.models import zoo
from posttrain.models.adapters import apply_adapter, enable_gradient_checkpointing, save_final
from posttrain.models.load import load_model, load_tokenizer, weights_fingerprint
from posttrain.train import loop
from posttrain.train.runtime import Runtime
from posttrain.train.losses import (
    PreferenceLoss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
    token_logps,
)

REFERENCE_VERSION = 2  # 2: packed rows (1: one padded row per sequence)
SHAPE_QUANTUM = 32  # SequenceLogps(one_by_one=True) pads each sequence to a multiple of this many tokens


class SequenceLogps(torch.nn.Module):
    """(summed log-prob, scored-token count) of each sequence's response; the module DDP wraps.

    Takes a packed batch: ``example_ids`` [R,T] says which sequence each position belongs to (-1 for
    padding) and ``spans[j]`` = (row, start, end) where sequence j lies; the result has one entry per
    sequence, in ``spans``' order.

    ``one_by_one`` runs the decoder on each sequence alone instead of on the rows (the default on CPU).
    On CPU, scaled-dot-product attention costs rows × width² whatever the mask (causal or
    block-diagonal: fully masked blocks are still computed), so a 512-wide row holding two 256-token
    sequences costs twice what the two cost apart, and matmuls need no big batch to run at full speed:
    on the DPO benchmark's data, forward+backward took 8% (bf16) to 14% (fp32) less CPU time this way,
    4 pairs per pass. A pair's chosen and rejected sequences start with the same prompt: it runs once, and
    both responses run on its keys and values (:meth:`_one_by_one`). Each sequence run alone, and each
    group's responses, are right-padded to a multiple of ``SHAPE_QUANTUM`` tokens (causal
    attention: the padding changes nothing before it) because bf16 matmuls on CPU go through oneDNN,
    which keeps compiled kernels for every shape it meets: with exact lengths, resident memory grew by
    ~6 MB per new length, 1.3 GB to 2.1 GB over one epoch. On GPUs one call over the rows keeps them busy.
    """

    def __init__(self, model: torch.nn.Module, one_by_one: bool = False):
        from posttrain.models.load import plain_cache

        super().__init__()
        self.model = model
        self.one_by_one = one_by_one
        self.plain_cache = one_by_one and plain_cache(model.config)  # whether _one_by_one may share prompts

    def forward(self, input_ids, position_ids, attention_mask, target_ids, example_ids, spans: list[tuple[int, int, int]]):
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        if self.one_by_one:
            if attention_mask is not None:
                raise ValueError("one_by_one takes packed rows (no attention mask)")
            # Each sequence's hidden states (padding cut off again), end to end in one row: the LM head
            # then runs once for the whole batch.
            pieces = self._one_by_one(decoder, input_ids, target_ids, spans)
            hidden = torch.cat(pieces, dim=1)
            target_ids = torch.cat([target_ids[row, start:end] for row, start, end in spans])[None]
            example_ids = torch.cat([torch.full((end - start,), j, device=hidden.device) for j, (_, start, end) in enumerate(spans)])[None]
        else:
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)[0]
        per_token = token_logps(hidden, target_ids, head)  # 0 where not scored
        where = example_ids.clamp(min=0).flatten()  # padding adds its 0 to sequence 0
        sums = per_token.new_zeros(len(spans)).index_add(0, where, per_token.flatten())
        counts = torch.zeros(len(spans), dtype=torch.long, device=where.device).index_add(0, where, (target_ids != IGNORE).flatten().long())
        return sums, counts

    def _one_by_one(self, decoder: torch.nn.Module, input_ids, target_ids, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Hidden states [1, n, H] of each span, each sequence run alone; a prompt its sequences share runs once.

        Sequences whose tokens agree up to their first scored position (a pair's chosen and rejected
        responses after their prompt; KTO's mismatched sequence too) form a group: the decoder runs that
        prefix once, keeping its keys and values, then every member's continuation in one call on top of
        them (gradients reach the prefix through the cache). What it saves is the prompt's share of the
        compute, less on a CPU where the prompts are short: the shorter runs use its matmuls less well (the
        demo's pairs, whose prompts are short, gain little). Not under gradient
        checkpointing, which runs the decoder without a cache, nor for caches other than plain attention
        layers (sliding windows). A shared prompt runs at its exact length (padding it would put the
        padding inside the cache).
        """
        from transformers import DynamicCache

        from posttrain.models.load import cache_kwarg

        share = self.plain_cache and not (decoder.training and getattr(decoder, "gradient_checkpointing", False))
        groups: dict[tuple[int, ...], list[int]] = {}
        prefix_of: list[int] = []
        for j, (row, start, end) in enumerate(spans):
            scored = (target_ids[row, start:end] != IGNORE).nonzero()
            p = int(scored[0]) + 1 if len(scored) else end - start  # the hidden state at p - 1 predicts the first scored token
            prefix_of.append(p)
            key = (p, *input_ids[row, start : start + p].tolist()) if share else (j,)
            groups.setdefault(key, []).append(j)
        pieces: list[torch.Tensor | None] = [None] * len(spans)
        for members in groups.values():
            if len(members) == 1:
                row, start, end = spans[members[0]]
                n = end - start
                width = -(-n // SHAPE_QUANTUM) * SHAPE_QUANTUM
                ids = torch.nn.functional.pad(input_ids[row, start:end], (0, width - n))[None]
                positions = torch.arange(width, device=ids.device)[None]
                pieces[members[0]] = decoder(input_ids=ids, position_ids=positions, use_cache=False)[0][:, :n]
                continue
            row, start, _ = spans[members[0]]
            p = prefix_of[members[0]]
            cache = DynamicCache(config=decoder.config)
            ids = input_ids[row, start : start + p][None]
            shared = decoder(input_ids=ids, position_ids=torch.arange(p, device=ids.device)[None], use_cache=True, **{cache_kwarg(decoder): cache})[0]
            rest = [spans[j][2] - spans[j][1] - p for j in members]
            width = -(-max(rest) // SHAPE_QUANTUM) * SHAPE_QUANTUM
            after = shared
            if width:
                ids = torch.stack([torch.nn.functional.pad(input_ids[r, s + p : e], (0, width - (e - s - p))) for r, s, e in (spans[j] for j in members)])
                positions = torch.arange(p, p + width, device=ids.device).expand(len(members), -1)
                expanded = DynamicCache(config=decoder.config)
                for layer, cached in enumerate(cache.layers):
                    expanded.update(cached.keys.expand(len(members), -1, -1, -1), cached.values.expand(len(members), -1, -1, -1), layer)
                after = decoder(input_ids=ids, position_ids=positions, use_cache=True, **{cache_kwarg(decoder): expanded})[0]
            for k, j in enumerate(members):
                pieces[j] = torch.cat([shared, after[k : k + 1, : rest[k]]], dim=1) if rest[k] else shared
        return pieces  # type: ignore[return-value]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (AttributeError, OSError):
        return None


def release_freed_memory(device: torch.device) -> None:
    """Give the heap memory that freed CPU tensors left behind back to the system (glibc's ``malloc_trim``), now.

    PyTorch's CPU tensors come from ``malloc``. glibc raises its mmap threshold as large blocks are freed,
    so after the first steps activations live in the heap; with sizes that change with every sequence,
    the heap fragments and what is freed is seldom given back. On the DPO benchmark (bf16, one 30-step
    epoch) resident memory climbed from 1.3 to 1.8 GB while live tensors never passed ~1.1 GB; trimming
    after every micro-batch and optimizer step kept the peak at 1.2 GB. Does nothing off CPU or without
    glibc. The training loop trims only when memory has grown (:class:`HeapTrimmer`).
    """
    if device.type == "cpu" and (trim := _malloc_trim()) is not None:
        trim(0)


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return None


@functools.cache
def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """:func:`release_freed_memory` when resident memory has grown past ``growth`` × its size at the first call.

    Trimming gives the freed pages back, and the next micro-batch faults them in again: trimming after
    every micro-batch and optimizer step made the demo's fp32 DPO steps slower (timed outside the repo's
    benchmarks; no figure is claimed here).
    The first call measures the resident size a micro-batch leaves (model, optimizer and the heap its
    activations used) and trims; later calls trim only once the heap has grown past that by ``growth``,
    which bounds the climb the trimming was there for. Without /proc (resident size unknown), every call
    trims.
    """

    def __init__(self, device: torch.device, growth: float = 1.15):
        self.device, self.growth = device, growth
        self.ceiling: float | None = None
        self.trims = 0

    def __call__(self) -> None:
        if self.device.type != "cpu" or _malloc_trim() is None:
            return
        resident = _resident_bytes()
        if resident is not None and self.ceiling is not None and resident <= self.ceiling:
            return
        if resident is not None and self.ceiling is None:
            self.ceiling = self.growth * resident
        release_freed_memory(self.device)
        self.trims += 1


def pack(examples: list[dict], pad_id: int) -> Batch:
    """The sequences packed into rows as wide as the longest (best fit, longest first): no padding between them.

    Each position attends only within its own sequence (position ids restart at 0 and the model gets no
    attention mask; see :mod:`posttrain.data.packing`). ``segments[k].index`` is the sequence's place in
    ``examples``.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    return collate_packed(examples, best_fit_decreasing(lengths, max(lengths)), pad_id)


def example_ids(batch: Batch) -> torch.Tensor:
    """[R,T]: the place in the packed list of the sequence each position belongs to; -1 for padding."""
    ids = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
    for s in batch.segments:
        ids[s.row, s.start : s.end] = s.index
    return ids


def run_logps(module: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) of every sequence of a packed batch, in the order they were packed (``segments[k].index``)."""
    b = batch.to(device)
    spans = [(s.row, s.start, s.end) for s in sorted(batch.segments, key=lambda s: s.index)]
    return module(b.input_ids, b.position_ids, b.attention_mask, b.target_ids, example_ids(batch).to(device), spans)


def pair_examples(data: TokenizedData, pairs: list[int], mismatched: bool = False) -> list[dict]:
    """``[chosen of each pair..., rejected of each pair...]`` (pair i is examples 2i and 2i+1).

    With ``mismatched`` (KTO), a third block: pair i's prompt followed by pair (i+1)'s chosen response,
    spliced at the token level where the response starts. The partner is fixed (i+1 modulo the number of
    pairs), not drawn per batch, so the reference log-probs of these rows can be precomputed too.
    """
    chosen = [data[2 * i] for i in pairs]
    rejected = [data[2 * i + 1] for i in pairs]
    extra = [splice(data[2 * i], data[2 * ((i + 1) % (len(data) // 2))]) for i in pairs] if mismatched else []
    return chosen + rejected + extra


def pair_batch(data: TokenizedData, pairs: list[int], pad_id: int, mismatched: bool = False) -> Batch:
    """The pairs' sequences (:func:`pair_examples`' order) packed into rows for one forward pass."""
    return pack(pair_examples(data, pairs, mismatched), pad_id)


def splice(prompt_of: dict, response_of: dict) -> dict:
    """``prompt_of``'s tokens before its first scored token, then ``response_of``'s tokens from its first scored one."""
    a = int(np.flatnonzero(np.asarray(prompt_of["labels"]) != IGNORE)[0])
    b = int(np.flatnonzero(np.asarray(response_of["labels"]) != IGNORE)[0])
    return {
        "input_ids": np.concatenate([np.asarray(prompt_of["input_ids"][:a]), np.asarray(response_of["input_ids"][b:])]),
        "labels": np.concatenate([np.full(a, IGNORE), np.asarray(response_of["labels"][b:])]),
    }


def preference_loss(cfg: DPOConfig, pc, pr, counts_c, counts_r, ref: tuple[torch.Tensor, ...] | None, kl: torch.Tensor | None = None):
    """The configured variant on one micro-batch: (per-pair loss, chosen rewards, rejected rewards).

    KTO treats each chosen response as a desirable example and each rejected one as undesirable; a pair's
    loss is the mean of its two, so the step's loss is KTO's mean over examples. ``kl`` is its z₀.
    """
    kind = PreferenceLoss(cfg.dpo.loss_type)
    beta = cfg.dpo.resolved_beta
    avg_c, avg_r = pc / counts_c.clamp(min=1), pr / counts_r.clamp(min=1)
    if kind in (PreferenceLoss.SIGMOID, PreferenceLoss.ROBUST):
        return dpo_loss(pc, pr, ref[0], ref[1], beta=beta, label_smoothing=cfg.dpo.label_smoothing)
    if kind is PreferenceLoss.HINGE:
        return hinge_loss(pc, pr, ref[0], ref[1], beta=beta)
    if kind is PreferenceLoss.IPO:
        return ipo_loss(avg_c, avg_r, ref[0] / counts_c.clamp(min=1), ref[1] / counts_r.clamp(min=1), beta=beta)
    if kind is PreferenceLoss.SIMPO:
        return simpo_loss(avg_c, avg_r, beta=beta, gamma=cfg.dpo.simpo_gamma)
    if kind is PreferenceLoss.ORPO:
        return orpo_loss(avg_c, avg_r, -avg_c, lam=cfg.dpo.orpo_lambda)
    if kind is PreferenceLoss.KTO:
        m = len(pc)
        desirable = torch.arange(2 * m, device=pc.device) < m
        loss, rewards = kto_loss(
            torch.cat([pc, pr]), torch.cat([ref[0], ref[1]]), desirable, beta=beta, kl=kl,
            desirable_weight=cfg.dpo.kto_desirable_weight, undesirable_weight=cfg.dpo.kto_undesirable_weight,
        )  # fmt: skip
        return (loss[:m] + loss[m:]) / 2, rewards[:m], rewards[m:]
    raise ValueError(f"loss_type {kind.value} is not supported by posttrain dpo")


def preferred(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """How many pairs the policy prefers the right way; a tie (as at step 0, policy = reference) counts half."""
    return ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).sum().item()


def sampler_reference(cfg: DPOConfig, model: torch.nn.Module) -> dict[str, float]:
    """{:func:`~posttrain.synth.label.reference_key`: summed log-prob} recorded in the pairs' ``meta["reference"]`` by ``model``.

    Only entries measured on these very weights (their fingerprint) in this run's precision count: fp32
    sampling for an fp32 reference (bf16 sampling casts the weights, bf16 training autocasts, and the two
    round differently). Read from a local JSON Lines file (what ``posttrain label`` writes); other sources
    give none. The fingerprint is computed only if some record carries log-probs.
    """
    path = Path(cfg.data.path)
    if cfg.train.bf16 or cfg.model.dtype != "float32" or not path.is_file() or path.suffix != ".jsonl":
        return {}
    recorded = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                meta = json.loads(line).get("meta") if line.strip() else None
            except (json.JSONDecodeError, AttributeError):
                continue  # reading the data proper reports it
            ref = meta.get("reference") if isinstance(meta, dict) else None
            if isinstance(ref, dict) and ref.get("precision") == "float32":
                recorded.append(ref)
    if not recorded:
        return {}
    fingerprint = weights_fingerprint(model)
    given = {}
    for ref in (r for r in recorded if r.get("model") == fingerprint):
        for side in ("chosen", "rejected"):
            entry = ref.get(side)
            if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("logp"), (int, float)):
                given[entry["key"]] = float(entry["logp"])
    return given


def _sequence_key(example: dict) -> str | None:
    """:func:`~posttrain.synth.label.reference_key` of an example: its tokens before the scored run, and the run; None if not one run."""
    from posttrain.synth.label import reference_key

    ids, scored = np.asarray(example["input_ids"]), np.flatnonzero(np.asarray(example["labels"]) != IGNORE)
    if not len(scored) or scored[-1] - scored[0] + 1 != len(scored):
        return None
    return reference_key(ids[: scored[0]].tolist(), ids[scored[0] : scored[-1] + 1].tolist())


class ReferenceTable(NamedTuple):
    table: np.ndarray  # [pairs, 2 or 3] summed log-probs
    from_cache: bool
    taken: int  # sequences whose log-prob the sampler had recorded (``given``)
    shares: list[int]  # sequences each process scored


def reference_logps(
    module: torch.nn.Module,
    data: TokenizedData,
    pad_id: int,
    cfg: DPOConfig,
    rt: Runtime,
    cache_root: Path | None = None,
    given: dict[str, float] | None = None,
    fingerprint: str | None = None,
) -> ReferenceTable:
    """[pairs, 2] summed reference log-probs (chosen, rejected; and mismatched for KTO) of the initial model, with where they came from.

    Cached under sha256(tokenized pairs, weights, precision, version): a second run with the same data
    and starting model reads them instead of running the reference forward passes again. ``given``
    (:func:`sampler_reference`): log-probs already measured, by sequence; only the other sequences run.
    ``fingerprint``: :func:`weights_fingerprint` of ``module``, taken before it was sharded (FSDP).

    Several processes split the work: the sequences still to score are packed once (the same rows on
    every process), each process runs a contiguous share of the forward passes, and one sum over the
    processes gives everyone the whole table (no process waits idle while another scores everything).
    """
    mismatched = cfg.dpo.loss_type == "kto"
    key = hashlib.sha256(
        json.dumps([data.key, fingerprint or weights_fingerprint(module), cfg.train.bf16, cfg.model.dtype, mismatched, REFERENCE_VERSION]).encode()
    ).hexdigest()[:24]
    root = cache_root or zoo.cache_dir() / "reference"
    path = root / key / "logps.npy"
    # Rank 0 decides and everyone follows: a process must not skip the collectives below on its own.
    if rt.any(rt.main and path.exists()):
        return ReferenceTable(np.load(path), True, 0, [0] * rt.world)
    n = len(data) // 2
    columns = 3 if mismatched else 2
    examples = pair_examples(data, list(range(n)), mismatched)  # column j of pair i is example j·n + i
    by_column = np.full((columns, n), np.nan, dtype=np.float64)
    flat = by_column.reshape(-1)  # a view: flat[j·n + i] is by_column[j, i]
    if given:
        for j, ex in enumerate(examples):
            seq = _sequence_key(ex)
            if seq is not None and seq in given:
                flat[j] = given[seq]
    todo = np.flatnonzero(np.isnan(flat)).tolist()
    taken = len(flat) - len(todo)
    shares = [0] * rt.world
    # The sequences still to score packed at once (best fit, longest first), then a training forward's
    # worth of rows (2 or 3 × micro_batch_size) at a time: almost no padding anywhere.
    lengths = [len(examples[i]["input_ids"]) for i in todo]
    rows = [[todo[i] for i in row] for row in best_fit_decreasing(lengths, max(lengths))] if todo else []
    per_forward = columns * cfg.train.micro_batch_size
    groups = [rows[k : k + per_forward] for k in range(0, len(rows), per_forward)]
    mine = list(rt.share(groups))
    # Sharded weights: every process runs as many forwards as the busiest (a repeat's result is unused).
    work = rt.balance(mine, filler=groups[0]) if rt.sharded and groups else [(g, 1.0) for g in mine]
    scored = np.zeros(len(flat) + rt.world, dtype=np.float64)  # the log-probs, then how many each process scored
    with torch.no_grad():
        for group, weight in work:
            members = [i for row in group for i in row]
            local = {i: place for place, i in enumerate(members)}
            batch = collate_packed([examples[i] for i in members], [[local[i] for i in row] for row in group], pad_id)
            with rt.autocast():
                sums, _ = run_logps(module, batch, rt.device)
            if weight:
                scored[members] = sums.double().cpu().numpy()
                scored[len(flat) + rt.rank] += len(members)
    rt.reshard(module)
    if todo:
        summed = rt.sum_array(scored)  # each sequence was scored by exactly one process
        flat[todo] = summed[todo]
        shares = [int(n) for n in summed[len(flat) :]]
    release_freed_memory(rt.device)
    table = np.ascontiguousarray(by_column.T)
    if rt.main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        np.save(tmp / "logps.npy", table)
        try:
            tmp.rename(path.parent)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return ReferenceTable(table, False, taken, shares)


@dataclass
class DPOResult:
    run_dir: Path
    final_dir: Path
    steps: int
    losses: list[float]
    accuracies: list[float]
    reference_from_cache: bool | None
    reference_from_sampler: int = 0  # sequences whose reference log-prob the sampler had recorded


def train(config: DPOConfig) -> DPOResult:
    cfg = config
    rt = Runtime.start(cfg.train)
    run_dir = Path(cfg.output_dir)
    loop.seed_everything(cfg.train.seed)
    kind = PreferenceLoss(cfg.dpo.loss_type)
    kto = kind is PreferenceLoss.KTO

    # -- data: two examples per pair (chosen, rejected), each with only its response scored ----------
    tokenizer = load_tokenizer(cfg.model)
    options = RenderOptions(
        train_on="all_assistant", max_length=cfg.data.max_length, overlong=cfg.data.overlong, template=cfg.data.template
    )
    prep = {
        "format": cfg.data.format or "preference",
        "on_error": cfg.data.on_error,
        "split": cfg.data.split, "subset": cfg.data.subset, "revision": cfg.data.revision,
        "group": rt if rt.group else None,
    }  # fmt: skip
    data = prepare(cfg.data.path, tokenizer, options, **prep)
    n_pairs = len(data) // 2
    if cfg.data.eval_path:
        eval_data = prepare(cfg.data.eval_path, tokenizer, options, **prep)
        train_pairs, eval_pairs = list(range(n_pairs)), list(range(len(eval_data) // 2))
    else:
        train_pairs, eval_pairs = loop.split_eval(n_pairs, cfg.data.eval_fraction, cfg.train.seed)
        eval_data = data
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * rt.world
    if len(train_pairs) < per_step:
        raise loop.TrainingError(
            f"{len(train_pairs)} training pairs, but one step needs {per_step} (micro_batch_size × grad_accum × processes)"
        )
    steps_per_epoch = loop.steps_per_epoch(len(train_pairs), per_step, rt.world)
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    plan = loop.Plan([[i] for i in train_pairs], per_step, steps_per_epoch, total)

    # -- model, reference, optimizer ------------------------------------------------------------------
    model = load_model(cfg.model, rt.load_device, quantize=cfg.adapter.quantize)
    use_sampler = kind.needs_reference and cfg.dpo.reference == "precompute" and cfg.dpo.sampler_reference
    given = sampler_reference(cfg, model) if use_sampler else {}
    model = apply_adapter(model, cfg.adapter)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.adapter.kind)
    logps_module = SequenceLogps(model, one_by_one=rt.device.type == "cpu")
    needs_reference = kind.needs_reference
    precompute = needs_reference and cfg.dpo.reference == "precompute"
    fingerprint = weights_fingerprint(logps_module) if precompute else None  # of the whole initial weights, before any sharding
    ref_model: torch.nn.Module | None = None
    if needs_reference and cfg.dpo.reference == "model":
        ref_model = SequenceLogps(copy.deepcopy(model).eval().requires_grad_(False), one_by_one=rt.device.type == "cpu").to(rt.device)
    step_module = rt.wrap(logps_module, model)  # under FSDP logps_module itself is now sharded
    ref_table = ref_eval_table = None
    ref_cached, from_sampler, ref_shares = None, 0, None
    if precompute:
        # Before any update (and before loading a checkpoint): the reference is the initial model.
        model.eval()
        ref_table, ref_cached, from_sampler, ref_shares = reference_logps(logps_module, data, pad_id, cfg, rt, given=given, fingerprint=fingerprint)
        if eval_pairs and eval_data is not data:
            ref_eval_table = reference_logps(logps_module, eval_data, pad_id, cfg, rt, given=given, fingerprint=fingerprint).table
        else:
            ref_eval_table = ref_table
    model.train()
    optimizer = loop.make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    scheduler = loop.make_scheduler(optimizer, cfg.train, total)
    identity = loop.run_identity(cfg, data=data.key, batch=per_step)
    start, checkpoint, metrics = loop.start_run(run_dir, cfg, model, optimizer, scheduler, rt, identity)

    def reference(pairs: list[int], batch: Batch, table, column: int | None = None) -> tuple[torch.Tensor, ...] | None:
        """Reference log-probs of the batch's blocks: (chosen, rejected[, mismatched]), or of ``column`` alone."""
        if not needs_reference:
            return None
        if table is not None:
            rows = torch.as_tensor(table[pairs], dtype=torch.float32, device=rt.device)
            return tuple(rows[:, j] for j in ([column] if column is not None else range(rows.shape[1])))
        with torch.no_grad(), rt.autocast():
            if ref_model is not None:
                sums, _ = run_logps(ref_model, batch, rt.device)
            else:
                with model.disable_adapter():
                    sums, _ = run_logps(rt.unwrap(step_module), batch, rt.device)
        return tuple(sums.float().reshape(-1, len(pairs)))

    def z0(chunks: list[list[int]], source: TokenizedData, table, filler: list[int]) -> torch.Tensor:
        """KTO's reference point: mean(log π − log π_ref) over the mismatched sequences of ``chunks`` on
        every process, clamped at 0, before any gradient (it is never differentiated). Over the whole step,
        so micro-batching and the process count do not change it."""
        module = rt.unwrap(step_module)
        kl = count = 0.0
        with torch.no_grad():
            for pairs, weight in rt.balance(chunks, filler=filler):
                batch = pack([splice(source[2 * i], source[2 * ((i + 1) % (len(source) // 2))]) for i in pairs], pad_id)
                with rt.autocast():
                    policy, _ = run_logps(module, batch, rt.device)
                (ref,) = reference(pairs, batch, table, column=2)
                kl += weight * float((policy.float() - ref).sum())
                count += weight * len(pairs)
        rt.reshard(module)
        kl, count = rt.sum(kl, count)
        return torch.tensor(max(kl / max(count, 1.0), 0.0), device=rt.device)

    # -- the loop -------------------------------------------------------------------------------------
    losses: list[float] = []
    accuracies: list[float] = []
    progress = loop.progress_bar(
        rt.main, total, start, checkpoint, "loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}  margin {task.fields[margin]:.3f}"
    )
    task = progress.add_task("dpo", total=total, completed=start, loss=float("nan"), acc=0.0, margin=0.0)
    trim = HeapTrimmer(rt.device)
    progress.start()
    for step in range(start, total):
        t0 = time.perf_counter()
        step_pairs = [u[0] for u in plan.step_rows(step, cfg.train.seed)]
        mine = rt.share(step_pairs)
        chunks = [mine[k : k + cfg.train.micro_batch_size] for k in range(0, len(mine), cfg.train.micro_batch_size)]
        kl = z0(chunks, data, ref_table, step_pairs[:1]) if kto else None
        sums = {k: 0.0 for k in ("loss", "acc", "rc", "rr", "logps_c", "logps_r")}
        # Every process runs as many micro-batches as the busiest; a repeat has weight 0.
        balanced = rt.balance(chunks)
        for k, (pairs, weight) in enumerate(balanced):
            m = len(pairs)
            batch = pair_batch(data, pairs, pad_id)
            ref = reference(pairs, batch, ref_table)
            with rt.no_sync(step_module, last=k == len(balanced) - 1), rt.autocast():
                logps, counts = run_logps(step_module, batch, rt.device)
                per_pair, chosen_r, rejected_r = preference_loss(cfg, logps[:m], logps[m : 2 * m], counts[:m], counts[m : 2 * m], ref, kl)
                # The step's loss is the mean over all its pairs, on every process.
                (per_pair.sum() * (weight * rt.gradient_scale / len(step_pairs))).backward()
            sums["loss"] += weight * per_pair.sum().item()
            sums["acc"] += weight * preferred(chosen_r, rejected_r)
            sums["rc"] += weight * chosen_r.sum().item()
            sums["rr"] += weight * rejected_r.sum().item()
            sums["logps_c"] += weight * logps[:m].detach().sum().item()
            sums["logps_r"] += weight * logps[m : 2 * m].detach().sum().item()
            trim()
        totals = {k: v / len(step_pairs) for k, v in zip(sums, rt.sum(*sums.values()))}
        grad_norm, lr = loop.optimizer_step(model, optimizer, scheduler, totals["loss"], cfg.train.max_grad_norm, step, run_dir, rt)
        trim()
        done = step + 1
        record = {
            "step": done,
            "loss": totals["loss"],
            "lr": lr,
            "accuracy": totals["acc"],
            "rewards_chosen": totals["rc"],
            "rewards_rejected": totals["rr"],
            "margin": totals["rc"] - totals["rr"],
            "logps_chosen": totals["logps_c"],
            "logps_rejected": totals["logps_r"],
            "grad_norm": grad_norm,
            "pairs_per_s": len(step_pairs) / (time.perf_counter() - t0),
            "peak_memory_gb": rt.peak_memory_gb(),
        }
        if kl is not None:
            record["kto_z0"] = float(kl)
        if cfg.train.eval_every and eval_pairs and (done % cfg.train.eval_every == 0 or done == total):
            record.update(evaluate(step_module, eval_data, eval_pairs, cfg, rt, pad_id, reference, ref_eval_table, z0))
        losses.append(record["loss"])
        accuracies.append(record["accuracy"])
        if done % cfg.train.log_every == 0 or done == total or "eval_accuracy" in record:
            metrics.log(record)
        progress.update(task, completed=done, loss=record["loss"], acc=record["accuracy"], margin=record["margin"])
        if rt.main and not progress.console.is_terminal and (done % max(1, total // 20) == 0 or done == total or step == start):
            # No live bar in logs and pipes: a plain line every 5% instead.
            progress.console.print(
                f"dpo step {done}/{total}  loss {record['loss']:.4f}  acc {record['accuracy']:.2f}  margin {record['margin']:.3f}",
                highlight=False,
            )
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == total:
            state = {"epoch": step // steps_per_epoch, "total_steps": total, "identity": identity}
            loop.save_checkpoint(run_dir, done, model, optimizer, scheduler, state, cfg.train.keep_last, rt)
    progress.stop()
    metrics.close()
    release_freed_memory(rt.device)  # what the steps' heap kept, back for whatever runs next in this process (the demo's next stages)
    final = run_dir / "final"
    gathered = rt.gathered_state(model, trainable_only=cfg.adapter.kind != "full")
    if rt.main:
        save_final(model, tokenizer, final, gathered)
        loop.plot_losses(run_dir, f"DPO ({kind.value}) of {cfg.model.name}")
        reference_stats = {"from_cache": ref_cached, "from_sampler": from_sampler, "scored_by_process": ref_shares}
        (run_dir / "data_stats.json").write_text(
            json.dumps({"render": data.stats.to_dict(), "read": data.read, "pairs": n_pairs, "reference": reference_stats}, indent=1)
        )
    rt.barrier()
    rt.close()
    return DPOResult(run_dir, final, total, losses, accuracies, ref_cached, from_sampler)


def evaluate(
    step_module, data: TokenizedData, pairs: list[int], cfg: DPOConfig, rt: Runtime, pad_id: int, reference, table, z0
) -> dict[str, float]:
    """Held-out preference loss and accuracy (each process takes a share; KTO's z₀ over the whole held-out set).

    On the module inside DDP's wrapper; under FSDP every process runs as many batches as the busiest.
    """
    module = rt.unwrap(step_module)
    module.eval()
    loss = acc = 0.0
    mine = pairs[rt.rank :: rt.world]
    chunks = [mine[k : k + cfg.train.micro_batch_size] for k in range(0, len(mine), cfg.train.micro_batch_size)]
    kl = z0(chunks, data, table, pairs[:1]) if cfg.dpo.loss_type == "kto" else None
    with torch.no_grad():
        for chunk, weight in rt.balance(chunks, filler=pairs[:1]) if rt.sharded else [(c, 1.0) for c in chunks]:
            m = len(chunk)
            batch = pair_batch(data, chunk, pad_id)
            ref = reference(chunk, batch, table)
            with rt.autocast():
                logps, counts = run_logps(module, batch, rt.device)
                per_pair, cr, rr = preference_loss(cfg, logps[:m], logps[m : 2 * m], counts[:m], counts[m : 2 * m], ref, kl)
            loss += weight * per_pair.sum().item()
            acc += weight * preferred(cr, rr)
    rt.reshard(module)
    module.train()
    loss, acc = rt.sum(loss, acc)
    n = max(len(pairs), 1)
    return {"eval_loss": loss / n, "eval_accuracy": acc / n}
