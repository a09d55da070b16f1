"""Batched generation for Hugging Face causal LMs: prompts in, completions out, in the caller's order.

One interface, two backends. :class:`Engine` runs a transformers model in this process with our own
decode loop; :class:`VLLMEngine` hands the same prompts and :class:`SamplingParams` to vLLM when it is
installed. Both render chats with :class:`~posttrain.data.chat.ChatRenderer` (the one renderer), so a
prompt is the same tokens whichever backend generates it and whatever trained the model.

Why our own decode loop instead of ``model.generate``
------------------------------------------------------
Decoding is the product's hot path (rejection sampling, DPO labelling, GRPO and evaluation all sample),
and owning the loop is measurably faster here and gives guarantees ``generate`` does not. Measured with
``benchmarks/generate.py`` (SmolLM2-135M-Instruct, the first 64 IFEval prompts with the chat template,
64 new tokens, greedy, batches of 32; machine A of docs/PERFORMANCE.md, otherwise idle; before the decode
steps moved to :mod:`posttrain.generate.fast`)::

                              fp32 tok/s   bf16 tok/s
    this loop, batch 32          221          539
    model.generate, batch 32     144          258    (bf16 as autocast)
    this loop, one at a time      25           42

Where the difference comes from, each measured on the way:

* the prefill asks for the last position's logits only, as an index tensor: ``logits_to_keep=1``
  slices a non-contiguous view, and the vocabulary projection on it became a batched matmul over 32
  copies of the 49k x 576 embedding matrix (1.5 s of a 3 s prefill; ``generate`` pays it too);
* the tokens every prompt starts with (the chat template's system prompt: 24 of SmolLM2's 47-119
  prompt tokens) are prefilled once per call and their cache copied to every row, as vLLM's prefix
  caching does; the rest is prefilled in groups of similar length (padding at most 25%) whose caches
  are joined, not as one block padded to the longest prompt. For the first 32 prompts (2,306 real
  tokens) that is 1,912 tokens of prefill instead of 3,808;
* bf16 casts the weights once per call instead of at every forward, which is what autocast does
  (a batch-1 decode step: 50 ms under autocast, 22 ms with bf16 weights, 31 ms in fp32);
* a prompt's ``n`` samples share one prefill, and finished sequences leave the batch and the cache
  instead of being fed padding to the end.

The model's own parts are used as they are meant to be: its forward for the prefill (sdpa attention:
eager was slower here, 115 vs 140 tok/s fp32 on one thread), its ``DynamicCache`` (``update`` to join,
``batch_select_indices`` to drop and copy rows) and its chat template through posttrain's one renderer.
Models whose cache layers are not plain growing attention layers (sliding window, linear attention) get
one padded prefill per batch and no shared prefix.

The decode steps of Llama, Mistral and Qwen2 models run on :class:`~posttrain.generate.fast.FastDecoder`
(a preallocated cache written in place; see that module for why and what it measured), which also lets
finished rows take new sequences (continuous batching); every other model, and any model with hooks or
adapter layers, steps through its own forward (``Engine(fast=False)`` forces that).

Batching
--------
Prompts are tokenized, each repeated ``n`` times, sorted longest first (so a batch holds prompts of
similar length and little padding) and decoded ``batch_size`` *sequences* at a time (a prompt's ``n``
samples count ``n``: the batch's width is what costs memory and time). With the fast decoder, when an
eighth of the rows have finished the next waiting sequences are prefilled into them; otherwise the
sequences are cut into batches, each decoded to its end. Padding is on the left
with an attention mask and position ids that start at 0 at each prompt's first real token, so a
padded prompt sees exactly what it would see alone. Results come back in the input order.

Stopping
--------
A sequence finishes at the first of: an end token (``finish_reason="eos"``: the tokenizer's EOS, the
generation config's EOS ids, and the chat template's end-of-turn token, e.g. ChatML's ``<|im_end|>``,
which a chat model emits where a base tokenizer's EOS is ``<|endoftext|>``); a token in
``stop_token_ids`` or any ``stop`` string in the decoded new text (``"stop"``); ``max_new_tokens``
(``"length"``). The text never contains the end or stop token, and is cut before a stop string;
``token_ids`` keep every generated token, the last included (a stop string can end inside a token, so
tokens cannot be cut at it). A stop string that is exactly one special token of the vocabulary
(``"<|im_end|>"``) is matched as that token id, since special tokens are left out of decoded text.
When every sequence of a batch has finished, the loop stops.

Randomness: what is and is not guaranteed
-----------------------------------------
``temperature=0`` is greedy (argmax; ``top_p``/``top_k`` ignored) and uses no randomness. Sampling
draws each sequence's tokens from its own ``torch.Generator``, seeded from (``seed``, the prompt's
token ids, which copy of an identical prompt this is within the call, the sample's index ``j < n``).
So with the same model, device and dtype:

* guaranteed: the same call gives the same completions; a prompt's random numbers do not depend on
  ``batch_size``, the order of the prompts, or which other prompts share the call (only on how many
  identical copies of it came before it in the call);
* not guaranteed: bit-identical logits across batch compositions. Batched matmuls of a different
  shape round differently (~1e-6 in fp32, ~1e-2 in bf16), so a token whose probability sits on a
  sampling boundary (or two logits that tie within rounding, for greedy) can flip, after which the
  sequence diverges. In fp32 batched and one-at-a-time greedy agree token for token (the tests on tiny
  models; SmolLM2 on 64 IFEval prompts x 64 tokens: 64/64); in bf16 they do not (SmolLM2: 27/64
  identical, first differences anywhere from the first token on, as between bf16 and fp32 themselves);
* not guaranteed across backends or devices: vLLM and CUDA use other kernels and other random
  streams (vLLM gets one seed per prompt and draws its ``n`` samples from it).

Sampling follows transformers' order: temperature, then top-k, then top-p (nucleus: the smallest set
of tokens whose probability reaches ``top_p``, always at least one); the token is then drawn by inverse
CDF from one uniform number of the sequence's generator (what a seed gives changed with this, in
December 2026: earlier versions drew with ``torch.multinomial``).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from posttrain.generate.fast import FastDecoder
from posttrain.generate.fast import supports as fast_supports
from posttrain.models.load import cache_kwarg, plain_cache

FinishReason = Literal["stop", "length", "eos"]


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. Validated on construction, every problem listed at once.

    ``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1 switch those filters off. ``n`` samples per
    prompt. ``stop``: strings that end a completion (cut from its text); ``stop_token_ids``: token ids
    that do. ``bf16``: run the forwards in bf16 (the fast path on CPUs with bf16 matmul); float32 weights
    are cast for the call and restored exactly afterwards. ``logprobs``: also return each generated
    token's log-probability under the model itself (:attr:`Completion.logprobs`).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    bf16: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        # accept lists (and a lone string) from callers and configs, store tuples so params stay hashable
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 is greedy), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 is off), not {self.top_k}")
        if self.n < 1:
            problems.append(f"n must be at least 1, not {self.n}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop must be non-empty strings, not {list(self.stop)!r}")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated continuation of one prompt.

    ``text``: the decoded new tokens, special tokens skipped, cut before a stop string, without the end or
    stop token. ``token_ids``: every generated token (the final end/stop token included).
    ``num_tokens == len(token_ids)``. ``prompt_token_ids``: the prompt as the model saw it.
    ``logprobs`` (when asked for): the log-probability of each of ``token_ids`` under the model's own
    distribution, as a forward pass over prompt and completion scores it (temperature 1, no top-k or
    top-p: what a DPO reference model measures), whatever temperature the tokens were drawn at.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    num_tokens: int
    prompt_token_ids: list[int] = field(repr=False)
    logprobs: list[float] | None = field(default=None, repr=False)


# -- prompts ------------------------------------------------------------------------------------


class PromptEncoder:
    """Prompts to token ids, and the token ids that end a turn, for one tokenizer.

    Chats go through :meth:`ChatRenderer.render_prompt` (the generation prompt appended) and are tokenized
    without added special tokens, since the template writes its own (as in training). Raw text
    (``apply_chat_template=False``) is tokenized with the tokenizer's special tokens (a BOS, if it has one),
    as the plain-text training path does.
    """

    def __init__(self, tokenizer: Any, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self._renderer: Any = None

    @property
    def renderer(self) -> Any:
        if self._renderer is None:
            from posttrain.data.chat import ChatRenderer, RenderOptions

            self._renderer = ChatRenderer(self.tokenizer, RenderOptions(template=self.template))
        return self._renderer

    def render(self, prompt: Any) -> str:
        return self.renderer.render_prompt(prompt)

    def encode(self, prompts: Sequence[Any], *, apply_chat_template: bool = True) -> list[list[int]]:
        if apply_chat_template:
            texts = [self.render(p) for p in prompts]
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"apply_chat_template=False takes plain strings; prompt(s) {bad[:5]} are {type(prompts[bad[0]]).__name__}")
        return self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]

    def end_token_ids(self, model_eos: Any = None) -> set[int]:
        """Ids that end a completion: the tokenizer's EOS, ``model_eos`` (an id or ids), the template's end of turn."""
        ids = set()
        for value in (self.tokenizer.eos_token_id, model_eos):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        turn_end = self.turn_end_token()
        if turn_end is not None:
            ids.add(self.tokenizer.convert_tokens_to_ids(turn_end))
        return ids

    def turn_end_token(self) -> str | None:
        """The special token the chat template closes an assistant turn with, or None (no template, or none)."""
        from posttrain.data.chat import TemplateError

        try:
            rendered = self.renderer.to_text(
                {"messages": [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi there."}]}
            )
        except (TemplateError, ValueError, TypeError):
            return None
        start, end = rendered.spans[-1]
        trained = rendered.text[start:end]
        return next((t for t in self.renderer.special_tokens if trained.endswith(t)), None)

    def special_stop_ids(self, stop: Sequence[str]) -> tuple[list[str], set[int]]:
        """Split stop strings into (text stops, token ids): a special token is matched as its id."""
        specials = set(self.tokenizer.all_special_tokens) | {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        texts = [s for s in stop if s not in specials]
        ids = {self.tokenizer.convert_tokens_to_ids(s) for s in stop if s in specials}
        return texts, ids


def sample_seed(seed: int, prompt_ids: Sequence[int], copy: int, sample: int) -> int:
    """The seed of one sequence's random stream: fixed by the prompt's tokens, not its place in a batch."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{seed}:{copy}:{sample}:".encode())
    h.update(",".join(map(str, prompt_ids)).encode())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


