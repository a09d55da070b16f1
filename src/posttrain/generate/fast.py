"""Decode steps for Llama-family models (Llama, Mistral, Qwen2) on a preallocated cache that rows can re-enter.

Our own code, not the model's forward with its ``DynamicCache``, mainly because a preallocated buffer is
what lets the engine put a new sequence into a finished sequence's row (continuous batching,
``Engine._stream``), which keeps the batch wide: on a CPU a step costs less per row at 64 or 128 rows than
at 32. The step itself is also cheaper than the model's forward (numbers below).

The engine prefills with the model's own forward (``engine.py``) and then, for these architectures, runs
the one-token steps through :class:`FastDecoder`. Same weights, the model's own rotary embedding, activation
and final norm, and the layers' RMSNorms computed with the float32 operations transformers uses; what changes:

* keys and values go into a buffer allocated once per call and written in place, one column a step.
  ``DynamicCache`` joins every layer's keys and values with ``torch.cat`` at every step (with the rotary
  embedding's joins, 9-13% of a model-forward step's CPU time at 64 rows);
* q, k and v come from one matmul, gate and up from another (weights joined once per call), each norm's
  weight folded into the projection after it and attention's scaling into q's rows (:class:`_Layer`), so
  neither is an elementwise pass of its own; rotary embedding runs on q and k together;
* attention for one query is batched matmuls over the cache with the query heads grouped by their
  key/value head (no copy of keys and values per query head): in bf16 one per block of 64 columns, the
  cache being stored in such blocks (a strided slice of one long buffer was copied by CPU ``bmm`` in bf16),
  in float32 one over the columns in use of a single buffer (:mod:`posttrain.generate.kv_blocks`); the CPU's
  fused SDPA kernel took 1.6-1.9 ms a layer for it at 64 rows;
* on x86-64 CPUs (bf16 where the CPU has AVX512-BF16, float32 on any), attention and everything between the
  projections (the norms, the rotary embedding with the buffers' writes, silu(gate) * up) run as C kernels of
  our own on buffers laid out for them (:mod:`posttrain.generate.decode_kernels`: a step at 64 and 128 rows in
  0.65-0.78 of the time of torch's ops in bf16, 0.79-0.84 in float32), and where every row is greedy the
  vocabulary projection's (vocabulary, rows) product is handed on as its transpose, not copied: the argmax
  kernel reads it in place (``decode_kernels.argmax``; a sampler would need a transposing copy, slower in torch
  than the transposes saved, so sampled rows get (rows, vocabulary) logits as before);
* every projection is computed as ``W @ x`` with the hidden state kept as (features, rows), so each
  product is used in the layout it comes in and no step copies it into the other; on x86-64 CPUs by our
  own kernel (``decode_kernels.matmul``, 1.1-2.6x torch's product at a decode step's shapes, a row's result
  the same whatever rows share the step), else by torch's. On this CPU's BLAS
  that product is faster than ``x @ W.T`` (``F.linear``) for these shapes: SmolLM2's 49k x 576
  vocabulary projection at 128 rows 95 vs 155 ms, its MLP's gate/up 4.90 vs 8.07 ms (1.15 vs 2.69 at
  32 rows). Without the kernels the logits are wanted one row per sequence, so the vocabulary
  projection runs ``HEAD_SLICE`` vocabulary rows at a time and writes each slice's transpose while it is
  still in cache (a transpose of the whole 49k x 128 product afterwards reads and writes it all from memory);
  with them and greedy rows, float32 keeps the slices (faster than one product) and bf16 makes one.

``python benchmarks/decode_step.py`` (SmolLM2-135M-Instruct, fp32, a 100-token cache, AMD EPYC Zen 3,
2 cores, 2026-12-02, after the two changes above), ms per step, this decoder vs the model's forward:
32 rows 216 vs 351 (1.63x), 64 rows 335 vs 522 (1.56x), 128 rows 682 vs 915 (1.34x); per row 6.7,
5.2 and 5.3 ms. (Its earlier run, with ``F.linear`` layouts and a whole-vocabulary transpose:
1.15x, 1.08x, 1.04x.) With the folded norms and scaling and the (features, rows) layout, a bf16
step at 128 rows and a 200-token cache took 167 and 212 ms against the previous source's 243 and 240 ms
(``python benchmarks/decode_profile.py --rows 128 --precisions bf16``, the two sources alternating, 2026-12-06,
machine D in docs/PERFORMANCE.md: a noisy machine, hence the range). End to end: see docs/PERFORMANCE.md
(``benchmarks/generate.py --decoders``). Where sequences wait, the refills are what count: the demo's
sampling stage (320 samples, batches of 128) ran at 137 tok/s.

In fp32 the logits agree with the model's forward to rounding (within 1e-5 in the tests), and greedy and sampled tokens
agree with the model's own decode in the tests; bf16 rounds differently, as any other kernel order would.

Interventions (:mod:`posttrain.generate.intervene`) run here too, per row: a row's steerings edit its
hidden state after the layer they name (where the model's forward hook would), and InstABoost's
``log m`` sits in the row's additive mask at its instruction's columns, for every layer and head. The
tokens are those of the model's forward with hooks and a 4-D mask (tests/test_intervene.py).

Used only where it is the same computation: a model whose modules are the stock classes with plain
``nn.Linear`` projections (a LoRA-wrapped model in training goes through its own forward), no sliding
window, and no hooks of the caller's (a model someone hooked is decoded with its forward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from posttrain.generate import decode_kernels
from posttrain.generate.intervene import Intervention
from posttrain.generate.kv_blocks import KVBlocks, attend, block_rows, round_up, step_bias

HEAD_SLICE = 2048  # vocabulary rows per product in the vocabulary projection (see the module docstring)
NARROW = 16  # a float32 product over 2 to NARROW - 1 rows is padded to NARROW columns (see :func:`_mm`)
SUPPORTED = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}


def supports(model: Any, *, adapters: bool = False) -> bool:
    """Whether ``model`` can be decoded by :class:`FastDecoder` as the same computation as its forward.

    ``adapters``: also take a peft model whose projections are LoRA or DoRA layers over plain linears
    (the server decodes its adapters' rows in one batch with the base's); without it, an adapted model
    goes through its own forward (training's rollouts: a LoRA policy being trained).
    """
    inner_model = _base_model(model) if adapters else model
    config = getattr(inner_model, "config", None)
    layer_class = SUPPORTED.get(getattr(config, "model_type", None))
    inner = getattr(inner_model, "model", None)
    layers = getattr(inner, "layers", None)
    if layer_class is None or layers is None or not isinstance(getattr(inner_model, "lm_head", None), nn.Linear):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False
    for layer in layers:
        if type(layer).__name__ != layer_class:
            return False
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if adapters:
            if not all(type(p) is nn.Linear or _is_lora(p) for p in projections):
                return False
            projections = [_linear(p) for p in projections]
        if any(type(p) is not nn.Linear for p in projections) or projections[-1].bias is not None or projections[3].bias is not None:
            return False
        if projections[4].bias is not None or projections[5].bias is not None:
            return False
    return True


def _base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (the model itself when it has none)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _is_lora(module: Any) -> bool:
    """A peft LoRA/DoRA linear over a plain ``nn.Linear``, unmerged, with nothing but A, B (and DoRA's magnitude)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return False
    if type(module) is not LoraLinear or type(module.base_layer) is not nn.Linear or module.merged:
        return False
    return not getattr(module, "lora_bias", {}) or not any(module.lora_bias.values())


def _linear(module: Any) -> nn.Linear:
    return module.base_layer if _is_lora(module) else module


class _Delta:
    """One adapter's low-rank update of a joined projection (q, k and v; or gate and up; or o; or down).

    ``a`` (rank total, in) stacks the parts' A matrices; ``b`` (out total, rank total) holds each part's
    B, scaled by its LoRA scaling, on the block diagonal (zeros for a part the adapter leaves alone), so
    the update is two matmuls. ``magnitude`` (out total,) is DoRA's m / ||W + sBA|| per output feature
    (1 where a part is plain LoRA or not adapted), or None when no part is DoRA. With bias b, DoRA's output
    is magnitude * (W x + s B A x) + b (peft's DoraLinearLayer), which the step computes in that order.
    """

    def __init__(self, parts: list[Any], name: str):
        a_parts, b_parts, scales = [], [], []
        outs = [_linear(p).weight.shape[0] for p in parts]
        ranks = []
        for p, out in zip(parts, outs):
            if _is_lora(p) and name in p.lora_A:
                dtype = p.base_layer.weight.dtype  # adapters load in float32 over a bf16 base: compute in the base's dtype
                a, b = p.lora_A[name].weight.float(), p.lora_B[name].weight.float() * p.scaling[name]
                a_parts.append(a)
                b_parts.append(b)
                ranks.append(a.shape[0])
                if p.use_dora.get(name):
                    norm = (p.base_layer.weight.float() + b @ a).norm(p=2, dim=1)
                    scales.append((p.lora_magnitude_vector[name].weight.float() / norm).to(dtype))
                else:
                    scales.append(None)
                a_parts[-1], b_parts[-1] = a.to(dtype), b.to(dtype)
            else:
                ranks.append(0)
                b_parts.append(None)
                scales.append(None)
        self.empty = not a_parts
        if self.empty:
            return
        ref = a_parts[0]
        self.a = torch.cat(a_parts)
        self.b = ref.new_zeros((sum(outs), sum(ranks)))
        row = col = 0
        for out, rank, b in zip(outs, ranks, b_parts):
            if b is not None:
                self.b[row : row + out, col : col + rank] = b
            row, col = row + out, col + rank
        self.magnitude = None
        if any(m is not None for m in scales):
            self.magnitude = torch.cat([m if m is not None else ref.new_ones(out) for m, out in zip(scales, outs)])

    def fold(self, columns: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Scale the update as the joined weight is scaled: its inputs by ``columns`` (a norm's weight folded
        into the projection), its outputs by ``rows`` (attention's scaling folded into q); see :class:`_Layer`."""
        if self.empty:
            return
        dtype = self.a.dtype
        self.a = (self.a.float() * columns.float()).to(dtype)
        if rows is not None:
            self.b = (self.b.float() * rows.float()[:, None]).to(dtype)

    def apply(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out`` (rows, out) is W x for rows ``x`` (rows, in); returns the adapted output (before any bias)."""
        delta = (x @ self.a.T) @ self.b.T
        if self.magnitude is None:
            return out + delta
        return self.magnitude * (out + delta)


class _Layer:
    """One decoder layer's weights as the step uses them.

    The two RMSNorms' weights are folded into the projections they feed (``W diag(g)``: q, k and v; gate and
    up), and attention's scaling into q's rows (rotary embedding is linear, so scaling q before it is the
    same), each folded weight computed in float32 and rounded once to the model's dtype; an adapter's
    update is folded the same way (:meth:`_Delta.fold`). The step then normalises without a weight and
    never scales its scores: two fewer elementwise passes a layer and one fewer per attention.
    """

    def __init__(self, layer: Any, adapters: list[str]):
        attn, mlp = layer.self_attn, layer.mlp
        self.eps1, self.eps2 = layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon
        self.act = mlp.act_fn
        g1, g2 = layer.input_layernorm.weight.float(), layer.post_attention_layernorm.weight.float()
        q, k, v, o = (_linear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        gate, up, down = (_linear(p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        weights, biases = (q.weight, k.weight, v.weight), (q.bias, k.bias, v.bias)
        dtype = q.weight.dtype
        # per output row: attention's scaling on q's rows, 1 on k's and v's
        row_scale = torch.ones(sum(w.shape[0] for w in weights), device=q.weight.device)
        row_scale[: q.weight.shape[0]] = attn.scaling
        self.qkv = _folded(weights, g1, row_scale)
        self.qkv_bias = None  # Qwen2 has biases on q, k and v; a model with some of them gets zeros for the rest
        if any(b is not None for b in biases):
            joined = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
            self.qkv_bias = (joined.float() * row_scale).to(dtype)[:, None]
        self.o = o.weight
        self.gate_up = _folded((gate.weight, up.weight), g2)
        self.down = down.weight
        # per adapter (index i + 1 in the decoder's rows), its updates of the four joined projections
        self.deltas = [
            {
                "qkv": _Delta([attn.q_proj, attn.k_proj, attn.v_proj], name),
                "o": _Delta([attn.o_proj], name),
                "gate_up": _Delta([mlp.gate_proj, mlp.up_proj], name),
                "down": _Delta([mlp.down_proj], name),
            }
            for name in adapters
        ]
        for deltas in self.deltas:
            deltas["qkv"].fold(g1, row_scale)
            deltas["gate_up"].fold(g2)


FOLD_ROWS = 256  # rows of a joined weight folded at a time (in float32: 576 KB for SmolLM2's 576 columns)


def _folded(weights: tuple[torch.Tensor, ...], columns: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``weights`` joined by rows, each column times ``columns`` and each row times ``rows`` (None: 1), computed in
    float32 and rounded once to the weights' dtype: ``(cat(weights).float() * columns * rows[:, None]).to(dtype)``, the
    same numbers, but ``FOLD_ROWS`` rows at a time in place of the joined copy, so the float32 copy of a whole weight
    is never made (it was most of a decoder's start-up: every generation call joins and folds the weights anew)."""
    joined = torch.cat(weights)
    for lo in range(0, joined.shape[0], FOLD_ROWS):
        piece = joined[lo : lo + FOLD_ROWS]
        scaled = piece.float() * columns
        if rows is not None:
            scaled *= rows[lo : lo + FOLD_ROWS, None]
        piece.copy_(scaled)
    return joined


def _mm(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ x`` for ``x`` (in, rows), into ``out`` if given: on a CPU through :func:`decode_kernels.matmul` where it
    takes them (bf16 with AVX512-BF16, float32 on x86-64; a row's result the same whatever rows share the step), else
    torch's product. There, in float32, 2 to ``NARROW - 1`` rows (the last few sequences of a batch) are multiplied
    as ``NARROW`` columns, the rest zeros: over 2-15 columns torch's BLAS (MKL's sgemm) is so much slower that a
    decode step at 4 or 8 rows took longer than at 16 (114 and 109 against 87 ms, machine E in
    docs/PERFORMANCE.md); padded, steps at 2, 4, 8 and 12 rows take 0.74, 0.78, 0.71 and 0.90 of their unpadded time
    (``python benchmarks/decode_profile.py --rows 2,4,8,12 --precisions fp32``, kernels off). One row stays a
    matrix-vector product, the fastest of torch's."""
    if x.device.type == "cpu" and (product := decode_kernels.matmul(weight, x, out)) is not None:
        return product
    rows = x.shape[1]
    if not 1 < rows < NARROW or x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.mm(weight, x, out=out)
    product = torch.mm(weight, nn.functional.pad(x, (0, NARROW - rows)))[:, :rows]
    return product.contiguous() if out is None else out.copy_(product)


def _normed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation of ``x`` (features, rows) down its columns, without a weight (folded, see :class:`_Layer`).

    The same float32 operations as transformers' Llama RMSNorm (its mean of squares: another reduction, e.g.
    ``vector_norm``, rounds differently and flips near-tied greedy tokens), rounded once to the model's dtype."""
    h = x.float()  # x itself in float32
    return (h * h.pow(2).mean(0, keepdim=True).add_(eps).rsqrt_()).to(x.dtype)


class FastDecoder:
    """One-token decode steps of a supported model over a preallocated key/value buffer.

    Built once per ``generate`` call (inside any dtype cast, so the joined weights have the forward's
    dtype). :meth:`start` takes a batch's prefilled ``DynamicCache`` and attention mask; :meth:`step`
    feeds one token per row and returns the next logits; :meth:`admit` puts new sequences into free rows
    (or rows past the current ones, up to the ``capacity`` given to :meth:`start`); :meth:`compact` keeps
    some rows.

    ``adapters``: names of LoRA/DoRA adapters loaded into a peft ``model``; a row decoded with adapter
    ``i + 1`` (0 is the base model) adds that adapter's low-rank update to each projection, so rows of
    different adapters share one step (the base weights are read once for all of them).
    """

    def __init__(self, model: Any, adapters: list[str] | tuple[str, ...] = ()):
        base = _base_model(model)
        config = base.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embed = base.model.embed_tokens
        self.rotary = base.model.rotary_emb
        self.final_norm = base.model.norm
        self.lm_head = base.lm_head.weight
        self.lm_bias = base.lm_head.bias
        self.adapters = list(adapters)
        self.layers = [_Layer(layer, self.adapters) for layer in base.model.layers]
        self.silu = getattr(config, "hidden_act", None) == "silu"  # the MLP's activation, which decode_kernels.silu_mul fuses
        self.rows = 0
        self.adapter_of: list[int] = []  # each row's adapter index (0: the base model)
        self.intervention_of: list[Intervention | None] = []  # each row's steering (its boost is in ``bias``)
        self._steer: list[tuple[Intervention, torch.Tensor | None]] | None = None  # _steering_rows(), until rows change
        if self.lm_head.device.type == "cpu":
            decode_kernels.build_soon()  # made before the prompts prefill: the compiler runs while they do

    def start(
        self,
        cache: Any,
        mask: torch.Tensor,
        max_new_tokens: int,
        *,
        capacity: int = 0,
        adapter: int = 0,
        intervention: Intervention | None = None,
        boost: torch.Tensor | None = None,
    ) -> None:
        """Copy a prefilled cache (rows, kv heads, width, head dim per layer) into buffers with room to grow.

        Room for ``2 * max_new_tokens`` more columns, so that sequences admitted while the first ones are
        still going (:meth:`admit`) seldom need the buffers moved. ``capacity``: the most rows :meth:`admit`
        may fill (at least the cache's); the buffers start with the rows given and double as rows are
        added, so a server that decodes one request at a time does not fill a whole batch's buffers for it.
        Memory: rows x columns x layers x 2 x kv heads x head dim floats (SmolLM2-135M in fp32: 46 KB a row
        and column; 2.8 GB for 128 rows of 150-token prompts and 160 new tokens). ``intervention``: the rows'
        steering; ``boost``: (rows, width) ``log m`` at the instruction's columns (InstABoost), or None.
        """
        rows, width = mask.shape
        self.max_rows = max(capacity, rows)
        columns = round_up(width + 2 * max_new_tokens)
        first = cache.layers[0].keys
        # float32 on x86-64, bf16 with AVX512-BF16: the step through our C kernels, on buffers in their layouts (decode_kernels.py)
        self.kernel = decode_kernels.usable(first.dtype, first.device, self.heads // self.kv_heads, self.head_dim)
        self.keys, self.values = [], []
        for layer in cache.layers:
            if self.kernel:  # the kernels' layouts, uninitialised (KVBlocks.empty): every column read is written first
                kb = KVBlocks.empty(rows, self.kv_heads, columns, self.head_dim, layer.keys, "keys")
                vb = KVBlocks.empty(rows, self.kv_heads, columns, self.head_dim, layer.values, "values")
            else:
                kb = KVBlocks.zeros(rows, self.kv_heads, columns, self.head_dim, layer.keys)
                vb = KVBlocks.zeros(rows, self.kv_heads, columns, self.head_dim, layer.values)
            self._put(kb, vb, layer, 0, None)
            self.keys.append(kb)
            self.values.append(vb)
        # additive mask over the cache's columns: padding -inf, real tokens (and every new column) 0
        bias = torch.zeros((rows, columns), dtype=torch.float32, device=mask.device)
        if boost is not None:
            bias[:, :width] = boost
        bias[:, :width].masked_fill_(mask == 0, float("-inf"))
        self.bias = bias
        self.length = width
        self.rows = rows
        self.adapter_of = [adapter] * rows
        self.intervention_of = [intervention] * rows
        self._steer = None

    @property
    def capacity(self) -> int:
        """Rows the buffers hold now."""
        return self.bias.shape[0]

    def _grow_rows(self, needed: int) -> None:
        """Room for ``needed`` rows: the buffers double (up to ``max_rows``), new rows zero and masked."""
        if needed <= self.capacity:
            return
        if needed > self.max_rows:
            raise ValueError(f"row {needed - 1} is past the decoder's {self.max_rows} rows")
        grown = min(self.max_rows, max(needed, 2 * self.capacity))
        extra = grown - self.capacity
        for buffers in (self.keys, self.values):
            for b in buffers:
                b.grow_rows(extra)
        self.bias = torch.cat([self.bias, self.bias.new_zeros((extra, self.bias.shape[1]))])

    def admit(
        self,
        rows: list[int],
        cache: Any,
        mask: torch.Tensor,
        max_new_tokens: int,
        keep: list[int],
        *,
        adapter: int = 0,
        intervention: Intervention | None = None,
        boost: torch.Tensor | None = None,
    ) -> None:
        """Put prefilled sequences into ``rows``: finished rows, or rows past the current ones (within the capacity).

        Every row writes the same column at each step, so a newcomer's prompt is placed right before it,
        everything left of it masked; a prompt longer than the current column moves the kept rows' columns
        right first. ``keep``: the rows still generating, whose columns must be kept.
        """
        width = mask.shape[1]
        self._grow_rows(max(rows) + 1)
        self._make_room(width, max_new_tokens, keep)
        t = self.length
        index = torch.tensor(rows, device=self.bias.device)
        for layer, kb, vb in zip(cache.layers, self.keys, self.values):
            self._put(kb, vb, layer, t - width, index)
        bias = torch.full((len(rows), self.bias.shape[1]), float("-inf"), device=self.bias.device)
        real = boost if boost is not None else torch.zeros(mask.shape, device=self.bias.device)
        bias[:, t - width : t] = torch.where(mask == 1, real, bias[:, t - width : t])
        bias[:, t:] = 0.0
        self.bias[index] = bias
        self.rows = max(self.rows, max(rows) + 1)
        self.adapter_of += [0] * (self.rows - len(self.adapter_of))
        self.intervention_of += [None] * (self.rows - len(self.intervention_of))
        for r in rows:
            self.adapter_of[r] = adapter
            self.intervention_of[r] = intervention
        self._steer = None

    def _put(self, keys: KVBlocks, values: KVBlocks, layer: Any, start: int, rows: torch.Tensor | None) -> None:
        """A prefilled cache layer's keys and values into columns ``start ..`` of ``rows`` (None: every row in order): one
        C pass in the kernels' layouts (``decode_kernels.put_columns``), else :meth:`KVBlocks.write`."""
        if self.kernel:
            decode_kernels.put_columns(keys, values, layer.keys, layer.values, start, rows)
        else:
            keys.write(slice(None) if rows is None else rows, start, layer.keys)
            values.write(slice(None) if rows is None else rows, start, layer.values)

    def _make_room(self, width: int, max_new_tokens: int, keep: list[int]) -> None:
        """Make sure ``max_new_tokens`` more columns fit after the current one, with ``width`` before it.

        Columns that no kept row uses any more (left of every kept row's first token) are dropped by moving
        the rest left; when ``width`` is more than the current column, the rest moves right; the buffers
        grow only if that is not enough.
        """
        t, columns = self.length, self.bias.shape[1]
        if width <= t and t + max_new_tokens <= columns:
            return
        first = int(torch.isfinite(self.bias[keep]).float().argmax(-1).min()) if keep else t
        used = t - first  # the kept rows' columns [first, t)
        length = max(used, width)
        grown = max(columns, round_up(length + 2 * max_new_tokens))
        bias = self.bias.new_zeros((self.capacity, grown))
        bias[:, : length - used] = float("-inf")
        bias[:, length - used : length] = self.bias[:, first:t]
        for buffers in (self.keys, self.values):
            for i, b in enumerate(buffers):
                kept = b.read(first, t)
                moved = b.resized(grown) if grown > columns else b
                moved.write(slice(None), length - used, kept)
                buffers[i] = moved
        self.bias, self.length = bias, length

    def compact(self, live: list[int]) -> list[int]:
        """Keep only the rows in ``live``; returns the old row of each row kept, in its new place.

        A live row past the first ``len(live)`` rows moves into a finished row's place before them, and the
        decoder steps only its first ``len(live)`` rows: only the movers are copied, not every kept row.
        """
        n = len(live)
        order = list(range(n))
        movers = [r for r in live if r >= n]
        holes = sorted(set(range(n)) - set(live))
        if movers:
            src = torch.tensor(movers, device=self.bias.device)
            dst = torch.tensor(holes, device=self.bias.device)
            for buffers in (self.keys, self.values):
                for b in buffers:
                    b.move_rows(dst, src)
            self.bias[dst] = self.bias[src]
            for hole, mover in zip(holes, movers):
                order[hole] = mover
                self.adapter_of[hole] = self.adapter_of[mover]
                self.intervention_of[hole] = self.intervention_of[mover]
        self.rows = n
        self.adapter_of = self.adapter_of[:n]
        self.intervention_of = self.intervention_of[:n]
        self._steer = None
        return order

    def _project(self, weight: torch.Tensor, x: torch.Tensor, layer: _Layer, part: str) -> torch.Tensor:
        """``W @ x`` for ``x`` (in, rows): (out, rows), with each adapted row's update."""
        out = _mm(weight, x)
        if not self.adapters or not any(self.adapter_of):
            return out
        for a in set(self.adapter_of) - {0}:
            delta = layer.deltas[a - 1][part]
            if delta.empty:
                continue
            index = torch.tensor([r for r, i in enumerate(self.adapter_of) if i == a], device=out.device)
            out[:, index] = delta.apply(out[:, index].T, x[:, index].T).T
        return out

    def _steering_rows(self) -> list[tuple[Intervention, torch.Tensor | None]]:
        """Each steering intervention among the rows, with its rows (None: every row); kept until the rows change."""
        if self._steer is not None:
            return self._steer
        groups: dict[Intervention, list[int]] = {}
        for r, intervention in enumerate(self.intervention_of[: self.rows]):
            if intervention is not None and intervention.steerings:
                groups.setdefault(intervention, []).append(r)
        self._steer = [
            (iv, None if len(rows) == self.rows else torch.tensor(rows, device=self.bias.device)) for iv, rows in groups.items()
        ]
        return self._steer

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """Logits (rows, vocabulary) after feeding ``tokens`` (rows,) at ``positions`` (rows,). ``greedy``: every row
        takes the argmax and wants no scores, so the logits may be the transpose of a (vocabulary, rows) product (the
        argmax kernel reads it in place; a sampler would have to copy it, which costs more than it saves)."""
        t = self.length
        rows = tokens.shape[0]
        if rows != self.rows:
            raise ValueError(f"{rows} tokens for {self.rows} rows")
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        group, half, qk = h // kv, d // 2, (h + kv) * d
        # the hidden state is (hidden, rows): features down the columns, each projection's W @ x as it comes
        x = self.embed(tokens).T.contiguous()
        cos, sin = self.rotary(x, positions[:, None])  # (rows, 1, head dim)
        kernel = self.kernel  # norms, rotary and writes, attention, SiLU through decode_kernels
        if kernel:
            cos, sin = cos[:, 0].float().contiguous(), sin[:, 0].float().contiguous()  # (rows, head dim)
        else:
            cos, sin = cos[:, 0].T.contiguous(), sin[:, 0].T.contiguous()  # (head dim, rows)
            sin_low, sin_high = sin[:half], sin[half:]
            bias = step_bias(self.bias, rows, t, self.keys[0].span(t))
            spans = block_rows(bias, self.keys[0].block)  # the rows each block of the cache is multiplied for
        norm = decode_kernels.rms_norm if kernel else _normed
        steer = self._steering_rows()
        for i, (layer, keys, values) in enumerate(zip(self.layers, self.keys, self.values)):
            qkv = self._project(layer.qkv, norm(x, layer.eps1), layer, "qkv")  # (q, k, v features, rows); q scaled
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            if kernel:
                q = decode_kernels.rotary_write(qkv, cos, sin, h, keys, values, t)
                attn = decode_kernels.attend(q, keys, values, self.bias, rows, t + 1)  # (rows, heads x head dim)
            else:
                # rotary embedding of q and k together: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1)
                both = qkv[:qk].view(h + kv, d, rows)
                rotated = both * cos
                rotated[:, :half].addcmul_(both[:, half:], sin_low, value=-1)
                rotated[:, half:].addcmul_(both[:, :half], sin_high)
                keys.write(slice(0, rows), t, rotated[h:].permute(2, 0, 1)[:, :, None])
                values.write(slice(0, rows), t, qkv[qk:].view(kv, d, rows).permute(2, 0, 1)[:, :, None])
                q = rotated[:h].permute(2, 0, 1).reshape(rows * kv, group, d)
                attn = attend(q, keys, values, bias, spans)
            x = x + self._project(layer.o, attn.T, layer, "o")
            gate_up = self._project(layer.gate_up, norm(x, layer.eps2), layer, "gate_up")  # (2 x intermediate, rows)
            if kernel and self.silu:
                act = decode_kernels.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2)
                act = layer.act(gate).mul_(up)
            x = x + self._project(layer.down, act, layer, "down")
            for intervention, index in steer:
                for s in intervention.at(i):
                    if index is None:
                        x = s.apply(x.T).T.contiguous()
                    else:
                        x.T[index] = s.apply(x.T[index])
        self.length = t + 1
        hidden = self.final_norm(x.T.contiguous()).T.contiguous()  # (hidden, rows); normed as (rows, hidden), every row alike
        vocabulary = self.lm_head.shape[0]
        if kernel and greedy:  # (vocabulary, rows) as W @ h gives it, returned as its (rows, vocabulary) transpose, not
            # copied: the argmax kernel reads it in place (sampling.pick), and the transposes below are not made
            if x.dtype == torch.bfloat16:  # one product
                logits = _mm(self.lm_head, hidden).T
            else:  # a slice of the vocabulary at a time, as below
                out = hidden.new_empty((vocabulary, rows))
                for lo in range(0, vocabulary, HEAD_SLICE):
                    _mm(self.lm_head[lo : lo + HEAD_SLICE], hidden, out=out[lo : lo + HEAD_SLICE])
                logits = out.T
            return logits if self.lm_bias is None else logits + self.lm_bias
        if kernel and x.dtype == torch.bfloat16:  # bf16's (rows, vocabulary) product is as fast as the slices below
            logits = nn.functional.linear(hidden.T.contiguous(), self.lm_head)
            return logits if self.lm_bias is None else logits + self.lm_bias
        # W @ h a slice of the vocabulary at a time, each slice's transpose written while it is in cache
        logits = hidden.new_empty((rows, vocabulary))
        for lo in range(0, vocabulary, HEAD_SLICE):
            logits[:, lo : lo + HEAD_SLICE] = _mm(self.lm_head[lo : lo + HEAD_SLICE], hidden).T
        return logits if self.lm_bias is None else logits + self.lm_bias
