"""AutoIF on real teacher output (QwenLM/AutoIF's published samples, written by a 72B teacher), and end to end.

The sample files live in ../shared/data/autoif_sample_data (Apache-2.0; LICENSES.md there). Expected
counts are derived by reading the files, as each test's comments show; the end-to-end tests run
``posttrain synth autoif`` with a tiny random model, in this process and through ``posttrain serve``,
its function-writing stage answered by the 72B teacher's real replies (put in the run's request cache,
as a resumed run finds them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from rich.console import Console
from serve_fixtures import served
from sft_fixtures import cli, subprocess_env, torch_threads

from posttrain.synth import autoif
from posttrain.synth.autoif_run import FUNCTION_PROMPT, AutoIFConfig, run
from posttrain.synth.teacher import Teacher
from posttrain.verify import sandbox as sb

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "autoif_sample_data"
pytestmark = [
    pytest.mark.skipif(not SAMPLES.is_dir(), reason="needs ../shared/data/autoif_sample_data beside the repository"),
    pytest.mark.skipif(all(sb.probe(i) for i in sb.ISOLATIONS), reason="no sandbox works here (bubblewrap or user namespaces)"),
]


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def box():
    with sb.Sandbox(workers=2) as sandbox:
        yield sandbox


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


# -- parsing and cross-validation of the 72B teacher's functions --------------------------------

# Per instruction of eval_func_rft.jsonl (8 replies each): replies with an object holding a "func" string;
# distinct functions; distinct (input, output) cases; functions that do not compile. Read off the file:
# - three replies are not JSON but Python literals, read as such: two of instruction 2 (one has "\\'" in a
#   string, an invalid JSON escape at char 333; one writes `"output": True`) and one of instruction 4
# (`True` again); read as Python, the first one's function holds an unterminated triple-quoted string;
# - instruction 1: 24 cases, one (input, output) twice; instruction 4: 24 cases, 6 repeated;
# - instruction 5: replies 0 and 5 define the same code (is_prime, then evaluate), so 7 distinct functions.
PARSED = [(8, 8, 23, 0), (8, 8, 24, 1), (8, 8, 24, 0), (8, 8, 18, 0), (8, 7, 24, 0)]


def replies_of(row: dict) -> list[autoif.FunctionReply]:
    return [autoif.parse_function_reply(answer) for answer in row["gpt-answer"]]


def test_the_72b_teachers_replies_parse_as_read_off_the_file(box):
    for row, (parsed, functions, cases, broken) in zip(jsonl("eval_func_rft.jsonl"), PARSED):
        replies = replies_of(row)
        assert sum(r.function is not None for r in replies) == parsed
        distinct = list(dict.fromkeys(r.function for r in replies if r.function))
        assert len(distinct) == functions
        assert len({c for r in replies for c in r.cases}) == cases
        assert all(r.bad_cases == 0 for r in replies)  # every case has a string input and a true/false output
        errors = [e for e in box.compile_errors(distinct) if e is not None]
        assert len(errors) == broken and all(e.startswith("SyntaxError: unterminated triple-quoted") for e in errors)


def test_cross_validation_of_the_72b_teachers_functions(box):
    """Instruction 5 derived by hand in full; the others' gates read off the file.

    Instruction 5, "words that each contain at least two 's's ... a prime number of words in each
    sentence": six of its seven functions compute the same thing (whitespace words, a prime count, each
    word with two lower-case s), the seventh does it per '.'-sentence, which is the same on these cases
    (none has two sentences). Their shared verdict agrees with the label on 15 of the 24 cases: reply 0
    all 3; reply 1 "sessions missed" and "This sentence does not comply." (not "Assessments usually
    possess essentials.": 4 words); reply 2 none ("Assessments usually stress students." has 4 words,
    "Assessment passes." and "Classes dismissed." follow the rule but are labelled false); reply 3 only
    "Mississippi passes tests seamlessly." (false, 4 words); reply 4 all 3; reply 5 the two false
    ones; reply 6 the last two; reply 7 the first two ("Lessons stresses successes." follows the rule,
    labelled false). No function is right on any other case, so 15 cases are kept and all 7 functions
    score 15/15.
    Instruction 3 ("rhetorical questions ... as hashtags") contradicts itself: its functions split
    between requiring "?" and forbidding it, so every case agrees with some function (24 kept) and none
    reaches 0.8 (best 16/24): the instruction is dropped.
    """
    rows = jsonl("eval_func_rft.jsonl")
    expected = [  # (kept cases, indices of kept functions among the distinct ones, their accuracies)
        (19, [2, 5], [16 / 19, 16 / 19]),
        (20, [0, 4, 5, 7], [19 / 20] * 4),
        (24, [], []),
        (14, [0, 1, 3, 5, 6, 7], [1.0, 1.0, 1.0, 1.0, 12 / 14, 1.0]),
        (15, [0, 1, 2, 3, 4, 5, 6], [1.0] * 7),
    ]
    for row, (kept_cases, kept, accuracies) in zip(rows, expected):
        replies = replies_of(row)
        distinct = list(dict.fromkeys(r.function for r in replies if r.function))
        functions = [f for f, e in zip(distinct, box.compile_errors(distinct)) if e is None]
        cv = autoif.cross_validate(row["instruction"], functions, [c for r in replies for c in r.cases], box)
        assert len(cv.kept_cases) == kept_cases
        assert [distinct.index(f) for f, _ in cv.kept] == kept
        assert [a for _, a in cv.kept] == pytest.approx(accuracies)
        assert (cv.dropped is None) == bool(kept)
    cv = autoif.cross_validate("x", ["def evaluate(r):\n    return True\n"] * 2, [("a", True)] * 12, box)
    assert cv.dropped.startswith("1 functions and 1 cases")  # deduplicated before the gate


def test_query_verification_on_the_72b_sample(box):
    """query_rft.jsonl: 20 prompts × 16 responses; none passes more than half its functions.

    Read off the file: the "exactly 4 syllables" functions fail a response with any word of three letters
    or fewer (at most 3 vowels, and at most 2 vowel groups), and every one of those 256 responses has such
    a word but four, which are the one word "Cooperationally": 6 vowel groups for the one function
    (c-o-op-e-r-a-t-i-on-a-ll-y), 8 vowels for the other, not 4; the "military lingo" functions fail a response with any word outside their lists, and every
    one of those 64 responses has one. So every pass rate is 0.
    """
    lists = set()
    rows = jsonl("query_rft.jsonl")
    for func, _ in rows[16]["eval_func"]:
        lists |= set(eval(func[func.index("["): func.index("]") + 1]))  # noqa: S307 - the word lists are literals in the file
    total = 0
    for row in rows:
        functions = [f for f, _ in row["eval_func"]]
        rates = autoif.pass_rates(box.run_many([(f, row["gpt-answer"]) for f in functions]))
        total += len(rates)
        assert rates == [0.0] * len(row["gpt-answer"])
        for response in row["gpt-answer"]:
            if "syllables" in row["instruction"]:
                assert any(len(w.strip(".?!")) <= 3 for w in response.split()) or response == "Cooperationally"
            else:
                assert any(w.lower() not in lists for w in response.split())
    assert total == 320


def test_dpo_pairs_from_the_published_pass_rates():
    """dpo_query_eval_score_results.jsonl: 20 prompts × 8 responses with their pass rates.

    Read off the file (distinct texts with rate >= 0.5 / with rate 0): prompt 4 has 1 / 7, prompt 11
    2 identical / 4, prompt 13 1 / 7; prompts 9, 10 and 16 pass everything (no rejected side), the
    other 14 nothing (no chosen side). A side with two or more distinct texts makes it 2 × 2, capped
    by what there is: 1 × 2 pairs for each of prompts 4, 11 and 13, so 6 pairs from 3 prompts.
    """
    rng = random.Random(0)
    per_prompt = [len(autoif.dpo_pairs([tuple(r) for r in row["response"]], rng)) for row in jsonl("dpo_query_eval_score_results.jsonl")]
    assert per_prompt == [0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0]
    for chosen, rejected in autoif.dpo_pairs([("good", 1.0), ("good", 0.5), ("bad", 0.0), ("", 0.0), ("meh", 0.25)], rng):
        assert (chosen, rejected) == ("good", "bad")  # distinct non-empty texts; 0.25 is neither side


# -- the smaller pieces -------------------------------------------------------------------------


def test_new_instructions_are_parsed_and_near_duplicates_dropped():
    replies = [
        "1. Write every word in lowercase letters\n2) Use exactly three bullet points in the answer\n- Respond using only emoji\n"
        "Some chatter that is not a list item\n4. Write every single word in lowercase letters!\n5. Hi\n6. Réponds en français ici"
    ]
    parsed = autoif.parse_instructions(replies, ["Write every word in lowercase letters"])
    assert parsed.kept == ["Use exactly three bullet points in the answer", "Respond using only emoji"]
    assert {k: len(v) for k, v in parsed.dropped.items()} == {"near-duplicate": 2, "not 3-40 words": 1, "not ASCII": 1}


def test_function_replies_in_other_shapes():
    fenced = 'Sure:\n```python\ndef evaluate(response):\n    return response.isupper()\n```'
    assert autoif.parse_function_reply(fenced).function == "def evaluate(response):\n    return response.isupper()\n"
    escaped = '{"func": "def evaluate(response):\\\\n    return True", "cases": [{"input": "a", "output": "True"}, {"input": 3, "output": true}, {"input": "b"}]}'
    reply = autoif.parse_function_reply(escaped)
    assert reply.function == "def evaluate(response):\n    return True\n" and reply.cases == (("a", True),) and reply.bad_cases == 2
    assert autoif.parse_function_reply("no code here").problem is not None
    assert autoif.parse_function_reply('{{"func": "x"}} [[[' + "{" * 5000).function == "x\n"  # a set of dicts around one; deep nesting


def test_compose_score_and_contradiction():
    assert autoif.compose("what is tea?", "use no commas.") == "What is tea? Use no commas."
    assert autoif.compose("tell me about tea", "use no commas") == "Tell me about tea. Use no commas."
    assert autoif.parse_score("Good answer.\nScore: 9") == 9.0 and autoif.parse_score("Score: 3\nScore: 8.5") == 8.5
    assert autoif.parse_score("Score: 11") is None and autoif.parse_score("nine") is None
    assert autoif.parse_contradiction("Yes, they do.") is True and autoif.parse_contradiction("no") is False
    assert autoif.parse_contradiction("Maybe.") is None


# -- end to end -----------------------------------------------------------------------------------


def prefill(cfg: AutoIFConfig, name: str, rows: list[dict]) -> None:
    """Put the 72B teacher's replies in the run's request cache as the answers to the functions stage's requests."""
    teacher = Teacher(None, name, Path(cfg.output_dir) / "requests")
    settings = {"n": 8, "temperature": cfg.temperature, "top_p": 1.0, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    for row in rows:
        key = teacher.key(FUNCTION_PROMPT.format(instruction=row["instruction"]), settings)
        teacher.cache.append(name, {"key": key, "replies": row["gpt-answer"], "truncated": [False] * 8})


def autoif_config(tmp_path: Path, **kw) -> AutoIFConfig:
    rows = jsonl("eval_func_rft.jsonl")
    tmp_path.mkdir(parents=True, exist_ok=True)
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join(r["instruction"] for r in rows) + "\n")
    base = dict(
        teacher="tiny-llama", seeds=str(seeds), n_instructions=5, seed_share=1.0, functions_per_instruction=8, queries_per_instruction=2,
        responses_per_query=3, max_new_tokens=24, response_max_new_tokens=12, bf16=False, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    cfg = AutoIFConfig(**{**base, **kw})
    return cfg


def counts(result: dict) -> dict[str, tuple[int, int]]:
    return {s["stage"]: (s["count_in"], s["count_out"]) for s in result["funnel"]}


def check_run(result: dict, run_dir: Path) -> None:
    c = counts(result)
    assert c["seeds"] == (5, 5) and c["augment"] == (5, 5)  # all five seeds fill the pool: nothing to write
    assert c["functions"] == (40, 40) and c["compile"] == (40, 38)  # PARSED above: one repeated function, one SyntaxError
    assert c["cross-validate"] == (5, 4)  # instruction 3 dropped (above)
    for stage in result["funnel"]:  # nothing dropped without a counted reason
        assert stage["count_in"] - stage["count_out"] == sum(stage["dropped"].values()), stage["stage"]
    library = [json.loads(line) for line in (run_dir / "verifiers.jsonl").read_text().splitlines()]
    assert len(library) == c["cross-validate"][1] == c["back-translate"][0]
    assert {e["instruction"] for e in library} <= {r["instruction"] for r in jsonl("eval_func_rft.jsonl")}
    assert c["queries"] == (2 * c["back-translate"][1], 2 * c["back-translate"][1])
    assert c["responses"][0] == 3 * c["queries"][1] and c["verify"][0] == c["responses"][1]
    assert (run_dir / "report.html").read_text().count("<tr>") == len(result["funnel"]) + 1
    prompts = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines()]
    assert {p["instruction_id_list"][0] for p in prompts} == {e["id"] for e in library}


