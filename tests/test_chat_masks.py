"""Masks on real template families: exactly the assistant content and end-of-turn tokens are trained."""

from __future__ import annotations

import pytest
from chat_fixtures import CONVERSATION, FAMILIES, TEMPLATES, family_tokenizer

from posttrain.data.chat import IGNORE, ChatRenderer, RenderOptions, RenderStats, TemplateError
from posttrain.models.zoo import train_tokenizer

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
# What each family trains on CONVERSATION, written from the published formats: content + end-of-turn token.
EXPECTED = {
    "chatml": ["Paris.<|im_end|>", f"<tool_call>\n{CALL}\n</tool_call><|im_end|>", "Sunny and 21 C.<|im_end|>", "You are welcome.<|im_end|>"],
    "smollm2": ["Paris.<|im_end|>", f"<tool_call>\n{CALL}\n</tool_call><|im_end|>", "Sunny and 21 C.<|im_end|>", "You are welcome.<|im_end|>"],
    "llama3": [
        "Paris.<|eot_id|>",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "Sunny and 21 C.<|eot_id|>",
        "You are welcome.<|eot_id|>",
    ],
    "mistral": ["Paris.</s>", f"[TOOL_CALLS] [{CALL}]</s>", "Sunny and 21 C.</s>", "You are welcome.</s>"],
    "gemma": ["Paris.<end_of_turn>", f"```tool_call\n{CALL}\n```<end_of_turn>", "Sunny and 21 C.<end_of_turn>", "You are welcome.<end_of_turn>"],
    "phi3": ["Paris.<|end|>", f"<|tool_call|>{CALL}<|/tool_call|><|end|>", "Sunny and 21 C.<|end|>", "You are welcome.<|end|>"],
}
END_OF_TURN = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}


