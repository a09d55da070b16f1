"""Activation steering: the fit's arithmetic, the hooks' exact edits, the file, and generation through Engine."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.generate import Engine, SamplingParams
from posttrain.generate.intervene import Steering, steered
from posttrain.models.zoo import build_tiny
from posttrain.steer.vectors import Direction, SteeringSet, direction, last_token_residuals


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = build_tiny("llama")
    return model.eval(), tokenizer


def test_direction_is_the_normalised_mean_difference_and_c_the_mean_projection():
    g = torch.Generator().manual_seed(0)
    without = torch.randn(5, 3, 8, generator=g)
    shift = torch.randn(3, 8, generator=g)
    with_instruction = without + shift + 0.01 * torch.randn(5, 3, 8, generator=g)
    d = direction(with_instruction, without)
    mean = (with_instruction - without).mean(0)
    torch.testing.assert_close(d.u * d.norm.unsqueeze(-1), mean)
    torch.testing.assert_close(d.u.norm(dim=-1), torch.ones(3))
    for layer in range(3):
        assert d.c[layer].item() == pytest.approx((with_instruction[:, layer] @ d.u[layer]).mean().item(), rel=1e-5)


def _residuals(model, ids):
    return last_token_residuals(model, [ids], batch_size=1)[0]


def test_add_and_adjust_edit_exactly_the_layer_they_name(tiny):
    model, tokenizer = tiny
    ids = tokenizer("the quick brown fox jumps")["input_ids"]
    base = _residuals(model, ids)
    d = base.shape[1]
    u = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(1)), dim=0)
    # the capture hook is registered after the steering hook, so it sees the steered output of layer 0
    with steered(model, [Steering(0, u, "add", 2.5)]):
        added = _residuals(model, ids)
    torch.testing.assert_close(added[0], base[0] + 2.5 * u)
    assert not torch.allclose(added[1], base[1])  # the edit flows on to the next layer
    with steered(model, [Steering(1, u, "adjust", -3.0)]):
        adjusted = _residuals(model, ids)
    assert torch.equal(adjusted[0], base[0])  # layers before the steered one are untouched
    assert (adjusted[1] @ u).item() == pytest.approx(-3.0, abs=1e-4)
    torch.testing.assert_close(adjusted[1] - (adjusted[1] @ u) * u, base[1] - (base[1] @ u) * u)
    # the hooks are gone after the block, also after an error inside it
    with pytest.raises(RuntimeError), steered(model, [Steering(0, u, "add", 1.0)]):
        raise RuntimeError("inside")
    assert torch.equal(_residuals(model, ids), base)


def test_weight_zero_gives_the_unsteered_logits_and_tokens(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, batch_size=8, fast=False)
    prompts = ["write a poem about the sea", "name three rivers", "what is two plus two"]
    params = SamplingParams(max_new_tokens=12)
    plain = [c[0].token_ids for c in engine.generate(prompts, params, progress=False)]
    u = torch.nn.functional.normalize(torch.ones(model.config.hidden_size), dim=0)
    with steered(model, [Steering(1, u, "add", 0.0)]):
        zero = [c[0].token_ids for c in engine.generate(prompts, params, progress=False)]
    assert zero == plain
    with steered(model, [Steering(1, u, "add", 50.0)]):
        pushed = [c[0].token_ids for c in engine.generate(prompts, params, progress=False)]
    assert pushed != plain  # a large push changes what is generated: the hooks are really in the loop


def test_the_file_round_trips(tmp_path):
    g = torch.Generator().manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    steering = SteeringSet("tiny-llama", {"detectable_format:title": Direction(u, torch.rand(4, generator=g), torch.randn(4, generator=g), 2, 4.0)})
    steering.save(tmp_path / "v.safetensors")
    back = SteeringSet.load(tmp_path / "v.safetensors")
    d = back.directions["detectable_format:title"]
    assert back.model == "tiny-llama" and d.layer == 2 and d.weight == 4.0 and torch.equal(d.u, u)
    s = back.steering("detectable_format:title")
    assert s.layer == 2 and s.mode == "add" and s.amount == pytest.approx(4.0 * float(d.norm[2]))
    assert back.steering("detectable_format:title", mode="adjust").amount == pytest.approx(float(d.c[2]))
    with pytest.raises(KeyError, match="no direction for instruction type"):
        back.steering("punctuation:no_comma")
    with pytest.raises(FileNotFoundError, match="posttrain steer fit"):
        SteeringSet.load(tmp_path / "missing.safetensors")


def test_built_prompts_can_carry_their_query_and_instruction_apart():
    from posttrain.synth.verifiable import build_prompts

    plain = build_prompts("train", 12, 0, 2)
    parts = build_prompts("train", 12, 0, 2, parts=True)
    assert all("query" not in r and "instruction" not in r for r in plain)  # the demo's cached records are unchanged
    for a, b in zip(plain, parts):
        assert {k: b[k] for k in a} == a
        assert b["prompt"] == f"{b['query']} {b['instruction']}"


def test_repetition_and_perplexity_measure_what_they_say(tiny):
    from posttrain.steer.fluency import Bounds, Fluency, completion_nll, repetition

    assert repetition("the cat sat on the mat and then went home") == 0.0
    assert repetition("go on go on go on go on go on go on") > 0.7
    assert repetition("too short") == 0.0
    model, tokenizer = tiny
    prompts = [tokenizer("a short prompt")["input_ids"], tokenizer("a much longer prompt than the other one is")["input_ids"]]
    completions = [tokenizer(" one two three")["input_ids"], tokenizer(" four")["input_ids"]]
    batched = completion_nll(model, prompts, completions, batch_size=2)
    for p, c, got in zip(prompts, completions, batched):  # each alone, no padding: the same figure
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want = -logp[len(p) - 1 :].gather(-1, ids[0, len(p) :, None]).mean().item()
        assert got == pytest.approx(want, abs=1e-4)
    base = Fluency(4.0, 0.05, 10)
    assert Bounds(2.0, 0.1).within(Fluency(7.9, 0.14, 10), base)
    assert not Bounds(2.0, 0.1).within(Fluency(8.1, 0.0, 10), base)
    assert not Bounds(2.0, 0.1).within(Fluency(1.0, 0.16, 10), base)


def test_bootstrap_interval_holds_the_rate_and_narrows_with_more_prompts():
    from posttrain.verify.stats import bootstrap_interval

    small = bootstrap_interval([True, False] * 10)
    large = bootstrap_interval([True, False] * 200)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 2
    assert bootstrap_interval([True] * 5) == (1.0, 1.0)
    assert bootstrap_interval([True, False] * 10) == small  # seeded


def test_fit_and_eval_write_a_file_and_a_report_from_disjoint_queries(tmp_path):
    """The CLI end to end on a tiny model: the fit's queries (training split) are never the evaluation's (held out)."""
    from typer.testing import CliRunner

    from posttrain.cli import app
    from posttrain.cli.steer import _builtin
    from posttrain.steer.vectors import SteeringSet

    types = "change_case:english_lowercase,punctuation:no_comma"
    runner = CliRunner()
    fit = runner.invoke(app, ["steer", "fit", "--model", "tiny-llama", "--types", types, "--limit", "4", "--validation", "2", "--boost-prompts", "1",
                              "--max-new-tokens", "6", "-o", str(tmp_path / "v.safetensors")])  # fmt: skip
    assert fit.exit_code == 0, fit.output
    steering = SteeringSet.load(tmp_path / "v.safetensors")
    assert set(steering.directions) == set(types.split(","))
    report = steering.report
    for name, d in steering.directions.items():
        assert d.layer is not None and str(d.layer) in report["types"][name]["layers"]
    assert steering.boost in (1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0, 19.0) and len(report["boost"]["factors"]) == 10
    ev = runner.invoke(app, ["steer", "eval", "--model", "tiny-llama", "--steer", str(tmp_path / "v.safetensors"), "--limit", "3",
                             "--max-new-tokens", "6", "-o", str(tmp_path / "eval")])  # fmt: skip
    assert ev.exit_code == 0, ev.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for name in types.split(","):
        row = results["types"][name]["conditions"]
        assert set(row) == {"absent", "absent+steer", "present", "present+steer", "present+boost"}
        assert all(row[c]["n"] == 3 and row[c]["ci"][0] <= row[c]["pass"] <= row[c]["ci"][1] for c in row)
    assert set(results["gains"]) == {"steer_without_instruction", "steer_with_instruction", "boost_with_instruction"}
    assert all(g["ci"][0] <= g["gain"] <= g["ci"][1] for g in results["gains"].values())
    outputs = (tmp_path / "eval" / "outputs.jsonl").read_text().splitlines()
    assert len(outputs) == 2 * 3 * 5
    assert (tmp_path / "eval" / "plot.png").stat().st_size > 1000 and "<table>" in (tmp_path / "eval" / "report.html").read_text()
    fit_queries = {ex.query for ex in _builtin("train", 6, types.split(","), 0)}
    eval_queries = {ex.query for ex in _builtin("heldout", 3, types.split(","), 0)}
    assert fit_queries and eval_queries and not fit_queries & eval_queries


def test_eval_ifeval_steers_and_boosts_each_prompt_as_the_engine_does(tmp_path):
    """`eval ifeval --steer --instaboost` gives each prompt the responses Engine gives it with its types' steering and the boost."""
    from typer.testing import CliRunner

    from posttrain.cli import app
    from posttrain.generate.intervene import Intervention
    from posttrain.records import write_jsonl
    from posttrain.synth.verifiable import build_prompts

    engine = Engine.from_name("tiny-llama", batch_size=8)
    d = engine.model.config.hidden_size
    layers = engine.model.config.num_hidden_layers
    g = torch.Generator().manual_seed(4)
    u = torch.nn.functional.normalize(torch.randn(layers, d, generator=g), dim=-1)
    steering = SteeringSet("tiny-llama", {"punctuation:no_comma": Direction(u, torch.ones(layers), torch.full((layers,), 8.0), layers - 1)})
    steering.save(tmp_path / "v.safetensors")
    records = build_prompts("heldout", 4, 0, 1, ["punctuation:no_comma", "change_case:english_lowercase"], parts=True)
    write_jsonl(tmp_path / "prompts.jsonl", records)
    runner = CliRunner()
    args = ["eval", "ifeval", "--model", "tiny-llama", "--data", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "8",
            "--plot", str(tmp_path / "p.png"), "--per-item", str(tmp_path / "items.jsonl")]  # fmt: skip
    result = runner.invoke(app, [*args, "--steer", str(tmp_path / "v.safetensors"), "--instaboost", "5", "--fp32"])
    assert result.exit_code == 0, result.output
    got = [json.loads(line)["response"] for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    steer = steering.steering("punctuation:no_comma", mode="adjust")
    interventions = [Intervention((steer,) if "punctuation:no_comma" in r["instruction_id_list"] else (), 5.0) for r in records]
    want = engine.generate([r["prompt"] for r in records], SamplingParams(max_new_tokens=8), progress=False, intervention=interventions,
                           instructions=[r["instruction"] for r in records])  # fmt: skip
    assert got == [c[0].text for c in want]
    plain = engine.generate([r["prompt"] for r in records], SamplingParams(max_new_tokens=8), progress=False)
    assert got != [c[0].text for c in plain]
    # IFEval's own prompts keep no instruction apart: InstABoost says so instead of guessing
    bare = [{k: v for k, v in r.items() if k not in ("query", "instruction")} for r in records]
    write_jsonl(tmp_path / "bare.jsonl", bare)
    refused = runner.invoke(app, [*args[:4], "--data", str(tmp_path / "bare.jsonl"), "--max-new-tokens", "8", "--instaboost", "5"])
    assert refused.exit_code == 1 and "stored apart" in refused.output


def test_the_pipeline_eval_stage_steers_and_boosts_its_prompts(tmp_path):
    """A pipeline's steer: section: the held-out prompts (instructions kept apart) steered and boosted, the IFEval ones steered only."""
    from posttrain.demo.evaluate import evaluate_model
    from posttrain.demo.pipeline import PipelineConfig, build_prompt_files
    from posttrain.generate.intervene import Intervention
    from posttrain.records import read_jsonl

    engine = Engine.from_name("tiny-llama", batch_size=8)
    d, layers = engine.model.config.hidden_size, engine.model.config.num_hidden_layers
    u = torch.nn.functional.normalize(torch.randn(layers, d, generator=torch.Generator().manual_seed(5)), dim=-1)
    types = ["punctuation:no_comma", "change_case:english_lowercase"]
    steering = SteeringSet("tiny-llama", {t: Direction(u, torch.ones(layers), torch.full((layers,), 8.0), layers - 1) for t in types})
    steering.save(tmp_path / "v.safetensors")
    cfg = PipelineConfig.model_validate({
        "model": "tiny-llama", "generation": {"max_new_tokens": 6, "bf16": False},
        "prompts": {"n_train": 2, "n_heldout": 4, "n_ifeval": 3, "types": types, "max_instructions": 1},
        "steer": {"file": str(tmp_path / "v.safetensors"), "instaboost": 4.0},
    })  # fmt: skip
    build_prompt_files(cfg.prompts, tmp_path / "prompts", parts=True)
    evaluate_model(engine, "tiny-llama", tmp_path / "prompts", tmp_path / "out", cfg)
    for name, boosted in (("heldout", True), ("ifeval", False)):
        raw = list(read_jsonl(tmp_path / "prompts" / f"{name}.jsonl"))
        assert all(("instruction" in r) == boosted for r in raw)
        got = [r["response"] for r in read_jsonl(tmp_path / "out" / f"{name}.jsonl")]
        ivs = [Intervention(tuple(steering.steering(t, mode="adjust") for t in r["instruction_id_list"] if t in types), 4.0 if boosted else 1.0) for r in raw]
        want = engine.generate([r["prompt"] for r in raw], SamplingParams(max_new_tokens=6), progress=False, intervention=ivs,
                               instructions=[r.get("instruction") for r in raw] if boosted else None)  # fmt: skip
        assert got == [c[0].text for c in want], name
    with pytest.raises(ValueError, match="backend engine"):
        PipelineConfig.model_validate({"generation": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1"}, "steer": {"instaboost": 3}})
