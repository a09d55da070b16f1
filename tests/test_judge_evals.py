"""Judged evaluations (MT-Bench grading, win rates raw and length-controlled, arena) and RLAIF labelling.

The length-controlled win rate is checked on preferences drawn with a planted length bias, against the
true rate and against direct fits of the same GLM. The harnesses run with a rule-following judge engine
written here (it prefers the longer answer, or rates by a rule), because the only judges that run on this
machine are a random tiny model, which never gives a verdict, and SmolLM2-135M, whose verdicts are noise;
the CLI commands also run end to end on tiny real models, judge included, unparsable verdicts counted.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sft_fixtures import torch_threads
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.eval import mt_bench
from posttrain.eval.arena import arena_results
from posttrain.eval.judge import DEFAULT_PROMPTS, Judge, judge_scorer, read_judge_prompts
from posttrain.eval.results import Metric, Results, read_results
from posttrain.eval.winrate import LC_C, design, fit_length_controlled, lc_interval, winrate_results
from posttrain.generate.params import Completion, SamplingParams
from posttrain.synth.teacher import Teacher

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
QUESTIONS, JUDGE_PROMPTS = SHARED / "mt_bench_question.jsonl", SHARED / "mt_bench_judge_prompts.jsonl"


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# -- length-controlled win rate ------------------------------------------------------------------


def test_length_control_moves_a_planted_length_bias_back_to_the_true_rate() -> None:
    """Quality decides the true preference; the judge adds a length bonus (φ = 1.5 on tanh(Δlen/σ)) to answers
    that are longer on average. The raw win rate is inflated; the LC win rate lands near the true one."""
    rng = np.random.default_rng(0)
    n = 600
    quality = rng.normal(0.0, 1.0, n)
    delta = rng.normal(250.0, 200.0, n)  # the model writes 250 characters more than the reference on average
    planted = 1.5
    judged = _sigmoid(quality + planted * np.tanh(delta / delta.std()))
    preferences = (rng.random(n) < judged).astype(float)
    true_rate = 100 * float(_sigmoid(quality).mean())
    raw = 100 * float(preferences.mean())

    fit = fit_length_controlled(preferences, delta)
    low, high = lc_interval(preferences, delta, resamples=100)
    assert raw - true_rate > 15  # the bias is large ...
    assert abs(fit.win_rate - true_rate) < 0.3 * (raw - true_rate)  # ... and length control removes most of it
    assert low < fit.win_rate < high and low < true_rate < high < raw
    assert fit.length == pytest.approx(planted, abs=0.5) and fit.difficulty == 0.0

    # the coefficients are those of a direct scikit-learn fit of the same weighted design ...
    from sklearn.linear_model import LogisticRegression

    x = design(delta, delta.std(), np.zeros(n))
    direct = LogisticRegression(C=LC_C, max_iter=5000).fit(np.vstack([x, x]), np.r_[np.ones(n), np.zeros(n)], sample_weight=np.r_[preferences, 1 - preferences])
    assert fit.intercept == pytest.approx(direct.intercept_[0], rel=1e-6) and fit.length == pytest.approx(direct.coef_[0][0], rel=1e-6)
    # ... and close to the unpenalised maximum-likelihood fit (scipy), the weak penalty barely moving them
    from scipy.optimize import minimize

    t = np.tanh(delta / delta.std())

    def nll(w: np.ndarray) -> float:
        z = w[0] + w[1] * t
        return float(np.sum(np.logaddexp(0, -z) * preferences + np.logaddexp(0, z) * (1 - preferences)))

    mle = minimize(nll, np.zeros(2), method="BFGS").x
    assert fit.intercept == pytest.approx(mle[0], abs=0.02) and fit.length == pytest.approx(mle[1], abs=0.03)


def test_length_control_leaves_an_unbiased_judge_alone() -> None:
    rng = np.random.default_rng(1)
    n = 400
    quality = rng.normal(0.5, 1.0, n)
    delta = rng.normal(250.0, 200.0, n)
    preferences = (rng.random(n) < _sigmoid(quality)).astype(float)
    fit = fit_length_controlled(preferences, delta)
    assert abs(fit.length) < 0.4 and abs(fit.win_rate - 100 * preferences.mean()) < 4


# -- a judge engine that follows rules ------------------------------------------------------------


def _between(text: str, start: str, end: str) -> str:
    match = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.DOTALL)
    assert match, f"{start!r} not in the judge prompt"
    return match.group(1)


class RuleJudge:
    """A judge backend that answers by rule: pairwise, the longer answer ([[C]] when equal); single, a rating from
    ``rate(question, answer)`` (None: a reply with no verdict). Records the chats and temperatures it is sent."""

    def __init__(self, rate: Any = None) -> None:
        self.rate = rate or (lambda q, a: min(10, 1 + a.count("e")))
        self.chats: list[list[dict[str, str]]] = []

    def generate(self, prompts: Sequence[Any], params: SamplingParams, progress: bool = True) -> list[list[Completion]]:
        out = []
        for chat in prompts:
            self.chats.append(chat)
            text = chat[-1]["content"]
            if "[Answer A]" in text:
                a, b = _between(text, "[Answer A]", "[End of answer A]"), _between(text, "[Answer B]", "[End of answer B]")
                reply = "Answer A is longer. [[A]]" if len(a) > len(b) else "Answer B is longer. [[B]]" if len(b) > len(a) else "Equal. [[C]]"
            else:
                if "[The Start of Assistant's Answer]" in text:  # FastChat's single-v1 / single-math-v1
                    answer = _between(text, "[The Start of Assistant's Answer]", "[The End of Assistant's Answer]")
                elif "<|The Start of Assistant A's Conversation with User|>" in text:  # FastChat's multi-turn
                    answer = text.split("### Assistant A:\n")[-1].split("\n\n<|The End of Assistant A's Conversation")[0]
                else:
                    answer = _between(text, "[Answer]", "[End of answer]")
                rating = self.rate(text, answer)
                reply = "I cannot decide." if rating is None else f"Fair enough.\nRating: [[{rating}]]"
            out.append([Completion(reply, [], "stop", 0, [])])
        return out


class Answerer:
    """A model stand-in that answers each question with ``answer(question, temperature)``; records temperatures."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.temperatures: dict[str, float] = {}

    def generate(self, prompts: Sequence[Any], params: SamplingParams, progress: bool = True) -> list[list[Completion]]:
        out = []
        for chat in prompts:
            question = chat[-1]["content"] if isinstance(chat, list) else chat
            self.temperatures[question] = params.temperature
            out.append([Completion(self.answer(question, len(chat) if isinstance(chat, list) else 1), [], "stop", 0, [])])
        return out


