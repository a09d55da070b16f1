"""IFEval's 25 instruction types as verifiers (Zhou et al., 2023, "Instruction-Following Evaluation for
Large Language Models", arXiv:2311.07911).

Each check reproduces the reference checker's behaviour exactly (google-research
instruction_following_eval, as packaged in lm-evaluation-harness ``tasks/ifeval``): the same regular
expressions' semantics, the same counting rules, the same comparisons ("less than" is ``<``, "at
least" is ``>=``), the same instruction wording. ``tests/test_ifeval_parity.py`` holds us to it,
verdict for verdict. The code is ours; where the reference has a quirk we keep it (scores must agree)
and say so in the docstring.

Where we depart, deliberately:

- **Missing or out-of-range kwargs are errors.** The reference silently draws a random value (a
  random letter, a random count, a random ``nth_paragraph`` when it exceeds ``num_paragraphs``), so its
  verdict changes run to run. Here every verdict is a function of the kwargs and the response.
- **``keywords:letter_frequency`` with a non-letter.** Two IFEval prompts ask for a character that is
  not a-z (key 1122: at least 4 ``#``; key 1129: at least 6 ``!``). The reference then counts a random
  ASCII letter instead. We count the character that was asked for. Those two instructions are the only
  ones whose reference verdict is random; the parity test leaves them out.
- **Kwargs that are not valid regular expressions.** The reference puts keywords, the postscript
  marker and the section splitter into regexes unescaped (so ``.`` in a keyword matches any
  character, which we keep) and crashes on one that does not compile (``C++``); we match that kwarg
  literally instead.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from posttrain.verify import text
from posttrain.verify.base import RELATIONS, Kwargs, Relation, Verdict, Verifier, compare

# ISO 639-1 codes IFEval asks for, with the names its instructions use.
LANGUAGES: dict[str, str] = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi", "fr": "French",
    "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian", "bn": "Bengali", "uk": "Ukrainian",
    "th": "Thai", "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "bg": "Bulgarian", "ko": "Korean",
    "pl": "Polish", "he": "Hebrew", "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili",
    "kn": "Kannada", "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}  # fmt: skip

# Words random keyword instructions draw from (our own list; IFEval draws from a longer one).
KEYWORD_POOL: tuple[str, ...] = (
    "answer", "balance", "bridge", "camera", "candle", "career", "castle", "circle", "climate", "coffee",
    "comfort", "compass", "courage", "culture", "desert", "detail", "dinner", "engine", "energy", "family",
    "feather", "festival", "forest", "freedom", "future", "garden", "guitar", "harbor", "harvest", "history",
    "horizon", "island", "journey", "justice", "kitchen", "ladder", "language", "lantern", "library", "machine",
    "market", "memory", "mirror", "moment", "mountain", "museum", "network", "ocean", "orchard", "paper",
    "pattern", "pencil", "planet", "pocket", "puzzle", "quality", "rainbow", "reason", "record", "river",
    "rocket", "season", "shadow", "signal", "silver", "soccer", "spirit", "station", "storm", "story",
    "summer", "teacher", "theory", "thunder", "ticket", "timber", "tower", "travel", "valley", "village",
    "voyage", "wallet", "weather", "window", "winter", "wisdom", "wonder", "yellow",
)  # fmt: skip

CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
SECTION_SPLITTERS = ("Section", "SECTION")

# Limits IFEval draws random kwargs within.
_MAX_SENTENCES = 20
_MAX_PLACEHOLDERS = 4
_MAX_BULLETS = 5
_MAX_HIGHLIGHTS = 4
_MAX_SECTIONS = 5
_MAX_PARAGRAPHS = 5
_KEYWORDS_PER_INSTRUCTION = 2
_MAX_KEYWORD_FREQUENCY = 3
_MAX_LETTER_FREQUENCY = 10
_MAX_CAPITAL_WORDS = 20
_WORDS_RANGE = (100, 500)

_PLACEHOLDER = re.compile(r"\[.*?\]")
_BULLET_STAR = re.compile(r"^\s*\*[^\*].*$", re.MULTILINE)
_BULLET_DASH = re.compile(r"^\s*-.*$", re.MULTILINE)
_HIGHLIGHT = re.compile(r"\*[^\n\*]*\*")
_DOUBLE_HIGHLIGHT = re.compile(r"\*\*[^\n\*]*\*\*")
_PARAGRAPH_DIVIDER = re.compile(r"\s?\*\*\*\s?")
_TITLE = re.compile(r"<<[^\n]+>>")
_POSTSCRIPT_PS = re.compile(r"\s*p\.\s?s\..*$", re.MULTILINE)
_POSTSCRIPT_PPS = re.compile(r"\s*p\.\s?p\.\s?s.*$", re.MULTILINE)
_JSON_FENCE_OPENINGS = ("```json", "```Json", "```JSON", "```")
_FIRST_WORD_STOP = frozenset(".,?!'\"")


def _kwarg_pattern(prefix: str, value: str, suffix: str, flags: int = 0) -> re.Pattern[str]:
    """``prefix + value + suffix`` as a regex, ``value`` unescaped as IFEval has it, literal if it is no regex."""
    try:
        return re.compile(prefix + value + suffix, flags)
    except re.error:
        return re.compile(prefix + re.escape(value) + suffix, flags)


def _expected(relation: Relation, threshold: int) -> str:
    return f"expected {relation} {threshold}"


def _verdict(passed: bool, measured: str, expected: str) -> Verdict:
    return Verdict(passed, f"{measured}, {expected}")


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"


# -- keywords ------------------------------------------------------------------------------------


class KeywordsKwargs(Kwargs):
    keywords: list[str] = Field(min_length=1)

    @field_validator("keywords")
    @classmethod
    def _nonblank(cls, words: list[str]) -> list[str]:
        if any(not word.strip() for word in words):
            raise ValueError("keywords must not be blank")
        return words


class KeywordExistence(Verifier[KeywordsKwargs]):
    """Every keyword occurs somewhere, case-insensitively, as a substring (not a whole word: "cat" is in "concatenate")."""

    id = "keywords:existence"
    Kwargs = KeywordsKwargs

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._keywords = sorted(self.kwargs.keywords)
        self._patterns = [_kwarg_pattern("", word, "", re.IGNORECASE) for word in self._keywords]

    def description(self) -> str:
        return f"Include keywords {self._keywords} in the response."

    def check(self, response: str) -> Verdict:
        missing = [word for word, pattern in zip(self._keywords, self._patterns) if not pattern.search(response)]
        if missing:
            return Verdict(False, "missing keywords: " + ", ".join(map(repr, missing)))
        return Verdict(True, "all keywords present")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"keywords": rng.sample(KEYWORD_POOL, _KEYWORDS_PER_INSTRUCTION)}


class KeywordFrequencyKwargs(Kwargs):
    keyword: str = Field(min_length=1)
    frequency: int = Field(ge=1)
    relation: Relation

    @field_validator("keyword")
    @classmethod
    def _strip(cls, word: str) -> str:
        if not word.strip():
            raise ValueError("keyword must not be blank")
        return word.strip()


class KeywordFrequency(Verifier[KeywordFrequencyKwargs]):
    """Case-insensitive occurrences of the keyword, counted as substrings ("ai" counts in "said")."""

    id = "keywords:frequency"
    Kwargs = KeywordFrequencyKwargs

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pattern = _kwarg_pattern("", self.kwargs.keyword, "", re.IGNORECASE)

    def description(self) -> str:
        k = self.kwargs
        return f"In your response, the word {k.keyword} should appear {k.relation} {k.frequency} times."

    def check(self, response: str) -> Verdict:
        k = self.kwargs
        count = len(self._pattern.findall(response))
        measured = f"{k.keyword!r} appears {_plural(count, 'time')}"
        return _verdict(compare(count, k.relation, k.frequency), measured, _expected(k.relation, k.frequency))

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {
            "keyword": rng.choice(KEYWORD_POOL),
            "frequency": rng.randint(1, _MAX_KEYWORD_FREQUENCY),
            "relation": rng.choice(RELATIONS),
        }


class ForbiddenWordsKwargs(Kwargs):
    forbidden_words: list[str] = Field(min_length=1)

    @field_validator("forbidden_words")
    @classmethod
    def _nonblank(cls, words: list[str]) -> list[str]:
        if any(not word.strip() for word in words):
            raise ValueError("forbidden words must not be blank")
        return words


class ForbiddenWords(Verifier[ForbiddenWordsKwargs]):
    """None of the words occurs as a whole word (``\\b`` boundaries), case-insensitively."""

    id = "keywords:forbidden_words"
    Kwargs = ForbiddenWordsKwargs

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._words = sorted(set(self.kwargs.forbidden_words))
        self._patterns = [_kwarg_pattern(r"\b", word, r"\b", re.IGNORECASE) for word in self._words]

    def description(self) -> str:
        return f"Do not include keywords {self._words} in the response."

    def check(self, response: str) -> Verdict:
        found = [word for word, pattern in zip(self._words, self._patterns) if pattern.search(response)]
        if found:
            return Verdict(False, "found forbidden words: " + ", ".join(map(repr, found)))
        return Verdict(True, "no forbidden words")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"forbidden_words": rng.sample(KEYWORD_POOL, _KEYWORDS_PER_INSTRUCTION)}


class LetterFrequencyKwargs(Kwargs):
    letter: str
    let_frequency: int = Field(ge=1)
    let_relation: Relation

    @field_validator("letter")
    @classmethod
    def _one_character(cls, letter: str) -> str:
        if len(letter) != 1 or letter.isspace():
            raise ValueError("letter must be a single non-space character")
        return letter.lower()


class LetterFrequency(Verifier[LetterFrequencyKwargs]):
    """Occurrences of the letter, case-insensitively, anywhere in the response.

    A non-letter (``#``, ``!``) is counted as given; the reference counts a random letter instead.
    """

    id = "keywords:letter_frequency"
    Kwargs = LetterFrequencyKwargs

    def description(self) -> str:
        k = self.kwargs
        return f"In your response, the letter {k.letter} should appear {k.let_relation} {k.let_frequency} times."

    def check(self, response: str) -> Verdict:
        k = self.kwargs
        count = response.lower().count(k.letter)
        measured = f"{k.letter!r} appears {_plural(count, 'time')}"
        return _verdict(compare(count, k.let_relation, k.let_frequency), measured, _expected(k.let_relation, k.let_frequency))

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {
            "letter": rng.choice("abcdefghijklmnopqrstuvwxyz"),
            "let_frequency": rng.randint(1, _MAX_LETTER_FREQUENCY),
            "let_relation": rng.choice(RELATIONS),
        }


# -- language ------------------------------------------------------------------------------------


class LanguageKwargs(Kwargs):
    language: str

    @field_validator("language")
    @classmethod
    def _known(cls, code: str) -> str:
        if code not in LANGUAGES:
            raise ValueError(f"language must be one of IFEval's ISO 639-1 codes: {', '.join(LANGUAGES)}")
        return code


class ResponseLanguage(Verifier[LanguageKwargs]):
    """langdetect (seeded) names the language; text it cannot classify passes, as in IFEval."""

    id = "language:response_language"
    Kwargs = LanguageKwargs

    def description(self) -> str:
        name = LANGUAGES[self.kwargs.language]
        return f"Your ENTIRE response should be in {name} language, no other language is allowed."

    def check(self, response: str) -> Verdict:
        expected = self.kwargs.language
        detected = text.detect_language(response)
        if detected is None:
            return Verdict(True, "language could not be detected, which counts as followed")
        return _verdict(detected == expected, f"detected language {detected!r}", f"expected {expected!r}")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"language": rng.choice(list(LANGUAGES))}


# -- length constraints --------------------------------------------------------------------------


class NumberSentencesKwargs(Kwargs):
    num_sentences: int = Field(ge=1)
    relation: Relation


class NumberSentences(Verifier[NumberSentencesKwargs]):
    """Sentences by NLTK's English Punkt model (see :mod:`posttrain.verify.text`)."""

    id = "length_constraints:number_sentences"
    Kwargs = NumberSentencesKwargs

    def description(self) -> str:
        k = self.kwargs
        return f"Your response should contain {k.relation} {k.num_sentences} sentences."

    def check(self, response: str) -> Verdict:
        k = self.kwargs
        count = text.count_sentences(response)
        return _verdict(
            compare(count, k.relation, k.num_sentences), f"found {_plural(count, 'sentence')}", _expected(k.relation, k.num_sentences)
        )

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"num_sentences": rng.randint(1, _MAX_SENTENCES), "relation": rng.choice(RELATIONS)}