@dataclass
class _Sequence:
    prompt: int  # index into the caller's prompts
    sample: int
    prompt_ids: list[int]
    seed: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None
    cut: int | None = None  # where a stop string starts in the decoded text


def _plan(prompt_ids: list[list[int]], params: SamplingParams) -> list[_Sequence]:
    """Every (prompt, sample) as a sequence, longest prompt first (stable: a prompt's samples stay together)."""
    copies: dict[tuple[int, ...], int] = {}
    seqs = []
    for i, ids in enumerate(prompt_ids):
        key = tuple(ids)
        copy = copies.get(key, 0)
        copies[key] = copy + 1
        seqs += [_Sequence(i, j, ids, sample_seed(params.seed, ids, copy, j)) for j in range(params.n)]
    return sorted(seqs, key=lambda s: -len(s.prompt_ids))


MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth a separate forward pass
PREFILL_TOKENS = 4096  # most tokens (padding included) in one prefill forward, to bound activation memory
COMPACT_AT = 8  # the fast decoder refills finished rows (or, once nothing waits, drops them) when they are 1/COMPACT_AT of its rows
PREFILL_PADDING = 1.25  # a prefill group grows while its padded size stays within this factor of its real tokens


@dataclass
class _Prefix:
    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, (1, kv heads, length, head dim)


