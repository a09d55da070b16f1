"""Deduplication and decontamination (posttrain.data.dedup, .decontaminate): planted contamination is found
and nothing else, near duplicates are confirmed exactly, both commands and the SFT data step."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.data.decontaminate import EvalDataError, EvalIndex, decontaminate, read_eval_items
from posttrain.data.dedup import dedup, jaccard, lsh_params, record_words, shingles
from posttrain.data.formats import iter_read
from posttrain.data.quality import normalize, segments, words

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IFEVAL = SHARED / "ifeval_input_data.jsonl"
MT_BENCH = SHARED / "mt_bench_question.jsonl"
SEEDS = (SHARED / "self_instruct_seed_tasks.jsonl", SHARED / "self_instruct_user_oriented_instructions.jsonl")
runner = CliRunner()

needs_shared = pytest.mark.skipif(not all(p.exists() for p in (IFEVAL, MT_BENCH, *SEEDS)), reason="shared/data is not beside the repository")


def write_jsonl(path: Path, values: list) -> Path:
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    return path


def alpaca(instruction: str, output: str = "Sure.", input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": output}


# ---------------------------------------------------------------------------------------------------
# Normalisation


def test_words_are_lm_eval_normalisation_on_ascii_and_delete_unicode_punctuation_too():
    janitor = pytest.importorskip("lm_eval.decontamination.janitor")
    jan = janitor.Janitor(ngram_n=8)
    texts = [json.loads(line)["prompt"] for line in IFEVAL.read_text().splitlines()] if IFEVAL.exists() else []
    texts += ["Hello, World! It's a \"test\" -- of   THE system_name; 3.5% $x+y", "tab\tnew\nline [x] {y} <z> a/b\\c @d #e ~f `g` ^h |i"]
    ascii_texts = [t for t in texts if t.isascii()]
    assert len(ascii_texts) > 2
    for text in ascii_texts:
        assert words(text) == jan.normalize_string(text).split(), text
    # Beyond lm-eval: Unicode lower-casing and punctuation (curly quotes, dashes, ellipses, guillemets).
    assert words("“Don’t” — ÉCOLE… «naïve»") == ["dont", "école", "naïve"]
    assert normalize("  Write, a   POEM! ") == "write a poem"


def test_segments_name_each_piece_of_text_with_its_role():
    conversation = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert [(s.field, s.role, s.text) for s in segments(conversation)] == [
        ("messages[0].content", "system", "Be brief."), ("messages[1].content", "user", "Hi"), ("messages[2].content", "assistant", "Hello"),
    ]  # fmt: skip
    pair = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    assert [(s.field, s.role) for s in segments(pair)] == [("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")]
    assert [s.role for s in segments({"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]})] == ["user", "assistant"]
    # dedup compares the user pieces, then the assistant ones; never the system prompt
    assert record_words(conversation) == [["hi"], ["hello"]]
    assert record_words(conversation, ["response"]) == [["hello"]]


# ---------------------------------------------------------------------------------------------------
# Decontamination


def _clean_records() -> list[dict]:
    """Self-Instruct's 175 seed tasks and 252 user-oriented instructions as Alpaca records (their first instance)."""
    records = []
    for path in SEEDS:
        for line in path.read_text().splitlines():
            task = json.loads(line)
            first = task["instances"][0]
            records.append(alpaca(task["instruction"], first["output"] or "Done.", first["input"]))
    return records


def _repunctuate(text: str) -> str:
    """Every ASCII punctuation mark deleted, a comma after every fifth word, curly quotes round it, ?! at the end."""
    bare = re.sub(r"[!-/:-@\[-`{-~]", "", text).split()
    return "“" + " ".join(w + ("," if i % 5 == 4 else "") for i, w in enumerate(bare)) + "”?!"


