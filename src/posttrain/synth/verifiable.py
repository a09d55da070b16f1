"""Verifiable prompts: everyday queries with IFEval-style instructions, split so that held-out prompts are new.

AutoIF (Dong et al., 2024, arXiv 2406.13542) pairs user queries with instructions a program can
check. Here the queries are ours (``data/queries.txt``, ~300 short everyday requests written for this
project), the checks are posttrain's IFEval verifiers (:mod:`posttrain.verify.ifeval`, same ids and
kwargs as IFEval), and the instruction texts are ours: several phrasings per type, some used only in
training and others only in evaluation, so the held-out score measures following an instruction
phrased in a way never trained on, about a query never trained on. Own code, no library: it is a
small, deterministic table plus a round robin.

- :func:`split_queries`: queries split train / held-out by a hash of their text (about 1 in 5 held
  out), so the split is the same on every machine and survives edits to other lines.
- :func:`build_prompts`: IFEval-format records (``key``, ``prompt``, ``instruction_id_list``,
  ``kwargs``), 1 to ``max_instructions`` instructions per prompt (default 2: about half each), types spread evenly, never two
  conflicting types (:data:`CONFLICTS`). Deterministic for a seed; a prefix of a longer build.
- :data:`TYPES`: the instruction types with their phrasings and kwargs samplers; :func:`type_label` and
  :func:`describe` name them for people.

``posttrain demo`` builds its training and held-out prompts here (its fixed IFEval subset is its own:
:mod:`posttrain.demo.ifeval_subset`).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any, Literal

Split = Literal["train", "heldout", "test"]
SPLITS: tuple[Split, ...] = ("train", "heldout", "test")

HELDOUT_EVERY = 5  # a query is held out when the hash of its text is 0 modulo this (~20%)

# -- queries -------------------------------------------------------------------------------------


def _data_text(name: str) -> str:
    return files("posttrain.synth").joinpath("data", name).read_text(encoding="utf-8")


def is_heldout(query: str) -> bool:
    """Whether ``query`` is a held-out query: the first 8 bytes of its UTF-8 SHA-256, mod :data:`HELDOUT_EVERY`, are 0."""
    return int.from_bytes(hashlib.sha256(query.encode("utf-8")).digest()[:8], "big") % HELDOUT_EVERY == 0


@cache
def queries() -> tuple[str, ...]:
    """The built-in everyday queries, in file order (blank lines skipped; duplicates are an error)."""
    lines = [line.strip() for line in _data_text("queries.txt").splitlines() if line.strip()]
    repeated = [q for q, count in Counter(lines).items() if count > 1]
    if repeated:
        raise ValueError(f"queries.txt repeats {len(repeated)} queries, first {repeated[0]!r}")
    return tuple(lines)


@cache
def test_queries() -> tuple[str, ...]:
    """The frozen test split's queries (``data/test_queries.txt``): written apart from ``queries.txt``, none of
    them in it, and never used to choose a preset or a hyperparameter (only scored)."""
    lines = [line.strip() for line in _data_text("test_queries.txt").splitlines() if line.strip()]
    known = {q.lower() for q in queries()}
    shared = [q for q in lines if q.lower() in known]
    if shared or len(set(lines)) != len(lines):
        raise ValueError(f"test_queries.txt must hold distinct queries not in queries.txt; {len(shared)} shared, first {shared[:1]}")
    return tuple(lines)


def split_queries() -> dict[Split, tuple[str, ...]]:
    """``{"train": ..., "heldout": ..., "test": ...}``, each in file order. Train and held-out (the development
    split: presets were tuned on it) divide ``queries.txt`` by hash; test comes from its own file."""
    return {
        "train": tuple(q for q in queries() if not is_heldout(q)),
        "heldout": tuple(q for q in queries() if is_heldout(q)),
        "test": test_queries(),
    }


# -- kwargs --------------------------------------------------------------------------------------

# Kwargs samplers take (rng, query, avoid): ``avoid`` holds the lower-cased words the prompt's other
# instruction already uses (its keywords, forbidden words, end phrase), so that no prompt asks for a
# word and forbids it, or forbids a word of the phrase it must end with.
Sampler = Callable[[random.Random, str, frozenset[str]], dict[str, Any]]

END_PHRASES = (
    "Any other questions?", "Is there anything else I can help with?", "Hope this helps!", "Let me know if you have more questions.",
    "Have a great day!", "That is all for now.", "Good luck!", "Thanks for asking.",
)  # fmt: skip
# Words that fit an answer on any topic (to include), and words an answer is likely to use (to forbid).
TOPIC_FREE_WORDS = (
    "today", "example", "remember", "patience", "habit", "plan", "morning", "friend", "practice", "moment", "choice", "routine",
)  # fmt: skip
LIKELY_WORDS = (
    "very", "really", "just", "also", "important", "good", "great", "best", "always", "easy", "simple", "usually", "quickly", "tips",
)  # fmt: skip
_STOPWORDS = frozenset((
    "about", "after", "also", "away", "before", "best", "better", "does", "doesn", "each", "easiest", "easy", "every", "from", "good",
    "have", "help", "into", "keep", "know", "less", "long", "make", "many", "more", "much", "need", "often", "other", "really", "should",
    "some", "than", "that", "their", "them", "there", "they", "thing", "things", "this", "want", "ways", "what", "when", "where", "which",
    "while", "will", "with", "without", "would", "could", "your", "write", "short", "brief", "quick", "little", "simple",
))  # fmt: skip


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def content_words(query: str) -> list[str]:
    """Words of ``query`` worth asking for or forbidding: alphabetic, 4+ letters, not stop words, in order."""
    seen: list[str] = []
    for word in re.findall(r"[A-Za-z]+", query):
        word = word.lower()
        if len(word) >= 4 and word not in _STOPWORDS and word not in seen:
            seen.append(word)
    return seen


def _pick(rng: random.Random, pool: Iterable[str], avoid: Iterable[str]) -> str:
    avoid = set(avoid)
    return rng.choice([w for w in pool if w not in avoid])


def _existence(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    own = [w for w in content_words(query) if w not in avoid]
    first = rng.choice(own) if own else _pick(rng, TOPIC_FREE_WORDS, avoid)
    return {"keywords": [first, _pick(rng, TOPIC_FREE_WORDS, avoid | {first})]}


def _forbidden(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    first = _pick(rng, LIKELY_WORDS, avoid)
    own = [w for w in content_words(query) if w not in avoid and w != first]
    second = rng.choice(own) if own and rng.random() < 0.5 else _pick(rng, LIKELY_WORDS, avoid | {first})
    return {"forbidden_words": [first, second]}


def _frequency(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    own = [w for w in content_words(query) if w not in avoid]
    keyword = rng.choice(own) if own and rng.random() < 0.6 else _pick(rng, TOPIC_FREE_WORDS, avoid)
    return {"keyword": keyword, "frequency": rng.randint(2, 3), "relation": "at least"}


def _end_phrase(rng: random.Random, query: str, avoid: frozenset[str]) -> dict[str, Any]:
    return {"end_phrase": rng.choice([p for p in END_PHRASES if not _words(p) & avoid])}


def _fixed(**kwargs: Any) -> Sampler:
    return lambda rng, query, avoid: dict(kwargs)


def _ranged(name: str, low: int, high: int, step: int = 1, **extra: Any) -> Sampler:
    return lambda rng, query, avoid: {name: rng.randrange(low, high + 1, step), **extra}


# -- instruction types ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructionType:
    """One verifier id with its label, kwargs sampler and phrasings (``str.format`` templates over :func:`render_values`)."""

    id: str
    label: str
    sample: Sampler
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    test: tuple[str, ...]  # the frozen test split's phrasings: in neither of the other two

    def phrasings(self, split: Split) -> tuple[str, ...]:
        return {"train": self.train, "heldout": self.heldout, "test": self.test}[split]


# Counts are chosen so that every phrasing is plural and a short answer can meet it. "Fewer than N",
# "under N", "less than N" and "shorter than N" are IFEval's "less than" N; "at most M" and "no more
# than M" are "less than" M + 1 (the ``*_max`` values), so kwargs always say what the text says.
TYPES: tuple[InstructionType, ...] = (
    InstructionType(
        "change_case:english_lowercase", "lowercase", _fixed(),
        train=(
            "Write your entire answer in lowercase letters, with no capital letters at all.",
            "Please reply in English using only lowercase letters.",
            "Do not capitalize anything in your response, not even the first word of a sentence.",
        ),
        heldout=(
            "Every single letter in your reply must be lowercase.",
            "Answer in English and keep the whole response in small letters, with no uppercase.",
        ),
        test=(
            "Use no uppercase letters anywhere in what you write.",
            "Keep every word of your answer in lowercase, in English.",
        ),
    ),
    InstructionType(
        "change_case:english_capital", "all capitals", _fixed(),
        train=(
            "Write your entire answer in English and in capital letters only.",
            "Please reply using only uppercase letters.",
            "Your whole response must be in all caps, in English.",
        ),
        heldout=(
            "Type your whole reply in block capitals.",
            "Every letter of your answer should be uppercase.",
        ),
        test=(
            "Write the complete answer in English with capital letters throughout.",
            "Make your response entirely uppercase.",
        ),
    ),
    InstructionType(
        "punctuation:no_comma", "no commas", _fixed(),
        train=(
            "Do not use any commas in your answer.",
            "Please avoid commas entirely in your response.",
            "Write your reply without a single comma.",
        ),
        heldout=(
            "Your response must not contain the comma character at all.",
            "Leave out every comma and use other punctuation instead.",
        ),
        test=(
            "Commas are not allowed anywhere in your response.",
            "Answer without using a single comma character.",
        ),
    ),
    InstructionType(
        "startend:end_checker", "ends with phrase", _end_phrase,
        train=(
            'End your response with the exact phrase "{end_phrase}" and write nothing after it.',
            'Finish your answer with the words "{end_phrase}" with nothing after them.',
            'Make "{end_phrase}" the very last words of your reply.',
        ),
        heldout=(
            'Close your response with exactly "{end_phrase}" and add nothing afterwards.',
            'Your final sentence must be exactly "{end_phrase}" with no text following it.',
        ),
        test=(
            'The last words of your response have to be "{end_phrase}", with nothing following.',
            'Conclude with exactly "{end_phrase}" and stop there.',
        ),
    ),
    InstructionType(
        "startend:quotation", "in quotation marks", _fixed(),
        train=(
            "Wrap your entire response in double quotation marks.",
            'Put your whole answer inside double quotes, like "this".',
            "Start and end your reply with a double quotation mark.",
        ),
        heldout=(
            "Enclose the full response in a pair of double quotation marks.",
            'Place a double quote character (") at the very beginning and the very end of your answer.',
        ),
        test=(
            "Put the entire reply between double quotation marks.",
            "Surround everything you write with double quotes.",
        ),
    ),
    InstructionType(
        "detectable_format:title", "title in << >>", _fixed(),
        train=(
            "Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
            "Include a title in double angle brackets, for example <<A Quick Answer>>.",
            "Start with a short title enclosed in << and >>.",
        ),
        heldout=(
            "Your reply needs a title surrounded by double angular brackets, like <<title here>>.",
            "Add a heading written inside double angle brackets, e.g. <<Helpful Tips>>.",
        ),
        test=(
            "Begin with a title inside double angular brackets, for instance <<Main Points>>.",
            "Give the response a name in double angle brackets, like <<Short Guide>>.",
        ),
    ),
    InstructionType(
        "detectable_content:postscript", "postscript", lambda rng, query, avoid: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))},
        train=(
            "After your answer, add a postscript that starts with {postscript_marker} and gives one extra tip.",
            "Include a short postscript beginning with {postscript_marker} at the end of your reply.",
            "Close with a note marked {postscript_marker} that adds one more thought.",
        ),
        heldout=(
            "Below your main answer, write a brief {postscript_marker} note with a final remark.",
            "Put an afterthought at the bottom, introduced by {postscript_marker} as a postscript.",
        ),
        test=(
            "End with a postscript that begins with {postscript_marker}.",
            "After the main text, add a line starting with {postscript_marker} that makes one final point.",
        ),
    ),
    InstructionType(
        "detectable_format:json_format", "JSON", _fixed(),
        train=(
            "Wrap your whole response in valid JSON.",
            "Give your answer as a JSON object and nothing else.",
            "Reply only with JSON, optionally inside markdown code fences.",
        ),
        heldout=(
            "The entire output must be valid JSON that a parser can read.",
            "Respond with a single JSON object containing your answer, with no text outside it.",
        ),
        test=(
            "Format your whole answer as JSON.",
            "Output nothing but a JSON object holding your response.",
        ),
    ),
    InstructionType(
        "detectable_format:number_bullet_lists", "exactly N bullets", _ranged("num_bullets", 2, 5),
        train=(
            "Answer with exactly {num_bullets} bullet points, using markdown bullets such as * like this.",
            "Give exactly {num_bullets} markdown bullet points, each line starting with *, and no other bullets.",
            "Your response must contain exactly {num_bullets} bullet points in markdown.",
        ),
        heldout=(
            "Present your answer as a list of precisely {num_bullets} markdown bullets, each starting with *.",
            "Use exactly {num_bullets} bullet points, no more and no fewer, with * at the start of each line.",
        ),
        test=(
            "Write your answer as exactly {num_bullets} markdown bullet points, lines starting with *.",
            "List exactly {num_bullets} points, each on its own line beginning with *.",
        ),
    ),
    InstructionType(
        "keywords:existence", "includes keywords", _existence,
        train=(
            "Make sure to include the words {keywords} in your answer.",
            "Your response must mention {keywords}.",
            "Use the words {keywords} somewhere in your reply.",
        ),
        heldout=(
            "Work the words {keywords} into your response.",
            "Be sure your answer contains both {keywords}.",
        ),
        test=(
            "Your answer has to include the words {keywords}.",
            "Mention {keywords} in what you write.",
        ),
    ),
    InstructionType(
        "keywords:forbidden_words", "forbidden words", _forbidden,
        train=(
            "Do not use the words {forbidden_words} in your answer.",
            "Avoid the words {forbidden_words} completely.",
            "Your response must not contain the words {forbidden_words}.",
        ),
        heldout=(
            "Never write {forbidden_words} anywhere in your reply.",
            "Stay away from the words {forbidden_words} when you answer.",
        ),
        test=(
            "Do not write the words {forbidden_words} at all.",
            "The words {forbidden_words} must not appear in your reply.",
        ),
    ),
    InstructionType(
        "keywords:frequency", "keyword N+ times", _frequency,
        train=(
            'Use the word "{keyword}" at least {frequency} times.',
            'The word "{keyword}" should appear at least {frequency} times in your response.',
            'Mention "{keyword}" at least {frequency} times in your answer.',
        ),
        heldout=(
            'Repeat the word "{keyword}" {frequency} or more times in your reply.',
            'Say "{keyword}" no fewer than {frequency} times.',
        ),
        test=(
            'Include the word "{keyword}" {frequency} or more times.',
            'Your answer needs the word "{keyword}" at least {frequency} times.',
        ),
    ),
    InstructionType(
        "length_constraints:number_words", "under N words", _ranged("num_words", 40, 120, 10, relation="less than"),
        train=(
            "Answer in fewer than {num_words} words.",
            "Keep your response under {num_words} words.",
            "Use less than {num_words} words in total.",
        ),
        heldout=(
            "Your reply must be shorter than {num_words} words.",
            "Write at most {num_words_max} words.",
        ),
        test=(
            "Respond using fewer than {num_words} words.",
            "Your answer should have no more than {num_words_max} words.",
        ),
    ),
    InstructionType(
        "length_constraints:number_sentences", "under N sentences", _ranged("num_sentences", 3, 6, relation="less than"),
        train=(
            "Answer in fewer than {num_sentences} sentences.",
            "Keep your reply under {num_sentences} sentences.",
            "Your response should contain less than {num_sentences} sentences.",
        ),
        heldout=(
            "Use no more than {num_sentences_max} sentences.",
            "Limit yourself to at most {num_sentences_max} sentences.",
        ),
        test=(
            "Respond in fewer than {num_sentences} sentences.",
            "Keep it to no more than {num_sentences_max} sentences.",
        ),
    ),
    InstructionType(
        "detectable_format:number_highlighted_sections", "N+ highlights", _ranged("num_highlights", 2, 3),
        train=(
            "Highlight at least {num_highlights} parts of your answer with markdown, i.e. *highlighted part*.",
            "Use markdown to highlight at least {num_highlights} phrases, like *this*.",
            "Mark at least {num_highlights} key words or phrases with asterisks, such as *important*.",
        ),
        heldout=(
            "Emphasize {num_highlights} or more sections with markdown highlighting, e.g. *like this*.",
            "Put at least {num_highlights} separate phrases in *asterisks* to highlight them.",
        ),
        test=(
            "Highlight {num_highlights} or more phrases with markdown asterisks, as in *key idea*.",
            "Use markdown emphasis on at least {num_highlights} parts of the answer, written like *this part*.",
        ),
    ),
    InstructionType(
        "detectable_content:number_placeholders", "N+ [placeholders]", _ranged("num_placeholders", 2, 4),
        train=(
            "Include at least {num_placeholders} placeholders in square brackets, such as [name].",
            "Add at least {num_placeholders} placeholders like [date] that I can fill in later.",
            "Your reply should contain at least {num_placeholders} bracketed placeholders, for example [address].",
        ),
        heldout=(
            "Leave {num_placeholders} or more blanks for me to fill in, written in square brackets like [time].",
            "Use no fewer than {num_placeholders} square-bracket placeholders such as [place].",
        ),
        test=(
            "Include {num_placeholders} or more placeholders in square brackets, like [company].",
            "Put at least {num_placeholders} fill-in fields in square brackets, such as [amount], in your answer.",
        ),
    ),
)  # fmt: skip
TYPE_BY_ID: dict[str, InstructionType] = {t.id: t for t in TYPES}

_JSON_CONFLICTS = (
    "detectable_format:title", "detectable_format:number_bullet_lists", "startend:quotation", "startend:end_checker",
    "detectable_content:postscript", "detectable_format:number_highlighted_sections", "detectable_content:number_placeholders",
    "punctuation:no_comma", "length_constraints:number_sentences",
)  # fmt: skip
#: Pairs never combined in one prompt, each with the reason.
CONFLICTS: dict[frozenset[str], str] = {
    frozenset(("change_case:english_lowercase", "change_case:english_capital")): "a response cannot be all lowercase and all capitals",
    **{frozenset(("detectable_format:json_format", other)): "text outside or inside the JSON that JSON cannot hold" for other in _JSON_CONFLICTS},
    frozenset(("startend:quotation", "startend:end_checker")): "two demands on how the response ends",
    frozenset(("startend:quotation", "detectable_format:number_bullet_lists")): "the opening quote hides the first bullet",
    frozenset(("detectable_content:postscript", "startend:end_checker")): "both want the last word",
    frozenset(("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections")): "a line starting *highlight* counts as a bullet",
    frozenset(("detectable_format:number_bullet_lists", "length_constraints:number_sentences")): "each bullet is a sentence, so the counts fight",
}  # fmt: skip


def conflicts(a: str, b: str) -> bool:
    """Whether instruction types ``a`` and ``b`` may not share a prompt (a type never pairs with itself)."""
    return a == b or frozenset((a, b)) in CONFLICTS


def type_label(type_id: str) -> str:
    """A short human label for an instruction type ("lowercase", "no commas", ...); unknown ids come back as they are."""
    found = TYPE_BY_ID.get(type_id)
    return found.label if found else type_id


def describe() -> list[dict[str, Any]]:
    """One row per instruction type: ``id``, ``label``, and how many phrasings each split has."""
    return [{"id": t.id, "label": t.label, "train_phrasings": len(t.train), "heldout_phrasings": len(t.heldout)} for t in TYPES]


def _quoted(words: list[str], conjunction: str) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" {conjunction} {quoted[-1]}"


def render_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What templates can name: the kwargs, keyword lists quoted and joined, and ``*_max`` = threshold - 1 for "less than"."""
    values = dict(kwargs)
    if "keywords" in kwargs:
        values["keywords"] = _quoted(kwargs["keywords"], "and")
    if "forbidden_words" in kwargs:
        values["forbidden_words"] = _quoted(kwargs["forbidden_words"], "or")
    for name in ("num_words", "num_sentences"):
        if name in kwargs:
            values[f"{name}_max"] = kwargs[name] - 1
    return values