def _groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Split lengths sorted longest first into runs ``[lo, hi)`` worth prefilling together.

    A run grows while padding every row to its first (longest) row costs at most ``PREFILL_PADDING`` times
    its real tokens and stays within ``PREFILL_TOKENS``: little compute on padding, few forward passes.
    """
    groups, lo, real = [], 0, 0
    for i, n in enumerate(lengths):
        rows = i - lo + 1
        if i > lo and (lengths[lo] * rows > PREFILL_PADDING * (real + n) or lengths[lo] * rows > PREFILL_TOKENS):
            groups.append((lo, i))
            lo, real = i, 0
        real += n
    groups.append((lo, len(lengths)))
    return groups


def _last(length: int, device: torch.device) -> torch.Tensor:
    """``logits_to_keep`` for the last of ``length`` positions, as an index tensor, not the int 1.

    The int slices the hidden states to a non-contiguous (rows, 1, hidden) view, and a linear layer on that
    view broadcasts the vocabulary projection's weight to every row (a batched matmul over copies of a
    49k x 576 matrix): 1.5 s of SmolLM2's 3 s prefill at batch 32. Indexing gives a contiguous copy.
    """
    return torch.tensor([length - 1], device=device)


def _pad_middle(states: torch.Tensor, shared: int, pad: int) -> torch.Tensor:
    """Insert ``pad`` zero positions after the first ``shared`` ones of (batch, heads, positions, dim) states."""
    if pad == 0:
        return states
    b, h, _, d = states.shape
    return torch.cat([states[:, :, :shared], states.new_zeros((b, h, pad, d)), states[:, :, shared:]], dim=2)


@contextmanager
def _bf16(model: Any, enabled: bool, device: torch.device) -> Iterator[None]:
    """bf16 forwards: the float32 weights cast to bf16 once for the call (and given back after), under autocast.

    Autocast alone casts every weight at every forward; its cast cache did not help under inference_mode
    (measured: a SmolLM2-135M decode step at batch 1 took 50 ms with autocast, 22 ms with bf16 weights,
    31 ms in fp32). Casting once costs about one step. Numerically this is the model loaded in bf16
    (embeddings, norms and the residual stream in bf16 too, as vLLM runs bf16 models), not fp32 autocast's
    mix. Parameters are swapped through ``.data`` and the original float32 tensors put back, so a model in
    training and its optimizer are unaffected; tied weights stay tied. Memory: a bf16 copy of the weights
    for the call's duration.
    """
    if not enabled:
        yield
        return
    params = [p for p in model.parameters() if p.dtype == torch.float32]
    originals = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(torch.bfloat16)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        for p, data in zip(params, originals):
            p.data = data


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("prompts"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar.add_task("generate", total=total, rate="")
    return bar


def _advance(bar: Any, done_prompts: int, tokens: int, started: float) -> None:
    if bar is not None:
        rate = tokens / max(time.perf_counter() - started, 1e-9)
        bar.update(bar.task_ids[0], advance=done_prompts, rate=f"{rate:,.0f} tok/s")


# -- transformers backend -----------------------------------------------------------------------


class Engine:
    """Batched generation with a loaded transformers causal LM (and its tokenizer), on the model's device.

    ``batch_size``: sequences decoded together (a prompt with ``n`` samples counts ``n``). ``template``:
    the chat template, as in :class:`~posttrain.data.chat.RenderOptions` (None: the tokenizer's own).
    The model is put in eval mode for a call and given back in the mode it came in; the cache is always
    used, whatever ``model.config.use_cache`` says (training switches it off).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, template: str | None = None, fast: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prompts = PromptEncoder(tokenizer, template)
        generation_config = getattr(model, "generation_config", None)
        self.end_token_ids = self.prompts.end_token_ids(getattr(generation_config, "eos_token_id", None))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        self._plain: bool | None = None
        self.fast = fast

    @classmethod
    def from_name(
        cls, name: str, *, dtype: str = "float32", device: str | None = None, batch_size: int = 32, template: str | None = None
    ) -> Engine:
        """Load ``name`` (zoo, fetched, local directory or hub id) with posttrain's loaders."""
        from posttrain.config import ModelConfig
        from posttrain.models.load import load_model, load_tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(ModelConfig(name=name, dtype=dtype), torch.device(device))
        return cls(model, load_tokenizer(name), batch_size=batch_size, template=template)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: Sequence[Any], *, apply_chat_template: bool = True) -> list[list[int]]:
        """The token ids each prompt is generated from."""
        return self.prompts.encode(prompts, apply_chat_template=apply_chat_template)

    def generate(
        self,
        prompts: Sequence[Any],
        params: SamplingParams | None = None,
        *,
        apply_chat_template: bool = True,
        progress: bool = True,
        batch_size: int | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in the prompts' order.

        A prompt is a string (one user message), a list of chat messages, or a canonical record (its
        prompt); with ``apply_chat_template=False``, a string given to the model as it is.
        """
        return self.generate_ids(
            self.encode(prompts, apply_chat_template=apply_chat_template), params, progress=progress, batch_size=batch_size
        )

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        *,
        progress: bool = True,
        batch_size: int | None = None,
    ) -> list[list[Completion]]:
        """As :meth:`generate`, from prompts already tokenized."""
        params = params or SamplingParams()
        prompt_ids = [list(p) for p in prompt_ids]
        if any(not p for p in prompt_ids):
            raise ValueError(f"empty prompt(s) at {[i for i, p in enumerate(prompt_ids) if not p][:5]}: nothing to condition on")
        width = batch_size or self.batch_size
        if width < 1:
            raise ValueError(f"batch_size must be at least 1, not {width}")
        text_stops, special_stops = self.prompts.special_stop_ids(params.stop)
        stop_ids = set(params.stop_token_ids) | special_stops
        seqs = _plan(prompt_ids, params)
        left = [params.n] * len(prompt_ids)  # samples still to finish per prompt, for the progress bar
        bar = _progress_bar(progress, len(prompt_ids))
        started, generated = time.perf_counter(), 0
        was_training = self.model.training
        self.model.eval()
        try:
            with bar or nullcontext(), torch.inference_mode(), _bf16(self.model, params.bf16, self.device):
                prefix = self._prefix(prompt_ids)
                decoder = FastDecoder(self.model) if self.fast and self._plain_cache() and fast_supports(self.model) else None

                def finished(s: _Sequence) -> None:
                    nonlocal generated
                    generated += len(s.tokens)
                    left[s.prompt] -= 1
                    _advance(bar, int(left[s.prompt] == 0), generated, started)

                if decoder is not None:
                    self._stream(seqs, width, prefix, params, text_stops, stop_ids, decoder, finished)
                else:
                    for b in range(0, len(seqs), width):
                        batch = seqs[b : b + width]
                        self._decode(batch, prefix, params, text_stops, stop_ids)
                        for s in batch:
                            finished(s)
        finally:
            self.model.train(was_training)
        out: list[list[Completion | None]] = [[None] * params.n for _ in prompt_ids]
        for s in seqs:
            out[s.prompt][s.sample] = self._completion(s, params.logprobs)
        return out  # type: ignore[return-value]

    # -- prefill --------------------------------------------------------------------------------

    @functools.cached_property
    def _cache_kwarg(self) -> str:
        """The forward's name for the cache: ``cache`` (transformers 5.24 on; ``past_key_values`` is deprecated) or ``past_key_values``."""
        return cache_kwarg(self.model)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _plain_cache(self) -> bool:
        """Whether the model's cache is plain growing attention layers, which we may cut and join.

        Sliding-window, linear-attention and other layers keep other state: those models get one padded
        prefill per batch and no shared prefix.
        """
        if self._plain is None:
            self._plain = plain_cache(self.model.config)
        return self._plain

    def _prefix(self, prompt_ids: list[list[int]]) -> _Prefix | None:
        """The keys and values of the tokens every prompt of the call starts with (a system prompt), or None.

        Computed once per call and shared by every batch, as vLLM's prefix caching does; each prompt keeps
        at least one token of its own, whose logits start its completion.
        """
        length = min(len(p) for p in prompt_ids) - 1
        first = prompt_ids[0]
        for p in prompt_ids[1:]:
            length = next((i for i in range(length) if p[i] != first[i]), length)
        if length < MIN_SHARED_PREFIX or not self._plain_cache():
            return None
        cache = self._new_cache()
        ids = torch.tensor([first[:length]], device=self.device)
        self.model(input_ids=ids, **{self._cache_kwarg: cache}, use_cache=True, logits_to_keep=_last(length, self.device))
        return _Prefix(length, [(layer.keys, layer.values) for layer in cache.layers])

    def _prefill(self, prompts: list[list[int]], prefix: _Prefix | None) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompts (longest first) through the model: (cache, attention mask, next positions, last logits).

        Rows are left-padded to a common width; with a shared prefix, the padding sits between the prefix
        and each prompt's own tokens (the mask hides it and positions skip it). Prompts are run in groups
        of similar length so little compute goes to padding, and the groups' caches joined.
        """
        device, shared = self.device, prefix.length if prefix else 0
        lengths = [len(p) - shared for p in prompts]
        groups = _groups(lengths) if (prefix or self._plain_cache()) else [(0, len(prompts))]
        width = lengths[0]  # the longest, as prompts come longest first
        parts, masks, logits = [], [], []
        for lo, hi in groups:
            rows, own = hi - lo, lengths[lo]
            ids = torch.full((rows, own), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((rows, shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            for r, p in enumerate(prompts[lo:hi]):
                ids[r, own - len(p) + shared :] = torch.tensor(p[shared:])
                mask[r, shared + width - len(p) + shared :] = 1
            ids, mask = ids.to(device), mask.to(device)
            cache = self._new_cache()
            if prefix:
                for layer, (k, v) in enumerate(prefix.layers):
                    cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), layer)
            group_mask = torch.cat([mask[:, :shared], mask[:, shared + width - own :]], dim=1)
            # positions count real tokens only: a padded prompt is embedded exactly as it would be alone
            positions = (group_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
            out = self.model(
                input_ids=ids,
                attention_mask=group_mask,
                position_ids=positions,
                **{self._cache_kwarg: cache},
                use_cache=True,
                logits_to_keep=_last(own, device),
            )
            parts.append((cache, own))
            masks.append(mask)
            logits.append(out.logits[:, -1])
        if len(parts) == 1 and parts[0][1] == width:
            cache = parts[0][0]
        else:
            cache = self._new_cache()
            for layer in range(len(parts[0][0].layers)):
                keys = [_pad_middle(c.layers[layer].keys, shared, width - own) for c, own in parts]
                values = [_pad_middle(c.layers[layer].values, shared, width - own) for c, own in parts]
                cache.update(torch.cat(keys), torch.cat(values), layer)
        mask = torch.cat(masks)
        next_position = torch.tensor([len(p) for p in prompts], device=device)
        return cache, mask, next_position, torch.cat(logits)

    # -- the decode loop ------------------------------------------------------------------------

    def _prefill_rows(self, batch: list[_Sequence], prefix: _Prefix | None) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_prefill` for a batch of sequences: each distinct prompt once, its rows copied for its samples."""
        distinct: dict[tuple[int, ...], int] = {}
        rows = [distinct.setdefault(tuple(s.prompt_ids), len(distinct)) for s in batch]
        cache, mask, next_position, logits = self._prefill([list(p) for p in distinct], prefix)
        if len(distinct) < len(batch):  # n samples (or repeated prompts): copy the prefilled rows
            index = torch.tensor(rows, device=self.device)
            cache.batch_select_indices(index)
            logits, mask, next_position = logits[index], mask[index], next_position[index]
        return cache, mask, next_position, logits

    def _decode(
        self, batch: list[_Sequence], prefix: _Prefix | None, params: SamplingParams, text_stops: list[str], stop_ids: set[int]
    ) -> None:
        """Generate ``batch`` to completion in place with the model's forward: prefill, then one token a step."""
        device = self.device
        cache, mask, next_position, logits = self._prefill_rows(batch, prefix)
        generators = None if params.greedy else [self._generator(s.seed, device) for s in batch]
        active = list(batch)
        for _ in range(params.max_new_tokens):
            tokens, logprobs = _pick(logits, params, generators)
            if logprobs is not None:
                for s, lp in zip(active, logprobs.tolist()):
                    s.logprobs.append(lp)
            keep = [k for k, (s, t) in enumerate(zip(active, tokens.tolist())) if not self._step(s, t, params, text_stops, stop_ids)]
            if not keep:
                break
            if len(keep) < len(active):  # finished sequences leave the batch and the cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                tokens, mask, next_position = tokens[index], mask[index], next_position[index]
                active = [active[k] for k in keep]
                if generators is not None:
                    generators = [generators[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = self.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=next_position[:, None],
                **{self._cache_kwarg: cache},
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            next_position = next_position + 1

    def _stream(
        self,
        seqs: list[_Sequence],
        width: int,
        prefix: _Prefix | None,
        params: SamplingParams,
        text_stops: list[str],
        stop_ids: set[int],
        decoder: FastDecoder,
        finished: Any,
    ) -> None:
        """Every sequence through a :class:`FastDecoder` of ``width`` rows, refilled as sequences finish.

        Continuous batching: when an eighth of the rows have finished and sequences are waiting, the next
        ones are prefilled and take those rows, so the batch stays wide (a decode step costs little more at
        128 rows than at 64 on a CPU). Sequences come longest prompt first, so a newcomer's prompt always
        fits left of the current column. Once nothing waits, finished rows leave the buffers in batches
        (an eighth of the rows at a time): moving them costs more than letting a few ride along a few steps.
        ``finished(seq)`` is called as each sequence ends.
        """
        device = self.device
        rows: list[_Sequence] = seqs[:width]
        waiting = width
        cache, mask, next_position, logits = self._prefill_rows(rows, prefix)
        decoder.start(cache, mask, params.max_new_tokens)
        del cache
        generators = None if params.greedy else [self._generator(s.seed, device) for s in rows]
        tokens, logprobs = _pick(logits, params, generators)
        self._advance_rows(rows, tokens, logprobs, params, text_stops, stop_ids, finished)
        while True:
            free = [r for r, s in enumerate(rows) if s.finish is not None]
            if waiting < len(seqs) and len(free) * COMPACT_AT >= len(rows):
                new = seqs[waiting : waiting + len(free)]
                waiting += len(new)
                at = free[: len(new)]
                cache, mask, new_positions, new_logits = self._prefill_rows(new, prefix)
                index = torch.tensor(at, device=device)
                decoder.admit(index, cache, mask, params.max_new_tokens, keep=[r for r, s in enumerate(rows) if s.finish is None])
                del cache
                new_generators = None if params.greedy else [self._generator(s.seed, device) for s in new]
                first, logprobs = _pick(new_logits, params, new_generators)
                self._advance_rows(new, first, logprobs, params, text_stops, stop_ids, finished)
                tokens[index], next_position[index] = first, new_positions
                for r, s in zip(at, new):
                    rows[r] = s
                if generators is not None and new_generators is not None:
                    for r, g in zip(at, new_generators):
                        generators[r] = g
                continue  # newcomers may have finished on their first token: look again
            live = [r for r, s in enumerate(rows) if s.finish is None]
            if not live:
                if waiting < len(seqs):
                    continue
                return
            if waiting >= len(seqs) and (len(rows) - len(live)) * COMPACT_AT >= len(rows):
                order = decoder.compact(live)
                index = torch.tensor(order, device=device)
                tokens, next_position = tokens[index], next_position[index]
                rows = [rows[r] for r in order]
                if generators is not None:
                    generators = [generators[r] for r in order]
            logits = decoder.step(tokens, next_position)
            next_position = next_position + 1
            tokens, logprobs = _pick(logits, params, generators)
            self._advance_rows(rows, tokens, logprobs, params, text_stops, stop_ids, finished)

    def _advance_rows(
        self,
        rows: list[_Sequence],
        tokens: torch.Tensor,
        logprobs: torch.Tensor | None,
        params: SamplingParams,
        text_stops: list[str],
        stop_ids: set[int],
        finished: Any,
    ) -> None:
        """Append each row's token (and its log-prob) to its sequence, if it has not finished; report the sequences that finish."""
        lps = logprobs.tolist() if logprobs is not None else None
        for r, (s, t) in enumerate(zip(rows, tokens.tolist())):
            if s.finish is not None:
                continue
            if lps is not None:
                s.logprobs.append(lps[r])
            if self._step(s, t, params, text_stops, stop_ids):
                finished(s)

    @staticmethod
    def _generator(seed: int, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def _step(self, s: _Sequence, token: int, params: SamplingParams, text_stops: list[str], stop_ids: set[int]) -> bool:
        """Append ``token`` to ``s``; True when ``s`` has finished."""
        s.tokens.append(token)
        if token in self.end_token_ids:
            s.finish = "eos"
        elif token in stop_ids:
            s.finish = "stop"
        elif text_stops:
            text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
            hits = [i for i in (text.find(stop) for stop in text_stops) if i >= 0]
            if hits:
                s.finish, s.cut = "stop", min(hits)
        if s.finish is None and len(s.tokens) >= params.max_new_tokens:
            s.finish = "length"
        return s.finish is not None

    def _completion(self, s: _Sequence, logprobs: bool) -> Completion:
        ended_by_token = s.finish in ("eos", "stop") and s.cut is None
        text = self.tokenizer.decode(s.tokens[:-1] if ended_by_token else s.tokens, skip_special_tokens=True)
        if s.cut is not None:
            text = text[: s.cut]
        return Completion(text, s.tokens, s.finish or "length", len(s.tokens), s.prompt_ids, s.logprobs if logprobs else None)


def _pick(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(next token of each row, its log-prob under the model at temperature 1, when ``params.logprobs``; else None)."""
    scores = logits.float()
    tokens = _choose(scores, params, generators)
    if not params.logprobs:
        return tokens, None
    return tokens, scores.gather(-1, tokens[:, None])[:, 0] - scores.logsumexp(-1)


def _choose(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None) -> torch.Tensor:
    """The next token of each row of ``logits`` (rows, vocab): argmax, or a draw from each row's generator."""
    if generators is None:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p; the first always stays
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Inverse-CDF draw: one uniform number from each row's generator, then one batched cumulative sum and
    # search. For 128 rows of SmolLM2's 49k-token vocabulary torch.multinomial row by row (it rebuilds each
    # row's distribution) took 207-238 ms, this 21-40 ms (benchmarks/decode_step.py, two runs). float64 keeps the CDF exact.
    cdf = logits.softmax(-1).double().cumsum_(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generators]).to(cdf.device)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return picked.clamp_(max=logits.shape[-1] - 1)


# -- vLLM backend -------------------------------------------------------------------------------


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMEngine:
    """The same interface on vLLM's offline ``LLM.generate(prompts, SamplingParams)``.

    Prompts are rendered and tokenized by posttrain (the same :class:`PromptEncoder` as :class:`Engine`)
    and passed as token ids, so both backends see identical prompts. End-of-turn tokens are passed as
    ``stop_token_ids``. Each prompt's request gets its own seed (:func:`sample_seed`), so its samples do
    not depend on the batch; vLLM draws the ``n`` samples of a request from that one seed. ``bf16`` is
    not a per-call switch in vLLM: choose the dtype when building the engine (``dtype="bfloat16"``).
    """

    def __init__(self, name: str, *, template: str | None = None, **llm_kwargs: Any):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("the vLLM backend needs vllm (`pip install vllm`, CUDA machines); use Engine for transformers") from err
        from posttrain.models.load import load_tokenizer, resolve

        path = resolve(name)
        self.tokenizer = load_tokenizer(name)
        self.prompts = PromptEncoder(self.tokenizer, template)
        self.llm = LLM(model=path, **llm_kwargs)
        self.end_token_ids = self.prompts.end_token_ids(_generation_eos(path))

    def encode(self, prompts: Sequence[Any], *, apply_chat_template: bool = True) -> list[list[int]]:
        return self.prompts.encode(prompts, apply_chat_template=apply_chat_template)

    def generate(
        self,
        prompts: Sequence[Any],
        params: SamplingParams | None = None,
        *,
        apply_chat_template: bool = True,
        progress: bool = True,
        batch_size: int | None = None,
    ) -> list[list[Completion]]:
        """As :meth:`Engine.generate`; ``batch_size`` is ignored (vLLM schedules its own batches)."""
        return self.generate_ids(self.encode(prompts, apply_chat_template=apply_chat_template), params, progress=progress)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        *,
        progress: bool = True,
        batch_size: int | None = None,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams

        params = params or SamplingParams()
        if params.logprobs:
            raise ValueError("logprobs=True is not supported by the vLLM backend here; use the transformers Engine")
        prompt_ids = [list(p) for p in prompt_ids]
        text_stops, special_stops = self.prompts.special_stop_ids(params.stop)
        user_stop_ids = set(params.stop_token_ids) | special_stops
        copies: dict[tuple[int, ...], int] = {}
        requests, sampling = [], []
        for ids in prompt_ids:
            copy = copies.get(tuple(ids), 0)
            copies[tuple(ids)] = copy + 1
            requests.append({"prompt_token_ids": ids})
            sampling.append(
                VLLMSamplingParams(
                    n=params.n,
                    max_tokens=params.max_new_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k or -1,  # -1 is "off" in every vLLM release (0 only in recent ones)
                    seed=None if params.greedy else sample_seed(params.seed, ids, copy, 0),
                    stop=list(text_stops) or None,
                    stop_token_ids=sorted(user_stop_ids | self.end_token_ids) or None,
                    skip_special_tokens=True,
                )
            )
        outputs = self.llm.generate(requests, sampling, use_tqdm=progress)
        results = []
        for ids, request in zip(prompt_ids, outputs):
            ordered = sorted(request.outputs, key=lambda o: o.index)
            results.append([self._completion(o, ids, user_stop_ids, text_stops) for o in ordered])
        return results

    def _completion(self, out: Any, prompt_ids: list[int], user_stop_ids: set[int], text_stops: list[str]) -> Completion:
        # vLLM says "stop" for EOS, stop tokens and stop strings alike; stop_reason tells them apart
        # (None: EOS; an int: that stop token id; a str: that stop string).
        reason: FinishReason
        if out.finish_reason == "length":
            reason = "length"
        elif isinstance(out.stop_reason, str) or (isinstance(out.stop_reason, int) and out.stop_reason in user_stop_ids):
            reason = "stop"
        else:
            reason = "eos"
        token_ids = list(out.token_ids)
        return Completion(out.text, token_ids, reason, len(token_ids), prompt_ids)


def _generation_eos(path: str) -> Any:
    """The EOS id(s) in a model's generation_config.json, if it has one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        return None


Backend = Literal["auto", "transformers", "vllm"]


def load_engine(
    name: str,
    *,
    backend: Backend = "auto",
    dtype: str = "float32",
    device: str | None = None,
    batch_size: int = 32,
    template: str | None = None,
) -> Engine | VLLMEngine:
    """An engine for model ``name``: vLLM when asked, or for ``auto`` when it is installed and CUDA is up; else transformers."""
    if backend == "vllm" or (backend == "auto" and vllm_available() and torch.cuda.is_available()):
        return VLLMEngine(name, template=template, dtype=dtype)
    return Engine.from_name(name, dtype=dtype, device=device, batch_size=batch_size, template=template)
