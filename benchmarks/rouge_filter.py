"""Self-Instruct's ROUGE-L filter at pool scale: posttrain's RougePool vs rouge_score over a process pool.

    .venv/bin/python benchmarks/rouge_filter.py [--pool 10000] [--candidates 200] [--quick] [--out benchmarks/results/rouge_filter.json]

The pool: instruction-like texts from ../shared/data (Self-Instruct's seed and user-oriented
instructions, IFEval prompts, MT-Bench turns, Orca DPO prompts) and the sentences of GPT-4's IFEval
responses and Orca's chosen responses, deduplicated, the first ``--pool`` of them. The candidates: Self-Instruct seed instructions
with a few words edited (so some are near-duplicates of pool items and most are not), ``--candidates``
of them, and as many made of the first half of one seed and the second half of another. Each candidate is compared with the whole pool, and the question asked is Self-Instruct's: is
any ROUGE-L F above 0.7?

- **rouge_score, as Alpaca runs it** (stanford_alpaca's generate_instruction.py): the pool tokenised once
  with the scorer's tokenizer, then for each candidate ``Pool(cores).map(partial(rouge_scorer._score_lcs,
  candidate_tokens), pool_tokens)``; (Self-Instruct's own script calls ``scorer.score`` per pair, slower);
- **posttrain**: ``posttrain.synth.rouge.RougePool``: one process, an inverted index for a bound on every
  pool item, a bit-parallel LCS for the items the bound cannot rule out.

Both verdicts are compared for every candidate (and the maximum scores, which must be equal). The
result: seconds per candidate for each, the ratio, the share of pool items whose LCS was computed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "src"))

from posttrain.synth.rouge import RougePool  # noqa: E402


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHARED / name).read_text().splitlines() if line.strip()]


def pool_texts(size: int) -> list[str]:
    texts = [r["instruction"] for r in _jsonl("self_instruct_seed_tasks.jsonl")]
    texts += [r["instruction"] for r in _jsonl("self_instruct_user_oriented_instructions.jsonl")]
    texts += [r["prompt"] for r in _jsonl("ifeval_input_data.jsonl")]
    texts += [turn for r in _jsonl("mt_bench_question.jsonl") for turn in r["turns"]]
    orca = _jsonl("orca_dpo_pairs_validation.jsonl")
    texts += [m["content"] for r in orca for m in r["input"]["messages"] if m["role"] == "user"]
    responses = [r["response"] for r in _jsonl("ifeval_input_response_data_gpt4_20231107_145030.jsonl")]
    responses += [m["content"] for r in orca for m in r["preferred_output"]]
    for response in responses:
        texts += [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", response) if len(s.split()) >= 4]
    return list(dict.fromkeys(texts))[:size]


def candidates(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    seeds = [r["instruction"] for r in _jsonl("self_instruct_seed_tasks.jsonl")]
    out = []
    while len(out) < n:
        if len(out) % 2:  # half are new: the first half of one seed and the second half of another
            a, b = rng.choice(seeds).split(), rng.choice(seeds).split()
            out.append(" ".join(a[: len(a) // 2] + b[len(b) // 2 :]))
            continue
        words = rng.choice(seeds).split()
        for _ in range(rng.randint(0, max(1, len(words) // 2))):
            i = rng.randrange(len(words))
            if rng.random() < 0.5 and len(words) > 2:
                del words[i]
            else:
                words.insert(i, rng.choice(["please", "briefly", "new", "the", "a", "list", "each"]))
        out.append(" ".join(words))
    return out


def main() -> None:
    from rouge_score import rouge_scorer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=10000)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a pool of 1,000 and 20 candidates: checks the script only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rouge_filter.json")
    args = parser.parse_args()
    if args.quick:
        args.pool, args.candidates, args.out = 1000, 20, ROOT / "benchmarks" / ".cache" / "rouge_filter-quick.json"
    cores = os.cpu_count() or 1
    texts, cands = pool_texts(args.pool), candidates(args.candidates)
    print(f"pool {len(texts)} texts, {len(cands)} candidates, {cores} cores", flush=True)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    started = time.perf_counter()
    pool_tokens = [scorer._tokenizer.tokenize(t) for t in texts]
    baseline = []
    with Pool(cores) as workers:
        for cand in cands:
            scores = workers.map(partial(rouge_scorer._score_lcs, scorer._tokenizer.tokenize(cand)), pool_tokens)
            baseline.append(max(s.fmeasure for s in scores))
    t_baseline = time.perf_counter() - started

    started = time.perf_counter()
    pool = RougePool(texts)
    ours = [pool.most_similar(cand, 0.0) for cand in cands]  # threshold 0: the best score, to compare with the baseline's max
    t_full = time.perf_counter() - started
    started = time.perf_counter()
    pool = RougePool(texts)
    verdicts = [pool.most_similar(cand) is not None for cand in cands]
    t_filter = time.perf_counter() - started

    best = [m.score if m else 0.0 for m in ours]
    assert best == baseline, "maximum scores differ"
    assert verdicts == [b > 0.7 for b in baseline], "verdicts differ"
    rows = {
        "rouge_score_process_pool": t_baseline,
        "posttrain_best_score": t_full,
        "posttrain_filter_0.7": t_filter,
    }
    print(f"\n{'method':<48} {'s/candidate':>12} {'speed-up':>9}")
    for name, seconds in rows.items():
        print(f"{name:<48} {seconds / len(cands):>12.5f} {t_baseline / seconds:>8.1f}x")
    print(f"{sum(verdicts)} of {len(cands)} candidates are near-duplicates (F > 0.7); every maximum score equal to rouge_score's")
    print(f"LCS computed for {pool.compared} of {len(cands) * len(texts)} pairs ({pool.compared / (len(cands) * len(texts)):.2%}) by the filter")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cores": cores,
        "pool": len(texts),
        "candidates": len(cands),
        "seconds": rows,
        "speedup": {k: t_baseline / v for k, v in rows.items()},
        "near_duplicates": sum(verdicts),
        "lcs_computed_share": pool.compared / (len(cands) * len(texts)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