class NumberParagraphsKwargs(Kwargs):
    num_paragraphs: int = Field(ge=1)


class NumberParagraphs(Verifier[NumberParagraphsKwargs]):
    """Paragraphs are what ``***`` dividers separate (one optional whitespace character either side).

    Empty text before the first or after the last divider is ignored; an empty paragraph anywhere
    else fails the check outright.
    """

    id = "length_constraints:number_paragraphs"
    Kwargs = NumberParagraphsKwargs

    def description(self) -> str:
        return f"There should be {self.kwargs.num_paragraphs} paragraphs. Paragraphs are separated with the markdown divider: ***"

    def check(self, response: str) -> Verdict:
        expected = self.kwargs.num_paragraphs
        paragraphs = _PARAGRAPH_DIVIDER.split(response)
        last = len(paragraphs) - 1
        count = len(paragraphs)
        for index, paragraph in enumerate(paragraphs):
            if not paragraph.strip():
                if 0 < index < last:
                    return Verdict(False, f"paragraph {index + 1} between *** dividers is empty")
                count -= 1
        return _verdict(count == expected, f"found {_plural(count, 'paragraph')}", f"expected exactly {expected}")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"num_paragraphs": rng.randint(1, _MAX_PARAGRAPHS)}


class NumberWordsKwargs(Kwargs):
    num_words: int = Field(ge=1)
    relation: Relation


