"""Code verifiers (model-written checks run in the sandbox): a library on disk, the same verdicts wherever verifiers judge.

The verifier is one the 72B teacher of AutoIF's samples wrote and cross-validation kept ("words that each
contain at least two 's's ... a prime number of words"); it judges in `eval ifeval`, in `label`'s pairing,
in GRPO's reward and in the pipeline's scoring exactly as it does alone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sft_fixtures import cli, subprocess_env, torch_threads

from posttrain.data.prompts import read_prompts
from posttrain.eval import ifeval
from posttrain.synth import autoif
from posttrain.synth.label import pair_by_verifiers
from posttrain.train.grpo import verifier_reward
from posttrain.verify import code, get
from posttrain.verify import sandbox as sb
from posttrain.verify.sandbox import Sandbox
from posttrain.verify.scoring import score_response, verifiers_of

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "autoif_sample_data"
pytestmark = [
    pytest.mark.skipif(not SAMPLES.is_dir(), reason="needs ../shared/data/autoif_sample_data beside the repository"),
    pytest.mark.skipif(all(sb.probe(i) for i in sb.ISOLATIONS), reason="no sandbox works here (bubblewrap or user namespaces)"),
]

RESPONSES = [
    "Classes assesses stresses.",  # 3 words, each with two s: follows
    "Masses possess passes.",  # follows
    "Assessments usually possess strengths.",  # 4 words: does not
    "This sentence does not comply.",  # "This" has one s: does not
    "Classes * assesses stresses.",  # 4 words with the lone "*": follows only once asterisks go (a loose variant)
    "Sure!\nClasses assesses stresses.",  # follows only without its first line (loose)
    "",
]
STRICT = [True, True, False, False, False, False, False]
LOOSE = [True, True, False, False, True, True, False]


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    row = [json.loads(line) for line in (SAMPLES / "eval_func_rft.jsonl").read_text().splitlines()][4]
    replies = [autoif.parse_function_reply(answer) for answer in row["gpt-answer"]]
    with Sandbox(workers=2) as box:
        cv = autoif.cross_validate(row["instruction"], [r.function for r in replies if r.function], [c for r in replies for c in r.cases], box)
    check = code.CodeCheck(
        id=code.check_id(row["instruction"], [f for f, _ in cv.kept]), instruction=row["instruction"], functions=[f for f, _ in cv.kept],
        cases=[{"input": t, "output": o} for t, o in cv.kept_cases], accuracy=[a for _, a in cv.kept], provenance={"source": "AutoIF sample"},
    )  # fmt: skip
    path = tmp_path_factory.mktemp("lib") / "verifiers.jsonl"
    code.write_library(path, [check])
    return path


@pytest.fixture(scope="module")
def prompts_file(library, tmp_path_factory) -> Path:
    (check,) = code.load_library(library)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"key": i, "prompt": f"Question {i}. {check.instruction}", "instruction_id_list": [check.id], "kwargs": [{}]} for i in range(len(RESPONSES))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_library_loads_and_its_verifier_judges(library):
    (check,) = code.load_library(library)
    assert check.id.startswith("code:") and len(check.functions) == 7
    verifier = get(check.id)
    assert verifier.description() == check.instruction
    verdicts = verifier.check_many(RESPONSES[:4])
    assert [v.passed for v in verdicts] == STRICT[:4]
    assert "7 of 7 functions return True" in verdicts[0].reason and "0 of 7" in verdicts[2].reason
    assert code.load_library(library) == [check]  # loading again registers the same class, not an error


def test_the_same_verdicts_in_eval_label_and_grpo(library, prompts_file):
    code.load_library(library)
    prompts = read_prompts(prompts_file, validate=verifiers_of)
    records = [p.verifiable for p in prompts]
    alone = [score_response(r, text) for r, text in zip(records, RESPONSES)]
    assert [s.strict for s in alone] == STRICT and [s.loose for s in alone] == LOOSE
    # eval ifeval's scoring (batched through prefetch)
    evaluated = ifeval.score(records, RESPONSES)
    assert [s.strict for s in evaluated.scores] == STRICT and [s.loose for s in evaluated.scores] == LOOSE
    # GRPO's verifier reward: the share of the prompt's instructions followed
    for loose, expected in ((False, STRICT), (True, LOOSE)):
        reward = verifier_reward(loose)
        assert [reward(p, text).reward for p, text in zip(prompts, RESPONSES)] == [float(x) for x in expected]
    # label's pairing: the chosen follows, the rejected fails even loosely
    record, why = pair_by_verifiers(prompts[0], RESPONSES)
    assert why is None
    assert record["meta"]["pass_rates_strict"] == [float(x) for x in STRICT]
    assert record["meta"]["pass_rates_loose"] == [float(x) for x in LOOSE]
    assert record["chosen"][0]["content"] == RESPONSES[0] and record["rejected"][0]["content"] == RESPONSES[2]


def test_eval_ifeval_and_label_take_the_library_from_the_command_line(library, prompts_file, tmp_path):
    responses = tmp_path / "responses.jsonl"
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    responses.write_text("".join(json.dumps({"prompt": r["prompt"], "response": t}) + "\n" for r, t in zip(rows, RESPONSES)))
    per_item = tmp_path / "items.jsonl"
    args = ["eval", "ifeval", "--responses", str(responses), "--data", str(prompts_file), "--per-item", str(per_item), "--plot", str(tmp_path / "p.png")]
    missing = subprocess.run(cli(*args), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "unknown verifier id 'code:" in missing.stderr  # without the library the ids are unknown
    done = subprocess.run(cli(*args, "--verifiers", str(library)), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    items = [json.loads(line) for line in per_item.read_text().splitlines()]
    assert [i["strict"] for i in items] == [[x] for x in STRICT] and [i["loose"] for i in items] == [[x] for x in LOOSE]
    labelled = subprocess.run(
        cli("label", "--model", "tiny-llama", "--data", str(prompts_file), "--output", str(tmp_path / "pairs.jsonl"), "--k", "2",
            "--max-new-tokens", "6", "--verifiers", str(library), "--fp32"),
        env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    assert f"from {len(RESPONSES)} prompts" in " ".join(labelled.stdout.split())


def test_grpo_trains_on_code_verifier_rewards(library, prompts_file, tmp_path):
    from posttrain.config import ConfigError, GRPOConfig, load_config
    from posttrain.train import grpo

    raw = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(prompts_file)},
        "adapter": {"kind": "full"},
        "train": {"lr": 1e-3, "max_steps": 1, "seed": 0, "device": "cpu", "micro_batch_size": 8, "schedule": "constant", "warmup_steps": 0},
        "grpo": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 6, "beta": 0.0, "reward": "verifiers:loose", "verifiers": [str(library)]},
        "output_dir": str(tmp_path / "grpo"),
    }
    with torch_threads(1):
        result = grpo.train(load_config(raw, cls=GRPOConfig))
    assert len(result.losses) == 1
    with pytest.raises(ConfigError, match=r"grpo.verifiers\[0\]: no such verifier library"):
        load_config({**raw, "grpo": {**raw["grpo"], "verifiers": [str(tmp_path / "nope.jsonl")]}}, cls=GRPOConfig)


def test_bad_library_lines_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"id": "code:abc", "instruction": "x", "functions": ["def evaluate(r):\n    return True\n"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "nope", "functions": []}) + "\n{not json\n")
    with pytest.raises(ValueError) as raised:
        code.load_library(path)
    message = str(raised.value)
    assert "bad.jsonl:2: field 'id'" in message and "bad.jsonl:2: field 'functions'" in message and "bad.jsonl:3" in message


def test_sandbox_check_from_the_command_line(tmp_path):
    function = tmp_path / "f.py"
    function.write_text("def evaluate(response):\n    if response == 'boom':\n        raise ValueError('no')\n    return response.islower()\n")
    responses = tmp_path / "r.jsonl"
    responses.write_text("".join(json.dumps({"response": r}) + "\n" for r in ("abc", "ABC", "boom")))
    done = subprocess.run(cli("sandbox", "check", str(function), "--responses", str(responses)), env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == [
        {"ok": True, "result": True, "error": None},
        {"ok": True, "result": False, "error": None},
        {"ok": False, "result": None, "error": "ValueError: no"},
    ]
    responses.write_text('{"response": 1}\n')
    bad = subprocess.run(cli("sandbox", "check", str(function), "--responses", str(responses)), env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "r.jsonl:1: field 'response'" in bad.stderr


NO_COMMA = [
    "def evaluate(response):\n    return ',' not in response\n",
    "def evaluate(response):\n    return response.count(',') == 0\n",
    "def evaluate(response):\n    return all(ch != ',' for ch in response)\n",
]


def test_the_pipeline_samples_and_scores_with_code_verifiers(tmp_path):
    """`posttrain run` with prompt files naming a code verifier (prompts.verifiers): every stage runs, verdicts as alone."""
    from posttrain.demo import pipeline

    instruction = "Do not use any commas in your answer"
    check = code.CodeCheck(id=code.check_id(instruction, NO_COMMA), instruction=instruction, functions=NO_COMMA)
    library = tmp_path / "verifiers.jsonl"
    code.write_library(library, [check])
    questions = ["What color is the sky?", "Name a fruit.", "Describe a cat.", "Say hello.", "Count to three.", "Tell a joke."]
    files = {}
    for split, part in (("train", questions[:3]), ("heldout", questions[3:])):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"key": i, "prompt": f"{q} {instruction}.", "instruction_id_list": [check.id], "kwargs": [{}]}) + "\n" for i, q in enumerate(part)))
    base = pipeline.demo_config(quick=True)
    base["prompts"] = {"train": str(files["train"]), "heldout": str(files["heldout"]), "n_train": 3, "n_heldout": 3, "n_ifeval": 0, "verifiers": [str(library)]}
    base["output_dir"] = str(tmp_path / "run")
    with torch_threads(1):
        summary = pipeline.run(pipeline.load_pipeline(None, base=base))
    assert summary["stage_seconds"]
    verifier = get(check.id)
    for stage in ("eval-start", "eval-dpo"):
        items = [json.loads(line) for line in (tmp_path / "run" / stage / "heldout.jsonl").read_text().splitlines()]
        assert [i["strict"] for i in items] == [[verifier.check(i["response"]).passed and bool(i["response"].strip())] for i in items]
    samples = [json.loads(line) for line in (tmp_path / "run" / "sample" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["kept"] <= ("," not in s["response"]) for s in samples)