def test_autoif_end_to_end_in_process_resumes_from_its_cache(tmp_path):
    cfg = autoif_config(tmp_path)
    prefill(cfg, cfg.teacher, jsonl("eval_func_rft.jsonl"))
    console = Console(record=True, width=300)
    result = run(cfg, console=console)
    check_run(result, tmp_path / "run")
    assert "functions: 5 requests to tiny-llama: 5 from the cache, 0 generated" in console.export_text()
    # a rerun reuses every stage; with the stage files gone it re-sends nothing: every request is cached
    again = Console(record=True, width=300)
    assert counts(run(cfg, console=again)) == counts(result)
    assert "reused" in again.export_text()
    for path in (tmp_path / "run" / "stages").iterdir():
        path.unlink()
    fresh = Console(record=True, width=300)
    assert counts(run(cfg, console=fresh)) == counts(result)
    assert " 0 generated" in fresh.export_text() and not any(
        line.endswith("generated") and " 0 generated" not in line for line in fresh.export_text().splitlines()
    )


def test_autoif_through_posttrain_serve_counts_the_same(tmp_path):
    rows = jsonl("eval_func_rft.jsonl")
    local = autoif_config(tmp_path / "local")
    prefill(local, local.teacher, rows)
    in_process = counts(run(local, console=Console(record=True)))
    with served("tiny-llama", "--dtype", "float32", env={"OMP_NUM_THREADS": "1"}) as url:
        remote = autoif_config(tmp_path / "remote", base_url=url)
        prefill(remote, remote.teacher, rows)
        result = run(remote, console=Console(record=True))
    check_run(result, tmp_path / "remote" / "run")
    through_server = counts(result)
    for stage in ("seeds", "compile", "cross-validate", "queries"):
        assert through_server[stage] == in_process[stage]


