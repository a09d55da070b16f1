"""Verifiers: each IFEval instruction type on hand-written responses, kwargs validation, the registry,
random instruction building, strict vs loose scoring, and the text measurements behind them."""

from __future__ import annotations

import random

import pytest

from posttrain.verify import (
    PromptRecord,
    UnknownVerifierError,
    VerifierKwargsError,
    aggregate,
    all_ids,
    get,
    loose_variants,
    score_response,
    text,
    verifier_class,
)
from posttrain.verify.ifeval import IFEVAL_VERIFIERS, LANGUAGES

IFEVAL_IDS = sorted(cls.id for cls in IFEVAL_VERIFIERS)

ENGLISH = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence."
GERMAN = "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer vom alten Holzzaun aus zusieht."
FRENCH = "Le renard brun saute par-dessus le chien paresseux pendant que le fermier regarde depuis la vieille clôture."

# id, kwargs, a response that passes, a response that fails, the failure's reason
CASES = [
    (
        "keywords:existence",
        {"keywords": ["river", "Bridge"]},
        "A BRIDGE over the river.",
        "Only a river here.",
        "missing keywords: 'Bridge'",
    ),
    ("keywords:existence", {"keywords": ["cat"]}, "Concatenate the strings.", "A dog.", "missing keywords: 'cat'"),
    (
        "keywords:frequency",
        {"keyword": "ai", "frequency": 3, "relation": "at least"},
        "AI said: ai!",
        "AI and ai.",
        "'ai' appears 2 times, expected at least 3",
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "less than"},
        "One cat.",
        "cat cat",
        "'cat' appears 2 times, expected less than 2",
    ),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["cat", "dog"]},
        "Concatenate; dogma.",
        "The Cat sat.",
        "found forbidden words: 'cat'",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "Q", "let_frequency": 2, "let_relation": "at least"},
        "Quick quiz",
        "Quick",
        "'q' appears 1 time, expected at least 2",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "#", "let_frequency": 2, "let_relation": "at least"},
        "#a #b",
        "#a",
        "'#' appears 1 time, expected at least 2",
    ),
    ("language:response_language", {"language": "fr"}, FRENCH, ENGLISH, "detected language 'en', expected 'fr'"),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "One. Two.",
        "One. Two. Three.",
        "found 3 sentences, expected less than 3",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "at least"},
        "Dr. Smith left. He ran.",
        "Dr. Smith left.",
        "found 1 sentence, expected at least 2",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "One.\n***\nTwo.\n***",
        "One.\n***\nTwo.\n***\nThree.",
        "found 3 paragraphs, expected exactly 2",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "***\nOne. *** Two.",
        "One.\n***\n***\nTwo.",
        "paragraph 2 between *** dividers is empty",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 4, "relation": "less than"},
        "Don't stop.",
        "Don't stop me now.",
        "found 5 words, expected less than 4",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 4, "relation": "at least"},
        "state-of-the-art",
        "one two three",
        "found 3 words, expected at least 4",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"},
        'First.\n\n"Then, later.',
        "First.\n\nNow.",
        "paragraph 2 starts with 'now', expected 'then'",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "first"},
        "First.\n\nSecond.",
        "First.\n\nSecond.\n\nThird.",
        "found 3 paragraphs, expected exactly 2",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "b"},
        "a\n\nb",
        "a\n\n\n\nb",
        "paragraph 2 is empty",
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "[name] at [address]",
        "[name] only",
        "found 1 placeholder, expected at least 2",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Bye.\n\np. s. see you",
        "Bye. PS see you",
        "no postscript marked 'P.S.'",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.P.S"},
        "Bye.\nP.P.S. more",
        "Bye.\nP.S. more",
        "no postscript marked 'P.P.S'",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 3},
        "* a\n* b\n- c",
        "* a\n* b\n**bold**",
        "found 2 bullet points, expected exactly 3",
    ),
    ("detectable_format:number_bullet_lists", {"num_bullets": 1}, "* a", "* a\n---", "found 2 bullet points, expected exactly 1"),
    (
        "detectable_format:constrained_response",
        {},
        "Well. My answer is no.",
        "My answer is: no.",
        "contains none of 'My answer is yes.', 'My answer is no.', 'My answer is maybe.'",
    ),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "*one* and *two*",
        "**one** and * *",
        "found 1 highlighted section, expected at least 2",
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\na\nSection 2\nb",
        "SECTION 1\na\nSECTION 2\nb",
        "found 0 sections marked 'Section', expected at least 2",
    ),
    (
        "detectable_format:json_format",
        {},
        '```json\n{"a": 1}\n```',
        'Here: {"a": 1}',
        "not valid JSON: Expecting value: line 1 column 1 (char 0)",
    ),
    ("detectable_format:title", {}, "<<My Title>>\nText", "<< >>\nText", "no title wrapped in << >>"),
    ("combination:two_responses", {}, "A\n******\nB", "A\n******\nA", "the two responses are identical"),
    (
        "combination:two_responses",
        {},
        "******\nA\n******\nB\n******",
        "A\n******\n\n******\nB",
        "part 2 between ****** separators is empty",
    ),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a poem."},
        "  write a POEM. Roses are red.",
        "Sure! Write a poem.",
        "does not start with the request word for word",
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        '"... any other questions?"',
        "Any other questions? Bye.",
        "ends with 'ther questions? bye.', expected 'Any other questions?'",
    ),
    ("startend:quotation", {}, ' "Hello" ', '"Hello', "starts with '\"' and ends with 'o', expected '\"' at both ends"),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "I LOVE it",
        "I love it",
        "found 1 all-capital word, expected at least 2",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "less than"},
        "NASA's rocket",
        "DON'T go",
        "found 2 all-capital words, expected less than 2",
    ),
    ("change_case:english_capital", {}, ENGLISH.upper(), ENGLISH, "not all capital letters"),
    ("change_case:english_capital", {}, ENGLISH.upper(), GERMAN.upper(), "all capital letters, detected language 'de', expected 'en'"),
    ("change_case:english_lowercase", {}, ENGLISH.lower(), ENGLISH, "not all lowercase letters"),
    ("punctuation:no_comma", {}, "No commas here; none，at all.", "One, two, three", "found 2 commas, expected none"),
]