def trained_runs(tokenizer, example) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == token, "a trained label must be the token itself (labels are unshifted)"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exactly_assistant_content_and_end_of_turn_trained(family):
    tok = family_tokenizer(family)
    example = ChatRenderer(tok).render(CONVERSATION)
    # The tokens are the ones the model sees at inference: the template applied by transformers, tokenized whole.
    reference = tok.apply_chat_template(CONVERSATION["messages"], tools=CONVERSATION["tools"], tokenize=True, return_dict=True)["input_ids"]
    assert example["input_ids"] == reference
    runs = trained_runs(tok, example)
    assert [tok.decode(r) for r in runs] == EXPECTED[family]
    eot = tok.convert_tokens_to_ids(END_OF_TURN[family])
    assert all(r[-1] == eot for r in runs), "every trained turn ends with the end-of-turn token, as one token"
    # Token by token: trained positions are exactly the runs found above, and nothing else.
    assert sum(len(r) for r in runs) == sum(label != IGNORE for label in example["labels"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_last_turn_only_and_all_tokens(family):
    tok = family_tokenizer(family)
    last = ChatRenderer(tok, RenderOptions(train_on="last_assistant")).render(CONVERSATION)
    assert [tok.decode(r) for r in trained_runs(tok, last)] == EXPECTED[family][-1:]
    everything = ChatRenderer(tok, RenderOptions(train_on="all")).render(CONVERSATION)
    assert everything["labels"] == everything["input_ids"]


def test_template_that_is_not_prefix_stable_raises_naming_the_turn():
    tok = family_tokenizer("mistral", "mistral_last_user_system.jinja")
    with pytest.raises(TemplateError, match=r"not prefix-stable at turn 2 \(assistant\)"):
        ChatRenderer(tok).render(CONVERSATION)
    # Without a system prompt the same template is stable and masks like mistral's.
    no_system = {"messages": CONVERSATION["messages"][1:], "tools": CONVERSATION["tools"]}
    example = ChatRenderer(tok).render(no_system)
    assert [tok.decode(r) for r in trained_runs(tok, example)] == EXPECTED["mistral"]


def test_generation_tags_give_the_same_mask():
    tok = family_tokenizer("chatml", "chatml_generation.jinja")
    renderer = ChatRenderer(tok)
    assert renderer.has_generation_tags
    assert [tok.decode(r) for r in trained_runs(tok, renderer.render(CONVERSATION))] == EXPECTED["chatml"]


def test_generation_tags_that_leave_out_the_end_of_turn_token_are_extended():
    text = (TEMPLATES / "chatml_generation.jinja").read_text()
    moved = text.replace("{{- '<|im_end|>' }}\n        {%- endgeneration %}", "{%- endgeneration %}\n        {{- '<|im_end|>' }}")
    assert moved != text
    tok = train_tokenizer(moved, ["<|im_start|>", "<|im_end|>"])
    assert [tok.decode(r) for r in trained_runs(tok, ChatRenderer(tok).render(CONVERSATION))] == EXPECTED["chatml"]


def test_completion_messages_train_only_the_completion():
    tok = family_tokenizer("llama3")
    msgs = CONVERSATION["messages"]
    record = {"prompt": msgs[:7], "completion": msgs[7:]}
    assert [tok.decode(r) for r in trained_runs(tok, ChatRenderer(tok).render(record))] == EXPECTED["llama3"][-1:]


def test_text_prompt_completion_trains_completion_and_eos():
    tok = family_tokenizer("chatml")
    example = ChatRenderer(tok).render({"prompt": "Two plus two is", "completion": " four."})
    assert [tok.decode(r) for r in trained_runs(tok, example)] == [" four.<|endoftext|>"]
    assert tok.decode(example["input_ids"]) == "Two plus two is four.<|endoftext|>"


def test_preference_renders_two_examples_with_shared_prompt():
    tok = family_tokenizer("chatml")
    record = {"prompt": [{"role": "user", "content": "Color of grass?"}], "chosen": [{"role": "assistant", "content": "Green."}], "rejected": [{"role": "assistant", "content": "Blue."}]}
    chosen, rejected = ChatRenderer(tok).render_preference(record)
    assert [tok.decode(r) for r in trained_runs(tok, chosen)] == ["Green.<|im_end|>"]
    assert [tok.decode(r) for r in trained_runs(tok, rejected)] == ["Blue.<|im_end|>"]
    first_trained = chosen["labels"].index(next(label for label in chosen["labels"] if label != IGNORE))
    assert chosen["input_ids"][:first_trained] == rejected["input_ids"][:first_trained]


def test_overlong_examples_are_truncated_or_dropped_and_counted():
    tok = family_tokenizer("chatml")
    full = ChatRenderer(tok).render(CONVERSATION)
    n = len(full["input_ids"])
    stats = RenderStats()
    cut = ChatRenderer(tok, RenderOptions(max_length=n - 5)).render(CONVERSATION, stats)
    assert cut["input_ids"] == full["input_ids"][: n - 5] and stats.truncated == 1 and stats.kept == 1
    # The cut turn no longer ends with <|im_end|>, and the statistics say so.
    assert stats.turn_end_tokens["<|im_end|>"] == 3 and sum(stats.turn_end_tokens.values()) == 4
    stats = RenderStats()
    assert ChatRenderer(tok, RenderOptions(max_length=n - 5, overlong="drop")).render(CONVERSATION, stats) is None
    assert stats.dropped_overlong == 1 and stats.kept == 0
    # Cut before the first assistant token: nothing left to train, so it is dropped and counted as such.
    first = full["labels"].index(next(label for label in full["labels"] if label != IGNORE))
    stats = RenderStats()
    assert ChatRenderer(tok, RenderOptions(max_length=first)).render(CONVERSATION, stats) is None
    assert stats.dropped_nothing_trained == 1 and stats.truncated == 1


def test_appended_eos_is_kept_only_when_it_fits_under_max_length():
    # Text prompt/completion: the tokenizer adds nothing, we append EOS. Cut at the EOS: it goes, the rest stays.
    tok = family_tokenizer("chatml")
    record = {"prompt": "Name a primary color. ", "completion": "Red, blue or yellow."}
    full = ChatRenderer(tok).render(record)
    n = len(full["input_ids"])
    assert full["input_ids"][-1] == tok.eos_token_id and full["labels"][-1] == tok.eos_token_id
    stats = RenderStats()
    fits = ChatRenderer(tok, RenderOptions(max_length=n)).render(record, stats)
    assert fits == full and stats.truncated == 0
    stats = RenderStats()
    cut = ChatRenderer(tok, RenderOptions(max_length=n - 1)).render(record, stats)
    assert cut["input_ids"] == full["input_ids"][:-1] and cut["labels"] == full["labels"][:-1] and stats.truncated == 1
    assert cut["input_ids"][-1] != tok.eos_token_id
    stats = RenderStats()
    assert ChatRenderer(tok, RenderOptions(max_length=n - 1, overlong="drop")).render(record, stats) is None
    assert stats.dropped_overlong == 1 and stats.truncated == 0


def test_tagged_template_masks_like_prefix_diffs_of_the_same_text():
    # chatml_generation.jinja renders exactly as chatml.jinja: the tags and the prefix diffs must give one mask.
    tagged = ChatRenderer(family_tokenizer("chatml", "chatml_generation.jinja"))
    plain = ChatRenderer(family_tokenizer("chatml"))
    assert tagged.has_generation_tags and not plain.has_generation_tags
    assert tagged.to_text(CONVERSATION) == plain.to_text(CONVERSATION)
    assert tagged.render(CONVERSATION) == plain.render(CONVERSATION)


def test_builtin_alpaca_template_matches_the_reference_prompt():
    tok = train_tokenizer(None)
    renderer = ChatRenderer(tok, RenderOptions(template="alpaca"))
    record = {"messages": [{"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": "Red."}]}
    example = renderer.render(record)
    expected_prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a primary color.\n\n### Response:"
    )
    assert tok.decode(example["input_ids"]) == expected_prompt + "Red.<|endoftext|>"
    assert [tok.decode(r) for r in trained_runs(tok, example)] == ["Red.<|endoftext|>"]


def test_builtin_chatml_template_masks_like_the_published_one():
    tok = train_tokenizer(None)
    example = ChatRenderer(tok, RenderOptions(template="chatml")).render(CONVERSATION)
    assert [tok.decode(r) for r in trained_runs(tok, example)] == EXPECTED["chatml"]


def test_missing_template_and_rewriting_template_are_refused():
    tok = train_tokenizer(None)
    with pytest.raises(TemplateError, match="no chat template.*--template"):
        ChatRenderer(tok)
    shouting = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    tok = train_tokenizer(shouting)
    with pytest.raises(TemplateError, match="turn 2 .*content is not inside"):
        ChatRenderer(tok).render(CONVERSATION)


def test_stats_name_the_end_of_turn_token():
    tok = family_tokenizer("gemma")
    stats = RenderStats()
    ChatRenderer(tok).render_many([CONVERSATION, CONVERSATION], stats)
    assert stats.turn_end_tokens == {"<end_of_turn>": 8}
    assert stats.examples == 2 and stats.kept == 2
