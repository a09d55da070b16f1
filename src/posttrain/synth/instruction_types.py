"""The demo's instruction types: one per IFEval verifier, each with a label, a kwargs sampler and phrasings per split.

All 25 of IFEval's instruction types, each phrased several ways in our own words: some phrasings only in
training, others only in the development split, others only in the frozen test split (so a held-out
score measures following an instruction phrased in a way never trained on). Samplers draw kwargs a short
answer can meet (:mod:`posttrain.synth.instruction_kwargs`), and :data:`posttrain.synth.verifiable.CONFLICTS`
names the pairs never put in one prompt, with the reason. The
checks are posttrain's IFEval verifiers (:mod:`posttrain.verify.ifeval`, the same ids and kwargs as
IFEval). Own code, no library: a small, deterministic table; :mod:`posttrain.synth.verifiable` builds
prompts from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from posttrain.synth.instruction_kwargs import (
    RESPONSE_LANGUAGES,
    Sampler,
    _bounded,
    _capital_words,
    _end_phrase,
    _existence,
    _fixed,
    _forbidden,
    _frequency,
    _letter,
    _nth_paragraph,
    _ranged,
)

Split = Literal["train", "heldout", "test"]

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
# than M" are "less than" M + 1 (the ``*_bound_alt`` values), so kwargs always say what the text says.
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
        "length_constraints:number_words", "word count", _bounded("num_words", at_most=(40, 120, 10), at_least=(30, 70, 10)),
        train=(
            "Answer in {num_words_bound} words.",
            "Your response should contain {num_words_bound} words.",
            "Use {num_words_bound} words in total.",
        ),
        heldout=(
            "Your reply must be {num_words_bound} words long.",
            "Your reply should run to {num_words_bound_alt} words.",
        ),
        test=(
            "Respond using {num_words_bound} words.",
            "Your answer should have {num_words_bound_alt} words.",
        ),
    ),
    InstructionType(
        "length_constraints:number_sentences", "sentence count", _bounded("num_sentences", at_most=(3, 6, 1), at_least=(2, 4, 1)),
        train=(
            "Write your answer in {num_sentences_bound} sentences.",
            "Your reply should have {num_sentences_bound} sentences.",
            "Your response should contain {num_sentences_bound} sentences.",
        ),
        heldout=(
            "Build your reply from {num_sentences_bound_alt} sentences.",
            "Write your reply in {num_sentences_bound_alt} sentences.",
        ),
        test=(
            "Respond in {num_sentences_bound} sentences.",
            "Your answer needs {num_sentences_bound_alt} sentences.",
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
    InstructionType(
        "keywords:letter_frequency", "letter N times", _letter,
        train=(
            'Make sure the letter "{letter}" appears {let_relation_text} {let_frequency} times in your answer.',
            'In your reply, use the letter "{letter}" {let_relation_text} {let_frequency} times.',
            'Watch your letters: "{letter}" should occur {let_relation_text} {let_frequency} times in the response.',
        ),
        heldout=(
            'The letter "{letter}" must show up {let_relation_text} {let_frequency} times in what you write.',
            'Write your answer so that it contains the letter "{letter}" {let_relation_text} {let_frequency} times.',
        ),
        test=(
            'Your response should include the letter "{letter}" {let_relation_text} {let_frequency} times.',
            'Have the letter "{letter}" appear {let_relation_text} {let_frequency} times in your reply.',
        ),
    ),
    InstructionType(
        "language:response_language", "in another language", lambda rng, query, avoid: {"language": rng.choice(RESPONSE_LANGUAGES)},
        train=(
            "Write your entire answer in {language_name}, and use no other language.",
            "Please respond only in {language_name}.",
            "Your whole reply must be written in {language_name}.",
        ),
        heldout=(
            "Answer in {language_name} from start to finish, with no English.",
            "Use {language_name} for the complete response.",
        ),
        test=(
            "Reply entirely in {language_name}.",
            "The full answer has to be in {language_name}, not in any other language.",
        ),
    ),
    InstructionType(
        "length_constraints:number_paragraphs", "N paragraphs, ***", _ranged("num_paragraphs", 2, 3),
        train=(
            "Write exactly {num_paragraphs} paragraphs, separated from each other by the markdown divider ***.",
            "Your answer must have exactly {num_paragraphs} paragraphs, with *** on its own line between them.",
            "Split your reply into exactly {num_paragraphs} paragraphs and put the divider *** between each pair.",
        ),
        heldout=(
            "Give precisely {num_paragraphs} paragraphs, divided by ***.",
            "Use exactly {num_paragraphs} paragraphs in total, separating them with the markdown divider ***.",
        ),
        test=(
            "Organize the answer as exactly {num_paragraphs} paragraphs with *** between consecutive paragraphs.",
            "Respond in precisely {num_paragraphs} paragraphs separated by the *** divider.",
        ),
    ),
    InstructionType(
        "length_constraints:nth_paragraph_first_word", "paragraph starts with", _nth_paragraph,
        train=(
            'Write exactly {num_paragraphs} paragraphs separated by blank lines, and start the {nth_ordinal} paragraph with the word "{first_word}".',
            'Your answer should have exactly {num_paragraphs} paragraphs, separated by an empty line; the {nth_ordinal} one must begin with "{first_word}".',
            'Use exactly {num_paragraphs} paragraphs with a blank line between them, and make "{first_word}" the first word of the {nth_ordinal} paragraph.',
        ),
        heldout=(
            'Give precisely {num_paragraphs} paragraphs, with a blank line between each, and begin the {nth_ordinal} paragraph with the word "{first_word}".',
            'Write exactly {num_paragraphs} paragraphs divided by empty lines; the {nth_ordinal} paragraph has to open with "{first_word}".',
        ),
        test=(
            'Respond in exactly {num_paragraphs} paragraphs separated by blank lines, the {nth_ordinal} of which starts with the word "{first_word}".',
            'Your reply needs precisely {num_paragraphs} paragraphs split by blank lines, and the {nth_ordinal} paragraph must start with "{first_word}".',
        ),
    ),
    InstructionType(
        "detectable_format:constrained_response", "yes/no/maybe answer", _fixed(),
        train=(
            'Answer with one of the following options: "My answer is yes.", "My answer is no.", "My answer is maybe."',
            'Include one of these exact sentences in your reply: "My answer is yes.", "My answer is no." or "My answer is maybe."',
            'Respond using one of the fixed answers "My answer is yes.", "My answer is no." or "My answer is maybe."',
        ),
        heldout=(
            'Pick one of "My answer is yes.", "My answer is no." and "My answer is maybe." and put it in your answer word for word.',
            'Your reply must contain one of these options: "My answer is yes.", "My answer is no.", "My answer is maybe."',
        ),
        test=(
            'Choose your answer from "My answer is yes.", "My answer is no." or "My answer is maybe." and write it out.',
            'Use one of these responses: "My answer is yes.", "My answer is no.", or "My answer is maybe."',
        ),
    ),
    InstructionType(
        "detectable_format:multiple_sections", "N+ sections",
        lambda rng, query, avoid: {"section_spliter": rng.choice(("Section", "SECTION")), "num_sections": rng.randint(2, 3)},
        train=(
            'Divide your answer into at least {num_sections} sections, starting each with "{section_spliter} X", where X is the section number.',
            'Organize the response into {num_sections} or more sections, each headed by the word "{section_spliter}" and its number.',
            "Use at least {num_sections} sections, and mark the start of each with {section_spliter} followed by its number.",
        ),
        heldout=(
            'Break your reply into no fewer than {num_sections} sections, each labelled "{section_spliter}" and a number.',
            'Write at least {num_sections} sections, each beginning with the marker "{section_spliter} X" (X being its number).',
        ),
        test=(
            'Split the answer into {num_sections} or more sections, and begin each with "{section_spliter}" and its number.',
            'Give at least {num_sections} numbered sections whose headers read "{section_spliter} X", with X the number.',
        ),
    ),
    InstructionType(
        "combination:two_responses", "two responses, ******", _fixed(),
        train=(
            "Give two different responses, separated by six asterisks: ******.",
            "Write two distinct answers and put ****** between them.",
            "Provide two different versions of your answer, separated only by the six asterisks ******.",
        ),
        heldout=(
            "Offer two alternative responses, with ****** separating them.",
            "Answer twice in two different ways, and separate the two answers with ******.",
        ),
        test=(
            "Write two separate, different replies, split by six asterisks (******).",
            "Give me two different answers divided by ******.",
        ),
    ),
    InstructionType(
        "combination:repeat_prompt", "repeats the request", lambda rng, query, avoid: {"prompt_to_repeat": query},
        train=(
            "First repeat my request word for word without change, then give your answer.",
            "Before answering, copy my request exactly as I wrote it, then respond.",
            "Start your reply by repeating my request word for word, and only then answer it.",
        ),
        heldout=(
            "Begin by restating my request verbatim, then answer it.",
            "Repeat the request exactly as written before you give your answer.",
        ),
        test=(
            "Echo my request word for word first, and then answer.",
            "Open your response with my exact request, unchanged, followed by your answer.",
        ),
    ),
    InstructionType(
        "change_case:capital_word_frequency", "N all-caps words", _capital_words,
        train=(
            "Use words written in all capital letters {capital_relation_text} {capital_frequency} times.",
            "Include {capital_relation_text} {capital_frequency} fully capitalized words, like IMPORTANT, in your answer.",
            "In your response, all-caps words should appear {capital_relation_text} {capital_frequency} times.",
        ),
        heldout=(
            "Write {capital_relation_text} {capital_frequency} words entirely in uppercase.",
            "The number of words in all capitals in your reply should be {capital_relation_text} {capital_frequency}.",
        ),
        test=(
            "Put {capital_relation_text} {capital_frequency} words in full capitals in your answer.",
            "Have {capital_relation_text} {capital_frequency} all-uppercase words in your response.",
        ),
    ),
)  # fmt: skip
TYPE_BY_ID: dict[str, InstructionType] = {t.id: t for t in TYPES}


def type_label(type_id: str) -> str:
    """A short human label for an instruction type ("lowercase", "no commas", ...); unknown ids come back as they are."""
    found = TYPE_BY_ID.get(type_id)
    return found.label if found else type_id


def describe() -> list[dict[str, Any]]:
    """One row per instruction type: ``id``, ``label``, and how many phrasings each split has."""
    return [{"id": t.id, "label": t.label, "train_phrasings": len(t.train), "heldout_phrasings": len(t.heldout)} for t in TYPES]