@pytest.mark.parametrize(("verifier_id", "kwargs", "good", "bad", "reason"), CASES, ids=[case[0] for case in CASES])
def test_pass_and_fail_with_reason(verifier_id, kwargs, good, bad, reason):
    verifier = get(verifier_id, **kwargs)
    passed = verifier.check(good)
    assert passed.passed, passed.reason
    failed = verifier.check(bad)
    assert not failed.passed
    assert failed.reason == reason


def test_every_ifeval_type_has_cases():
    assert {case[0] for case in CASES} == set(IFEVAL_IDS)
    assert len(IFEVAL_IDS) == 25


def test_unclassifiable_language_counts_as_followed():
    # langdetect raises on text without letters; IFEval counts that as following the instruction.
    assert get("language:response_language", language="fr").check("1234 5678").passed
    verdict = get("change_case:english_lowercase").check("123 a")
    assert verdict.passed or "detected language" in verdict.reason
    assert text.detect_language("!!! 123") is None


# -- kwargs --------------------------------------------------------------------------------------


def test_none_kwargs_are_dropped_as_in_ifeval_data():
    # IFEval's published rows carry every kwarg name, unused ones None.
    everything = {"num_bullets": 2, "keywords": None, "relation": None, "language": None, "prompt_to_repeat": None}
    verifier = get("detectable_format:number_bullet_lists", **everything)
    assert verifier.kwargs_dict() == {"num_bullets": 2}
    assert get("punctuation:no_comma", keywords=None).kwargs_dict() == {}


def test_invalid_kwargs_report_every_problem():
    with pytest.raises(VerifierKwargsError) as caught:
        get("keywords:frequency", keyword="ai", frequency=0, relation="more than", colour="red")
    message = str(caught.value)
    assert message.startswith("keywords:frequency: invalid kwargs:")
    assert "'frequency': Input should be greater than or equal to 1 (got 0)" in message
    assert "'relation': Input should be 'less than' or 'at least' (got 'more than')" in message
    assert "unexpected kwarg 'colour'" in message
    assert "(it takes: keyword, frequency, relation)" in message
    assert len(caught.value.problems) == 3


@pytest.mark.parametrize(
    ("verifier_id", "kwargs", "fragment"),
    [
        ("detectable_format:number_bullet_lists", {}, "missing kwarg 'num_bullets'"),
        ("punctuation:no_comma", {"num_bullets": 2}, "unexpected kwarg 'num_bullets' (it takes: no kwargs)"),
        ("language:response_language", {"language": "xx"}, "language must be one of IFEval's ISO 639-1 codes"),
        ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1, "let_relation": "at least"}, "single non-space character"),
        (
            "length_constraints:nth_paragraph_first_word",
            {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"},
            "nth_paragraph (3) exceeds num_paragraphs (2)",
        ),
        ("combination:repeat_prompt", {"prompt_to_repeat": "  "}, "prompt_to_repeat must not be blank"),
        ("keywords:existence", {"keywords": []}, "'keywords': List should have at least 1 item"),
    ],
)
def test_kwargs_validation(verifier_id, kwargs, fragment):
    with pytest.raises(VerifierKwargsError) as caught:
        get(verifier_id, **kwargs)
    assert fragment in str(caught.value)


