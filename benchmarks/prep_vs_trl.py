"""Data preparation, posttrain vs TRL's SFTTrainer: tokenise and mask the same conversations, alternating runs.

    python benchmarks/prep_vs_trl.py [--quick] [--repeats 3] [--multiturn 2000] [--tokenizers smollm2,chatml]
                                     [--variants posttrain,trl,...] [--max-length 1024] [--workdir DIR] [--keep]

Needs TRL (``pip install -e .[bench]``) and SmolLM2-135M-Instruct's tokenizer in
``~/.cache/posttrain/models/smollm2-135m-instruct`` (only its tokenizer files are read).

Data (JSONL files of ``{"messages": [...]}``, written once, read by every run):

* ``ifeval-1turn``: ../shared/data's 541 IFEval GPT-4 prompt/response pairs, one user turn and one
  assistant turn each.
* ``multiturn``: ``--multiturn`` conversations made deterministically (seed 0) from the same texts:
  1 to 6 user/assistant exchanges, a quarter with a system message, and each assistant reply either whole or
  cut at a word boundary to 60%, 25% or 5% of its length, so lengths spread from a few dozen tokens to
  several thousand (cut at ``--max-length`` by both tools).

Tokenizers: ``smollm2`` (SmolLM2-135M-Instruct's, 49,152 tokens) and ``chatml`` (the byte-level BPE
tokenizer benchmarks/sft_vs_trl.py trains on the same texts, 8,000 tokens, posttrain's chatml template).

What each tool computes, from the JSONL file to tokenised, masked, truncated examples ready to train:

* TRL 1.16: ``load_dataset("json")`` then ``SFTTrainer._prepare_dataset`` (the method ``SFTTrainer.__init__``
  calls, on the attributes ``__init__`` sets; checked once against a real ``SFTTrainer``'s ``train_dataset`` on 200
  multi-turn conversations: identical), with ``SFTConfig(assistant_only_loss=True, max_length=--max-length)``,
  everything else default (``dataset_num_proc=None``: one process). It renders each conversation with
  ``apply_chat_template(..., return_assistant_tokens_mask=True)``, which needs ``{% generation %}`` tags: the tokenizer's template is
  replaced, for every tool, by the same ChatML template with the tags around each assistant message's content and
  its ``<|im_end|>`` (its output is character for character the model's own template's). Then it builds labels
  (-100 outside the assistant mask), truncates and drops examples with nothing trained, each a ``Dataset.map``
  or ``filter`` written to an Arrow cache (a fresh ``cache_dir`` per run).
* posttrain: ``posttrain.data.cache.prepare`` (read and validate every record, render, tokenise in batches, labels,
  truncate, write the arrays under a content hash; a fresh cache directory per run), with
  ``RenderOptions(max_length=--max-length)``: the assistant's content and end-of-turn token trained on every
  assistant turn. ``posttrain`` uses the same tagged template as TRL (the mask comes from the tags);
  ``posttrain-own`` uses the tokenizer's own template, without tags, as a posttrain user would (the mask comes
  from rendering growing prefixes of the conversation: 1 + 2 renders per assistant turn).

Both train exactly the same tokens: the assistant's content and ``<|im_end|>``, not the newline after it
nor the assistant header. The script checks it: every run's ``input_ids`` and labels are compared, example by
example, with TRL's; mismatches are counted and the first few printed (a non-zero count means the comparison is
unfair).

Variants (``--variants``; run A B C A B C …, ``--repeats`` times each, in this process, after one untimed
warm-up of each; fresh cache directories for every run, so every timed run is cold):

* ``posttrain``: posttrain's default ``num_proc`` (the cores, up to 8: a process pool when there are more than
  1,024 records, otherwise one process whose batch tokenisation uses the tokenizer's own threads), tagged template.
* ``posttrain-own``: the same with the tokenizer's own template (prefix diffs).
* ``posttrain-1proc``: ``num_proc=1`` (one process, the tokenizer's threads only), tagged template.
* ``trl``: TRL's defaults (``dataset_num_proc=None``: one process, one example at a time).
* ``trl-2proc``: ``dataset_num_proc=2`` (``datasets``' process pool).

Reported per tokenizer and data set, as a markdown table (medians over runs): conversations/s and tokens/s
(tokens of the prepared examples, after truncation), the min–max of the run times, CPU seconds (user + system of
all threads and worker processes: steadier than wall time when other work shares the cores), and the time of a
second, warm run on the same cache: posttrain's ``prepare`` loads the arrays and tokenises nothing; TRL's
``datasets`` finds its ``map`` results under the same fingerprints.

``--quick`` (under a minute on 2 cores): the ``smollm2`` tokenizer, 541 single-turn and 300 multi-turn
conversations, ``posttrain`` vs ``trl``, 3 runs each. The last line is
``ratio=<posttrain conversations/s / TRL conversations/s>`` over both data sets together (total conversations
over total median seconds). Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import date
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval_input_response_data_gpt4_20231107_145030.jsonl"
SMOLLM2 = Path.home() / ".cache" / "posttrain" / "models" / "smollm2-135m-instruct"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
VARIANTS = {
    "posttrain": "posttrain prepare(), default num_proc, tagged template",
    "posttrain-own": "posttrain prepare(), default num_proc, own template (prefix diffs)",
    "posttrain-1proc": "posttrain prepare(), num_proc=1, tagged template",
    "trl": "TRL _prepare_dataset, dataset_num_proc=None (default)",
    "trl-2proc": "TRL _prepare_dataset, dataset_num_proc=2",
}


def tagged_chatml(default_system: str | None) -> str:
    """ChatML with ``{% generation %}`` around each assistant message's content and ``<|im_end|>``.

    With ``default_system`` it renders exactly as SmolLM2-135M-Instruct's own template (a default system turn
    when the conversation has none); without, exactly as posttrain's ``chatml`` template for conversations
    without tools.
    """
    default = (
        "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{% endif %}"
        if default_system
        else ""
    )
    return (
        "{% for message in messages %}" + default + "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


# -- data ------------------------------------------------------------------------------------------


def read_pairs() -> list[dict]:
    with DATA.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cut(text: str, fraction: float) -> str:
    """The first ``fraction`` of ``text``, ending at a word boundary (at least one word)."""
    if fraction >= 1:
        return text
    end = text.rfind(" ", 0, max(1, int(len(text) * fraction)))
    return text[:end] if end > 0 else text.split(" ", 1)[0]


def multiturn(pairs: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` conversations of 1–6 exchanges from the pairs' texts, deterministic for ``seed``."""
    rng = random.Random(seed)
    out = []
    for j in range(n):
        messages = (
            [{"role": "system", "content": "You are a careful assistant. Follow every instruction exactly."}] if rng.random() < 0.25 else []
        )
        for _ in range(1 + j % 6):
            p = pairs[rng.randrange(len(pairs))]
            messages.append({"role": "user", "content": p["prompt"]})
            messages.append({"role": "assistant", "content": cut(p["response"], rng.choice([1.0, 1.0, 0.6, 0.25, 0.05]))})
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# -- tokenizers ------------------------------------------------------------------------------------