class NumberWords(Verifier[NumberWordsKwargs]):
    """Words are ``\\w+`` runs: "don't" is two, "state-of-the-art" four, "2023" one."""

    id = "length_constraints:number_words"
    Kwargs = NumberWordsKwargs

    def description(self) -> str:
        k = self.kwargs
        return f"Answer with {k.relation} {k.num_words} words."

    def check(self, response: str) -> Verdict:
        k = self.kwargs
        count = text.count_words(response)
        return _verdict(compare(count, k.relation, k.num_words), f"found {_plural(count, 'word')}", _expected(k.relation, k.num_words))

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"num_words": rng.randint(*_WORDS_RANGE), "relation": rng.choice(RELATIONS)}


class NthParagraphFirstWordKwargs(Kwargs):
    num_paragraphs: int = Field(ge=1)
    nth_paragraph: int = Field(ge=1)
    first_word: str

    @field_validator("first_word")
    @classmethod
    def _lower(cls, word: str) -> str:
        if not word.strip():
            raise ValueError("first_word must not be blank")
        return word.lower()

    @model_validator(mode="after")
    def _nth_within(self) -> NthParagraphFirstWordKwargs:
        if self.nth_paragraph > self.num_paragraphs:
            raise ValueError(f"nth_paragraph ({self.nth_paragraph}) exceeds num_paragraphs ({self.num_paragraphs})")
        return self