def test_regex_kwargs_keep_ifeval_semantics_and_survive_invalid_patterns():
    # IFEval searches keywords as regexes: "." matches any character.
    assert get("keywords:existence", keywords=["a.c"]).check("abc").passed
    # A keyword that is no valid regex is matched literally rather than crashing.
    unbalanced = get("keywords:frequency", keyword="f(x", frequency=2, relation="at least")
    assert unbalanced.check("f(x) and F(X)").passed
    assert not unbalanced.check("f x and f(y)").passed


# -- registry ------------------------------------------------------------------------------------


def test_registry_lookup_and_errors():
    assert verifier_class("punctuation:no_comma").id == "punctuation:no_comma"
    assert set(IFEVAL_IDS) <= set(all_ids())  # code verifiers (verify.code) may be registered beside them
    with pytest.raises(UnknownVerifierError, match=r"did you mean 'punctuation:no_comma'"):
        get("punctuation:no_commas")
    with pytest.raises(KeyError, match="known ids"):
        get("zzz")


def test_registering_a_taken_id_is_refused():
    from posttrain.verify import register
    from posttrain.verify.ifeval import NoComma

    class Impostor(NoComma):
        pass

    with pytest.raises(ValueError, match="taken by NoComma"):
        register(Impostor)
    assert register(NoComma) is NoComma  # registering the same class again is harmless


# -- random instruction building -----------------------------------------------------------------


@pytest.mark.parametrize("verifier_id", IFEVAL_IDS)
def test_build_is_seeded_and_its_kwargs_validate(verifier_id):
    cls = verifier_class(verifier_id)
    prompt = "Write a haiku about the sea."
    first = cls.build(random.Random(7), prompt=prompt)
    second = cls.build(random.Random(7), prompt=prompt)
    assert first.description() == second.description()
    assert first.kwargs_dict() == second.kwargs_dict()
    rebuilt = get(verifier_id, **first.kwargs_dict())  # the stored kwargs give the same verifier back
    assert rebuilt.description() == first.description()
    assert first.description().strip()


def test_build_draws_vary_and_stay_in_range():
    rng = random.Random(0)
    built = [verifier_class("length_constraints:nth_paragraph_first_word").build(rng) for _ in range(50)]
    assert len({v.description() for v in built}) > 10
    assert all(1 <= v.kwargs.nth_paragraph <= v.kwargs.num_paragraphs <= 5 for v in built)
    languages = {verifier_class("language:response_language").build(rng).kwargs.language for _ in range(100)}
    assert languages <= set(LANGUAGES) and len(languages) > 15


def test_prompt_dependent_build_needs_the_prompt():
    cls = verifier_class("combination:repeat_prompt")
    with pytest.raises(ValueError, match="build it with prompt="):
        cls.build(random.Random(0))
    assert cls.build(random.Random(0), prompt="Say hi.").kwargs.prompt_to_repeat == "Say hi."


def test_descriptions_use_ifeval_wording():
    assert get("detectable_format:number_bullet_lists", num_bullets=3).description() == (
        "Your answer must contain exactly 3 bullet points. Use the markdown bullet points such as:\n* This is point 1. \n* This is point 2"
    )
    assert get("keywords:existence", keywords=["zebra", "apple"]).description() == "Include keywords ['apple', 'zebra'] in the response."
    assert get("language:response_language", language="sw").description() == (
        "Your ENTIRE response should be in Swahili language, no other language is allowed."
    )


# -- strict and loose scoring --------------------------------------------------------------------


def _record(*instructions: tuple[str, dict]) -> PromptRecord:
    return PromptRecord(key=1, prompt="p", instruction_id_list=[i for i, _ in instructions], kwargs=[kwargs for _, kwargs in instructions])


def test_loose_variants_are_ifevals_eight():
    assert loose_variants("Intro\n*body*\nOutro") == (
        "Intro\n*body*\nOutro",
        "Intro\nbody\nOutro",
        "*body*\nOutro",
        "Intro\n*body*",
        "*body*",
        "body\nOutro",
        "Intro\nbody",
        "body",
    )


def test_loose_forgives_a_chatty_first_line_and_markdown_stars():
    record = _record(("startend:quotation", {}), ("detectable_format:json_format", {}), ("punctuation:no_comma", {}))
    score = score_response(record, 'Sure, here you go:\n"*quoted*"')
    by_id = {inst.instruction_id: inst for inst in score.instructions}
    assert not by_id["startend:quotation"].strict and by_id["startend:quotation"].loose
    assert by_id["startend:quotation"].reason == "starts with 'S' and ends with '\"', expected '\"' at both ends"
    # Without the first line the response is '"*quoted*"', a JSON string: loose scoring accepts it.
    json_format = by_id["detectable_format:json_format"]
    assert (json_format.strict, json_format.loose) == (False, True)
    assert not by_id["punctuation:no_comma"].strict and by_id["punctuation:no_comma"].loose
    assert (score.strict, score.loose) == (False, True)