def _planted_file(tmp_path: Path) -> tuple[Path, dict[int, tuple[str, int]], int]:
    """Clean Self-Instruct records with IFEval prompts planted among them in four disguises.

    Returns the file, {line: (disguise, IFEval line)} of the planted records, and the number of clean records.
    """
    clean = _clean_records()
    prompts = [json.loads(line)["prompt"] for line in IFEVAL.read_text().splitlines()]
    rng = random.Random(0)
    # Prompts of 13 words or more (all but 2 of 541), so that n = 13 can find them embedded too; a shorter one
    # has no 13-gram and is found only when a whole piece of the record is the prompt (exact match).
    chosen = rng.sample([k for k, p in enumerate(prompts) if len(words(p)) >= 13], 48)
    disguises = {
        "verbatim": lambda p: alpaca(p),
        "re-cased": lambda p: alpaca(p.upper() if len(p) % 2 else p.swapcase()),
        "re-punctuated": lambda p: alpaca(_repunctuate(p)),
        "embedded in the instruction": lambda p: alpaca("My teacher gave us this, please help me with it. " + p + " It is due on Monday morning."),
        "embedded in the input": lambda p: alpaca("Answer the request below.", input="Request from a customer:\n" + p + "\nThanks in advance."),
        "embedded in the response": lambda p: alpaca("Give me an example of a writing task.", output="Here is one: " + p + " Good luck with it!"),
    }
    names = list(disguises)
    records: list[dict] = list(clean)
    planted: dict[int, tuple[str, int]] = {}
    for k, index in enumerate(chosen):
        name = names[k % len(names)]
        at = rng.randrange(len(records) + 1)
        records.insert(at, ("planted", name, index, disguises[name](prompts[index])))
    lines = []
    for line, record in enumerate(records, start=1):
        if isinstance(record, tuple):
            _, name, index, value = record
            planted[line] = (name, index + 1)
            lines.append(value)
        else:
            lines.append(record)
    return write_jsonl(tmp_path / "train.jsonl", lines), planted, len(clean)


@needs_shared
def test_self_instruct_records_are_clean_against_ifeval_and_mt_bench():
    """The clean side of the planted test really is clean: no Self-Instruct record shares an 8-gram (or a whole
    text) with IFEval or MT-Bench, its instructions, inputs and outputs all checked."""
    index = EvalIndex.from_files([IFEVAL, MT_BENCH], 8)
    records = _clean_records()
    assert len(records) == 175 + 252
    assert [i for i, r in enumerate(records) if index.find(r_to_canonical(r))] == []


def r_to_canonical(record: dict) -> dict:
    from posttrain.data.formats import from_alpaca
    from posttrain.records import Location

    return from_alpaca(record, Location("x"))


@needs_shared
@pytest.mark.parametrize("n", [8, 13])
def test_planted_ifeval_prompts_are_all_found_and_nothing_else(tmp_path, n, capsys):
    train, planted, clean = _planted_file(tmp_path)
    index = EvalIndex.from_files([IFEVAL, MT_BENCH], n)
    items = list(iter_read(train))
    result = decontaminate([(raw.location, record) for raw, record in items], index)

    found = {c.location.line: c for c in result.found}
    missed = sorted(set(planted) - set(found))
    false_positives = sorted(set(found) - set(planted))
    with capsys.disabled():
        print(
            f"\n[decontamination, n={n}] planted {len(planted)} IFEval prompts in {clean} clean Self-Instruct records: "
            f"found {len(set(found) & set(planted))} of {len(planted)}, false positives {len(false_positives)} of {clean}"
        )
    assert not missed, [planted[line] for line in missed]
    assert not false_positives, [found[line].to_dict() for line in false_positives]
    # each report names the right IFEval line, and how it matched
    for line, (name, ifeval_line) in planted.items():
        c = found[line]
        assert c.item.location.line == ifeval_line and c.item.location.source == str(IFEVAL)
        assert c.match == ("exact" if name in ("verbatim", "re-cased", "re-punctuated") else "ngram"), (name, c.to_dict())
        if c.match == "ngram":
            assert len(c.ngram.split()) == n and c.ngram in normalize(c.item.text)
    assert len(result.kept) == clean


