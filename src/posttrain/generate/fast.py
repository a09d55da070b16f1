"""Decode steps for Llama-family models (Llama, Mistral, Qwen2) on a preallocated cache that rows can re-enter.

Our own code, not the model's forward with its ``DynamicCache``, mainly because a preallocated buffer is
what lets the engine put a new sequence into a finished sequence's row (continuous batching,
``Engine._stream``), which keeps the batch wide: on a CPU a step costs less per row at 64 or 128 rows than
at 32. The step itself is also cheaper than the model's forward (numbers below).

The engine prefills with the model's own forward (``engine.py``) and then, for these architectures, runs
the one-token steps through :class:`FastDecoder`. Same weights, and the model's own modules for the parts
that carry numerics (its RMSNorms, its rotary embedding, its activation); what changes:

* keys and values go into a buffer allocated once per call and written in place, one column a step.
  ``DynamicCache`` joins every layer's keys and values with ``torch.cat`` at every step (with the rotary
  embedding's joins, 9-13% of a model-forward step's CPU time at 64 rows);
* q, k and v come from one matmul, gate and up from another (weights joined once per call);
* attention for one query is two batched matmuls over the cache with the query heads grouped by their
  key/value head (no copy of keys and values per query head); the CPU's fused SDPA kernel took 1.6-1.9 ms
  a layer for it at 64 rows;
* every projection is computed as ``W @ x.T`` (weight rows first), the hidden state kept as the
  transpose of that product, features running down its columns, so no step copies it into the other
  layout. On this CPU's BLAS that product is faster than ``x @ W.T`` (``F.linear``) for these shapes:
  SmolLM2's 49k x 576 vocabulary projection at 128 rows 95 vs 155 ms, its MLP's gate/up 4.90 vs
  8.07 ms (1.15 vs 2.69 at 32 rows). The logits are wanted one row per sequence, so the vocabulary
  projection runs ``HEAD_SLICE`` vocabulary rows at a time and writes each slice's transpose while it is
  still in cache (a transpose of the whole 49k x 128 product afterwards reads and writes it all from memory).

``python benchmarks/decode_step.py`` (SmolLM2-135M-Instruct, fp32, a 100-token cache, AMD EPYC Zen 3,
2 cores, 2026-12-02, after the two changes above), ms per step, this decoder vs the model's forward:
32 rows 216 vs 351 (1.63x), 64 rows 335 vs 522 (1.56x), 128 rows 682 vs 915 (1.34x); per row 6.7,
5.2 and 5.3 ms. (Its earlier run, with ``F.linear`` layouts and a whole-vocabulary transpose:
1.15x, 1.08x, 1.04x.) End to end: see docs/PERFORMANCE.md (``benchmarks/generate.py
--decoders``). Where sequences wait, the refills are what count: the demo's sampling stage (320
samples, batches of 128) ran at 137 tok/s.

In fp32 the logits agree with the model's forward to rounding (within 1e-5 in the tests), and greedy and sampled tokens
agree with the model's own decode in the tests; bf16 rounds differently, as any other kernel order would.

Used only where it is the same computation: a model whose modules are the stock classes with plain
``nn.Linear`` projections (a LoRA-wrapped model in training goes through its own forward), no sliding
window, and no hooks (steering vectors and other hooks run in the model's forward, so a hooked model is
decoded with it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HEAD_SLICE = 2048  # vocabulary rows per product in the vocabulary projection (see the module docstring)
SUPPORTED = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}


def supports(model: Any) -> bool:
    """Whether ``model`` can be decoded by :class:`FastDecoder` as the same computation as its forward."""
    config = getattr(model, "config", None)
    layer_class = SUPPORTED.get(getattr(config, "model_type", None))
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layer_class is None or layers is None or not isinstance(getattr(model, "lm_head", None), nn.Linear):
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
        if any(type(p) is not nn.Linear for p in projections) or mlp.down_proj.bias is not None or attn.o_proj.bias is not None:
            return False
        if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
            return False
    return True


class _Layer:
    def __init__(self, layer: Any):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2, self.act = layer.input_layernorm, layer.post_attention_layernorm, mlp.act_fn
        weights, biases = (
            (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
            (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias),
        )
        self.qkv = torch.cat(weights)
        self.qkv_bias = None  # Qwen2 has biases on q, k and v; a model with some of them gets zeros for the rest
        if any(b is not None for b in biases):
            self.qkv_bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        self.o = attn.o_proj.weight
        self.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.down = mlp.down_proj.weight
        self.scaling = attn.scaling


class FastDecoder:
    """One-token decode steps of a supported model over a preallocated key/value buffer.

    Built once per ``generate`` call (inside any dtype cast, so the joined weights have the forward's
    dtype). :meth:`start` takes a batch's prefilled ``DynamicCache`` and attention mask; :meth:`step`
    feeds one token per row and returns the next logits; :meth:`compact` keeps some rows.
    """

    def __init__(self, model: Any):
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embed = model.model.embed_tokens
        self.rotary = model.model.rotary_emb
        self.final_norm = model.model.norm
        self.lm_head = model.lm_head.weight
        self.lm_bias = model.lm_head.bias
        self.layers = [_Layer(layer) for layer in model.model.layers]

    def start(self, cache: Any, mask: torch.Tensor, max_new_tokens: int) -> None:
        """Copy a prefilled cache (rows, kv heads, width, head dim per layer) into buffers with room to grow.

        Room for ``2 * max_new_tokens`` more columns, so that sequences admitted while the first ones are
        still going (:meth:`admit`) seldom need the buffers moved. Memory: rows x columns x layers x 2 x
        kv heads x head dim floats (SmolLM2-135M in fp32: 46 KB a row and column; 2.8 GB for 128 rows of
        150-token prompts and 160 new tokens).
        """
        rows, width = mask.shape
        capacity = width + 2 * max_new_tokens
        self.keys, self.values = [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            kb = k.new_empty((rows, self.kv_heads, capacity, self.head_dim))
            vb = v.new_empty((rows, self.kv_heads, capacity, self.head_dim))
            kb[:, :, :width], vb[:, :, :width] = k, v
            self.keys.append(kb)
            self.values.append(vb)
        # additive mask over the cache's columns: padding -inf, real tokens (and every new column) 0
        bias = torch.zeros((rows, capacity), dtype=torch.float32, device=mask.device)
        bias[:, :width].masked_fill_(mask == 0, float("-inf"))
        self.bias = bias
        self.length = width

    def admit(self, rows: torch.Tensor, cache: Any, mask: torch.Tensor, max_new_tokens: int, keep: list[int]) -> None:
        """Put prefilled sequences into ``rows`` (whose sequences have finished): their cache ends at the current column.

        Every row writes the same column at each step, so a newcomer's prompt is placed right before it,
        everything left of it masked. ``keep``: the rows still generating, whose columns must be kept.
        """
        width = mask.shape[1]
        self._make_room(width, max_new_tokens, keep)
        t = self.length
        for layer, kb, vb in zip(cache.layers, self.keys, self.values):
            kb[rows, :, t - width : t] = layer.keys
            vb[rows, :, t - width : t] = layer.values
        bias = torch.full((len(rows), self.bias.shape[1]), float("-inf"), device=self.bias.device)
        bias[:, t - width : t].masked_fill_(mask == 1, 0.0)
        bias[:, t:] = 0.0
        self.bias[rows] = bias

    def _make_room(self, width: int, max_new_tokens: int, keep: list[int]) -> None:
        """Make sure ``max_new_tokens`` more columns fit after the current one, with ``width`` before it.

        Columns that no kept row uses any more (left of every kept row's first token) are dropped by moving
        the rest left; the buffers grow only if that is not enough.
        """
        t, capacity = self.length, self.bias.shape[1]
        if t + max_new_tokens <= capacity:
            return
        first = int((self.bias[keep] == 0).float().argmax(-1).min()) if keep else t
        shift = max(0, min(first, t - width))
        length = t - shift
        grown = max(capacity, length + 2 * max_new_tokens)
        for buffers in (self.keys, self.values):
            for i, b in enumerate(buffers):
                if grown > capacity:
                    moved = b.new_empty((b.shape[0], b.shape[1], grown, b.shape[3]))
                    moved[:, :, :length] = b[:, :, shift:t]
                    buffers[i] = moved
                else:
                    b[:, :, :length] = b[:, :, shift:t].clone()
        bias = self.bias.new_zeros((self.bias.shape[0], grown))
        bias[:, :length] = self.bias[:, shift:t]
        self.bias, self.length = bias, length

    def compact(self, live: list[int]) -> list[int]:
        """Keep only the rows in ``live``; returns the old row of each row kept, in its new place.

        A live row past the first ``len(live)`` rows moves into a finished row's place before them, and the
        buffers become views of their first ``len(live)`` rows: only the movers are copied, not every kept row.
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
                    b[dst] = b[src]
            self.bias[dst] = self.bias[src]
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        self.keys = [k[:n] for k in self.keys]
        self.values = [v[:n] for v in self.values]
        self.bias = self.bias[:n]
        return order

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocabulary) after feeding ``tokens`` (rows,) at ``positions`` (rows,)."""
        t = self.length
        rows = tokens.shape[0]
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        group = h // kv
        x = self.embed(tokens)  # (rows, hidden)
        cos, sin = self.rotary(x, positions[:, None])  # (rows, 1, head dim)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads: (rows, 1, 1, head dim)
        bias = self.bias[:, None, None, : t + 1]
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            # x is (rows, hidden) with its features contiguous per column (the transpose of W @ x.T): see the module docstring
            qkv = torch.mm(layer.qkv, layer.norm1(x).T).T
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            q = qkv[:, : h * d].reshape(rows, kv, group, d)
            k = qkv[:, h * d : (h + kv) * d].reshape(rows, kv, 1, d)
            v = qkv[:, (h + kv) * d :].reshape(rows, kv, 1, d)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys[:, :, t : t + 1] = k
            values[:, :, t : t + 1] = v
            scores = torch.matmul(q, keys[:, :, : t + 1].transpose(-1, -2)) * layer.scaling  # (rows, kv, group, t+1)
            probs = (scores.float() + bias).softmax(-1).to(q.dtype)
            attn = torch.matmul(probs, values[:, :, : t + 1]).reshape(rows, h * d)
            x = x + torch.mm(layer.o, attn.T).T
            gate, up = torch.mm(layer.gate_up, layer.norm2(x).T).chunk(2)  # (intermediate, rows) each
            x = x + torch.mm(layer.down, layer.act(gate) * up).T
        self.length = t + 1
        hidden = self.final_norm(x).T  # (hidden, rows), contiguous
        # W @ h.T a slice of the vocabulary at a time, each slice's transpose written while it is in cache
        logits = hidden.new_empty((rows, self.lm_head.shape[0]))
        for lo in range(0, self.lm_head.shape[0], HEAD_SLICE):
            logits[:, lo : lo + HEAD_SLICE] = torch.mm(self.lm_head[lo : lo + HEAD_SLICE], hidden).T
        return logits if self.lm_bias is None else logits + self.lm_bias


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