class NthParagraphFirstWord(Verifier[NthParagraphFirstWordKwargs]):
    """Exactly ``num_paragraphs`` paragraphs split on ``"\\n\\n"``, and paragraph n starts with the word.

    Reference quirks kept: blank paragraphs are left out of the count but not out of the numbering,
    so with ``"a\\n\\n\\n\\nb"`` paragraph 2 is the blank one (and fails); the first word is the
    first whitespace-separated token with leading quotes removed, cut at the first of ``. , ? ! ' "``
    and lower-cased (``"**Summary**"`` is ``**summary**``).
    """

    id = "length_constraints:nth_paragraph_first_word"
    Kwargs = NthParagraphFirstWordKwargs

    def description(self) -> str:
        k = self.kwargs
        return (
            f"There should be {k.num_paragraphs} paragraphs. Paragraphs and only paragraphs are separated with "
            "each other by two new lines as if it was '\\n\\n' in python. "
            f"Paragraph {k.nth_paragraph} must start with word {k.first_word}."
        )

    def check(self, response: str) -> Verdict:
        k = self.kwargs
        paragraphs = response.split("\n\n")
        count = sum(1 for paragraph in paragraphs if paragraph.strip())
        if k.nth_paragraph > count:
            return Verdict(False, f"found {_plural(count, 'paragraph')}, too few to have paragraph {k.nth_paragraph}")
        paragraph = paragraphs[k.nth_paragraph - 1].strip()
        if not paragraph:
            return Verdict(False, f"paragraph {k.nth_paragraph} is empty")
        word = paragraph.split()[0].lstrip("'").lstrip('"')
        first = []
        for char in word:
            if char in _FIRST_WORD_STOP:
                break
            first.append(char.lower())
        first_word = "".join(first)
        if count != k.num_paragraphs:
            return Verdict(False, f"found {_plural(count, 'paragraph')}, expected exactly {k.num_paragraphs}")
        return _verdict(first_word == k.first_word, f"paragraph {k.nth_paragraph} starts with {first_word!r}", f"expected {k.first_word!r}")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        num = rng.randint(1, _MAX_PARAGRAPHS)
        return {"num_paragraphs": num, "nth_paragraph": rng.randint(1, num), "first_word": rng.choice(KEYWORD_POOL)}