# -- judge prompts, MT-Bench -------------------------------------------------------------------------


def test_judge_prompt_files_are_read_or_refused_line_by_line(tmp_path: Path) -> None:
    prompts = read_judge_prompts(JUDGE_PROMPTS)
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn", "pair-v2"} <= set(prompts)
    assert prompts["pair-v2"].type == "pairwise" and prompts["single-math-v1"].category == "math"
    bad = tmp_path / "bad.jsonl"
    good = JUDGE_PROMPTS.read_text().splitlines()[0]
    bad.write_text("\n".join([good, "{not json", json.dumps({"name": "x", "type": "single"}), json.dumps({**json.loads(good), "type": "triple"})]) + "\n")
    with pytest.raises(ValueError) as e:
        read_judge_prompts(bad)
    message = str(e.value)
    assert "3 bad judge prompt line(s)" in message and f"{bad}:2: not JSON" in message
    assert f"{bad}:3: missing or non-text field(s) system_prompt, prompt_template, output_format" in message and f"{bad}:4: field type" in message
    with pytest.raises(ValueError, match="needs the field 'answer'"):
        DEFAULT_PROMPTS["single"].render({"question": "q"})


def test_mt_bench_grades_both_turns_reference_guided_where_due(tmp_path: Path) -> None:
    questions = [q for q in mt_bench.read_questions(QUESTIONS) if q.category in ("writing", "math", "extraction")][::5]
    assert {q.category for q in questions} == {"writing", "math", "extraction"} and all(q.reference for q in questions if q.category == "math")
    model = Answerer(lambda question, length: f"Turn {length // 2 + 1}: " + ("e" * (5 if length == 1 else 2)))
    second_turns = [q.turns[1] for q in questions if q.category == "extraction"]  # the judge cannot rate these
    rule = RuleJudge(rate=lambda text, answer: None if any(t in text for t in second_turns) else min(10, 1 + answer.count("e")))
    judge = Judge(Teacher(rule, "rules", tmp_path / "judge"), read_judge_prompts(JUDGE_PROMPTS))
    answers = mt_bench.answer(Teacher(model, "m", tmp_path / "m"), questions, max_new_tokens=32)
    assert [len(a) for a in answers] == [2] * len(questions)
    for q in questions:  # FastChat's temperatures by category, both turns
        assert model.temperatures[q.turns[0]] == model.temperatures[q.turns[1]] == mt_bench.TEMPERATURES[q.category]

    items = mt_bench.grade(judge, questions, answers, model="m")
    assert len(items) == 2 * len(questions) == len(rule.chats)
    for q, item in zip([q for q in questions for _ in (1, 2)], items):
        sent = rule.chats[items.index(item)][-1]["content"]
        if q.category == "math":
            assert item["reference_guided"] and item["judge_prompt"].startswith("single-math-v1") and q.reference[item["turn"] - 1] in sent
        else:
            assert not item["reference_guided"] and item["judge_prompt"].startswith("single-v1")
        if item["turn"] == 2:  # judged with the whole conversation
            assert q.turns[0] in sent and q.turns[1] in sent and item["judge_prompt"].endswith("multi-turn")
    extraction = [i for i in items if i["category"] == "extraction" and i["turn"] == 2]
    assert extraction and all(i["rating"] is None and "no rating" in i["reason"] for i in extraction)

    results = mt_bench.results({"m": items}, judge="rules")
    head = results.models["m"]
    assert head["turn 1"].value == 6.0 and head["turn 2"].value == 3.0  # "eeeee" -> 6, "ee" -> 3
    assert head["unparsable judgements"].value == len(extraction) and head["unparsable judgements"].n == len(items)
    assert head["score"].n == len(items) - len(extraction) and head["score"].low <= head["score"].value <= head["score"].high
    assert set(results.groups["m"]) == {"writing", "math", "extraction"} and results.groups["m"]["extraction"]["score"].value == 6.0
    assert any("not scored" in note for note in results.notes)
    page = results.write(tmp_path / "run") / "report.html"
    assert page.is_file() and "data:image/png;base64," in page.read_text() and "unparsable judgements" in page.read_text()
    again = read_results(tmp_path / "run")
    assert again.models == results.models and again.groups == results.groups and len(again.items) == len(items)


