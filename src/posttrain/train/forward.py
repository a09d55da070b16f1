"""One batch and one forward for every training loop: SFT, the DPO family, reward models, PPO and GRPO.

The batch is :class:`posttrain.data.packing.Batch`: rows of whole sequences packed end to end, positions
restarting at 0 for each, labels shifted within each sequence, no padding between sequences (only at a
row's end). :func:`pack` builds it from any list of sequences (:func:`scored_examples` makes them from
token lists), so an RL loop's prompt + completion rows are as padding-free as SFT's.

:class:`Forward` is the module a loop differentiates (and DDP or FSDP wraps): the decoder runs once over
the batch, then gives what the loop asks for, by name:

- ``"nll"``: the summed negative log-likelihood of the trained tokens (SFT; a scalar);
- ``"logps"``: log p of each target token, 0 where nothing is scored;
- ``"values"``: the scalar head at every position (PPO's value head);
- ``"entropy"``: the policy's entropy at each scored position (logging), 0 elsewhere;
- ``"sums"`` / ``"counts"``: each sequence's summed log-prob and number of scored tokens (the DPO family);
- ``"scores"``: the scalar head at each sequence's last token (reward models).

Per-token outputs come in *sequence order*: every sequence's positions end to end, in the order the
sequences were given, whatever rows they were packed into; :func:`per_sequence` lays them out as
[sequences, longest] for per-token losses (PPO, GRPO). Per-sequence outputs are in that order too.

On CPU a loop may ask for ``one_row``: the sequences are laid out again as one row and the decoder runs
once over it with :mod:`posttrain.train.packed_attention`'s attention. Each sequence attends only to
itself (the work is Σ nᵢ², not rows × width²), and sequences that share a prefix (a pair's chosen and
rejected responses after their prompt, a GRPO group's completions, every sequence after a common system
prompt) run it once (:func:`shared_row`). Under gradient checkpointing the caller must hold that attention
through the backward as well, which recomputes the layers (the DPO, GRPO and PPO loops do); models whose
attention is not plain causal self-attention in every layer (sliding windows, softcapping), and checkpointed
training whose caller does not hold it, run the rows as given, as on GPUs, where transformers' own attention
reads the packed positions (sdpa with a block-diagonal mask, or flash-attention-2's varlen kernel with
``model.attn_implementation: flash_attention_2``). Measured: docs/PERFORMANCE.md (``benchmarks/dpo_rows.py``,
``benchmarks/grpo_rows.py``).

Our own code: the packing and the shared-prompt row are where the loops' speed on a CPU comes from; the
decoder and its attention are transformers'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from posttrain.data.chat import IGNORE
from posttrain.data.packing import Batch, best_fit_decreasing, collate_packed
from posttrain.train.losses import token_entropy, token_logps, token_nll_sum

SHAPE_QUANTUM = 32  # the one row is padded to a multiple of this many tokens
SHARE_MIN = 8  # fewer shared tokens than this run again: a continuation costs a few copies in every layer
WANTS = ("nll", "logps", "values", "entropy", "sums", "counts", "scores")

Span = tuple[int, int, int]  # (row, start, end) of one sequence in a batch


def scored_examples(sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int] | None = None) -> list[dict]:
    """Token lists -> examples for :func:`pack`: the tokens from ``prompt_lengths[i]`` on are scored (none without it)."""
    examples = []
    for k, seq in enumerate(sequences):
        p = len(seq) if prompt_lengths is None else prompt_lengths[k]
        examples.append({"input_ids": list(seq), "labels": [IGNORE] * p + list(seq[p:])})
    return examples


def pack(examples: Sequence[dict], pad_id: int, width: int | None = None) -> Batch:
    """The examples packed into rows as wide as the longest (or ``width``), best fit longest first.

    ``segments[k].index`` is the example's place in ``examples``; nothing but a row's end is padding.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    capacity = max(max(lengths), width or 0)
    return collate_packed(examples, best_fit_decreasing(lengths, capacity), pad_id)


def one_row_here(device: torch.device, attn_implementation: str) -> bool:
    """Whether a loop should ask for ``one_row``: on CPU, where the model would otherwise attend with sdpa."""
    return device.type == "cpu" and attn_implementation == "sdpa"


