"""DPO's reference log-probs: computed once from the initial weights (split over the processes of a run),
cached under a content hash, or taken from what ``posttrain label --reference-logps`` recorded while
sampling the pairs from this same model (:func:`sampler_reference`).

Our own code, on :mod:`posttrain.train.forward`'s packed batches and forward.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from posttrain.config import DPOConfig
from posttrain.data.cache import TokenizedData
from posttrain.data.chat import IGNORE
from posttrain.data.prompts import reference_key
from posttrain.models import zoo
from posttrain.models.adapters import base_when_exact
from posttrain.models.load import weights_fingerprint
from posttrain.train.forward import pack, run
from posttrain.train.runtime import Runtime
from posttrain.train.sequences import pair_examples

REFERENCE_VERSION = 3  # 3: whole pairs a forward, the adapter off where it adds nothing; 2: packed rows; 1: one padded row per sequence


def sampler_reference(cfg: DPOConfig, model: torch.nn.Module) -> dict[str, float]:
    """{:func:`~posttrain.data.prompts.reference_key`: summed log-prob} recorded in the pairs' ``meta["reference"]`` by ``model``.

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
    """:func:`~posttrain.data.prompts.reference_key` of an example: its tokens before the scored run, and the run; None if not one run."""
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

    The forwards run with a LoRA adapter switched off while it still adds exactly nothing
    (:func:`~posttrain.models.adapters.base_when_exact`): the same sums, without the adapter's work.
    Several processes split the work: the sequences still to score are grouped once (the same forwards on
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
    # A training forward's worth of whole pairs at a time (micro_batch_size), longest first, each packed as the
    # training step packs its pairs: a pair's sequences in one forward run their shared prompt once on CPU
    # (Forward's one row), and like lengths go together, so rows carry little padding anywhere.
    by_pair: dict[int, list[int]] = {}
    for i in todo:
        by_pair.setdefault(i % n, []).append(i)
    units = sorted(by_pair.values(), key=lambda unit: -sum(len(examples[i]["input_ids"]) for i in unit))
    per_forward = cfg.train.micro_batch_size
    groups = [[i for unit in units[k : k + per_forward] for i in unit] for k in range(0, len(units), per_forward)]
    mine = list(rt.share(groups))
    # Sharded weights: every process runs as many forwards as the busiest (a repeat's result is unused).
    work = rt.forwards(mine, filler=groups[0] if groups else None)
    scored = np.zeros(len(flat) + rt.world, dtype=np.float64)  # the log-probs, then how many each process scored
    with torch.no_grad(), base_when_exact(getattr(module, "model", module)):
        for members, weight in work:
            batch = pack([examples[i] for i in members], pad_id)
            with rt.autocast():
                sums = run(module, batch, "sums", device=rt.device)
            if weight:
                scored[members] = sums.double().cpu().numpy()
                scored[len(flat) + rt.rank] += len(members)
    rt.reshard(module)
    if todo:
        summed = rt.sum_array(scored)  # each sequence was scored by exactly one process
        flat[todo] = summed[todo]
        shares = [int(n) for n in summed[len(flat) :]]
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