def test_short_eval_items_match_exactly_and_long_texts_do_not_match_short_items(tmp_path):
    """An eval item shorter than n words has no n-gram: only an exact (normalised) match finds it."""
    evals = write_jsonl(tmp_path / "alpaca_eval.jsonl", [{"instruction": "Write a haiku about autumn.", "output": "x", "generator": "gpt4", "dataset": "selfinstruct"}])
    index = EvalIndex.from_files([evals], 8)
    assert index.grams == {} and list(index.exact) == ["write a haiku about autumn"]
    exact = {"messages": [{"role": "user", "content": "write a HAIKU about autumn"}, {"role": "assistant", "content": "Leaves fall."}]}
    inside = {"messages": [{"role": "user", "content": "Please write a haiku about autumn for my class."}, {"role": "assistant", "content": "Leaves fall."}]}
    hit = index.find(exact)
    assert hit is not None and hit.match == "exact" and hit.field == "messages[0].content" and hit.item.location.line == 1
    assert index.find(inside) is None


def test_eval_formats_give_their_prompts(tmp_path):
    mt = write_jsonl(tmp_path / "mt.jsonl", [{"question_id": 81, "category": "writing", "turns": ["First question here.", "Second one."]}])
    ifeval = write_jsonl(tmp_path / "ifeval.jsonl", [{"key": 1000, "prompt": "Write a story.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Just a prompt line."}, {"id": "m", "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "As messages."}]}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "U2"}, {"role": "assistant", "content": "B"}]}])
    alpaca_eval = write_jsonl(tmp_path / "ae.json", [{"instruction": "Do it.", "input": "with this"}])
    got = {p.name: [(i.location.line, i.key, i.text) for i in read_eval_items(p)] for p in (mt, ifeval, prompts, chat, alpaca_eval)}
    assert got == {
        "mt.jsonl": [(1, "81/turn 1", "First question here."), (1, "81/turn 2", "Second one.")],
        "ifeval.jsonl": [(1, 1000, "Write a story.")],
        "prompts.jsonl": [(1, None, "Just a prompt line."), (2, "m", "As messages.")],
        "chat.jsonl": [(1, None, "U1"), (1, None, "U2")],
        "ae.json": [(1, None, "Do it.\n\nwith this")],
    }


def test_a_bad_eval_file_is_refused_with_every_bad_line_named(tmp_path):
    bad = tmp_path / "mt.jsonl"
    bad.write_text(
        json.dumps({"question_id": 1, "turns": ["fine", 7]}) + "\n" + "{not json\n" + json.dumps({"colour": "red"}) + "\n" + json.dumps({"prompt": ""}) + "\n"
    )
    with pytest.raises(EvalDataError) as err:
        read_eval_items(bad)
    text = str(err.value)
    assert "4 problems" in text
    assert f"{bad}:1: field 'turns[1]': expected non-empty text, found number 7" in text
    assert f"{bad}:2: expected one JSON object per line" in text
    assert f"{bad}:3: expected an eval item" in text and "keys ['colour']" in text
    assert f"{bad}:4: field 'prompt': expected non-empty text, found empty string" in text


def test_the_scan_is_fast(tmp_path):
    """The performance contract, on a small scale that runs in CI: time grows with the training data only."""
    import time

    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]
    evals = write_jsonl(tmp_path / "e.jsonl", [{"prompt": " ".join(rng.choices(vocab, k=40))} for _ in range(1000)])
    index = EvalIndex.from_files([evals], 8)
    records = [(None, {"prompt": " ".join(rng.choices(vocab, k=20)), "completion": " ".join(rng.choices(vocab, k=80))}) for _ in range(5000)]
    start = time.perf_counter()
    result = decontaminate(records, index)
    took = time.perf_counter() - start
    assert len(result.kept) == 5000
    assert took < 5, f"5000 records took {took:.1f} s"  # ~0.2 s; 52K records ~2 s


# ---------------------------------------------------------------------------------------------------
# Deduplication

BASE_TEXT = (
    "the quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch and drinks a cup of "
    "strong black coffee before the long day of work in the fields begins again"
)
BASE = BASE_TEXT.split()


def conv(prompt: str, response: str = "ok") -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def variant(changes: int) -> str:
    tokens = list(BASE)
    for k in range(changes):
        tokens[len(tokens) - 1 - 3 * k] = f"changed{k}"  # words near the end, 3 apart
    return " ".join(tokens)


def test_exact_duplicates_after_normalisation_cluster_with_the_first():
    records = [conv("Write a poem about the sea."), conv("Something else."), conv("write a POEM   about the sea"), conv("Write a poem, about the sea!!")]
    result = dedup(records)
    assert result.counts() == {"records": 4, "exact_duplicates": 2, "near_duplicates": 0, "kept": 2}
    assert result.kept == [0, 1]
    [cluster] = result.clusters
    assert cluster.kept == 0 and cluster.size == 3 and [(m.index, m.match, m.jaccard) for m in cluster.dropped] == [(2, "exact", 1.0), (3, "exact", 1.0)]


def test_near_duplicates_are_confirmed_exactly_and_nothing_below_the_threshold_is_dropped():
    one, two = variant(1), variant(2)
    j1 = jaccard(shingles(BASE, 5), shingles(one.split(), 5))
    j2 = jaccard(shingles(BASE, 5), shingles(two.split(), 5))
    assert 0.6 < j2 < j1 < 1
    records = [conv(" ".join(BASE)), conv("An unrelated prompt about cooking rice."), conv(one), conv(two)]
    # at exactly j2 both variants go; just above it the farther one stays (its Jaccard is below the threshold)
    at = dedup(records, threshold=j2, fields=["prompt"])
    assert at.counts()["near_duplicates"] == 2 and at.kept == [0, 1]
    [cluster] = at.clusters
    assert cluster.kept == 0 and [(m.index, m.match) for m in cluster.dropped] == [(2, "near"), (3, "near")]
    assert [m.jaccard for m in cluster.dropped] == pytest.approx([j1, j2])
    above = dedup(records, threshold=j2 + 1e-6, fields=["prompt"])
    assert above.kept == [0, 1, 3] and [m.index for m in above.clusters[0].dropped] == [2]
    for result in (at, above):
        assert all(m.jaccard >= result.threshold for c in result.clusters for m in c.dropped)


def test_clusters_are_stars_round_the_kept_record_not_chains():
    """A ~ B and B ~ C but A !~ C: B goes with A, and C stays (it is not at the threshold with A, the kept one)."""
    a = " ".join(BASE)
    b = variant(2)
    c_tokens = b.split()
    for k in range(2, 4):
        c_tokens[len(c_tokens) - 1 - 3 * k] = f"other{k}"
    c = " ".join(c_tokens)
    ab = jaccard(shingles(BASE, 5), shingles(b.split(), 5))
    bc = jaccard(shingles(b.split(), 5), shingles(c_tokens, 5))
    ac = jaccard(shingles(BASE, 5), shingles(c_tokens, 5))
    threshold = min(ab, bc)
    assert ac < threshold
    result = dedup([conv(a), conv(b), conv(c)], threshold=threshold, fields=["prompt"])
    assert result.kept == [0, 2]


def test_lsh_finds_nearly_every_pair_at_the_threshold():
    """The bands make a pair at the threshold a candidate with probability >= 0.99 (datasketch's own choice: 0.4)."""
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and 1 - (1 - 0.8**r) ** b >= 0.99
    rng = random.Random(3)
    vocab = [f"v{i}" for i in range(20000)]
    records = []
    for _ in range(60):
        tokens = rng.choices(vocab, k=60)
        copy = list(tokens)
        copy[rng.randrange(60)] = "swapped"  # one word changed: Jaccard 51/61 ~ 0.84 over 5-word shingles
        records += [conv(" ".join(tokens)), conv(" ".join(copy))]
    result = dedup(records, threshold=0.8, fields=["prompt"])
    assert result.near >= 59, f"{result.near} of 60 near-duplicate pairs found"
    assert all(c.size == 2 and c.dropped[0].index == c.kept + 1 for c in result.clusters)


def test_fields_choose_what_is_compared():
    records = [conv("Name three colors.", "Red, green and blue."), conv("Name three colors.", "Cyan, magenta and yellow.")]
    assert dedup(records).counts()["kept"] == 2  # prompt and response
    assert dedup(records, fields=["prompt"]).counts() == {"records": 2, "exact_duplicates": 1, "near_duplicates": 0, "kept": 1}
    with pytest.raises(ValueError, match="fields"):
        dedup(records, fields=["system"])
    prompts_only = [{"prompt": "Write a poem.", "key": 1, "instruction_id_list": [], "kwargs": []}, {"prompt": "Write a song.", "key": 2, "instruction_id_list": [], "kwargs": []}]
    result = dedup(prompts_only, fields=["response"])  # nothing to compare is nobody's duplicate
    assert result.kept == [0, 1] and result.without_text == 2 and not result.clusters


# ---------------------------------------------------------------------------------------------------
# The commands


def test_dedup_command_writes_kept_records_as_read_a_report_and_counts(tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [alpaca("Write a poem about the sea."), alpaca(" ".join(BASE), "A."), alpaca("WRITE A POEM ABOUT THE SEA"), alpaca(variant(1), "A."), {"instruction": "x", "output": "y", "id": 7}],
    )
    out, report = tmp_path / "clean.jsonl", tmp_path / "clusters.jsonl"
    result = runner.invoke(app, ["data", "dedup", str(data), "-o", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "5 records in, 1 exact duplicates, 1 near duplicates" in text and "3 kept" in text
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == [alpaca("Write a poem about the sea."), alpaca(" ".join(BASE), "A."), {"instruction": "x", "output": "y", "id": 7}]  # as read, extra fields kept
    clusters = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(c["size"], c["kept"]["line"], [d["line"] for d in c["dropped"]]) for c in clusters] == [(2, 1, [3]), (2, 2, [4])]
    assert clusters[0]["dropped"][0]["match"] == "exact" and clusters[1]["dropped"][0]["match"] == "near"
    assert 0.8 <= clusters[1]["similarity"] < 1 and "minhash_estimate" in clusters[1]["dropped"][0]


def test_decontaminate_command_writes_clean_records_and_a_report_line_per_contaminated_record(tmp_path):
    evals = write_jsonl(tmp_path / "mt.jsonl", [{"question_id": 81, "turns": ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences.", "Rewrite it."]}])
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            alpaca("Name a fruit.", "Apple."),
            alpaca("Please compose an ENGAGING travel blog post about a recent trip to Hawaii; highlighting the food.", "..."),
            alpaca("Rewrite it", "ok"),
            alpaca("Name a vegetable.", "Carrot."),
        ],
    )
    out, report = tmp_path / "clean.jsonl", tmp_path / "report.jsonl"
    result = runner.invoke(app, ["data", "decontaminate", str(train), "--against", str(evals), "-o", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "4 records in, 2 contaminated (1 by a shared 8-gram, 1 by an exact prompt match), 2 kept" in text
    assert [json.loads(line)["instruction"] for line in out.read_text().splitlines()] == ["Name a fruit.", "Name a vegetable."]
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["line"], r["match"], r["eval"]["line"], r["eval"]["key"]) for r in lines] == [(2, "ngram", 1, "81/turn 1"), (3, "exact", 1, "81/turn 2")]
    assert lines[0]["ngram"] == "compose an engaging travel blog post about a" and lines[0]["eval"]["file"] == str(evals)
    assert lines[0]["eval"]["text"].startswith("Compose an engaging") and lines[0]["field"] == "messages[0].content"


def test_commands_name_a_bad_line_with_file_and_line(tmp_path):
    evals = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Write a long story about a dragon who learns to fly over the sea."}])
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(alpaca("Fine.")) + "\n" + json.dumps({"instruction": 5, "output": "x"}) + "\n")
    for command in (["dedup", str(train)], ["decontaminate", str(train), "--against", str(evals), "-o", str(tmp_path / "o"), "--report", str(tmp_path / "r")]):
        result = runner.invoke(app, ["data", *command])
        assert result.exit_code == 1
        assert f"{train}:2: field 'instruction': expected a string, found number 5" in " ".join(result.output.split())
    bad_eval = tmp_path / "bad_eval.jsonl"
    bad_eval.write_text(json.dumps({"turns": "not a list"}) + "\n")
    result = runner.invoke(app, ["data", "decontaminate", str(evals), "--against", str(bad_eval), "-o", str(tmp_path / "o"), "--report", str(tmp_path / "r")])
    assert result.exit_code == 1 and f"{bad_eval}:1: field 'turns': expected a non-empty list of questions" in " ".join(result.output.split())


def test_on_error_skip_decontaminates_the_good_records(tmp_path):
    evals = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Write a long story about a dragon who learns to fly over the sea."}])
    train = write_jsonl(tmp_path / "train.jsonl", [alpaca("Write a long story about a dragon who learns to fly over the sea."), {"bad": 1}, alpaca("Fine.")])
    out, report = tmp_path / "clean.jsonl", tmp_path / "r.jsonl"
    result = runner.invoke(
        app, ["data", "decontaminate", str(train), "--against", str(evals), "-o", str(out), "--report", str(report), "--on-error", "skip", "--rejects", str(tmp_path / "rej.jsonl")]
    )
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 1 and json.loads(report.read_text())["line"] == 1
    assert json.loads((tmp_path / "rej.jsonl").read_text())["location"] == f"{train}:2"


# ---------------------------------------------------------------------------------------------------
# The data step of SFT and DPO configs


@needs_shared
def test_sft_with_decontaminate_against_drops_the_planted_records_and_counts_them(tmp_path):
    from sft_fixtures import sft_config, write_color_data

    from posttrain.config import load_config
    from posttrain.train import sft

    data = write_color_data(tmp_path / "colors.jsonl", n=40)
    prompts = [json.loads(line)["prompt"] for line in IFEVAL.read_text().splitlines()]
    planted = [
        {"messages": [{"role": "user", "content": prompts[3]}, {"role": "assistant", "content": "Sure."}]},
        {"messages": [{"role": "user", "content": "Hello! " + prompts[100].lower() + " ok?"}, {"role": "assistant", "content": "Fine."}]},
        {"messages": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": prompts[200]}]},
    ]
    with data.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in planted)
    cfg = load_config(
        sft_config(data, tmp_path / "run", data={"decontaminate_against": [str(IFEVAL), str(MT_BENCH)]}, train={"max_steps": 2})
    )
    result = sft.train(cfg)
    stats = json.loads((result.run_dir / "data_stats.json").read_text())
    decontaminated = stats["read"]["decontaminated"]
    assert decontaminated["removed"] == 3 and decontaminated["checked"] == 43 and decontaminated["n"] == 8
    assert decontaminated["by_eval_file"] == {str(IFEVAL): 3}
    assert decontaminated["removed_at"] == [f"{data}:41", f"{data}:42", f"{data}:43"]
    assert stats["render"]["examples"] == 40


def test_decontamination_is_part_of_the_tokenized_data_key(tmp_path):
    from posttrain.data.cache import prepare
    from posttrain.models.load import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    data = write_jsonl(tmp_path / "d.jsonl", [conv(f"Question number {i} about the weather today?", "Sunny.") for i in range(6)] + [conv("Tell me about the history of the printing press in Europe please.", "ok")])
    evals = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Tell me about the history of the printing press in Europe."}])
    store = tmp_path / "cache"
    plain = prepare(data, tok, cache=store)
    first = prepare(data, tok, cache=store, decontaminate_against=[evals])
    assert not first.from_cache and first.key != plain.key and len(first) == len(plain) - 1
    assert first.read["decontaminated"]["removed"] == 1
    again = prepare(data, tok, cache=store, decontaminate_against=[evals])
    assert again.from_cache and again.read["decontaminated"]["removed"] == 1
    assert prepare(data, tok, cache=store, decontaminate_against=[evals], decontaminate_n=13).key != first.key
    write_jsonl(evals, [{"prompt": "Something else entirely, with no words of the data in it at all."}])
    changed = prepare(data, tok, cache=store, decontaminate_against=[evals])
    assert not changed.from_cache and changed.key != first.key and len(changed) == len(plain)


def test_a_missing_eval_file_is_refused_before_anything_loads(tmp_path):
    from sft_fixtures import sft_config

    from posttrain.config import ConfigError, DPOConfig, load_config

    data = write_jsonl(tmp_path / "d.jsonl", [conv("hi")])
    missing = tmp_path / "no_such_eval.jsonl"
    raw = sft_config(data, tmp_path / "run", data={"decontaminate_against": [str(data), str(missing)]}, model={"name": str(tmp_path / "no-model")})
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    text = str(err.value)
    assert f"data.decontaminate_against[1]: no such file or directory: {missing}" in text and "model.name" in text
    dpo = {"model": {"name": "tiny-llama"}, "data": {"path": str(data), "decontaminate_against": [str(missing)], "decontaminate_n": 13}}
    with pytest.raises(ConfigError, match=re.escape("data.decontaminate_against[0]")):
        load_config(dpo, cls=DPOConfig)
    assert load_config({**dpo, "data": {**dpo["data"], "decontaminate_against": [str(data)]}}, cls=DPOConfig).data.decontaminate_n == 13


@needs_shared
@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_dpo_and_reward_model_configs_take_the_same_data_step(tmp_path, stage):
    from posttrain.config import DPOConfig, RewardConfig, load_config
    from posttrain.train import dpo, reward

    prompt = json.loads(IFEVAL.read_text().splitlines()[7])["prompt"]
    planted = {"prompt": [{"role": "user", "content": "Could you help? " + prompt}], "chosen": [{"role": "assistant", "content": "Yes."}], "rejected": [{"role": "assistant", "content": "No."}]}
    if stage == "dpo":
        from test_dpo import dpo_config

        raw = dpo_config(tmp_path, train={"max_steps": 2, "eval_every": None}, data={"eval_fraction": 0.0})
        cls, run = DPOConfig, dpo.train
    else:
        from test_reward import rm_config, write_pairs

        raw = rm_config(write_pairs(tmp_path / "pairs.jsonl", 24, seed=0), write_pairs(tmp_path / "held.jsonl", 8, seed=1), tmp_path / "run", train={"max_steps": 2, "eval_every": None})
        cls, run = RewardConfig, reward.train
    path = Path(raw["data"]["path"])
    before = len(path.read_text().splitlines())
    with path.open("a") as f:
        f.write(json.dumps(planted) + "\n")
    raw["data"]["decontaminate_against"] = [str(IFEVAL)]
    result = run(load_config(raw, cls=cls))
    stats = json.loads((result.run_dir / "data_stats.json").read_text())
    decontaminated = stats["read"]["decontaminated"] if stage == "dpo" else stats["decontaminated"]
    assert decontaminated["removed"] == 1 and decontaminated["removed_at"] == [f"{path}:{before + 1}"]
    assert (stats["pairs"]) == before
