"""Batched generation for Hugging Face causal LMs in this process: prompts in, completions out, in the caller's order.

:class:`Engine` runs a transformers model with our own decode loop. The same interface is on vLLM
(:mod:`posttrain.generate.vllm`) and on any OpenAI-compatible endpoint (:mod:`posttrain.generate.client`);
:mod:`posttrain.generate.scheduler` feeds this loop requests as they arrive (the server). Chats are
rendered by :class:`~posttrain.generate.prompts.PromptEncoder` (the training renderer), so a prompt is
the same tokens whichever backend generates it and whatever trained the model.

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
  caching does; the rest is prefilled in groups of similar length (padding at most 10%) whose caches
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
adapter layers, steps through its own forward (``Engine(fast=False)`` forces that), except that an
engine built with ``adapters`` (the server's) decodes LoRA/DoRA adapters' rows on the fast decoder too.

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

Sampling (temperature, top-k, top-p, an inverse-CDF draw from each sequence's generator) is
:mod:`posttrain.generate.sampling`; each sequence carries its own :class:`SamplingParams`, so the rows
of one batch may differ (the server's requests do). What a seed gives changed in December 2026, when
draws moved from ``torch.multinomial`` to the inverse CDF.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from posttrain.generate.context import advance, bf16_weights, progress_bar
from posttrain.generate.fast import FastDecoder
from posttrain.generate.fast import supports as fast_supports
from posttrain.generate.intervene import Intervention, attention_bias, effective, steered
from posttrain.generate.params import Completion, SamplingParams
from posttrain.generate.prefill import MIN_SHARED_PREFIX, Prefix, PrefixCache, last_index, prefill
from posttrain.generate.prompts import PromptEncoder
from posttrain.generate.sampling import generator, pick
from posttrain.generate.sequences import DecodeSequence, Feed, ListFeed, Stops, plan
from posttrain.models.load import cache_kwarg, plain_cache

COMPACT_AT = 8  # the fast decoder refills finished rows (or, once nothing waits, drops them) when they are 1/COMPACT_AT of its rows


class Engine:
    """Batched generation with a loaded transformers causal LM (and its tokenizer), on the model's device.

    ``batch_size``: sequences decoded together (a prompt with ``n`` samples counts ``n``). ``template``:
    the chat template, as in :class:`~posttrain.data.chat.RenderOptions` (None: the tokenizer's own).
    ``adapters``: names of LoRA/DoRA adapters loaded into ``model`` (a peft model) that a call may pick
    with ``adapter=``; their rows share the fast decoder's steps with the base model's. The model is put
    in eval mode for a call and given back in the mode it came in; the cache is always used, whatever
    ``model.config.use_cache`` says (training switches it off).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        template: str | None = None,
        fast: bool = True,
        adapters: Sequence[str] = (),
    ):
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
        self.adapters = list(adapters)
        self.prefill_seconds = 0.0  # of the last generate call: the prompts' forwards (what is not decoding)

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

    def stops(self, params: SamplingParams) -> Stops:
        """``params``' stop strings and ids, a stop string that is one special token taken as its id."""
        texts, special = self.prompts.special_stop_ids(params.stop)
        return Stops(tuple(texts), frozenset(set(params.stop_token_ids) | special))

    def adapter_index(self, adapter: str | None) -> int:
        if adapter is None:
            return 0
        if adapter not in self.adapters:
            raise ValueError(f"unknown adapter {adapter!r}; this engine has {self.adapters or 'none'}")
        return self.adapters.index(adapter) + 1

    def generate(
        self,
        prompts: Sequence[Any],
        params: SamplingParams | None = None,
        *,
        apply_chat_template: bool = True,
        progress: bool = True,
        batch_size: int | None = None,
        adapter: str | None = None,
        intervention: Intervention | Sequence[Intervention | None] | None = None,
        instructions: Sequence[str | None] | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in the prompts' order.

        A prompt is a string (one user message), a list of chat messages, or a canonical record (its
        prompt); with ``apply_chat_template=False``, a string given to the model as it is. ``adapter``:
        one of the engine's adapters (None: the model as it is). ``intervention``: steering and InstABoost
        (:mod:`posttrain.generate.intervene`) for every prompt of the call, or a list with each prompt's (rows
        of different interventions share the fast decoder's steps); ``instructions``: each prompt's
        instruction text as it appears in the prompt (None for a prompt without one), which InstABoost
        boosts; needed when ``intervention.boost`` is not 1.
        """
        spans = None
        if instructions is not None:
            ids, spans = self.prompts.encode_marked(prompts, instructions, apply_chat_template=apply_chat_template)
        else:
            ids = self.encode(prompts, apply_chat_template=apply_chat_template)
        return self.generate_ids(
            ids, params, progress=progress, batch_size=batch_size, adapter=adapter, intervention=intervention, spans=spans
        )

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        *,
        progress: bool = True,
        batch_size: int | None = None,
        adapter: str | None = None,
        intervention: Intervention | Sequence[Intervention | None] | None = None,
        spans: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[list[Completion]]:
        """As :meth:`generate`, from prompts already tokenized; ``spans``: each prompt's instruction tokens ``[start, end)``."""
        params = params or SamplingParams()
        prompt_ids = [list(p) for p in prompt_ids]
        if any(not p for p in prompt_ids):
            raise ValueError(f"empty prompt(s) at {[i for i, p in enumerate(prompt_ids) if not p][:5]}: nothing to condition on")
        width = batch_size or self.batch_size
        if width < 1:
            raise ValueError(f"batch_size must be at least 1, not {width}")
        if intervention is None or isinstance(intervention, Intervention):
            intervention = [intervention] * len(prompt_ids)
        if len(intervention) != len(prompt_ids):
            raise ValueError(f"{len(intervention)} interventions for {len(prompt_ids)} prompts")
        checked = {iv: self.check_intervention(iv, spans, prompt_ids) for iv in set(intervention)}
        interventions = [checked[iv] for iv in intervention]
        spans = list(spans) if spans is not None and any(iv is not None and iv.boost != 1 for iv in interventions) else None
        seqs = plan(prompt_ids, params, self.stops(params), self.adapter_index(adapter), interventions, spans)
        left = [params.n] * len(prompt_ids)  # samples still to finish per prompt, for the progress bar
        bar = progress_bar(progress, len(prompt_ids))
        started, generated = time.perf_counter(), 0

        def finished(s: DecodeSequence) -> None:
            nonlocal generated
            generated += len(s.tokens)
            left[s.prompt] -= 1
            advance(bar, int(left[s.prompt] == 0), generated, started)

        self.prefill_seconds = 0.0
        with bar or nullcontext(), self.session(params.bf16) as decoder:
            limit = min((s[0] for s in spans or () if s is not None), default=None)
            if len({s.group for s in seqs}) == 1:
                with self._using(seqs[0].group), self._prefilling():
                    prefix = self._prefix(prompt_ids, limit=limit)
            else:  # each group's forward makes its own keys and values of the shared tokens
                prefix = PrefixCache(self, prompt_ids[0][: self._shared_length(prompt_ids, limit)])
            self.run(ListFeed(seqs), min(width, len(seqs)), finished, prefix=prefix, decoder=decoder)
        out: list[list[Completion | None]] = [[None] * params.n for _ in prompt_ids]
        for s in seqs:
            out[s.prompt][s.sample] = self.completion(s)
        return out  # type: ignore[return-value]

    def check_intervention(
        self, intervention: Intervention | None, spans: Sequence[tuple[int, int] | None] | None, prompt_ids: Sequence[Sequence[int]]
    ) -> Intervention | None:
        """``intervention`` checked against the model and the prompts; None when it changes nothing."""
        intervention = effective(intervention)
        if intervention is None:
            return None
        layers, hidden = self.model.config.num_hidden_layers, self.model.config.hidden_size
        for s in intervention.steerings:
            if not 0 <= s.layer < layers or s.u.shape[0] != hidden:
                raise ValueError(f"steering {s.key} (layer {s.layer}, {s.u.shape[0]} features) does not fit this model ({layers} layers of {hidden})")
        if intervention.boost != 1:
            if spans is None or len(spans) != len(prompt_ids):
                raise ValueError("instaboost needs each prompt's instruction marked (instructions=..., or spans for token ids)")
            for i, (span, ids) in enumerate(zip(spans, prompt_ids)):
                if span is not None and not 0 <= span[0] < span[1] <= len(ids):
                    raise ValueError(f"prompt {i}: instruction tokens {span} are outside its {len(ids)} tokens")
        return intervention

    @contextmanager
    def session(self, bf16: bool = False) -> Iterator[FastDecoder | None]:
        """Eval mode, inference mode and the bf16 cast for a stretch of generation; yields the fast decoder
        (its weights joined inside the cast) or None when the model steps through its own forward."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), bf16_weights(self.model, bf16, self.device):
                yield self._decoder()
        finally:
            self.model.train(was_training)

    def _decoder(self) -> FastDecoder | None:
        if not (self.fast and self._plain_cache() and fast_supports(self.model, adapters=bool(self.adapters))):
            return None
        return FastDecoder(self.model, self.adapters)

    def run(
        self,
        feed: Feed,
        width: int,
        finished: Callable[[DecodeSequence], None],
        *,
        prefix: Prefix | PrefixCache | None = None,
        decoder: FastDecoder | None = None,
        eager: bool = False,
    ) -> None:
        """Generate every sequence ``feed`` gives until it has none waiting and none is running (inside :meth:`session`).

        With a fast decoder, sequences join the batch as rows free up (:meth:`_stream`; ``eager``: as soon as
        one row is free, for the server's time to first token); otherwise the model's forward decodes them
        ``width`` at a time, each batch to its end.
        """
        if decoder is not None:
            self._stream(feed, width, prefix, decoder, finished, eager)
            return
        while feed.waiting():
            batch = feed.take(width)
            if not batch:
                return
            self._decode(batch, prefix, finished)

    # -- prefill --------------------------------------------------------------------------------

    @functools.cached_property
    def _cache_kwarg(self) -> str:
        """The forward's name for the cache: ``cache`` (transformers 5.24 on; ``past_key_values`` is deprecated) or ``past_key_values``."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft passes it on
        return cache_kwarg(base)

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

    def _prefix(self, prompt_ids: list[list[int]], limit: int | None = None) -> Prefix | None:
        """The keys and values of the tokens every prompt of the call starts with (a system prompt), or None.

        Computed once per call and shared by every batch, as vLLM's prefix caching does; each prompt keeps
        at least one token of its own, whose logits start its completion. ``limit``: at most this many tokens
        (where an InstABoost instruction starts: its keys need the boost in the prefill).
        """
        length = self._shared_length(prompt_ids, limit)
        if length < MIN_SHARED_PREFIX or not self._plain_cache():
            return None
        first = prompt_ids[0]
        cache = self._new_cache()
        ids = torch.tensor([first[:length]], device=self.device)
        self.model(input_ids=ids, **{self._cache_kwarg: cache}, use_cache=True, logits_to_keep=last_index(length, self.device))
        return Prefix(length, [(layer.keys, layer.values) for layer in cache.layers])

    @staticmethod
    def _shared_length(prompt_ids: list[list[int]], limit: int | None = None) -> int:
        """How many tokens every prompt starts with, each keeping one of its own (at most ``limit``)."""
        length = min(len(p) for p in prompt_ids) - 1
        if limit is not None:
            length = min(length, limit)
        first = prompt_ids[0]
        for p in prompt_ids[1:]:
            length = next((i for i in range(length) if p[i] != first[i]), length)
        return length

    @property
    def _dtype(self) -> torch.dtype:
        """The dtype the forwards compute in (bf16 inside a bf16 session)."""
        return next(self.model.parameters()).dtype

    # -- the decode loop ------------------------------------------------------------------------

    def _prefill_rows(
        self, batch: list[DecodeSequence], prefix: Prefix | PrefixCache | None
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:func:`~posttrain.generate.prefill.prefill` for a batch of sequences of one group (adapter and intervention): each distinct
        prompt once (longest first, then first seen: a set of (tokens, None) ordered them anew in every process, Python 3.11 hashing
        None by its address), its rows copied for its samples and put back in the batch's order; seeds sampled sequences' generators."""
        if isinstance(prefix, PrefixCache):
            with self._prefilling():
                prefix = prefix.get(batch)
        keys = [(tuple(s.prompt_ids), s.instruction) for s in batch]
        distinct = sorted(dict.fromkeys(keys), key=lambda p: -len(p[0]))
        place = {p: i for i, p in enumerate(distinct)}
        rows = [place[k] for k in keys]
        intervention = batch[0].intervention
        log_boost = intervention.log_boost if intervention is not None else 0.0
        with self._using(batch[0].group), self._prefilling():
            cache, mask, next_position, logits, boost = prefill(self, [list(p) for p, _ in distinct], prefix, [i for _, i in distinct], log_boost)
        if rows != list(range(len(distinct))):  # n samples, repeated prompts or another order: pick the rows
            index = torch.tensor(rows, device=self.device)
            cache.batch_select_indices(index)
            logits, mask, next_position = logits[index], mask[index], next_position[index]
            boost = boost[index] if boost is not None else None
        for s in batch:
            if not s.params.greedy and s.generator is None:
                s.generator = generator(s.seed, self.device)
        return cache, mask, next_position, logits, boost

    @contextmanager
    def _prefilling(self) -> Iterator[None]:
        """Count the time inside in :attr:`prefill_seconds`."""
        start = time.perf_counter()
        yield
        self.prefill_seconds += time.perf_counter() - start

    # -- the decode loops -----------------------------------------------------------------------

    def _decode(self, batch: list[DecodeSequence], prefix: Prefix | PrefixCache | None, finished: Callable[[DecodeSequence], None]) -> None:
        """Generate ``batch`` (one adapter) to completion with the model's forward: prefill, then one token a step."""
        device = self.device
        cache, mask, next_position, logits, boost = self._prefill_rows(batch, prefix)
        active = list(batch)
        with self._using(batch[0].group):
            for _ in range(max(s.params.max_new_tokens for s in batch)):
                self._cancel(active, finished)
                self._advance_rows(active, logits, finished)
                keep = [k for k, s in enumerate(active) if s.finish is None]
                if not keep:
                    break
                tokens = torch.tensor([s.tokens[-1] for s in active], device=device)
                if len(keep) < len(active):  # finished sequences leave the batch and the cache
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    tokens, mask, next_position = tokens[index], mask[index], next_position[index]
                    boost = boost[index] if boost is not None else None
                    active = [active[k] for k in keep]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
                attention = mask
                if boost is not None:
                    boost = torch.cat([boost, boost.new_zeros((len(active), 1))], dim=1)
                    attention = attention_bias(mask, boost, 1, self._dtype)
                logits = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=attention,
                    position_ids=next_position[:, None],
                    **{self._cache_kwarg: cache},
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
                next_position = next_position + 1

    def _stream(
        self,
        feed: Feed,
        width: int,
        prefix: Prefix | PrefixCache | None,
        decoder: FastDecoder,
        finished: Callable[[DecodeSequence], None],
        eager: bool,
    ) -> None:
        """Every sequence of ``feed`` through a :class:`FastDecoder` of up to ``width`` rows, refilled as sequences finish.

        Continuous batching: when an eighth of the rows are free (``eager``: any row) and sequences are
        waiting, the next ones are prefilled and take those rows, so the batch stays wide (a decode step
        costs little more at 128 rows than at 64 on a CPU). A newcomer's prompt is placed left of the
        current column (the decoder moves the columns when it is longer). Once nothing waits, finished rows
        leave the buffers in batches (an eighth of the rows at a time): moving them costs more than letting
        a few ride along a few steps. ``finished(seq)`` is called as each sequence ends.
        """
        device = self.device
        rows = feed.take(width)
        if not rows:
            return
        cache, mask, positions, logits, boost = self._prefill_rows(rows, prefix)
        decoder.start(
            cache, mask, max(s.remaining for s in rows), capacity=width, adapter=rows[0].adapter, intervention=rows[0].intervention, boost=boost
        )
        del cache
        tokens = self._advance_rows(rows, logits, finished)
        while True:
            self._cancel(rows, finished)
            live = [r for r, s in enumerate(rows) if s.finish is None]
            spare = [r for r, s in enumerate(rows) if s.finish is not None] + list(range(len(rows), width))
            if spare and feed.waiting() and (eager or not live or len(spare) * COMPACT_AT >= width):
                new = feed.take(len(spare))
                if new:
                    at = spare[: len(new)]
                    cache, mask, new_positions, new_logits, boost = self._prefill_rows(new, prefix)
                    room = max(s.remaining for s in new + [rows[r] for r in live])
                    decoder.admit(at, cache, mask, room, keep=live, adapter=new[0].adapter, intervention=new[0].intervention, boost=boost)
                    del cache
                    grow = max(at) + 1 - len(rows)
                    if grow > 0:
                        rows += new[len(new) - grow :]
                        tokens = torch.cat([tokens, tokens.new_zeros(grow)])
                        positions = torch.cat([positions, positions.new_zeros(grow)])
                    for r, s in zip(at, new):
                        rows[r] = s
                    index = torch.tensor(at, device=device)
                    tokens[index] = self._advance_rows(new, new_logits, finished)
                    positions[index] = new_positions
                    continue  # newcomers may have finished on their first token: look again
            if not live:
                if feed.waiting():
                    continue
                return
            if not feed.waiting() and (len(rows) - len(live)) * COMPACT_AT >= len(rows):
                order = decoder.compact(live)
                index = torch.tensor(order, device=device)
                tokens, positions = tokens[index], positions[index]
                rows = [rows[r] for r in order]
            logits = decoder.step(tokens, positions, greedy=all(s.params.greedy and not s.params.scores for s in rows))
            positions = positions + 1
            tokens = self._advance_rows(rows, logits, finished)

    def _advance_rows(self, rows: list[DecodeSequence], logits: torch.Tensor, finished: Callable[[DecodeSequence], None]) -> torch.Tensor:
        """Pick each row's next token and append it (with its scores) to the row's sequence, if it has not
        finished; report the sequences that finish. Returns the tokens picked."""
        picked = pick(logits, [s.params for s in rows], [s.generator if s.finish is None else None for s in rows])
        lps = picked.logprobs.tolist() if picked.logprobs is not None else None
        top = (picked.top[0].tolist(), picked.top[1].tolist()) if picked.top is not None else None
        for r, (s, t) in enumerate(zip(rows, picked.tokens.tolist())):
            if s.finish is not None:
                continue
            if lps is not None and s.params.logprobs:
                s.logprobs.append(lps[r])
            if top is not None and s.params.top_logprobs:
                k = s.params.top_logprobs
                s.top_logprobs.append(list(zip(top[0][r][:k], top[1][r][:k])))
            done = self._step(s, t)
            if s.listener is not None:
                s.listener(s)
            if done:
                finished(s)
        return picked.tokens

    @staticmethod
    def _cancel(rows: list[DecodeSequence], finished: Callable[[DecodeSequence], None]) -> None:
        """End the sequences whose callers have gone: their rows are free from this step on."""
        for s in rows:
            if s.cancelled and s.finish is None:
                s.finish = "length"
                finished(s)

    def _step(self, s: DecodeSequence, token: int) -> bool:
        """Append ``token`` to ``s``; True when ``s`` has finished."""
        s.tokens.append(token)
        if token in self.end_token_ids:
            s.finish = "eos"
        elif token in s.stops.ids:
            s.finish = "stop"
        elif s.stops.texts:
            text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
            hits = [i for i in (text.find(stop) for stop in s.stops.texts) if i >= 0]
            if hits:
                s.finish, s.cut = "stop", min(hits)
        if s.finish is None and len(s.tokens) >= s.params.max_new_tokens:
            s.finish = "length"
        return s.finish is not None

    def text(self, s: DecodeSequence) -> str:
        """The text of ``s`` so far (or in full once it has finished): end or stop token left out, cut before a stop string."""
        ended_by_token = s.finish in ("eos", "stop") and s.cut is None
        text = self.tokenizer.decode(s.tokens[:-1] if ended_by_token else s.tokens, skip_special_tokens=True)
        return text[: s.cut] if s.cut is not None else text

    def completion(self, s: DecodeSequence) -> Completion:
        return Completion(
            self.text(s),
            s.tokens,
            s.finish or "length",
            len(s.tokens),
            s.prompt_ids,
            s.logprobs if s.params.logprobs else None,
            s.top_logprobs if s.params.top_logprobs else None,
        )

    @contextmanager
    def _using(self, group: tuple[int, Intervention | None]) -> Iterator[None]:
        """Forwards of the model for a :attr:`DecodeSequence.group`: its adapter (0: the base model, adapters off)
        set, its intervention's steering hooked onto the decoder layers (the boost is in the masks)."""
        adapter, intervention = group
        with steered(self.model, intervention.steerings if intervention is not None else ()), self._adapter(adapter):
            yield

    @contextmanager
    def _adapter(self, adapter: int) -> Iterator[None]:
        if not self.adapters:
            yield
            return
        if adapter == 0:
            with self.model.disable_adapter():
                yield
            return
        self.model.set_adapter(self.adapters[adapter - 1])
        yield