@dataclass
class Tok:
    """A tokenizer with its own template (``own``) and with the tagged one (``tagged``): same vocabulary."""

    name: str
    own: Any
    tagged: Any


def load_tokenizers(names: list[str], pairs: list[dict]) -> list[Tok]:
    from transformers import AutoTokenizer

    from posttrain.models.zoo import CHATML_SPECIALS, _chatml_template, train_tokenizer

    out = []
    for name in names:
        if name == "smollm2":
            if not (SMOLLM2 / "tokenizer.json").exists():
                raise SystemExit(f"SmolLM2's tokenizer is not at {SMOLLM2}: fetch it with posttrain's model fetcher first")
            own, tagged = AutoTokenizer.from_pretrained(SMOLLM2), AutoTokenizer.from_pretrained(SMOLLM2)
            tagged.chat_template = tagged_chatml(SMOLLM2_SYSTEM)
        elif name == "chatml":
            corpus = "\n".join(t for p in pairs for t in (p["prompt"], p["response"]))
            own = train_tokenizer(_chatml_template(), CHATML_SPECIALS, vocab_size=8000, corpus=corpus)
            tagged = train_tokenizer(tagged_chatml(None), CHATML_SPECIALS, vocab_size=8000, corpus=corpus)
        else:
            raise SystemExit(f"unknown tokenizer {name!r}: smollm2 or chatml")
        out.append(Tok(name, own, tagged))
    return out