# -- detectable content --------------------------------------------------------------------------


class PlaceholdersKwargs(Kwargs):
    num_placeholders: int = Field(ge=1)


class NumberPlaceholders(Verifier[PlaceholdersKwargs]):
    """Placeholders are ``[...]`` spans (shortest match, on one line or several)."""

    id = "detectable_content:number_placeholders"
    Kwargs = PlaceholdersKwargs

    def description(self) -> str:
        return (
            f"The response must contain at least {self.kwargs.num_placeholders} placeholders "
            "represented by square brackets, such as [address]."
        )

    def check(self, response: str) -> Verdict:
        expected = self.kwargs.num_placeholders
        count = len(_PLACEHOLDER.findall(response))
        return _verdict(count >= expected, f"found {_plural(count, 'placeholder')}", f"expected at least {expected}")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"num_placeholders": rng.randint(1, _MAX_PLACEHOLDERS)}


class PostscriptKwargs(Kwargs):
    postscript_marker: str

    @field_validator("postscript_marker")
    @classmethod
    def _strip(cls, marker: str) -> str:
        if not marker.strip():
            raise ValueError("postscript_marker must not be blank")
        return marker.strip()


class Postscript(Verifier[PostscriptKwargs]):
    """The marker occurs anywhere, case-insensitively (the reference's pattern is not anchored).

    "P.S." also matches "p. s."; "P.P.S" matches "p.p.s", "p. p. s" and the like.
    """

    id = "detectable_content:postscript"
    Kwargs = PostscriptKwargs

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        marker = self.kwargs.postscript_marker
        if marker == "P.P.S":
            self._pattern = _POSTSCRIPT_PPS
        elif marker == "P.S.":
            self._pattern = _POSTSCRIPT_PS
        else:
            self._pattern = _kwarg_pattern(r"\s*", marker.lower(), r".*$", re.MULTILINE)

    def description(self) -> str:
        return f"At the end of your response, please explicitly add a postscript starting with {self.kwargs.postscript_marker}"

    def check(self, response: str) -> Verdict:
        marker = self.kwargs.postscript_marker
        if self._pattern.search(response.lower()):
            return Verdict(True, f"found a postscript marked {marker!r}")
        return Verdict(False, f"no postscript marked {marker!r}")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)}


# -- detectable format ---------------------------------------------------------------------------


class BulletsKwargs(Kwargs):
    num_bullets: int = Field(ge=1)


