"""Tokenizers whose chat templates reproduce published model families (tests/templates/), and conversations."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from posttrain.models.zoo import train_tokenizer

TEMPLATES = Path(__file__).parent / "templates"

# family -> (template file, special tokens, bos, eos)
FAMILIES = {
    "chatml": ("chatml.jinja", ["<|im_start|>", "<|im_end|>"], None, "<|endoftext|>"),
    "llama3": ("llama3.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>"),
    "mistral": ("mistral.jinja", ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], "<s>", "</s>"),
    "gemma": ("gemma.jinja", ["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "phi3": ("phi3.jinja", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>"], None, "<|endoftext|>"),
    "smollm2": ("smollm2.jinja", ["<|im_start|>", "<|im_end|>"], None, "<|endoftext|>"),
}


@lru_cache(maxsize=None)
def family_tokenizer(family: str, template_file: str | None = None):
    file, specials, bos, eos = FAMILIES[family]
    template = (TEMPLATES / (template_file or file)).read_text()
    return train_tokenizer(template, specials, bos_token=bos, eos_token=eos)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

# System prompt, a tool call and its result, several assistant turns.
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Weather there?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny and 21 C."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ],
    "tools": [WEATHER_TOOL],
}