def test_the_outputs_train_with_sft_and_dpo(tmp_path):
    """The published pass-rate file as verified responses: write_outputs makes SFT records and DPO pairs that train."""
    import subprocess

    from posttrain.synth.autoif_run import write_outputs
    from posttrain.synth.funnel import Funnel

    rows = jsonl("dpo_query_eval_score_results.jsonl")
    checks = [{"instruction": "as in the query", "functions": ["def evaluate(r):\n    return True\n"], "accuracy": [1.0], "cases": []}]
    prompts = [{"check": 0, "query": row["query"], "prompt": row["query"]} for row in rows]
    verified = [
        {"check": 0, "query": row["query"], "prompt": row["query"], "response": text, "pass_rate": rate, "kept": rate > 0.5}
        for row in rows for text, rate in row["response"]
    ]  # fmt: skip
    cfg = autoif_config(tmp_path)
    outputs = write_outputs(cfg, tmp_path, checks, prompts, verified, Funnel())
    # SFT: distinct responses passing: prompt 4: 1, 9: 1, 10: 6, 11: 1, 13: 1, 16: 1 -> 11; DPO: 6 pairs (above)
    assert outputs == {"verifiers": 1, "prompts": 20, "sft": 11, "dpo": 6}
    common = ["--set", "model.name=tiny-llama", "--set", "train.device=cpu", "--set", "train.micro_batch_size=2", "--max-steps", "2"]
    for kind, data in (("sft", "sft.jsonl"), ("dpo", "dpo.jsonl")):
        done = subprocess.run(
            cli(kind, "--set", f"data.path={tmp_path / data}", "--output-dir", str(tmp_path / kind), *common),
            env=subprocess_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / kind / "final").is_dir()