def test_loose_star_removal_fixes_bullets_and_last_line_removal_fixes_endings():
    record = _record(("startend:end_checker", {"end_phrase": "Bye."}), ("detectable_format:number_bullet_lists", {"num_bullets": 1}))
    score = score_response(record, "- item\n**note** Bye.\nP.S. one more line")
    ending, bullets = score.instructions
    assert (ending.strict, ending.loose) == (False, True)
    assert (bullets.strict, bullets.loose) == (True, True)


def test_empty_response_fails_everything_even_checks_it_would_pass():
    record = _record(("punctuation:no_comma", {}), ("keywords:forbidden_words", {"forbidden_words": ["x"]}))
    for response in ("", "  \n\t"):
        score = score_response(record, response)
        assert all(not inst.strict and not inst.loose for inst in score.instructions)
        assert score.instructions[0].reason == "response is empty"


def test_aggregate_prompt_and_instruction_levels():
    one = _record(("punctuation:no_comma", {}), ("startend:quotation", {}))
    two = _record(("punctuation:no_comma", {}))
    scores = aggregate([score_response(one, '"no commas"'), score_response(one, "a, b"), score_response(two, "fine")])
    assert (scores.num_prompts, scores.num_instructions) == (3, 5)
    assert scores.prompt_strict == pytest.approx(2 / 3)
    assert scores.inst_strict == pytest.approx(3 / 5)
    assert scores.per_type["punctuation:no_comma"].count == 3
    assert scores.per_type["punctuation:no_comma"].strict == pytest.approx(2 / 3)
    assert scores.per_type["startend:quotation"].strict == pytest.approx(1 / 2)
    assert scores.headline() == "66.67 / 60.00 / 66.67 / 60.00"
    with pytest.raises(ValueError, match="no responses"):
        aggregate([])


def test_prompt_record_needs_one_kwargs_dict_per_instruction():
    with pytest.raises(ValueError, match="2 instruction ids but 1 kwargs dicts"):
        PromptRecord(prompt="p", instruction_id_list=["punctuation:no_comma", "startend:quotation"], kwargs=[{}])


def test_read_prompt_records_names_every_bad_line(tmp_path):
    from posttrain.verify import read_prompt_records

    path = tmp_path / "inputs.jsonl"
    path.write_text(
        '{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}\n'
        "not json\n"
        '{"key": 3, "prompt": "p", "instruction_id_list": ["punctuation:nope"], "kwargs": [{}]}\n'
        '{"key": 4, "prompt": "p", "instruction_id_list": ["detectable_format:title"], "kwargs": [{"num_bullets": 1}]}\n'
    )
    with pytest.raises(ValueError) as caught:
        read_prompt_records(path)
    message = str(caught.value)
    assert message.startswith(f"3 bad lines in {path}")
    assert f"{path}:2: expected one JSON object per line, found invalid JSON" in message
    assert f"{path}:3: unknown verifier id 'punctuation:nope'" in message
    assert f"{path}:4: detectable_format:title: invalid kwargs: unexpected kwarg 'num_bullets'" in message


def test_score_responses_reports_missing_responses():
    from posttrain.verify import score_responses

    with pytest.raises(KeyError, match="1 of 1 prompts have no response"):
        score_responses([_record(("punctuation:no_comma", {}))], {})


# -- text measurements ---------------------------------------------------------------------------


def test_sentences_follow_nltk_punkt():
    assert text.split_sentences("Dr. Smith arrived. He sat down.") == ["Dr. Smith arrived.", "He sat down."]
    # NLTK's quirks, which IFEval's counts inherit: a trailing "?!" and "!!!" leave a lone mark behind.
    assert text.split_sentences("Really?!") == ["Really?", "!"]
    assert text.split_sentences("Wow!!!") == ["Wow!!", "!"]
    assert text.count_sentences("Wait . . . what?") == 4
    assert text.count_sentences("") == 0


def test_words_and_tokens():
    assert text.count_words("Don't stop—it's state-of-the-art, 2024!") == 10
    assert text.word_tokens("I DON'T know. NASA's cannot.") == ["I", "DO", "N'T", "know", ".", "NASA", "'s", "can", "not", "."]


def test_language_detection_is_seeded():
    short = "Ciao amico"  # short text is where unseeded langdetect flips between answers
    assert len({text.detect_language(short) for _ in range(20)}) == 1