# -- win rates and arena with a length-biased judge -----------------------------------------------------------


def test_winrate_with_a_length_biased_judge_both_orders_and_counts(tmp_path: Path) -> None:
    rng = random.Random(0)
    n = 120
    questions = [f"Question {i}?" for i in range(n)]
    reference = ["x" * rng.randint(50, 150) for _ in questions]
    # the model's answers are longer on 3 items in 4: the length-loving judge prefers them there
    longer = [ref + "y" * 60 if i % 4 else ref[:-40] for i, ref in enumerate(reference)]
    judge = Judge(Teacher(RuleJudge(), "long-lover", tmp_path / "j"), DEFAULT_PROMPTS)
    results = winrate_results(judge, questions, {"long": longer}, reference, reference="ref")
    head = results.models["long"]
    assert head["win rate"].value == pytest.approx(75.0) and head["win rate"].low < 75 < head["win rate"].high
    # at equal length this judge has no reason to prefer either: the LC win rate is back near 50
    assert abs(head["LC win rate"].value - 50) < 8 and head["LC win rate"].low < 50 < head["LC win rate"].high < 75
    assert head["unparsable orders"].value == 0 and head["position-inconsistent pairs"].value == 0
    assert head["position-inconsistent pairs"].n == n and results.settings["glm"]["long"]["length"] > 1
    assert len(results.items) == n and results.items[1]["preference"] == 1.0 and results.items[0]["preference"] == 0.0