class NumberBulletLists(Verifier[BulletsKwargs]):
    """Bullet points are lines starting (after whitespace) with ``*`` not followed by ``*``, or with ``-``.

    So a ``---`` rule counts as a bullet and a ``**bold**`` line does not; the count must be exact.
    """

    id = "detectable_format:number_bullet_lists"
    Kwargs = BulletsKwargs

    def description(self) -> str:
        return (
            f"Your answer must contain exactly {self.kwargs.num_bullets} bullet points. "
            "Use the markdown bullet points such as:\n* This is point 1. \n* This is point 2"
        )

    def check(self, response: str) -> Verdict:
        expected = self.kwargs.num_bullets
        count = len(_BULLET_STAR.findall(response)) + len(_BULLET_DASH.findall(response))
        return _verdict(count == expected, f"found {_plural(count, 'bullet point')}", f"expected exactly {expected}")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"num_bullets": rng.randint(1, _MAX_BULLETS)}


class ConstrainedResponse(Verifier):
    """One of the three fixed answers occurs anywhere in the response."""

    id = "detectable_format:constrained_response"

    def description(self) -> str:
        return f"Answer with one of the following options: {CONSTRAINED_RESPONSES}"

    def check(self, response: str) -> Verdict:
        stripped = response.strip()
        for option in CONSTRAINED_RESPONSES:
            if option in stripped:
                return Verdict(True, f"contains {option!r}")
        return Verdict(False, "contains none of " + ", ".join(map(repr, CONSTRAINED_RESPONSES)))


class HighlightsKwargs(Kwargs):
    num_highlights: int = Field(ge=1)


class NumberHighlightedSections(Verifier[HighlightsKwargs]):
    """Counts non-blank ``*text*`` spans and, separately, non-blank ``**text**`` spans, within one line.

    The two are counted independently, as in the reference: ``**bold**`` is one (its single-star
    matches are the empty ``**`` pairs), ``*a* and *b*`` two.
    """

    id = "detectable_format:number_highlighted_sections"
    Kwargs = HighlightsKwargs

    def description(self) -> str:
        return f"Highlight at least {self.kwargs.num_highlights} sections in your answer with markdown, i.e. *highlighted section*."

    def check(self, response: str) -> Verdict:
        expected = self.kwargs.num_highlights
        count = sum(1 for span in _HIGHLIGHT.findall(response) if span.strip("*").strip())
        count += sum(1 for span in _DOUBLE_HIGHLIGHT.findall(response) if span[2:-2].strip())
        return _verdict(count >= expected, f"found {_plural(count, 'highlighted section')}", f"expected at least {expected}")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"num_highlights": rng.randint(1, _MAX_HIGHLIGHTS)}


class SectionsKwargs(Kwargs):
    # "spliter" is IFEval's spelling, kept so its data validates as it is.
    section_spliter: str
    num_sections: int = Field(ge=1)

    @field_validator("section_spliter")
    @classmethod
    def _strip(cls, splitter: str) -> str:
        if not splitter.strip():
            raise ValueError("section_spliter must not be blank")
        return splitter.strip()


class MultipleSections(Verifier[SectionsKwargs]):
    """Counts case-sensitive "SPLITTER <number>" headers anywhere (not only at line starts); at least N."""

    id = "detectable_format:multiple_sections"
    Kwargs = SectionsKwargs

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pattern = _kwarg_pattern(r"\s?", self.kwargs.section_spliter, r"\s?\d+\s?")

    def description(self) -> str:
        k = self.kwargs
        s = k.section_spliter
        return (
            f"Your response must have {k.num_sections} sections. Mark the beginning of each section with {s} X, such as:\n"
            f"{s} 1\n[content of section 1]\n{s} 2\n[content of section 2]"
        )

    def check(self, response: str) -> Verdict:
        k = self.kwargs
        count = len(self._pattern.split(response)) - 1
        measured = f"found {_plural(count, 'section')} marked {k.section_spliter!r}"
        return _verdict(count >= k.num_sections, measured, f"expected at least {k.num_sections}")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"section_spliter": rng.choice(SECTION_SPLITTERS), "num_sections": rng.randint(1, _MAX_SECTIONS)}