def spans_of(batch: Batch) -> list[Span]:
    """Where each sequence lies, in the order the sequences were given (``segments[k].index``)."""
    return [(s.row, s.start, s.end) for s in sorted(batch.segments, key=lambda s: s.index)]


def run(module: torch.nn.Module, batch: Batch, *want: str, device: torch.device | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``module`` (a :class:`Forward`, or DDP around one) over ``batch`` (moved to ``device`` first, if given)."""
    b = batch if device is None else batch.to(device)
    return module(b.input_ids, b.position_ids, b.attention_mask, b.target_ids, spans_of(batch), want)


def per_sequence(flat: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Sequence-order values [Σn] -> [sequences, longest], each sequence's values from column 0, 0 after its end."""
    out = flat.new_zeros((len(lengths), max(lengths)))
    at = 0
    for i, n in enumerate(lengths):
        out[i, :n] = flat[at : at + n]
        at += n
    return out


def lengths_of(batch: Batch) -> list[int]:
    """Each sequence's length, in sequence order."""
    return [end - start for _, start, end in spans_of(batch)]


def scored_mask(batch: Batch) -> torch.Tensor:
    """[sequences, longest] bool: which of each sequence's positions has a scored target (:func:`per_sequence`'s layout)."""
    targets = torch.cat([batch.target_ids[row, start:end] for row, start, end in spans_of(batch)])
    return per_sequence(targets != IGNORE, lengths_of(batch))


class Forward(torch.nn.Module):
    """A causal LM (or a peft model around one) and an optional scalar ``head``; see the module docstring.

    ``forward(input_ids, position_ids, attention_mask, target_ids, spans, want)``: the batch's tensors
    [R, T] (``attention_mask`` is None for packed rows), ``spans[j]`` = (row, start, end) of sequence j,
    and the names of the outputs wanted (:data:`WANTS`); returns one tensor per name, or the tensor
    itself for one name. Use :func:`run` to call it on a :class:`Batch`.
    """

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module | None = None, *, one_row: bool = False):
        from posttrain.train.packed_attention import supported

        super().__init__()
        self.model = model
        self.head = head
        self.one_row = one_row and supported(model)

    def forward(self, input_ids, position_ids, attention_mask, target_ids, spans: list[Span], want: Sequence[str]):
        unknown = [w for w in want if w not in WANTS]
        if unknown:
            raise ValueError(f"Forward cannot give {unknown}; it gives {WANTS}")
        decoder, lm_head = self.model.get_decoder(), self.model.get_output_embeddings()
        device = input_ids.device
        lengths = [end - start for _, start, end in spans]
        owner = None  # which sequence each position (in sequence order) belongs to: for sums and counts only
        if {"sums", "counts"} & set(want):
            owner = torch.repeat_interleave(torch.arange(len(spans), device=device), torch.tensor(lengths, device=device))
        if self._one_row_now(decoder):
            if attention_mask is not None:
                raise ValueError("one_row takes packed rows (no attention mask)")
            hidden = self._one_row(decoder, input_ids, target_ids, spans)  # [1, Σn, d] in sequence order
            target_ids = torch.cat([target_ids[row, start:end] for row, start, end in spans])[None]
            in_rows = False
        else:
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)[0]
            in_rows = True

        def in_order(x: torch.Tensor) -> torch.Tensor:  # [R, T, ...] -> [Σn, ...] in sequence order
            if not in_rows:
                return x.flatten(0, 1)
            return torch.cat([x[row, start:end] for row, start, end in spans])

        outputs: list[torch.Tensor] = []
        logps = None
        for name in want:
            if name == "nll":
                outputs.append(token_nll_sum(hidden, target_ids, lm_head))
            elif name in ("logps", "sums"):
                if logps is None:
                    logps = in_order(token_logps(hidden, target_ids, lm_head))
                if name == "logps":
                    outputs.append(logps)
                else:
                    outputs.append(logps.new_zeros(len(spans)).index_add(0, owner, logps))
            elif name == "counts":
                scored = (in_order(target_ids) != IGNORE).long()
                outputs.append(torch.zeros(len(spans), dtype=torch.long, device=device).index_add(0, owner, scored))
            elif name == "entropy":
                with torch.no_grad():
                    outputs.append(in_order(token_entropy(hidden, target_ids, lm_head)))
            elif name == "values":
                outputs.append(in_order(self._head(hidden)))
            elif name == "scores":  # the head at each sequence's last token only
                if in_rows:
                    rows, ends = zip(*[(row, end - 1) for row, _, end in spans])
                    at_last = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(ends, device=hidden.device)]
                else:
                    at_last = hidden[0, torch.tensor(lengths, device=device).cumsum(0) - 1]
                outputs.append(self._head(at_last))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _one_row_now(self, decoder: torch.nn.Module) -> bool:
        """Gradient checkpointing recomputes the layers in the backward, after this forward has returned: one
        row then only where the caller holds the packed attention through the backward too (DPO's loop does,
        :func:`posttrain.train.packed_attention.packed_attention`); elsewhere the rows as given."""
        from posttrain.train.packed_attention import active

        if not self.one_row:
            return False
        return not (decoder.training and getattr(decoder, "gradient_checkpointing", False)) or active(self.model)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this Forward has no scalar head: values and scores need one")
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def _one_row(self, decoder: torch.nn.Module, input_ids, target_ids, spans: list[Span]) -> torch.Tensor:
        """Hidden states [1, Σn, d] of the spans end to end, from one decoder call over one row (:func:`shared_row`)."""
        from posttrain.train.packed_attention import packed_attention

        ids, positions, index = shared_row(input_ids, target_ids, spans)
        with packed_attention(self.model):
            hidden = decoder(input_ids=ids[None], position_ids=positions[None], use_cache=False)[0]
        return hidden[:, index]


