"""The fast decoder's key/value buffers, stored as blocks of columns so attention reads them without copies.

A layer's keys (or values) for rows x kv heads x columns x head dim are kept as ``(blocks, rows, kv heads,
BLOCK, head dim)``: column c lives in block ``c // BLOCK`` at ``c % BLOCK``. Attention over the first
``t + 1`` columns is then one batched matmul per block on a contiguous ``(rows x kv heads, BLOCK, head dim)``
tensor. With the plain ``(rows, kv heads, columns, head dim)`` layout the first ``t + 1`` columns are a
strided slice, and torch's CPU ``bmm`` copies such a slice to contiguous memory before it multiplies in
bf16 (``python benchmarks/decode_profile.py``, SmolLM2-135M, one layer at 128 rows and 207 columns: 4.64 ms
for the strided attention in bf16, 2.32 ms of it copies; 1.94 ms with blocks; fp32 3.34 vs 2.76 ms). Columns past
``t`` in the last block are masked. Our own code: a few index helpers around ``torch.bmm``.
"""

from __future__ import annotations

import torch

BLOCK = 64  # columns a block holds


def round_up(columns: int) -> int:
    """``columns`` rounded up to whole blocks."""
    return -(-columns // BLOCK) * BLOCK


class KVBlocks:
    """One layer's keys or values; ``data`` is ``(blocks, rows, kv heads, BLOCK, head dim)``."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    @classmethod
    def zeros(cls, rows: int, kv_heads: int, columns: int, head_dim: int, like: torch.Tensor) -> KVBlocks:
        return cls(like.new_zeros((round_up(columns) // BLOCK, rows, kv_heads, BLOCK, head_dim)))

    @property
    def rows(self) -> int:
        return self.data.shape[1]

    def write(self, rows: slice | torch.Tensor, start: int, src: torch.Tensor) -> None:
        """Columns ``[start, start + src.shape[2])`` of ``rows`` set to ``src`` (rows, kv heads, columns, head dim)."""
        end, c = start + src.shape[2], start
        while c < end:
            block, offset = divmod(c, BLOCK)
            n = min(BLOCK - offset, end - c)
            self.data[block, rows, :, offset : offset + n] = src[:, :, c - start : c - start + n]
            c += n

    def read(self, start: int, end: int) -> torch.Tensor:
        """A copy of columns ``[start, end)`` of every row: (rows, kv heads, end - start, head dim)."""
        pieces, c = [], start
        while c < end:
            block, offset = divmod(c, BLOCK)
            n = min(BLOCK - offset, end - c)
            pieces.append(self.data[block, :, :, offset : offset + n])
            c += n
        if not pieces:
            return self.data.new_zeros((self.rows, self.data.shape[2], 0, self.data.shape[4]))
        return torch.cat(pieces, dim=2)

    def grow_rows(self, extra: int) -> None:
        self.data = torch.cat([self.data, self.data.new_zeros((self.data.shape[0], extra, *self.data.shape[2:]))], dim=1)

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.data[:, dst] = self.data[:, src]

    def resized(self, columns: int) -> KVBlocks:
        """Empty buffers of the same rows with ``columns`` columns (rounded up to whole blocks)."""
        rows, kv, _, d = self.data.shape[1:]
        return KVBlocks.zeros(rows, kv, columns, d, self.data)


def step_bias(bias: torch.Tensor, rows: int, t: int) -> torch.Tensor:
    """The additive mask one step's attention uses, for every layer: ``bias``'s first ``rows`` rows over whole
    blocks up to column ``t``, the last block's columns past ``t`` (not yet written) masked."""
    n = t // BLOCK + 1
    out = bias[:rows, : n * BLOCK].clone()
    out[:, t + 1 :] = float("-inf")
    return out


def block_rows(bias: torch.Tensor) -> list[int]:
    """For each block of a step's mask ``bias`` (rows, whole blocks' columns): how many leading rows cover every
    row with a column in that block it may attend to (0: no row has one).

    Rows are left-padded to the longest prompt of their batch, and the engine fills a batch longest prompt
    first, so a short prompt's row has nothing in the first blocks and the rows that do form a prefix:
    :func:`attend` multiplies only those rows' keys and values there. After refills and compactions the
    prefix is wider than it needs to be, never narrower."""
    rows, columns = bias.shape
    wanted = torch.isfinite(bias.view(rows, columns // BLOCK, BLOCK)).any(-1)  # (rows, blocks)
    index = torch.arange(1, rows + 1, device=bias.device)[:, None]
    return (index * wanted).amax(0).tolist()


def attend(q: torch.Tensor, keys: KVBlocks, values: KVBlocks, t: int, bias: torch.Tensor, spans: list[int] | None = None) -> torch.Tensor:
    """Attention of one query per row over columns ``[0, t]``.

    ``q`` (rows x kv heads, group, head dim), contiguous and already scaled; ``bias`` (rows, whole blocks' columns)
    from :func:`step_bias`; ``spans``: :func:`block_rows` of it (None: every row in every block). Scores are
    added to the float32 mask in one op (type promotion) and the softmax runs in float32. A row past a block's
    span has every column of that block masked, so its scores there are left 0 (made -inf by the mask) and its
    products with that block's values skipped (they would add exact zeros). Returns (rows, kv heads x group x
    head dim)."""
    batch, group, d = q.shape
    rows = bias.shape[0]
    kv = batch // rows
    n = t // BLOCK + 1  # blocks holding columns 0..t
    spans = spans if spans is not None else [rows] * n

    def keys_of(i: int, hi: int) -> torch.Tensor:
        return keys.data[i, :hi].view(hi * kv, BLOCK, d).transpose(1, 2)

    if all(hi == rows for hi in spans):
        scores = torch.bmm(q, keys_of(0, rows)) if n == 1 else torch.cat([torch.bmm(q, keys_of(i, rows)) for i in range(n)], dim=-1)
    else:
        scores = q.new_zeros((batch, group, n * BLOCK))
        for i, hi in enumerate(spans):
            if hi:
                scores[: hi * kv, :, i * BLOCK : (i + 1) * BLOCK] = torch.bmm(q[: hi * kv], keys_of(i, hi))
    probs = (scores.view(rows, kv, group, n * BLOCK) + bias[:, None, None]).softmax(-1).to(q.dtype).view(batch, group, n * BLOCK)
    out = None
    for i, hi in enumerate(spans):
        if not hi:
            continue
        p, v = probs[: hi * kv, :, i * BLOCK : (i + 1) * BLOCK], values.data[i, :hi].view(hi * kv, BLOCK, d)
        if out is None and hi == rows:
            out = torch.bmm(p, v)
        else:
            out = q.new_zeros((batch, group, d)) if out is None else out
            out[: hi * kv].baddbmm_(p, v)
    return out.view(rows, kv * group * d)