def render(phrasing: str, kwargs: dict[str, Any]) -> str:
    return phrasing.format(**render_values(kwargs))


# -- prompts -------------------------------------------------------------------------------------


def build_prompts(
    split: Split, n: int, seed: int, max_instructions: int = 2, types: list[str] | None = None, *, parts: bool = False
) -> list[dict[str, Any]]:
    """``n`` IFEval-format prompts for ``split``: a query of that split, then instruction phrasings of that split.

    Prompts cycle through 1, 2, ..., ``max_instructions`` instructions (with the default 2: half one,
    half two; fewer where the types left all conflict with those picked). Each instruction slot
    takes a least-used type so far (ties broken at random) that conflicts with none already
    picked for the prompt; phrasings of a type are used in turn, queries in a seeded shuffled order. Records are
    ``{"key", "prompt", "instruction_id_list", "kwargs"}``, as :class:`posttrain.records.PromptRecord`
    reads them. The same arguments give the same records on any machine, and a build of ``n`` is the
    first ``n`` records of any longer build with the same seed. ``parts``: also ``"query"`` and
    ``"instruction"`` (the text after the query: every phrase), which steering's fit and InstABoost need.
    """
    problems = []
    if split not in SPLITS:
        problems.append(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        problems.append(f"n must be >= 0, got {n}")
    if max_instructions < 1:
        problems.append(f"max_instructions must be >= 1, got {max_instructions}")
    chosen = list(TYPE_BY_ID) if types is None else list(dict.fromkeys(types))
    unknown = [t for t in chosen if t not in TYPE_BY_ID]
    if unknown:
        problems.append(f"unknown instruction types {unknown}; the known types are {list(TYPE_BY_ID)}")
    if not chosen:
        problems.append("types must name at least one instruction type")
    if problems:
        raise ValueError("build_prompts: " + "; ".join(problems))

    # str seeds hash the same everywhere. The seed string and the keys below keep the names they had in
    # posttrain.demo.prompts: the same arguments must give the same records (the demo's cached stages hold them).
    rng = random.Random(f"posttrain-demo-prompts:{split}:{seed}")
    pool = list(split_queries()[split])
    rng.shuffle(pool)
    uses = Counter({t: 0 for t in chosen})
    turn = {t: rng.randrange(len(TYPE_BY_ID[t].phrasings(split))) for t in chosen}

    def least_used(allowed: list[str]) -> str:
        low = min(uses[t] for t in allowed)
        return rng.choice([t for t in allowed if uses[t] == low])

    records = []
    for index in range(n):
        query = pool[index % len(pool)]
        picked = [least_used(chosen)]
        for _ in range(index % max_instructions):
            allowed = [t for t in chosen if not any(conflicts(t, p) for p in picked)]
            if not allowed:
                break
            picked.append(least_used(allowed))
        phrases, all_kwargs, avoid = [], [], frozenset[str]()
        for type_id in picked:
            kind = TYPE_BY_ID[type_id]
            kwargs = kind.sample(rng, query, avoid)
            avoid |= kwarg_words(kwargs)
            phrasings = kind.phrasings(split)
            phrases.append(render(phrasings[turn[type_id] % len(phrasings)], kwargs))
            turn[type_id] += 1
            uses[type_id] += 1
            all_kwargs.append(kwargs)
        record = {
            "key": f"demo-{split}-{seed}-{index:04d}",
            "prompt": " ".join([query, *phrases]),
            "instruction_id_list": picked,
            "kwargs": all_kwargs,
        }
        if parts:
            record |= {"query": query, "instruction": " ".join(phrases)}
        records.append(record)
    return records


def kwarg_words(kwargs: dict[str, Any]) -> frozenset[str]:
    """The lower-cased words of ``kwargs``' strings (keywords, forbidden words, end phrase): the ``avoid`` set that a
    prompt's later instructions' kwargs samplers (:attr:`InstructionType.sample`) must keep clear of."""
    words: set[str] = set()
    for value in kwargs.values():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                words |= _words(text)
    return frozenset(words)
