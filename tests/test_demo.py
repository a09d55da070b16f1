"""`posttrain demo --quick` and `posttrain run`: every stage runs on a tiny model, artifacts are reused, the report renders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.config import ConfigError
from posttrain.demo import pipeline, report
from posttrain.verify import sandbox

STAGE_DIRS = ("prompts", "eval-start", "sample", "sft", "eval-sft", "label", "dpo", "eval-dpo")


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "quick"
    result = _invoke("demo", "--quick", "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    return out, result.output


def _rerun_copy(quick_run, tmp_path: Path, *args: str) -> tuple[Path, dict]:
    """The quick run copied and run again with ``args``: the copy and its summary."""
    out, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = _invoke("demo", "--quick", "--output-dir", str(copy), *args)
    assert result.exit_code == 0, result.output
    return copy, json.loads((copy / "summary.json").read_text())


def test_quick_demo_writes_report_and_summary(quick_run):
    out, output = quick_run
    for name in STAGE_DIRS:
        assert (out / name / "stage.json").is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for label in ("start", "SFT", "DPO"):
        held = summary["scores"][label]["heldout"]
        assert held["prompts"] == 12 and 0 <= held["prompt_loose"] <= 100
        assert summary["scores"][label]["ifeval"]["prompts"] == 6
        assert summary["scores"][label]["test"]["prompts"] == 6
    assert summary["sample"]["kept"] > 0 and summary["label"]["pairs"] > 0
    assert summary["sft"]["steps"] == 4 and summary["dpo"]["steps"] == 4
    assert set(summary["gain_start_to_final"]) == {"test", "heldout", "ifeval"}
    # the frozen test split: built from its own queries, none of them a development or training prompt's, with its hash
    import hashlib

    test_file = out / "prompts" / "test.jsonl"
    assert summary["prompts"]["test_sha256"] == hashlib.sha256(test_file.read_bytes()).hexdigest()
    dev = {json.loads(line)["prompt"] for name in ("train", "heldout") for line in (out / "prompts" / f"{name}.jsonl").read_text().splitlines()}
    assert not dev & {json.loads(line)["prompt"] for line in test_file.read_text().splitlines()}
    # every accuracy and gain carries a 95% bootstrap interval (paired by prompt) that holds its point estimate
    for split in ("test", "heldout", "ifeval"):
        cis = summary["intervals"][split]
        for key in ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose"):
            for label in ("start", "SFT", "DPO"):
                low, high = cis["scores"][label][key]
                assert 0 <= low <= summary["scores"][label][split][key] <= high <= 100, (split, label, key)
            low, high = cis["gain"][key]
            assert low <= summary["gain_start_to_final"][split][key] <= high, (split, key)
    page = (out / "report.html").read_text()
    assert page.count("<table>") >= 4 and page.count("data:image/png;base64,") == 3
    assert "Frozen test prompts (only scored)" in page and "Development prompts" in page
    assert "Responses before and after" in page and "class=example" in page
    # the printed summary table, and the merged models the later stages read
    assert "frozen test prompts" in output and "development prompts" in output and "DPO − start" in output
    assert (out / "sft" / "merged" / "config.json").is_file() and (out / "dpo" / "merged" / "config.json").is_file()
    # training data came from verified samples only
    kept = [json.loads(line) for line in (out / "sample" / "kept.jsonl").read_text().splitlines()]
    assert kept and all(k["meta"]["pass_rate"] == 1.0 for k in kept)


def test_grpo_as_the_final_stage_replaces_label_and_dpo(quick_run, tmp_path):
    copy, summary = _rerun_copy(quick_run, tmp_path, "--set", "final_stage=grpo")
    stages = summary["stages"]
    assert [name for name in stages if not stages[name]["reused"]] == ["grpo", "eval-grpo"], stages  # up to SFT: reused
    assert "label" not in stages and "dpo" not in stages
    assert summary["final"] == {"label": "GRPO", "stage": "eval-grpo"}
    assert summary["grpo"]["steps"] == 2  # 16 training prompts, 8 a step, one epoch
    assert 0 <= summary["grpo"]["first_reward"] <= 1 and 0 <= summary["grpo"]["last_reward"] <= 1
    # the GRPO model is the one scored: its responses came from grpo/merged, not from the SFT or DPO model
    final = [json.loads(line)["response"] for line in (copy / "eval-grpo" / "heldout.jsonl").read_text().splitlines()]
    assert summary["scores"]["GRPO"]["heldout"]["prompts"] == len(final) == 12
    gain = summary["gain_start_to_final"]["heldout"]["prompt_loose"]
    assert gain == summary["scores"]["GRPO"]["heldout"]["prompt_loose"] - summary["scores"]["start"]["heldout"]["prompt_loose"]
    low, high = summary["intervals"]["heldout"]["gain"]["prompt_loose"]
    assert low <= gain <= high
    page = (copy / "report.html").read_text()
    assert "GRPO − start" in page and "GRPO on verifier rewards" in page and "DPO − start" not in page
    # settings that cannot apply are refused before anything loads
    base = pipeline.demo_config(quick=True)
    # the default preset's DPO rounds belong to its DPO stage: switching the final stage on the command line drops them
    preset = pipeline.demo_config()
    assert preset["dpo"]["rounds"] > 1
    switched = pipeline.load_pipeline(None, ["final_stage=grpo"], base=preset)
    assert switched.final_stage == "grpo" and switched.dpo == {} and switched.sft == pipeline.load_pipeline(None, [], base=preset).sft
    with pytest.raises(ConfigError, match=r"dpo.rounds: DPO rounds run only with final_stage dpo"):
        pipeline.load_pipeline(None, ["final_stage=grpo", "dpo.rounds=2"], base=base)
    with pytest.raises(ConfigError, match=r"grpo: settings for a GRPO stage, but final_stage is dpo"):
        pipeline.load_pipeline(None, ["grpo.train.lr=1e-4"], base=base)
    with pytest.raises(ConfigError, match=r"grpo\.grpo\.group_size"):
        pipeline.load_pipeline(None, ["final_stage=grpo", "grpo.grpo.group_size=1"], base=base)


def _hand_library(path: Path) -> list:
    """A verifier library as `posttrain synth autoif` writes it: two instructions, each checked by code run in the sandbox."""
    from posttrain.verify import code

    specs = [
        ("End your answer with an exclamation mark.", "def evaluate(response):\n    return response.strip().endswith('!')\n"),
        ("Do not use the letter z anywhere in your answer.", "def evaluate(response):\n    return 'z' not in response.lower()\n"),
    ]
    checks = [
        code.CodeCheck(
            id=code.check_id(instruction, [function]),
            instruction=instruction,
            functions=[function],
            provenance={"source": "written for this test", "teacher": "hand"},
        )
        for instruction, function in specs
    ]
    code.write_library(path, checks)
    return checks


@pytest.mark.skipif(all(sandbox.probe(i) for i in sandbox.ISOLATIONS), reason="no sandbox works here (bubblewrap or user namespaces)")
def test_invented_instructions_join_training_and_are_scored_per_verifier(quick_run, tmp_path):
    library = tmp_path / "autoif" / "verifiers.jsonl"
    checks = _hand_library(library)
    sets = ["--set", f"synth.autoif={library.parent}", "--set", "synth.n_train=8", "--set", "synth.n_heldout=6"]
    copy, summary = _rerun_copy(quick_run, tmp_path, *sets)
    assert not summary["stages"]["prompts"]["reused"]  # new prompts: every stage runs again
    train = [json.loads(line) for line in (copy / "prompts" / "train.jsonl").read_text().splitlines()]
    ids = {c.id for c in checks}
    assert len(train) == 16 + 8 and sum(r["instruction_id_list"][0] in ids for r in train) == 8
    invented = [json.loads(line) for line in (copy / "prompts" / "invented.jsonl").read_text().splitlines()]
    assert len(invented) == 6 and {r["instruction_id_list"][0] for r in invented} == ids
    from posttrain.synth.verifiable import split_queries

    heldout = split_queries()["heldout"]
    assert all(any(r["prompt"].startswith(q) for q in heldout) for r in invented)  # development queries only
    for label in ("start", "SFT", "DPO"):
        assert summary["scores"][label]["invented"]["prompts"] == 6
    # the verdicts are the library's own code run on the responses (here: "no letter z" is plain to recompute)
    no_z = next(c.id for c in checks if "letter z" in c.instruction)
    items = [json.loads(line) for line in (copy / "eval-start" / "invented.jsonl").read_text().splitlines()]
    assert [i["strict"][0] for i in items if i["instruction_id_list"] == [no_z]] == [
        "z" not in i["response"].lower() for i in items if i["instruction_id_list"] == [no_z]
    ]
    rows = {r["id"]: r for r in summary["invented"]}
    assert set(rows) == ids and all(r["source"] == "hand · written for this test" for r in rows.values())
    assert rows[no_z]["loose"]["start"] == summary["scores"]["start"]["invented"]["per_type"][no_z]["loose"]
    page = (copy / "report.html").read_text()
    assert "Invented instructions: who wrote each verifier" in page and "Do not use the letter z" in page
    with pytest.raises(ConfigError, match=r"synth.autoif: .*nowhere"):
        pipeline.load_pipeline(None, [f"synth.autoif={tmp_path / 'nowhere'}"], base=pipeline.demo_config(quick=True))


def test_report_says_what_its_numbers_mean(quick_run):
    out, _ = quick_run
    page = (out / "report.html").read_text()
    notes = page.split("What these numbers mean, and what they do not", 1)[1]
    # one prompt's worth on each split, from the run's own counts (12 development prompts: 8.3 points)
    assert "development 12 (8.3 points)" in notes and "test 6 (16.7 points)" in notes
    assert "at most 24 new tokens" in notes  # the quick preset's budget, not a fixed text
    assert "The model." not in notes  # a random built-in model: no note about the fetched, quantized one


def test_rerun_reuses_every_stage_and_a_changed_stage_reruns_it_and_what_follows(quick_run, tmp_path):
    out, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = _invoke("demo", "--quick", "--output-dir", str(copy))
    assert result.exit_code == 0, result.output
    stages = json.loads((copy / "summary.json").read_text())["stages"]
    assert all(stages[name]["reused"] for name in STAGE_DIRS), stages

    result = _invoke("demo", "--quick", "--output-dir", str(copy), "--set", "dpo.train.lr=5e-4")
    assert result.exit_code == 0, result.output
    stages = json.loads((copy / "summary.json").read_text())["stages"]
    rerun = {name for name in STAGE_DIRS if not stages[name]["reused"]}
    assert rerun == {"dpo", "eval-dpo"}, stages


def test_full_ifeval_adds_its_own_stages_and_reuses_the_rest(quick_run, tmp_path):
    out, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # 4 new tokens instead of 1280: the stages and the report, not the budget, are under test here
    result = _invoke("demo", "--quick", "--full-ifeval", "--output-dir", str(copy), "--set", "full_ifeval.max_new_tokens=4")
    assert result.exit_code == 0, result.output
    summary = json.loads((copy / "summary.json").read_text())
    assert all(summary["stages"][name]["reused"] for name in STAGE_DIRS), summary["stages"]
    assert not summary["stages"]["eval-full-start"]["reused"] and not summary["stages"]["eval-full-dpo"]["reused"]
    for label in ("start", "DPO"):
        assert summary["scores"][label]["ifeval_all"]["prompts"] == 541
        assert summary["scores"][label]["ifeval_unused"]["prompts"] == 421
        assert summary["scores"][label]["heldout"]["prompts"] == 12  # the fast splits are still there
    assert "ifeval_all" not in summary["scores"]["SFT"]  # only the start and final models take the long evaluation
    # the 421 are the 541's own responses, re-scored: the same text for the same key
    every = {json.loads(line)["key"]: json.loads(line)["response"] for line in (copy / "eval-full-dpo" / "ifeval_all.jsonl").read_text().splitlines()}
    unused = [json.loads(line) for line in (copy / "eval-full-dpo" / "ifeval_unused.jsonl").read_text().splitlines()]
    assert len(unused) == 421 and all(every[item["key"]] == item["response"] for item in unused)
    for split in ("ifeval_unused", "ifeval_all"):
        low, high = summary["intervals"][split]["gain"]["prompt_loose"]
        assert low <= summary["gain_start_to_final"][split]["prompt_loose"] <= high
    page = (copy / "report.html").read_text()
    assert "Ifeval prompts never used for a choice" not in page and "IFEval prompts never used for a choice" in page
    assert "not scored: run with" not in page
    assert "not scored: run with" in (out / "report.html").read_text()  # the run without it says how to get it


def test_dpo_rounds_sample_each_round_from_the_last_rounds_model(quick_run, tmp_path):
    copy, summary = _rerun_copy(quick_run, tmp_path, "--set", "dpo.rounds=2")
    stages = summary["stages"]
    # round 1 keeps the keys it had without rounds: reused; round 2 and the final evaluation are new
    assert all(stages[name]["reused"] for name in STAGE_DIRS if name != "eval-dpo"), stages
    assert not stages["label-2"]["reused"] and not stages["dpo-2"]["reused"] and not stages["eval-dpo"]["reused"]
    assert list(stages).index("dpo-2") < list(stages).index("eval-dpo")
    # round 2's pairs were sampled from round 1's DPO model, round 1's from SFT's: the log-probs each recorded carry
    # the sampler's weights fingerprint
    from posttrain.generate.engine import Engine
    from posttrain.models.load import weights_fingerprint

    round2 = [json.loads(line) for line in (copy / "label-2" / "pairs.jsonl").read_text().splitlines()]
    round1 = [json.loads(line) for line in (copy / "label" / "pairs.jsonl").read_text().splitlines()]
    sampler = {stage: weights_fingerprint(Engine.from_name(str(copy / stage / "merged")).model) for stage in ("sft", "dpo")}
    assert sampler["sft"] != sampler["dpo"]
    assert round2 and {r["meta"]["reference"]["model"] for r in round2} == {sampler["dpo"]}
    assert {r["meta"]["reference"]["model"] for r in round1} == {sampler["sft"]}
    assert [r["pairs"] for r in (x["label"] for x in summary["rounds"])] == [len(round1), len(round2)]
    assert summary["rounds"][1]["dpo"]["steps"] > 0
    assert "round 2:" in (copy / "report.html").read_text()
    # and the pipeline says what is wrong with a bad count before loading anything
    with pytest.raises(ConfigError, match=r"dpo.rounds"):
        pipeline.load_pipeline(None, ["dpo.rounds=0"], base=pipeline.demo_config(quick=True))


def test_an_upgrade_of_the_code_runs_every_stage_again(tmp_path, monkeypatch):
    from rich.console import Console

    calls = []
    stages = pipeline.Stages(tmp_path, Console(quiet=True))
    stages("one", {"x": 1}, (), lambda out: calls.append("one"))
    pipeline.Stages(tmp_path, Console(quiet=True))("one", {"x": 1}, (), lambda out: calls.append("one"))
    assert calls == ["one"], "unchanged code and inputs: reused"
    upgraded = {**pipeline.code_versions(), "transformers": "99.0"}
    monkeypatch.setattr(pipeline, "code_versions", lambda: upgraded)
    console = Console(record=True, width=200)
    pipeline.Stages(tmp_path, console)("one", {"x": 1}, (), lambda out: calls.append("one"))
    assert calls == ["one", "one"], "another transformers: run again"
    printed = console.export_text()
    assert "runs again: the code changed" in printed and "transformers" in printed and "99.0" in printed
    assert json.loads((tmp_path / "one" / "stage.json").read_text())["code"]["transformers"] == "99.0"


def test_interrupted_stage_runs_again(quick_run, tmp_path):
    out, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "label" / "stage.json").unlink()  # as if killed before it finished
    result = _invoke("demo", "--quick", "--output-dir", str(copy))
    assert result.exit_code == 0, result.output
    stages = json.loads((copy / "summary.json").read_text())["stages"]
    assert {name for name in STAGE_DIRS if not stages[name]["reused"]} == {"label", "dpo", "eval-dpo"}


def test_pipeline_config_lists_every_problem_before_loading_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: tiny-qwen2\nprompts: {n_train: 0}\nsft: {train: {lr: -1, epochs: 2}, model: {name: x}, bogus: 1}\ndpo: {dpo: {loss_type: nope}}\nextra: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        pipeline.load_pipeline(bad)
    message = str(info.value)
    for needle in ("prompts.n_train", "sft.train.lr", "sft.model", "sft.bogus", "dpo.dpo.loss_type", "extra"):
        assert needle in message, (needle, message)
    result = _invoke("run", str(bad))
    assert result.exit_code == 1 and "sft.train.lr" in result.output


def test_examples_demo_pipeline_is_the_builtin_demo():
    import yaml

    # examples/pipeline_qwen2.5_0.5b.yaml is validated in full, its hub model included, in test_hub.py.
    example = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "demo_smollm2.yaml").read_text())
    assert example == pipeline.demo_config(quick=False)
    pipeline.load_pipeline(None, base=example)


def test_demo_precision_follows_the_hardware_unless_pinned():
    # bf16 is the fast path only where it is native; elsewhere (e.g. AMD Zen 3) it is emulated, 5-7x slower.
    from posttrain.config import SFTConfig, native_bf16

    demo = pipeline.load_pipeline(None, base=pipeline.demo_config(quick=False))
    assert demo.generation.bf16 is native_bf16(demo.device)
    sft = SFTConfig.model_validate({**pipeline.deep_merge(pipeline.SFT_DEFAULTS, demo.sft), "model": {"name": "x"}, "data": {"path": "x"}})
    assert sft.train.bf16 is native_bf16(sft.train.device)
    pinned = pipeline.load_pipeline(None, base={**pipeline.demo_config(quick=False), "generation": {"bf16": not native_bf16()}})
    assert pinned.generation.bf16 is (not native_bf16())


@pytest.mark.skipif(report.find_chromium() is None, reason="no Chromium on PATH (apt-get install chromium)")
def test_report_renders_in_headless_chromium(quick_run, tmp_path):
    out, _ = quick_run
    png = report.screenshot(out / "report.html", tmp_path / "report.png", height=2400)
    from PIL import Image

    image = Image.open(png).convert("L")
    assert image.size == (1200, 2400)
    # a rendered page with tables and plots, not a blank or error page: many distinct grey levels, dark text on white
    histogram = image.histogram()
    assert sum(1 for count in histogram if count > 50) > 40
    assert histogram[255] < 0.95 * sum(histogram)


def test_seeds_run_the_pipeline_once_per_seed_and_summarize_the_gains(tmp_path):
    out = tmp_path / "seeds"
    result = _invoke("demo", "--quick", "--seeds", "2", "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    import yaml

    for s in (0, 1):  # each seed its own run, its sampling/training seed and its label seed moved by s
        written = yaml.safe_load((out / f"seed-{s}" / "pipeline.yaml").read_text())
        assert written["seed"] == s and written["label"]["seed"] == 1 + s and (out / f"seed-{s}" / "report.html").is_file()
    seeds = json.loads((out / "seeds.json").read_text())
    assert seeds["seeds"] == [0, 1] and set(seeds["splits"]) == {"test", "heldout", "ifeval"}
    for split, rows in seeds["splits"].items():
        per_run = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["gain_start_to_final"][split] for s in (0, 1)]
        for key, row in rows.items():
            assert row["gains"] == [g[key] for g in per_run]
            assert row["min"] <= row["mean"] <= row["max"] and row["mean"] == pytest.approx(sum(row["gains"]) / 2)
            low, high = row["interval"]
            assert low <= row["mean"] <= high
    assert "over 2 seeds" in result.output and "95% interval" in result.output
    # the stages no seed enters ran once: seed 1 reused seed 0's prompts and starting-model evaluation
    for name in ("prompts", "eval-start"):
        runs = [json.loads((out / f"seed-{s}" / name / "stage.json").read_text())["run"] for s in (0, 1)]
        assert runs[0] == runs[1], name
    sample = [json.loads((out / f"seed-{s}" / "sample" / "stage.json").read_text())["run"] for s in (0, 1)]
    assert sample[0] != sample[1]
    assert "eval-start: reused" in result.output
