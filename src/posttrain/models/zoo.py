"""Named models: tiny random models for tests and examples, built on the fly with no download.

A tiny model is a real architecture's config (Llama or Qwen2) at toy size (``small-llama``: 12 layers of
width 512, ~38M parameters, for memory and throughput checks), with random weights from a fixed seed, and a byte-level BPE tokenizer trained in a fraction of a second on a built-in English
corpus, with a chat template and its special tokens. They are saved once under the cache directory
(``$POSTTRAIN_CACHE`` or ``~/.cache/posttrain``, :func:`posttrain.cache_root.cache_dir`) and then load like any Hugging Face model directory.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from posttrain.cache_root import cache_dir  # zoo.cache_dir, as fetch, reference and the client call it

ZOO_VERSION = 2

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Please write a short poem about the sea. Sure! Here is a poem about the sea, with waves and light.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
Explain how photosynthesis works in simple terms. Plants use sunlight, water and carbon dioxide to make sugar.
Give me three tips for staying healthy: drink water, sleep well, and walk every day.
Translate "good morning" into Spanish. "Buenos dias" means good morning.
Summarize the following paragraph in one sentence. The meeting was moved to Tuesday at 10 am.
You are a helpful assistant. Answer the user's question as clearly as you can, in lowercase letters only.
Write your answer in JSON: {"name": "Alice", "age": 30, "city": "London"}. Use exactly 3 bullet points.
* first point
* second point
* third point
The weather today is sunny with a high of 25 degrees. Tomorrow it will rain in the afternoon.
Call the get_weather tool with the city name. The tool returned: {"temperature": 21, "unit": "celsius"}.
def add(a, b): return a + b  # Python code adds two numbers and returns 42 or 3.14 or -7.
Once upon a time, there was a little robot who wanted to learn how to paint pictures of mountains.
End your response with the phrase "Is there anything else I can help with?" Thank you very much!
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Letters: ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz.
"""

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(
    chat_template: str | None = None,
    special_tokens: list[str] | None = None,
    *,
    bos_token: str | None = None,
    eos_token: str = "<|endoftext|>",
    pad_token: str | None = None,
    vocab_size: int = 512,
    corpus: str = _CORPUS,
) -> Any:
    """A byte-level BPE tokenizer trained on ``corpus``, with ``special_tokens`` registered as special.

    Byte-level, so any text (any language, any bytes) encodes; deterministic for the same inputs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*(special_tokens or CHATML_SPECIALS), eos_token, *([bos_token] if bos_token else []), *([pad_token] if pad_token else [])]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token or eos_token, clean_up_tokenization_spaces=False
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in (bos_token, eos_token, pad_token)]})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _chatml_template() -> str:
    return resources.files("posttrain.data.templates").joinpath("chatml.jinja").read_text(encoding="utf-8")


def _tiny_config(arch: str, vocab_size: int, eos_id: int, size: str = "tiny") -> Any:
    from transformers import LlamaConfig, Qwen2Config

    if size == "small":  # ~38M parameters: big enough for memory and throughput figures, small enough for a CPU
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=512, intermediate_size=1376, num_hidden_layers=12, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=2048, eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None,
            tie_word_embeddings=True,
        )  # fmt: skip
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        # Wider than the usual 0.02: with so narrow a model, 0.02 embeddings cap the logits near uniform,
        # and an adapter (which cannot touch the tied embeddings or the norms) could never learn anything.
        initializer_range=0.2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}")


TINY = {"tiny-llama": "llama", "tiny-qwen2": "qwen2", "small-llama": "llama"}
SIZES = {"small-llama": "small"}  # the rest are tiny: 2 layers of width 64


def build_tiny(arch: str = "llama", *, seed: int = 0, chat_template: str | None = None, size: str = "tiny") -> tuple[Any, Any]:
    """(model, tokenizer): a random model of architecture ``arch`` (``size`` tiny, or small: ~38M) and its trained tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(chat_template or _chatml_template())
    config = _tiny_config(arch, len(tokenizer), tokenizer.eos_token_id, size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def zoo_path(name: str) -> Path:
    """The directory holding zoo model ``name``, built on first use (atomically: temp dir, then rename)."""
    if name not in TINY:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(TINY)}")
    target = cache_dir() / "zoo" / f"{name}-v{ZOO_VERSION}"
    if (target / "config.json").exists():
        return target
    model, tokenizer = build_tiny(TINY[name], size=SIZES.get(name, "tiny"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target
