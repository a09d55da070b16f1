"""`posttrain eval lm-eval`: lm-evaluation-harness tasks on posttrain models, offline, with local data."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from posttrain.cli import app

import lm_eval  # noqa: E402,F401 - a declared test dependency: missing, these tests fail rather than skip

QUESTIONS = [
    {"question": "What color is the sky?", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "What color is grass?", "choices": ["red", "green", "seven"], "answer": 1},
    {"question": "Two plus two is", "choices": ["four", "five", "Paris"], "answer": 0},
    {"question": "The capital of France is", "choices": ["Rome", "Paris", "blue"], "answer": 1},
    {"question": "Snow is", "choices": ["black", "white", "quick"], "answer": 1},
    {"question": "A fox is", "choices": ["quick", "a number", "the sea"], "answer": 0},
]


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return tmp_path


def expected_accuracy(model, tokenizer) -> float:
    """Our own scoring of the same task: the choice with the highest summed log-prob after ' '."""
    right = 0
    for q in QUESTIONS:
        context = tokenizer(q["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in q["choices"]:
            whole = tokenizer(q["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == q["answer"])
    return right / len(QUESTIONS)


def test_lm_eval_task_on_a_zoo_model_and_on_a_run(local_task, tmp_path):
    from posttrain.eval.lm_eval import load_for_eval

    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["eval", "lm-eval", "--model", "tiny-llama", "--tasks", "tiny_mc", "--include-path", str(local_task), "--no-chat-template", "-o", str(out)])
    assert result.exit_code == 0, result.output
    acc = json.loads(out.read_text())["results"]["tiny_mc"]["acc,none"]
    assert acc == pytest.approx(expected_accuracy(*load_for_eval("tiny-llama")))

    # A LoRA run directory: lm-eval sees the adapter merged into the base model.
    from posttrain.config import load_config
    from posttrain.train import sft
    from sft_fixtures import sft_config, write_color_data

    cfg = sft_config(write_color_data(tmp_path / "d.jsonl"), tmp_path / "run", adapter={"kind": "lora", "r": 4}, train={"max_steps": 3, "lr": 5e-2})
    sft.train(load_config(cfg))
    model, tokenizer = load_for_eval(str(tmp_path / "run"))
    assert not any("lora" in name for name, _ in model.named_parameters()), "the adapter must be merged"
    out2 = tmp_path / "results-run.json"
    result = CliRunner().invoke(app, ["eval", "lm-eval", "--model", str(tmp_path / "run"), "--tasks", "tiny_mc", "--include-path", str(local_task), "--no-chat-template", "-o", str(out2)])
    assert result.exit_code == 0, result.output
    assert json.loads(out2.read_text())["results"]["tiny_mc"]["acc,none"] == pytest.approx(expected_accuracy(model, tokenizer))