def shared_row(input_ids: torch.Tensor, target_ids: torch.Tensor, spans: list[Span]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, index): the spans' sequences in one row, every prefix they share once; ``row[index]`` is every span end to end.

    The sequences are placed in the order of their tokens before their first scored position (their prompt),
    so sequences sharing a prefix lie side by side. Each sequence that shares at least :data:`SHARE_MIN` tokens
    with the one placed before it (before its own first scored position: a pair's chosen and rejected responses
    after their prompt, KTO's mismatched sequence, a GRPO group's completions, every sequence after a common
    system prompt) is placed only from there on, with positions continuing that prefix: what
    :func:`posttrain.train.packed_attention.runs` reads as a continuation of the run before it, whose own prefix
    it includes. The row is right-padded to a multiple of ``SHAPE_QUANTUM`` with a run of its own (bf16
    matmuls on CPU go through oneDNN, which keeps compiled kernels for every shape it meets). ``index`` maps
    each span's positions to the row: a continuing sequence's shared positions are those of the sequence
    before it.
    """
    tokens, shared = [], []
    for row, start, end in spans:
        tokens.append(input_ids[row, start:end].tolist())
        scored = (target_ids[row, start:end] != IGNORE).nonzero()
        shared.append(int(scored[0]) + 1 if len(scored) else end - start)  # the hidden state at p - 1 predicts the first scored token
    order = sorted(range(len(spans)), key=lambda j: tokens[j][: shared[j]])
    pieces, where, at, previous = [], {}, 0, None
    for j in order:
        # Shared with the previous sequence: its tokens, up to this one's first scored position, never all of
        # either (a continuation's positions would run on from the one before as one run, or be no run at all).
        q = 0
        if previous is not None:
            limit = min(shared[j], len(tokens[previous]) - 1, len(tokens[j]) - 1)
            while q < limit and tokens[previous][q] == tokens[j][q]:
                q += 1
        q = q if q >= SHARE_MIN else 0
        n = len(tokens[j])
        pieces.append((input_ids[spans[j][0], spans[j][1] + q : spans[j][2]], torch.arange(q, n)))
        own = torch.arange(at, at + n - q)
        where[j] = torch.cat([where[previous][:q], own]) if q else own
        at += n - q
        previous = j
    width = -(-at // SHAPE_QUANTUM) * SHAPE_QUANTUM
    ids = torch.cat([t for t, _ in pieces] + [input_ids.new_zeros(width - at)])
    positions = torch.cat([q for _, q in pieces] + [torch.arange(width - at)]).to(ids.device)
    return ids, positions, torch.cat([where[j] for j in range(len(spans))]).to(ids.device)
