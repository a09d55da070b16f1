"""``posttrain label`` on a tiny model: preference pairs by verifiers (AutoIF's rule) and by a scorer or a
trained reward model, readable as preference data and renderable for DPO; every prompt counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sft_fixtures import torch_threads

from posttrain.data.chat import ChatRenderer
from posttrain.data.formats import DataError, ReadReport, read_records
from posttrain.data.prompts import read_prompts
from posttrain.generate.engine import Engine
from posttrain.models.load import load_tokenizer
from posttrain.records import PromptRecord
from posttrain.synth.label import label_file, label_prompts
from posttrain.verify.scoring import score_response, verifiers_of

QUESTIONS = [
    "What color is the sky?",
    "Write a poem about the sea.",
    "Give me three tips for staying healthy.",
    "Translate good morning into Spanish.",
    "What is two plus two?",
    "Tell me about Paris.",
    "Explain how photosynthesis works.",
    "Summarize the meeting notes.",
]
INSTRUCTIONS = [
    (["change_case:english_lowercase"], [{}]),
    (["punctuation:no_comma"], [{}]),
    (["startend:end_checker"], [{"end_phrase": "Is there anything else I can help with?"}]),
    (["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}]),
    (["startend:end_checker", "punctuation:no_comma"], [{"end_phrase": "e"}, {}]),
    (["keywords:letter_frequency"], [{"letter": "e", "let_frequency": 2, "let_relation": "at least"}]),
    (["keywords:letter_frequency"], [{"letter": "e", "let_frequency": 1, "let_relation": "less than"}]),
    (["startend:end_checker", "change_case:english_lowercase"], [{"end_phrase": "s"}, {}]),
]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def write_ifeval_prompts(path: Path) -> Path:
    with path.open("w") as f:
        for key, (q, (ids, kwargs)) in enumerate(zip(QUESTIONS, INSTRUCTIONS)):
            f.write(json.dumps({"key": key, "prompt": q, "instruction_id_list": ids, "kwargs": kwargs}) + "\n")
    return path


def pass_rates(record: PromptRecord, response: str) -> tuple[float, float]:
    score = score_response(record, response)
    n = len(score.instructions)
    return sum(i.strict for i in score.instructions) / n, sum(i.loose for i in score.instructions) / n


def assert_trainable_by_dpo(path: Path) -> list[dict]:
    """Reads as preference data with no rejects, and every pair renders into two examples with trained tokens."""
    report = ReadReport(str(path))
    records = read_records(path, format="preference", on_error="skip", report=report)
    assert not report.rejected and len(records) == report.read
    renderer = ChatRenderer(load_tokenizer("tiny-llama"))
    for record in records:
        chosen, rejected = renderer.render_preference(record)
        assert chosen is not None and rejected is not None
        assert any(label != -100 for label in chosen["labels"]) and any(label != -100 for label in rejected["labels"])
    return records


def test_label_by_verifiers_writes_autoif_pairs(tmp_path):
    prompts_path = write_ifeval_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "pairs.jsonl"
    summary = label_file("tiny-llama", prompts_path, out, k=8, max_new_tokens=8, seed=0, progress=False)

    assert summary.prompts == len(QUESTIONS) and summary.samples == 8 * len(QUESTIONS)
    assert summary.pairs + sum(summary.skipped.values()) == summary.prompts
    assert summary.pairs >= 2 and sum(summary.skipped.values()) >= 1, summary
    assert set(summary.skipped) <= {"no_chosen", "no_rejected", "too_few"}

    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(raw) == summary.pairs
    records = assert_trainable_by_dpo(out)
    by_prompt = {
        q: PromptRecord(key=k, prompt=q, instruction_id_list=ids, kwargs=kw)
        for k, (q, (ids, kw)) in enumerate(zip(QUESTIONS, INSTRUCTIONS))
    }
    for line, record in zip(raw, records):
        assert record["prompt"] == [{"role": "user", "content": line["prompt"][0]["content"]}]
        prompt = by_prompt[record["prompt"][0]["content"]]
        chosen, rejected = record["chosen"][0]["content"], record["rejected"][0]["content"]
        # re-verified here, independently of the labeller: chosen follows at least half, rejected none
        assert pass_rates(prompt, chosen)[0] >= 0.5
        assert pass_rates(prompt, rejected) == (0.0, 0.0)
        meta = line["meta"]
        assert meta["key"] == prompt.key and len(meta["pass_rates_strict"]) == 8
        assert meta["chosen_pass_rate"] == max(meta["pass_rates_strict"]) >= 0.5 and meta["rejected_pass_rate"] == 0.0
        assert "meta" not in record  # the reader keeps the canonical fields only

    # ... and `posttrain dpo` trains on the file as written.
    from typer.testing import CliRunner

    from posttrain.cli import app

    result = CliRunner().invoke(
        app, ["dpo", "--set", "model.name=tiny-llama", "--set", f"data.path={out}", "--set", "train.micro_batch_size=1", "--max-steps", "2", "-o", str(tmp_path / "dpo")]
    )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()) == 2


def test_label_by_scorer_pairs_best_against_worst(tmp_path):
    prompts = read_prompts(write_ifeval_prompts(tmp_path / "prompts.jsonl"))
    engine = Engine.from_name("tiny-llama", device="cpu")
    calls = []

    def e_count(ps: list, responses: list[str]) -> list[float]:
        calls.append(len(responses))
        assert all(isinstance(p, list) and p[0]["role"] == "user" for p in ps)
        return [float(r.count("e")) for r in responses]

    records, summary = label_prompts(engine, prompts, k=6, scorer=e_count, max_new_tokens=8, progress=False)
    assert calls == [6 * len(prompts)]  # one call for every sample
    assert summary.by == "reward_model" and summary.pairs + sum(summary.skipped.values()) == len(prompts)
    assert summary.pairs >= 1
    for record in records:
        scores = record["meta"]["scores"]
        assert record["chosen"][0]["content"].count("e") == max(scores) > min(scores) == record["rejected"][0]["content"].count("e")
    out = tmp_path / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert_trainable_by_dpo(out)


def test_label_by_a_trained_reward_model(tmp_path):
    """The wiring to ``posttrain.train.reward``: label by verifiers, train a reward model two steps on the
    pairs, label again by that reward model."""
    from posttrain.config import RewardConfig, load_config
    from posttrain.train import reward

    prompts_path = write_ifeval_prompts(tmp_path / "prompts.jsonl")
    pairs = tmp_path / "pairs.jsonl"
    label_file("tiny-llama", prompts_path, pairs, k=8, max_new_tokens=8, progress=False)
    cfg = load_config(
        {
            "model": {"name": "tiny-llama"},
            "data": {"path": str(pairs), "max_length": 64},
            "train": {"max_steps": 2, "micro_batch_size": 2, "device": "cpu", "lr": 1e-3},
            "output_dir": str(tmp_path / "rm"),
        },
        cls=RewardConfig,
    )
    rm_run = reward.train(cfg).run_dir
    out = tmp_path / "rm_pairs.jsonl"
    summary = label_file(
        "tiny-llama", prompts_path, out, by="reward-model", reward_model=rm_run, k=4, max_new_tokens=8, seed=1, progress=False
    )
    assert summary.by == "reward_model" and summary.pairs + sum(summary.skipped.values()) == len(QUESTIONS)
    assert summary.pairs >= 1
    for line in out.read_text().splitlines():
        meta = json.loads(line)["meta"]
        assert meta["scores"][meta["chosen_index"]] == max(meta["scores"]) > min(meta["scores"]) == meta["scores"][meta["rejected_index"]]
    assert_trainable_by_dpo(out)


def test_label_by_verifiers_needs_instructions(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "Hi there."}) + "\n")
    with pytest.raises(ValueError, match="IFEval-format prompts"):
        label_file("tiny-llama", path, tmp_path / "out.jsonl", k=2, max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="needs --reward-model"):
        label_file("tiny-llama", path, tmp_path / "out.jsonl", by="reward-model", k=2, progress=False)


def test_read_prompts_takes_every_format_and_reports_bad_lines(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        json.dumps({"prompt": "Hi there."})
        + "\n"
        + json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}], "extra": 1})
        + "\n"
    )
    a, b = read_prompts(plain)
    assert a.prompt == [{"role": "user", "content": "Hi there."}] and a.text == "Hi there."
    assert b.text == "Hello?" and b.record["extra"] == 1 and b.verifiable is None
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "Q2"},
                    {"role": "assistant", "content": "A2"},
                ]
            }
        )
        + "\n"
    )
    (c,) = read_prompts(chat)
    assert [m["content"] for m in c.prompt] == ["Q1", "A1", "Q2"] and c.text == "Q2"
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"prompt": "Complete this: ", "completion": "done"}) + "\n")
    (d,) = read_prompts(raw)
    assert d.prompt == "Complete this: " and d.response_record("x") == "x"  # text prompts stay raw text
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(DataError) as err:
        read_prompts(bad, format="prompts")
    assert "bad.jsonl:1" in str(err.value) and "bad.jsonl:2" in str(err.value)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(
        json.dumps({"key": 1, "prompt": "x", "instruction_id_list": ["no:such_check"], "kwargs": [{}]})
        + "\n"
        + json.dumps({"key": 2, "prompt": "y", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_bullets": 2}]})
        + "\n"
    )
    with pytest.raises(DataError, match="no:such_check") as err:
        read_prompts(unknown, validate=verifiers_of)  # the verifiers' check: every bad record, each with its place
    assert "unknown.jsonl row 0" in str(err.value) and "unknown.jsonl row 1" in str(err.value) and "num_bullets" in str(err.value)
    assert [p.verifiable.key for p in read_prompts(unknown)] == [1, 2]  # the data layer alone checks the shape only


def test_dpo_takes_the_reference_log_probs_recorded_while_sampling(tmp_path):
    """`label --reference-logps` records the sampler's log-probs; DPO's precompute takes them where the
    tokens, weights and precision match (and they equal what its forward pass gives), and runs the rest."""
    import numpy as np
    import torch

    from posttrain.config import load_config
    from posttrain.data.cache import prepare
    from posttrain.data.chat import RenderOptions
    from posttrain.models.load import load_model
    from posttrain.train import dpo
    from posttrain.train.forward import Forward
    from posttrain.train.runtime import Runtime

    out = tmp_path / "pairs.jsonl"
    summary = label_file(
        "tiny-llama", write_ifeval_prompts(tmp_path / "prompts.jsonl"), out, by="reward-model",
        scorer=lambda ps, rs: [float(r.count("e")) for r in rs], k=6, max_new_tokens=12, progress=False, reference_logps=True,
    )  # fmt: skip
    assert summary.pairs >= 3
    metas = [json.loads(line)["meta"] for line in out.read_text().splitlines()]
    assert {m["reference"]["precision"] for m in metas} == {"float32"} and len({m["reference"]["model"] for m in metas}) == 1
    assert all(m["reference"][side]["logp"] < 0 and m["reference"][side]["tokens"] >= 1 for m in metas for side in ("chosen", "rejected"))

    raw = {"model": {"name": "tiny-llama"}, "data": {"path": str(out), "max_length": 128}, "output_dir": str(tmp_path / "run")}
    raw["train"] = {"bf16": False, "micro_batch_size": 2, "max_steps": 1, "device": "cpu"}
    cfg = load_config(raw, cls=dpo.DPOConfig)
    model = load_model(cfg.model, torch.device("cpu")).eval()
    given = dpo.sampler_reference(cfg, model)
    assert len(given) >= summary.pairs  # one per distinct response measured

    tokenizer = load_tokenizer("tiny-llama")
    data = prepare(out, tokenizer, RenderOptions(max_length=128), format="preference")
    module = Forward(model, one_row=True)
    pad = tokenizer.pad_token_id
    taken_table, _, taken, _ = dpo.reference_logps(module, data, pad, cfg, Runtime(), cache_root=tmp_path / "a", given=given)
    computed, _, none, _ = dpo.reference_logps(module, data, pad, cfg, Runtime(), cache_root=tmp_path / "b")
    assert none == 0 and 0 < taken <= len(data)
    np.testing.assert_allclose(taken_table, computed, rtol=1e-4, atol=1e-4)

    # other weights, or bf16 training: nothing is taken
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert dpo.sampler_reference(cfg, model) == {}
    assert dpo.sampler_reference(load_config({**raw, "train": {**raw["train"], "bf16": True}}, cls=dpo.DPOConfig), model) == {}

    # end to end: `train` reports how many it took
    result = dpo.train(cfg)
    assert result.reference_from_sampler == taken and not result.reference_from_cache
    stats = json.loads((result.run_dir / "data_stats.json").read_text())
    assert stats["reference"] == {"from_cache": False, "from_sampler": taken, "scored_by_process": [len(data) - taken]}


def test_rejected_pass_rate_bound_pairs_both_against_one(tmp_path):
    """AutoIF's rule (the default) skips a prompt whose worst response still follows one of two instructions;
    ``max_rejected_pass_rate=0.5`` pairs it, against the least-followed response, never one as good as the chosen."""
    from posttrain.synth.label import pair_by_verifiers

    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps(
            {
                "key": 1,
                "prompt": "Tell me about Paris.",
                "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
                "kwargs": [{}, {}],
            }
        )
        + "\n"
    )
    (prompt,) = read_prompts(path, validate=verifiers_of)
    both, lower_only, comma_free_only = "paris is old and lovely.", "paris, old and lovely.", "Paris is old and lovely."
    record, why = pair_by_verifiers(prompt, [both, lower_only, comma_free_only])
    assert record is None and why == "no_rejected"
    record, why = pair_by_verifiers(prompt, [lower_only, both, comma_free_only], max_rejected_pass_rate=0.5)
    assert why is None
    assert record["chosen"][0]["content"] == both and record["rejected"][0]["content"] == lower_only  # the first of equals
    assert record["meta"]["chosen_pass_rate"] == 1.0 and record["meta"]["rejected_pass_rate"] == 0.5
    # never a pair of equals: with every response following one of two, nothing is chosen over anything
    record, why = pair_by_verifiers(prompt, [lower_only, comma_free_only], max_rejected_pass_rate=0.5)
    assert record is None and why == "no_rejected"
    # a response following nothing still goes first, as under AutoIF's rule
    record, _ = pair_by_verifiers(prompt, [both, lower_only, "Paris, old."], max_rejected_pass_rate=0.5)
    assert record["rejected"][0]["content"] == "Paris, old." and record["meta"]["rejected_pass_rate"] == 0.0