def test_arena_ranks_by_the_judges_preference_with_intervals(tmp_path: Path) -> None:
    questions = [f"Say something about topic {i}." for i in range(30)]
    answers = {name: [f"{q} " + "w" * size for q in questions] for name, size in (("short", 5), ("medium", 40), ("long", 120))}
    judge = Judge(Teacher(RuleJudge(), "long-lover", tmp_path / "j"), DEFAULT_PROMPTS)
    results = arena_results(judge, questions, answers)
    assert list(results.models) == ["long", "medium", "short"]
    ratings = {m: r["rating"] for m, r in results.models.items()}
    assert ratings["long"].value > ratings["medium"].value > ratings["short"].value
    assert all(r.low <= r.value <= r.high and r.n == 60 for r in ratings.values())
    assert results.models["long"]["win share"].value == 100.0 and results.models["short"]["win share"].value == 0.0
    assert len(results.items) == 90 and {i["outcome"] for i in results.items} == {"b"}  # pairs in order: short-medium, short-long, medium-long
    page = results.write(tmp_path / "arena") / "report.html"
    assert "rating" in page.read_text() and (tmp_path / "arena" / "plot.png").stat().st_size > 1000


def test_results_round_trip_and_metric_text() -> None:
    results = Results("x", models={"m": {"a": Metric(1.5, 1.0, 2.0, 3), "b": Metric(2, n=5, count=True)}}, plot_metric="a")
    assert str(results.models["m"]["a"]) == "1.50 [1.00, 2.00]" and str(results.models["m"]["b"]) == "2 of 5"
    assert Results.from_dict(json.loads(json.dumps(results.to_dict()))).models == results.models
    assert str(Metric(math.nan)) == "n/a"


# -- RLAIF ---------------------------------------------------------------------------------------------------