# -- the two tools -----------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Prepared:
    seconds: float
    cpu: float  # CPU seconds of this process's threads and of the worker processes it waited for
    input_ids: list[list[int]]
    labels: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(map(len, self.input_ids))


def run_posttrain(path: Path, tok: Tok, variant: str, max_length: int, cache: Path) -> Prepared:
    from posttrain.data.cache import prepare
    from posttrain.data.chat import RenderOptions

    tokenizer = tok.own if variant == "posttrain-own" else tok.tagged
    num_proc = 1 if variant == "posttrain-1proc" else None
    t0, c0 = time.perf_counter(), cpu_seconds()
    data = prepare(path, tokenizer, RenderOptions(max_length=max_length), cache=cache, num_proc=num_proc)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert not data.from_cache
    bounds = list(pairwise(data.offsets.tolist()))
    ids, labels = data.input_ids.tolist(), data.labels.tolist()
    return Prepared(seconds, cpu, [ids[a:b] for a, b in bounds], [labels[a:b] for a, b in bounds])


def warm_posttrain(path: Path, tok: Tok, variant: str, max_length: int, cache: Path) -> float:
    from posttrain.data.cache import prepare
    from posttrain.data.chat import RenderOptions

    tokenizer = tok.own if variant == "posttrain-own" else tok.tagged
    t0 = time.perf_counter()
    data = prepare(path, tokenizer, RenderOptions(max_length=max_length), cache=cache)
    seconds = time.perf_counter() - t0
    assert data.from_cache
    return seconds


def trl_config(max_length: int, num_proc: int | None, workdir: Path) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(workdir / "trl-out"),
        assistant_only_loss=True,
        max_length=max_length,
        dataset_num_proc=num_proc,
        report_to="none",
        use_cpu=True,
    )


def run_trl(path: Path, tok: Tok, args: Any, cache: Path) -> Prepared:
    """TRL's own preparation: the ``SFTTrainer._prepare_dataset`` method, on the attributes ``__init__`` would set.

    ``__init__`` sets ``_tokenizer`` (the processing class), ``chat_template`` (None: the tokenizer's template
    already has generation tags, so TRL does not swap in one of its own) and ``completion_only_loss`` (False:
    the data are ``messages``, not prompt/completion); building the whole trainer would also load a model.
    """
    from datasets import load_dataset
    from trl import SFTTrainer

    trainer = SimpleNamespace(_tokenizer=tok.tagged, chat_template=None, completion_only_loss=False)
    t0, c0 = time.perf_counter(), cpu_seconds()
    dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    dataset = SFTTrainer._prepare_dataset(trainer, dataset, tok.tagged, args, args.packing, None, "train")
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return Prepared(seconds, cpu, dataset["input_ids"], dataset["labels"])


# -- checking --------------------------------------------------------------------------------------


