"""Self-Instruct and Alpaca-style generation: the filters on realistic teacher text, every drop counted, resumable, outputs that train.

"Realistic teacher text" is built from Self-Instruct's 252 user-oriented instructions and their instances
(human-written, ../shared/data): replies a good teacher would give, put in the run's request cache where a
resumed run finds them; the stages nothing was cached for are answered by a tiny random model.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from sft_fixtures import cli, subprocess_env, torch_threads

from posttrain.synth import self_instruct as si
from posttrain.synth.self_instruct_run import SelfInstructConfig, run
from posttrain.synth.teacher import Teacher

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SEEDS = SHARED / "self_instruct_seed_tasks.jsonl"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data beside the repository")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def user_tasks() -> list[dict]:
    return [json.loads(line) for line in (SHARED / "self_instruct_user_oriented_instructions.jsonl").read_text().splitlines()]


def seed_tasks() -> list[si.SeedTask]:
    return [si.seed_task(json.loads(line)) for line in SEEDS.read_text().splitlines()]


# -- the rules ------------------------------------------------------------------------------------


def test_instruction_filters():
    assert si.instruction_problem("Summarize this.") == "3 words or fewer"
    assert si.instruction_problem(" ".join(["word"] * 151)) == "more than 150 words"
    assert "keyword" in si.instruction_problem("Draw a picture of your favourite animal.")
    assert si.instruction_problem("Describe the graph below in detail.") is not None
    assert si.instruction_problem("Describe the graphene market in two sentences.") is None  # word boundaries
    assert "keyword" in si.instruction_problem("Compose background music for a short film.", si.ALPACA_KEYWORDS)
    assert si.instruction_problem("Compose background music for a short film.") is None  # Alpaca's list only
    assert si.instruction_problem("Write a program that sorts a list of numbers.") == 'starts with "Write a program"'
    assert si.instruction_problem('"Quote" the best line of the poem below.') == "starts with punctuation"
    assert si.instruction_problem("Écris un poème sur la mer, s'il te plaît.") == "starts with a non-ASCII character"


def test_a_continued_list_splits_into_instructions():
    reply = " Give three tips for a job interview.\n10. Translate the sentence into French.\n11.Not split: no space\n12. Name   two\n  rivers in Asia."
    assert si.split_instructions(reply) == [
        "Give three tips for a job interview.",
        "Translate the sentence into French.\n11.Not split: no space".replace("\n", " "),
        "Name two rivers in Asia.",
    ]
    # SmolLM2 continues "9." with " 1. Write ..." and goes on from 2.: the restarted number is not instruction text
    assert si.split_instructions(" 1. Write a recommendation letter for a colleague.\n2. List three uses of baking soda.") == [
        "Write a recommendation letter for a colleague.",
        "List three uses of baking soda.",
    ]
    assert si.split_instructions(" 1. 1. Identify the biases in the paragraph below.\n7. 3. Name a fruit that is red.") == [
        "Identify the biases in the paragraph below.",
        "Name a fruit that is red.",
    ]


def test_instances_parse_and_filter():
    reply = "Example 1\nInput: 2 + 2\nOutput: 4\n\nExample 2\nInput: <none>\nOutput: 7\nExample 3\nInput: 3 + 3\nOutput: 3 + 3\nTask: next"
    pairs = si.parse_instances(reply, classification=False)
    assert pairs == [("2 + 2", "4"), ("", "7"), ("3 + 3", "3 + 3")]
    kept, dropped = si.clean_instances([*pairs, ("2 + 2", "4"), ("5", "")])
    assert kept == [("2 + 2", "4"), ("", "7")]
    assert dropped == {"output repeats the input": 1, "duplicate instance": 1, "empty output": 1}
    conflicting, why = si.clean_instances([("a", "1"), ("a", "2")])
    assert conflicting == [] and list(why) == ["one input with two outputs: the task's instances dropped"]
    labelled = si.parse_instances("Class label: Positive\nInput: I loved it.\nClass label: Negative\nInput: Dull and long.", classification=True)
    assert labelled == [("I loved it.", "Positive"), ("Dull and long.", "Negative")]


def test_alpaca_items_and_the_truncated_last_one():
    reply = " Name a fruit.\n4. Input:\n<noinput>\n4. Output:\nApple.\n###\n5. Instruction: Fix the grammar.\n5. Input:\nhe go home\n5. Output:\nHe goes home.\n###\n6. Instruction: List"
    items = si.parse_alpaca(reply, 4, truncated=True)
    assert items == [("Name a fruit.", "", "Apple."), ("Fix the grammar.", "he go home", "He goes home."), "cut at the token budget (the last item)"]
    assert si.parse_alpaca("garbage", 4, truncated=False) == ["not an instruction, input and output"]


# -- end to end -------------------------------------------------------------------------------------


def prefill_instructions(cfg: SelfInstructConfig, replies: list[str]) -> None:
    """The first round's instruction requests answered with ``replies`` (its prompts depend on the seeds alone)."""
    seeds = [t.instruction for t in seed_tasks()]
    teacher = Teacher(None, cfg.teacher, Path(cfg.output_dir) / "requests")
    settings = {"n": 1, "temperature": 0.7, "top_p": 0.5, "max_new_tokens": 256, "seed": cfg.seed, "stop": ["\n16."]}
    for k, reply in enumerate(replies):
        rng = random.Random(f"{cfg.seed}:request:{k}")
        demos = rng.sample(seeds, 8)
        rng.shuffle(demos)
        teacher.cache.append(cfg.teacher, {"key": teacher.key(si.bootstrap_prompt(demos), settings), "replies": [reply], "truncated": [k == 1]})