def test_label_by_judge_ranks_by_verifiers_first_and_never_pairs_an_unrated_sample(tmp_path: Path) -> None:
    from posttrain.data.prompts import read_prompts
    from posttrain.synth.label import label_prompts

    prompts_file = tmp_path / "prompts.jsonl"
    rows = [
        {"key": 0, "prompt": "Describe the sea.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {"key": 1, "prompt": "Describe the sky.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = read_prompts(prompts_file)
    samples = {
        "Describe the sea.": ["eeee, eeee", "calm water", "waves, eeeeeeee", "deep green sea"],  # the judge rates e's; the verifier wants no comma
        "Describe the sky.": ["blue", "b", "c", "d"],  # the judge cannot rate three of them
    }

    class Sampler:
        def generate(self, inputs: Sequence[Any], params: SamplingParams, progress: bool = True) -> list[list[Completion]]:
            return [[Completion(t, [], "stop", 0, []) for t in samples[i["prompt"][0]["content"]]] for i in inputs]

    def rate(text: str, answer: str) -> int | None:
        return None if answer in ("b", "c", "d") else min(10, 1 + answer.count("e"))

    judge = Judge(Teacher(RuleJudge(rate), "rules", tmp_path / "j"), DEFAULT_PROMPTS)
    records, summary = label_prompts(Sampler(), prompts, k=4, scorer=judge_scorer(judge), scored_by="judge", with_verifiers=True, progress=False)
    assert summary.by == "verifiers+judge" and summary.unscored_samples == 3 and summary.skipped == {"unscored": 1} and summary.pairs == 1
    (record,) = records
    # the verifier ranks first: chosen follows it (the judge preferring it of the two that do), rejected breaks it (the
    # judge's lower of the two that do), though the judge rates the rejected one above the chosen one
    assert record["chosen"][0]["content"] == "deep green sea" and record["rejected"][0]["content"] == "eeee, eeee"
    meta = record["meta"]
    assert meta["by"] == "verifiers+judge" and meta["scores"] == [9.0, 2.0, 10.0, 6.0] and meta["pass_rates_strict"] == [0.0, 1.0, 0.0, 1.0]

    alone, summary = label_prompts(Sampler(), prompts[:1], k=4, scorer=judge_scorer(judge), scored_by="judge", progress=False)
    assert summary.by == "judge" and alone[0]["chosen"][0]["content"] == "waves, eeeeeeee" and alone[0]["rejected"][0]["content"] == "calm water"


# -- the CLI on tiny real models -----------------------------------------------------------------------------


def test_cli_runs_every_judged_eval_on_tiny_models_and_reruns_from_the_cache(tmp_path: Path) -> None:
    """A random tiny model answers and judges: no verdict is readable, every one is counted, reports are written."""
    runner = CliRunner()
    small = ["--max-new-tokens", "8", "--judge-max-new-tokens", "8", "--batch-size", "4", "--fp32"]
    mt = tmp_path / "mt"
    args = ["eval", "mt-bench", "-m", "tiny-llama", "-j", "tiny-llama", "--questions", str(QUESTIONS), "--judge-prompts", str(JUDGE_PROMPTS), "--limit", "2", "-o", str(mt), *small]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((mt / "results.json").read_text())
    assert data["models"]["tiny-llama"]["unparsable judgements"] == {"value": 4.0, "low": None, "high": None, "n": 4, "count": True}
    assert (mt / "report.html").is_file() and len((mt / "items.jsonl").read_text().splitlines()) == 4
    result = runner.invoke(app, args)  # everything from the cache
    assert result.exit_code == 0 and set(re.findall(r"(\d+)\s+generated", result.output)) == {"0"}, result.output

    answers = tmp_path / "reference.jsonl"
    answers.write_text("".join(json.dumps({"prompt": f"Name a colour, {i}.", "completion": "Blue."}) + "\n" for i in range(3)))
    result = runner.invoke(app, ["eval", "winrate", "-m", "tiny-llama", "--reference", str(answers), "-j", "tiny-llama", "-o", str(tmp_path / "wr"), *small])
    assert result.exit_code == 0, result.output
    head = read_results(tmp_path / "wr").models["tiny-llama"]
    assert head["unparsable orders"].value == 6 and head["unparsable orders"].n == 6 and head["win rate"].n == 0

    result = runner.invoke(app, ["eval", "arena", "--models", "tiny-llama,tiny-qwen2", "-j", "tiny-llama", "--prompts", str(QUESTIONS), "--limit", "2", "-o", str(tmp_path / "ar"), *small])
    assert result.exit_code == 1 and "no battle had a readable verdict" in result.output

    result = runner.invoke(app, ["eval", "followbench", "-m", "tiny-llama", "--queries", "3", "--levels", "2", "-o", str(tmp_path / "fb"), "--max-new-tokens", "8", "--fp32"])
    assert result.exit_code == 0, result.output
    fb = read_results(tmp_path / "fb")
    assert set(fb.groups["tiny-llama"]) == {"level 1", "level 2"} and fb.models["tiny-llama"]["CSL"].n == 3 and (tmp_path / "fb" / "report.html").is_file()

    result = runner.invoke(app, ["eval", "winrate", "-m", "tiny-llama", "--reference", "tiny-qwen2", "-j", "tiny-llama", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "give --prompts FILE" in result.output


# -- verdicts from probabilities ---------------------------------------------------------------------------------


def test_verdicts_from_probabilities_arithmetic_and_refusal() -> None:
    from posttrain.eval.verdict_probs import VerdictProbs

    rating = {str(d): 0.0 for d in range(1, 11)} | {"6": 0.5, "8": 0.25, "10": 0.05}  # mass 0.8
    verdict, text = VerdictProbs._verdict("single", rating)
    assert verdict.value == pytest.approx((6 * 0.5 + 8 * 0.25 + 10 * 0.05) / 0.8) and "expected rating" in text
    verdict, _ = VerdictProbs._verdict("pairwise", {"A": 0.3, "B": 0.5, "C": 0.2})
    assert verdict.value == pytest.approx(0.4)
    verdict, _ = VerdictProbs._verdict("pairwise", {"A": 0.2, "B": 0.1, "C": 0.1})
    assert verdict.value is None and "only 0.40" in verdict.reason


def test_probs_mode_on_a_tiny_model_counts_what_it_cannot_read_and_caches(tmp_path: Path) -> None:
    from posttrain.eval.judge import open_backend
    from posttrain.eval.pairwise import both_orders, judge_counts

    teacher = open_backend("tiny-llama", tmp_path / "c", batch_size=4)
    judge = Judge(teacher, DEFAULT_PROMPTS, mode="probs")
    first = judge.rate(["What is 2+2?", "Name a colour."], ["4", "Blue."])
    assert all(j.verdict.value is None and "of the judge's probability" in j.verdict.reason and "P(10)=" in j.text for j in first)
    outcomes = both_orders(judge, ["What is 2+2?"], ["4"], ["five"], what="pair")
    assert judge_counts(outcomes)["unparsable orders"] == 2 and outcomes[0].preference is None
    cache_file = next((tmp_path / "c").glob("*.jsonl"))
    lines = len(cache_file.read_text().splitlines())
    assert lines == 4 and [j.text for j in judge.rate(["What is 2+2?", "Name a colour."], ["4", "Blue."])] == [j.text for j in first]
    assert len(cache_file.read_text().splitlines()) == lines  # answered from the cache
    with pytest.raises(ValueError, match="judge mode"):
        Judge(teacher, DEFAULT_PROMPTS, mode="vibes")


def test_label_by_judge_on_the_cli_and_its_pairs_train_with_dpo(tmp_path: Path) -> None:
    from posttrain.data.prompts import read_prompts
    from posttrain.synth.label import label_prompts

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": f"Say something about the number {i}."}) + "\n" for i in range(3)))
    runner = CliRunner()
    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["label", "-m", "tiny-llama", "--judge", "tiny-llama", "--judge-mode", "probs", "--data", str(prompts_file), "-o", str(out),
                                 "--k", "2", "--max-new-tokens", "6", "--fp32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "labelled by judge" in result.output and "unscored 3" in result.output and "6 of 6 samples got no readable rating" in result.output
    result = runner.invoke(app, ["label", "-m", "tiny-llama", "--judge", "tiny-llama", "--reward-model", str(tmp_path), "--data", str(prompts_file), "-o", str(out)])
    assert result.exit_code == 1 and "not both" in result.output

    # pairs labelled by a judge that rates longer answers higher: written as posttrain dpo reads them, and trained on
    samples = {f"Say something about the number {i}.": ["It is a number.", "It is a number with a long story behind it."] for i in range(3)}

    class Sampler:
        def generate(self, inputs: Sequence[Any], params: SamplingParams, progress: bool = True) -> list[list[Completion]]:
            return [[Completion(t, [], "stop", 0, []) for t in samples[i["prompt"][0]["content"]]] for i in inputs]

    judge = Judge(Teacher(RuleJudge(lambda text, answer: min(10, len(answer) // 5)), "rules", tmp_path / "j"), DEFAULT_PROMPTS)
    records, summary = label_prompts(Sampler(), read_prompts(prompts_file), k=2, scorer=judge_scorer(judge), scored_by="judge", progress=False)
    assert summary.pairs == 3 and all(r["chosen"][0]["content"].endswith("behind it.") for r in records)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = runner.invoke(app, ["dpo", "--set", "model.name=tiny-llama", "--set", f"data.path={out}", "--set", "train.micro_batch_size=1", "--max-steps", "2", "-o", str(tmp_path / "dpo")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()) == 2