class JsonFormat(Verifier):
    """The stripped response, less one opening code fence (```json, ```Json, ```JSON or ```) and one closing
    fence, parses as JSON. Text before the fence fails."""

    id = "detectable_format:json_format"

    def description(self) -> str:
        return "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."

    def check(self, response: str) -> Verdict:
        value = response.strip()
        for opening in _JSON_FENCE_OPENINGS:
            value = value.removeprefix(opening)
        value = value.removesuffix("```").strip()
        try:
            json.loads(value)
        except ValueError as error:
            return Verdict(False, f"not valid JSON: {error}")
        return Verdict(True, "valid JSON")


class Title(Verifier):
    """Some ``<<title>>`` on one line has non-blank text inside."""

    id = "detectable_format:title"

    def description(self) -> str:
        return "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."

    def check(self, response: str) -> Verdict:
        for title in _TITLE.findall(response):
            if title.lstrip("<").rstrip(">").strip():
                return Verdict(True, f"found title {title!r}")
        return Verdict(False, "no title wrapped in << >>")


# -- combination ---------------------------------------------------------------------------------


class TwoResponses(Verifier):
    """Exactly two non-blank parts separated by ``******``, different after stripping.

    Blank parts are allowed only before the first separator or after the last.
    """

    id = "combination:two_responses"

    def description(self) -> str:
        return "Give two different responses. Responses and only responses should be separated by 6 asterisk symbols: ******."

    def check(self, response: str) -> Verdict:
        parts = response.split("******")
        last = len(parts) - 1
        answers = []
        for index, part in enumerate(parts):
            if part.strip():
                answers.append(part)
            elif 0 < index < last:
                return Verdict(False, f"part {index + 1} between ****** separators is empty")
        if len(answers) != 2:
            return Verdict(False, f"found {_plural(len(answers), 'response')} separated by ******, expected exactly 2")
        if answers[0].strip() == answers[1].strip():
            return Verdict(False, "the two responses are identical")
        return Verdict(True, "found 2 different responses")


class RepeatPromptKwargs(Kwargs):
    prompt_to_repeat: str

    @field_validator("prompt_to_repeat")
    @classmethod
    def _nonblank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt_to_repeat must not be blank")
        return prompt


class RepeatPrompt(Verifier[RepeatPromptKwargs]):
    """The stripped response starts with the stripped request, case-insensitively."""

    id = "combination:repeat_prompt"
    Kwargs = RepeatPromptKwargs

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._prefix = self.kwargs.prompt_to_repeat.strip().lower()

    def description(self) -> str:
        return (
            "First repeat the request word for word without change, then give your answer (1. do not say any words or "
            "characters before repeating the request; 2. the request you need to repeat does not include this sentence)"
        )

    def check(self, response: str) -> Verdict:
        if response.strip().lower().startswith(self._prefix):
            return Verdict(True, "starts with the request")
        return Verdict(False, "does not start with the request word for word")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        if prompt is None or not prompt.strip():
            raise ValueError(f"{cls.id} repeats the prompt: build it with prompt=...")
        return {"prompt_to_repeat": prompt}


# -- start / end ---------------------------------------------------------------------------------


class EndPhraseKwargs(Kwargs):
    end_phrase: str

    @field_validator("end_phrase")
    @classmethod
    def _strip(cls, phrase: str) -> str:
        if not phrase.strip():
            raise ValueError("end_phrase must not be blank")
        return phrase.strip()


class EndChecker(Verifier[EndPhraseKwargs]):
    """The stripped response, less surrounding double quotes, ends with the phrase, case-insensitively."""

    id = "startend:end_checker"
    Kwargs = EndPhraseKwargs

    def description(self) -> str:
        return f"Finish your response with this exact phrase {self.kwargs.end_phrase}. No other words should follow this phrase."

    def check(self, response: str) -> Verdict:
        phrase = self.kwargs.end_phrase
        ending = response.strip().strip('"').lower()
        if ending.endswith(phrase.lower()):
            return Verdict(True, f"ends with {phrase!r}")
        return Verdict(False, f"ends with {ending[-len(phrase) :]!r}, expected {phrase!r}")

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"end_phrase": rng.choice(END_PHRASES)}


