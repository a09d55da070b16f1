#!/usr/bin/env bash
# The judged evaluations end to end with SmolLM2-135M-Instruct as model and judge, on a CPU:
# MT-Bench, a win rate against GPT-4's IFEval responses, FollowBench-style levels, RLAIF labels trained
# with DPO, and an arena of SmolLM2 before and after that DPO. Each writes results.json, items.jsonl and
# report.html under $OUT/<name>; every request is cached there, so a rerun only does what is missing.
#
#   bash examples/judged_evals.sh [OUT] [LIMIT]     (DATA=../shared/data by default)
#
# SmolLM2-135M never ends a written judgement with a verdict (try --judge-mode text on mt-bench: every
# judgement is counted unparsable), so the judge reads its verdicts from token probabilities
# (--judge-mode probs). A 135M judge's verdicts are close to noise: this shows the machinery, not a ranking.
set -euo pipefail
OUT=${1:-judged-evals}
LIMIT=${2:-80}
DATA=${DATA:-$(cd "$(dirname "$0")/../../shared/data" && pwd)}
MODEL=smollm2-135m-instruct
mkdir -p "$OUT"
posttrain models fetch "$MODEL" > /dev/null
judge=(--judge "$MODEL" --judge-mode probs)

posttrain eval mt-bench -m "$MODEL" "${judge[@]}" --questions "$DATA/mt_bench_question.jsonl" \
    --judge-prompts "$DATA/mt_bench_judge_prompts.jsonl" --limit "$LIMIT" --max-new-tokens 256 -o "$OUT/mt-bench"
posttrain eval winrate -m "$MODEL" --reference "$DATA/ifeval_input_response_data_gpt4_20231107_145030.jsonl" "${judge[@]}" \
    --limit "$LIMIT" --max-new-tokens 256 -o "$OUT/winrate"
posttrain eval followbench -m "$MODEL" --queries "$((LIMIT / 4 > 5 ? LIMIT / 4 : 5))" --levels 5 --max-new-tokens 256 -o "$OUT/followbench"

# RLAIF: 4 samples per IFEval prompt, ranked by the verifiers and then the judge; DPO on the pairs.
posttrain label -m "$MODEL" "${judge[@]}" --data "$DATA/ifeval_input_data.jsonl" --limit "$LIMIT" --k 4 \
    --max-new-tokens 256 -o "$OUT/label/pairs.jsonl"
posttrain dpo --set model.name="$MODEL" --set data.path="$OUT/label/pairs.jsonl" --set train.micro_batch_size=4 \
    --set adapter.kind=lora --set adapter.r=16 --set adapter.alpha=32 --set train.lr=4e-4 --set train.epochs=1 -o "$OUT/dpo-rlaif"
posttrain eval arena --models "$MODEL,$OUT/dpo-rlaif/final" "${judge[@]}" --prompts "$DATA/mt_bench_question.jsonl" \
    --limit "$LIMIT" --max-new-tokens 256 -o "$OUT/arena"