def compare(name: str, ours: Prepared, trl: Prepared, tokenizer: Any, show: int = 3) -> tuple[int, int]:
    """(examples whose ids or labels differ, tokens whose label differs); prints the first few differences."""
    bad_examples = bad_tokens = 0
    if len(ours.input_ids) != len(trl.input_ids):
        print(f"  MISMATCH {name}: {len(ours.input_ids)} examples vs TRL's {len(trl.input_ids)}")
        return abs(len(ours.input_ids) - len(trl.input_ids)), -1
    for i, (a_ids, a_lab, b_ids, b_lab) in enumerate(zip(ours.input_ids, ours.labels, trl.input_ids, trl.labels)):
        if a_ids != b_ids:
            bad_examples += 1
            bad_tokens += max(len(a_ids), len(b_ids))
            if bad_examples <= show:
                print(f"  MISMATCH {name} example {i}: input_ids differ ({len(a_ids)} vs {len(b_ids)} tokens)")
            continue
        diff = [k for k, (x, y) in enumerate(zip(a_lab, b_lab)) if x != y]
        if diff:
            bad_examples += 1
            bad_tokens += len(diff)
            if bad_examples <= show:
                k = diff[0]
                context = tokenizer.convert_ids_to_tokens(a_ids[max(0, k - 3) : k + 4])
                print(
                    f"  MISMATCH {name} example {i}: {len(diff)} labels differ, first at token {k} "
                    f"(posttrain {'trained' if a_lab[k] != -100 else 'masked'}, TRL {'trained' if b_lab[k] != -100 else 'masked'}); around it: {context}"
                )
    return bad_examples, bad_tokens


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="under a minute: smollm2, 541 + 300 conversations, posttrain vs trl, 3 runs each")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each variant, alternating")
    ap.add_argument("--multiturn", type=int, default=2000, help="multi-turn conversations to make")
    ap.add_argument("--tokenizers", default="smollm2,chatml")
    ap.add_argument("--variants", default="posttrain,posttrain-own,trl,trl-2proc", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--max-length", type=int, default=1024, help="both tools truncate here (TRL's default max_length)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed afterwards")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.quick:
        args.multiturn, args.repeats, args.tokenizers, args.variants = 300, 3, "smollm2", "posttrain,trl"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "posttrain" not in variants or "trl" not in variants:
        raise SystemExit(f"--variants must include posttrain and trl, from {', '.join(VARIANTS)}; unknown: {unknown}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # posttrain's batch tokenisation uses the cores

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prep-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        pairs = read_pairs()
        sets = {
            "ifeval-1turn": [
                {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]} for p in pairs
            ],
            "multiturn": multiturn(pairs, args.multiturn),
        }
        paths = {}
        for name, records in sets.items():
            paths[name] = workdir / f"{name}.jsonl"
            write_jsonl(paths[name], records)
        toks = load_tokenizers([t.strip() for t in args.tokenizers.split(",") if t.strip()], pairs)
        configs = {v: trl_config(args.max_length, 2 if v == "trl-2proc" else None, workdir) for v in variants if v.startswith("trl")}

        counter = iter(range(1_000_000))

        def once(v: str, tok: Tok, set_name: str) -> tuple[Prepared, Path]:
            cache = workdir / "caches" / f"{next(counter)}-{v}"
            if v.startswith("trl"):
                return run_trl(paths[set_name], tok, configs[v], cache), cache
            return run_posttrain(paths[set_name], tok, v, args.max_length, cache), cache

        results: dict[tuple[str, str, str], list[Prepared]] = {}
        warm: dict[tuple[str, str, str], float] = {}
        mismatches: dict[tuple[str, str, str], tuple[int, int]] = {}
        for tok in toks:
            for set_name, records in sets.items():
                for v in variants:  # untimed warm-up: imports, compiled templates, pools
                    once(v, tok, set_name)
                for rep in range(args.repeats):
                    for v in variants:
                        prepared, cache = once(v, tok, set_name)
                        results.setdefault((tok.name, set_name, v), []).append(prepared)
                        print(
                            f"{tok.name:<8}{set_name:<14}run {rep + 1}/{args.repeats} {v:<16}{prepared.seconds:7.2f} s {prepared.cpu:6.2f} CPU s "
                            f"{len(records) / prepared.seconds:9,.0f} conv/s {prepared.tokens / prepared.seconds:11,.0f} tok/s",
                            flush=True,
                        )
                        if rep == args.repeats - 1:  # warm: the same cache again
                            if v.startswith("trl"):
                                warm[(tok.name, set_name, v)] = run_trl(paths[set_name], tok, configs[v], cache).seconds
                            else:
                                warm[(tok.name, set_name, v)] = warm_posttrain(paths[set_name], tok, v, args.max_length, cache)
                        shutil.rmtree(cache, ignore_errors=True)
                reference = results[(tok.name, set_name, "trl")][-1]
                for v in variants:
                    if not v.startswith("trl"):
                        mismatches[(tok.name, set_name, v)] = compare(
                            f"{tok.name}/{set_name}/{v}", results[(tok.name, set_name, v)][-1], reference, tok.tagged
                        )
        report(args, variants, toks, sets, results, warm, mismatches, load_before, trl.__version__)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory: {workdir}")


def report(args, variants, toks, sets, results, warm, mismatches, load_before, trl_version) -> None:
    import datasets
    import transformers

    print(
        f"\nData preparation (read JSONL → tokenised, masked, truncated at {args.max_length}), {args.repeats} cold runs per variant, alternating"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {load_before[0]:.2f} before / {os.getloadavg()[0]:.2f} after; "
        f"transformers {transformers.__version__}, datasets {datasets.__version__}, trl {trl_version}; {date.today()}"
    )
    print()
    print(
        "| tokenizer | data | conversations | variant | conv/s | tok/s | s, median (min–max) | CPU s | warm s | mismatched ex / tok | time ÷ posttrain's |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    totals: dict[str, list[float]] = {v: [0.0, 0.0] for v in variants}  # conversations, median seconds
    dropped = []
    for tok in toks:
        for set_name in sets:
            base = statistics.median(p.seconds for p in results[(tok.name, set_name, "posttrain")])
            for v in variants:
                rs = results[(tok.name, set_name, v)]
                med = statistics.median(p.seconds for p in rs)
                n, tokens = len(rs[0].input_ids), rs[0].tokens
                conversations = len(sets[set_name])
                totals[v][0] += conversations
                totals[v][1] += med
                mm = mismatches.get((tok.name, set_name, v))
                print(
                    f"| {tok.name} | {set_name} | {conversations:,} | {v} | {conversations / med:,.0f} | {tokens / med:,.0f} "
                    f"| {med:.2f} ({min(p.seconds for p in rs):.2f}–{max(p.seconds for p in rs):.2f}) "
                    f"| {statistics.median(p.cpu for p in rs):.2f} | {warm[(tok.name, set_name, v)]:.2f} "
                    f"| {f'{mm[0]} / {mm[1]}' if mm else '(reference)'} | {med / base:.2f} |"
                )
                if n != conversations:
                    dropped.append(f"{tok.name}/{set_name}/{v}: {conversations - n}")
    print()
    print("conv/s: input conversations per second; tok/s: tokens of the prepared examples (after truncation) per second;")
    print("s: wall seconds from the JSONL file to prepared examples, medians over the cold runs; CPU s: median CPU seconds")
    print("(user + system, all threads and worker processes); warm s: a second run on the same cache (posttrain loads the")
    print("arrays; TRL's datasets finds its map cache); mismatched: examples / label tokens where posttrain's output differs")
    print("from TRL's (0 / 0: identical input_ids and labels); time ÷ posttrain's: > 1 means slower than posttrain.")
    if dropped:
        print("dropped (nothing trained left after truncation): " + ", ".join(dropped))
    ratio = (totals["posttrain"][0] / totals["posttrain"][1]) / (totals["trl"][0] / totals["trl"][1])
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