class Quotation(Verifier):
    """The stripped response starts and ends with ``"`` (and is longer than one character)."""

    id = "startend:quotation"

    def description(self) -> str:
        return "Wrap your entire response with double quotation marks."

    def check(self, response: str) -> Verdict:
        value = response.strip()
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            return Verdict(True, "wrapped in double quotation marks")
        return Verdict(False, f"starts with {value[:1]!r} and ends with {value[-1:]!r}, expected '\"' at both ends")


# -- change case ---------------------------------------------------------------------------------


class CapitalWordsKwargs(Kwargs):
    capital_frequency: int = Field(ge=1)
    capital_relation: Relation


class CapitalWordFrequency(Verifier[CapitalWordsKwargs]):
    """Words in all capitals, over ``nltk.word_tokenize`` tokens (``str.isupper``: "I", "U.S.", "AI's" → "AI" count)."""

    id = "change_case:capital_word_frequency"
    Kwargs = CapitalWordsKwargs

    def description(self) -> str:
        k = self.kwargs
        return f"In your response, words with all capital letters should appear {k.capital_relation} {k.capital_frequency} times."

    def check(self, response: str) -> Verdict:
        k = self.kwargs
        count = sum(1 for token in text.word_tokens(response) if token.isupper())
        return _verdict(
            compare(count, k.capital_relation, k.capital_frequency),
            f"found {_plural(count, 'all-capital word')}",
            _expected(k.capital_relation, k.capital_frequency),
        )

    @classmethod
    def random_kwargs(cls, rng: random.Random, *, prompt: str | None = None) -> dict[str, Any]:
        return {"capital_frequency": rng.randint(1, _MAX_CAPITAL_WORDS), "capital_relation": rng.choice(RELATIONS)}


class _EnglishInCase(Verifier):
    """Shared by the two case checks: the case test first, then langdetect must say English."""

    case: ClassVar[str]

    def _in_case(self, response: str) -> bool:
        raise NotImplementedError

    def check(self, response: str) -> Verdict:
        if not self._in_case(response):
            return Verdict(False, f"not all {self.case}")
        detected = text.detect_language(response)
        if detected is None:
            return Verdict(True, f"all {self.case}; language could not be detected, which counts as followed")
        return _verdict(detected == "en", f"all {self.case}, detected language {detected!r}", "expected 'en'")


class EnglishCapital(_EnglishInCase):
    """``str.isupper()`` (some cased letter, none lower-case) and English by langdetect."""

    id = "change_case:english_capital"
    case = "capital letters"

    def _in_case(self, response: str) -> bool:
        return response.isupper()

    def description(self) -> str:
        return "Your entire response should be in English, and in all capital letters."


class EnglishLowercase(_EnglishInCase):
    """``str.islower()`` (some cased letter, none upper-case) and English by langdetect."""

    id = "change_case:english_lowercase"
    case = "lowercase letters"

    def _in_case(self, response: str) -> bool:
        return response.islower()

    def description(self) -> str:
        return "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed."


# -- punctuation ---------------------------------------------------------------------------------


class NoComma(Verifier):
    """No ASCII comma (other commas, such as "，", are allowed)."""

    id = "punctuation:no_comma"

    def description(self) -> str:
        return "In your entire response, refrain from the use of any commas."

    def check(self, response: str) -> Verdict:
        count = response.count(",")
        return _verdict(count == 0, f"found {_plural(count, 'comma')}", "expected none")


IFEVAL_VERIFIERS: tuple[type[Verifier], ...] = (
    KeywordExistence,
    KeywordFrequency,
    ForbiddenWords,
    LetterFrequency,
    ResponseLanguage,
    NumberSentences,
    NumberParagraphs,
    NumberWords,
    NthParagraphFirstWord,
    NumberPlaceholders,
    Postscript,
    NumberBulletLists,
    ConstrainedResponse,
    NumberHighlightedSections,
    MultipleSections,
    JsonFormat,
    Title,
    TwoResponses,
    RepeatPrompt,
    EndChecker,
    CapitalWordFrequency,
    EnglishCapital,
    EnglishLowercase,
    NoComma,
    Quotation,
)
