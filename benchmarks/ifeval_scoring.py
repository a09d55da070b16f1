"""IFEval scoring speed: posttrain vs lm-evaluation-harness's checkers, on IFEval's 541 GPT-4 responses.

    python benchmarks/ifeval_scoring.py [--rounds 3] [--quick]

Both score every response strict and loose (834 instructions × up to 8 loose variants). Runs alternate
(posttrain, lm-eval, posttrain, ...) after one warm-up each (nltk, langdetect profiles), and the median
of each is reported. lm-eval runs offline on the same Punkt data and seeded langdetect. The last line
is ``ratio=<lm-eval seconds / posttrain seconds>`` (how many times faster posttrain is).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
INPUTS = DATA / "ifeval_input_data.jsonl"
GPT4 = DATA / "ifeval_input_response_data_gpt4_20231107_145030.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 rounds (well under 60 s)")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds

    from posttrain.eval.lm_eval import offline_nltk_data

    offline_nltk_data()
    import langdetect

    langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import utils as reference

    from posttrain.verify import aggregate, read_prompt_records, read_responses, score_response

    records = read_prompt_records(INPUTS)
    responses = read_responses(GPT4)
    docs = [{"key": r.key, "prompt": r.prompt, "instruction_id_list": r.instruction_id_list, "kwargs": r.kwargs} for r in records]

    def ours() -> str:
        return aggregate(score_response(r, responses[r.prompt]) for r in records).headline()

    def theirs() -> str:
        results = [reference.process_results(doc, [responses[doc["prompt"]]]) for doc in docs]
        agg = lambda key: 100 * statistics.fmean(x for r in results for x in ([r[key]] if isinstance(r[key], bool) else r[key]))  # noqa: E731
        return " / ".join(f"{agg(k):.2f}" for k in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"))

    times: dict[str, list[float]] = {"posttrain": [], "lm-eval": []}
    headlines = {"posttrain": ours(), "lm-eval": theirs()}  # warm-up
    for _ in range(rounds):
        for name, fn in (("posttrain", ours), ("lm-eval", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    print(f"IFEval scoring of {len(records)} GPT-4 responses, strict + loose; {rounds} alternating rounds after warm-up")
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores; {date.today()}")
    for name in times:
        print(f"{name:<10} median {statistics.median(times[name]):.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times[name])})  {headlines[name]}")
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
    print(f"ratio={statistics.median(times['lm-eval']) / statistics.median(times['posttrain']):.2f}")


if __name__ == "__main__":
    main()