def test_self_instruct_counts_every_drop_and_resumes(tmp_path):
    users = [t["instruction"] for t in user_tasks()]
    seeds = [t.instruction for t in seed_tasks()]
    replies = [
        # 7 items: 3 good, one near-copy of a seed (ROUGE-L > 0.7), one too short, one with a keyword, one "Write a program"
        f" {users[0]}\n10. {users[1]}\n11. {seeds[3].replace('.', '!')}\n12. Summarize it.\n13. Draw a map of your town.\n"
        f"14. Write a program to add numbers.\n15. {users[2]}",
        f" {users[3]}\n10. {users[4]}\n11. {users[5]} and",  # cut at the token budget: its last item goes
    ]
    cfg = SelfInstructConfig(teacher="tiny-llama", seed_tasks=str(SEEDS), n=5, requests_per_round=2, max_requests=2, output_dir=str(tmp_path / "run"),
                             bf16=False, instance_max_new_tokens=16)  # fmt: skip
    prefill_instructions(cfg, replies)
    console = Console(record=True, width=300)
    result = run(cfg, console=console)
    step = {s["stage"]: s for s in result["funnel"]}["instructions"]
    assert (step["count_in"], step["count_out"]) == (10, 5)
    assert step["dropped"] == {
        "ROUGE-L > 0.7 with an instruction in the pool": 1, "3 words or fewer": 1, "a keyword a text model cannot serve (image, file, draw, ...)": 1,
        'starts with "Write a program"': 1, "cut at the token budget (the last item of a reply)": 1,
    }  # fmt: skip
    kept = [json.loads(line)["instruction"] for line in (tmp_path / "run" / "instructions.jsonl").read_text().splitlines()]
    assert kept == [users[0], users[1], users[2], users[3], users[4]]
    for s in result["funnel"]:  # every drop is counted, and nothing else is lost
        assert s["count_in"] - s["count_out"] == sum(s["dropped"].values()), s["stage"]
    rejects = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == result["outputs"]["rejects"] and all(r["reply"] is not None for r in rejects)
    assert "instructions: 2 requests to tiny-llama: 2 from the cache, 0 generated" in console.export_text()
    again = Console(record=True, width=300)
    assert run(cfg, console=again)["outputs"] == result["outputs"]  # a rerun asks for nothing it already has
    assert all(" 0 generated" in line for line in again.export_text().splitlines() if line.rstrip().endswith("generated"))


def test_alpaca_style_records_train_with_sft(tmp_path):
    tasks = user_tasks()
    cfg = SelfInstructConfig(teacher="tiny-llama", seed_tasks=str(SEEDS), n=6, style="alpaca", requests_per_round=1, max_requests=1,
                             output_dir=str(tmp_path / "run"), bf16=False)  # fmt: skip
    seeds = seed_tasks()
    rng = random.Random(f"{cfg.seed}:alpaca:0")
    prompt = si.alpaca_prompt(rng.sample(seeds, 3))
    items = []
    for n, task in enumerate(tasks[10:17], 4):
        instance = task["instances"][0]
        head = "" if n == 4 else f"{n}. Instruction: "
        items.append(f"{head}{task['instruction']}\n{n}. Input:\n{instance['input'] or '<noinput>'}\n{n}. Output:\n{instance['output']}")
    teacher = Teacher(None, cfg.teacher, tmp_path / "run" / "requests")
    settings = {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 1536, "seed": 0, "stop": ["\n21."]}
    teacher.cache.append(cfg.teacher, {"key": teacher.key(prompt, settings), "replies": [" " + "\n###\n".join(items)], "truncated": [False]})
    result = run(cfg, console=Console(record=True))
    assert result["outputs"]["records"] == 6  # 7 items, n = 6: the 7th is "more than n"
    records = [json.loads(line) for line in (tmp_path / "run" / "data.jsonl").read_text().splitlines()]
    assert records[0]["instruction"] == tasks[10]["instruction"] and records[0]["output"] == tasks[10]["instances"][0]["output"]
    done = subprocess.run(
        cli("sft", "--set", f"data.path={tmp_path / 'run' / 'data.jsonl'}", "--set", "model.name=tiny-llama", "--set", "train.device=cpu",
            "--set", "train.micro_batch_size=2", "--set", "data.max_length=256", "--max-steps", "2", "--output-dir", str(tmp_path / "sft")),
        env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "sft" / "final").is_dir()


def test_a_bad_seed_file_is_named_before_anything_loads(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Name a fruit.", "instances": []}\n{"instances": []}\n{oops\n')
    cfg = SelfInstructConfig(teacher="no-such-model", seed_tasks=str(bad), output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError) as raised:
        run(cfg, console=Console(record=True))
    assert "seeds.jsonl:2: field 'instruction'" in str(raised.value) and "seeds.jsonl:3" in str(raised.value)
