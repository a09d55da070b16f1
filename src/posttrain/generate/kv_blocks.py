"""The fast decoder's key/value buffers, stored as blocks of columns so attention reads them without copies.

A layer's keys (or values) for rows x kv heads x columns x head dim are kept as ``(blocks, rows, kv heads,
BLOCK, head dim)``: column c lives in block ``c // BLOCK`` at ``c % BLOCK``. Attention over the first
``t + 1`` columns is then one batched matmul per block on a contiguous ``(rows x kv heads, BLOCK, head dim)``
tensor. With the plain ``(rows, kv heads, columns, head dim)`` layout the first ``t + 1`` columns are a
strided slice, and torch's CPU ``bmm`` copies such a slice to contiguous memory before it multiplies in
bf16 (``python benchmarks/decode_profile.py``, SmolLM2-135M, one layer at 128 rows and 207 columns: 4.64 ms
for the strided attention in bf16, 2.32 ms of it copies; 1.94 ms with blocks; machine D, 2026-12-06). Columns
past ``t`` in the last block are masked. That is bf16's layout.

In float32 the buffer is one block as wide as the cache, and attention multiplies its first ``t + 1``
columns as a strided slice: float32 ``bmm`` reads such a slice in place, and one product over the columns
in use beats one per block of 64 with the last partly masked. ``python benchmarks/decode_profile.py --rows
32,64,128 --precisions fp32`` (machine E in docs/PERFORMANCE.md, AVX2, 2026-12-07): one layer's attention at
128 rows over 207 columns 4.18 ms against blocks' 5.71; whole decode steps over a 200-token cache, the
layouts alternating, 0.95x, 0.89x and 0.92x the blocks' time at 32, 64 and 128 rows. Our own code: a few
index helpers around ``torch.bmm``.

Both are torch's path. Where the decode kernels run (:mod:`posttrain.generate.decode_kernels`: float32 on
x86-64, bf16 with AVX512-BF16) the buffers are in the kernels' own layouts, ``"keys"`` and ``"values"``
(:class:`KVBlocks`).
"""

from __future__ import annotations

import torch

BLOCK = 64  # columns a block holds


def round_up(columns: int) -> int:
    """``columns`` rounded up to whole blocks."""
    return -(-columns // BLOCK) * BLOCK


def cuts(dtype: torch.dtype) -> bool:
    """Whether a buffer of ``dtype`` is one block cut at the columns in use (float32), rather than blocks of
    ``BLOCK`` columns whose last is masked past the current column (bf16: its CPU ``bmm`` copies a strided slice)."""
    return dtype == torch.float32


PAIRED = ("keys", "values")  # the attention kernel's layouts (decode_kernels.c), beside torch's "plain"


def pair(dtype: torch.dtype) -> int:
    """Elements a kernel layout keeps side by side in 32 bits: 2 for bf16 (AVX512-BF16's pairwise products), 1 for float32."""
    return 4 // dtype.itemsize


class KVBlocks:
    """One layer's keys or values; ``data`` is ``(blocks, rows, kv heads, block, head dim)``, ``block`` being
    ``BLOCK`` or, in float32 (:func:`cuts`), every column in one block. ``cut``: attention reads the columns up to
    the current one (a strided slice of the last block) rather than whole blocks.

    ``layout``: ``"plain"`` as above, for torch's :func:`attend`; or the C kernel's
    (:mod:`posttrain.generate.decode_kernels`), ``(rows, kv heads, blocks, tile)`` so that a row's head is one
    stretch of memory read front to back (blocks first was slower in ad-hoc timings), each block of ``BLOCK`` columns a
    tile laid out for AVX512-BF16's pairwise dot products: ``"keys"`` ``(BLOCK / 16, head dim / 2, 16, 2)``, features
    in pairs with 16 columns side by side in a register, so the scores of 16 columns come out of one accumulator
    with no sum across it (and a column written is 16 columns' stretch of memory, not the whole tile's);
    ``"values"`` ``(BLOCK / 2, head dim, 2)``, columns in pairs with the features side by side. In float32
    (``decode_kernels_f32.c``) the same with :func:`pair` 1: keys ``(BLOCK / 16, head dim, 16, 1)``, values
    ``(BLOCK, head dim, 1)``.
    :meth:`write` and :meth:`read` take and give columns as ``(rows, kv heads, columns, head dim)`` whatever
    the layout."""

    def __init__(self, data: torch.Tensor, cut: bool = False, layout: str = "plain"):
        self.data = data
        self.cut = cut
        self.layout = layout
        self.pair = data.shape[-1] if layout in PAIRED else 1  # elements side by side in a kernel layout's 32 bits
        self.block = {"plain": data.shape[3], "keys": 16 * data.shape[3], "values": self.pair * data.shape[3]}[layout]
        self.row_dim = 1 if layout == "plain" else 0

    @classmethod
    def zeros(cls, rows: int, kv_heads: int, columns: int, head_dim: int, like: torch.Tensor, layout: str = "plain") -> KVBlocks:
        return cls._allocated(like.new_zeros, rows, kv_heads, columns, head_dim, like.dtype, layout)

    @classmethod
    def empty(cls, rows: int, kv_heads: int, columns: int, head_dim: int, like: torch.Tensor, layout: str) -> KVBlocks:
        """Uninitialised buffers in a kernel layout: the kernels read only columns that were written (a masked column
        beside an open one is left out of the products, decode_kernels.c), so nothing needs zeros first. Zeroing
        a decode's buffers was a pass over every page of them at each generation call."""
        if layout not in PAIRED:
            raise ValueError(f"only the kernels' layouts {PAIRED} may start uninitialised, not {layout!r}")
        return cls._allocated(like.new_empty, rows, kv_heads, columns, head_dim, like.dtype, layout)

    @classmethod
    def _allocated(cls, make, rows: int, kv_heads: int, columns: int, head_dim: int, dtype: torch.dtype, layout: str) -> KVBlocks:
        columns = round_up(columns)
        p = pair(dtype)
        if layout == "keys":
            return cls(make((rows, kv_heads, columns // BLOCK, BLOCK // 16, head_dim // p, 16, p)), layout=layout)
        if layout == "values":
            return cls(make((rows, kv_heads, columns // BLOCK, BLOCK // p, head_dim, p)), layout=layout)
        block = columns if cuts(dtype) else BLOCK
        return cls(make((columns // block, rows, kv_heads, block, head_dim)), cut=cuts(dtype))

    @property
    def rows(self) -> int:
        return self.data.shape[self.row_dim]

    @property
    def kv_heads(self) -> int:
        return self.data.shape[self.row_dim + 1]

    @property
    def head_dim(self) -> int:
        return self.data.shape[4] * (self.pair if self.layout == "keys" else 1)  # keys hold the features in pairs

    def tile(self, block: int) -> torch.Tensor:
        """Block ``block`` of every row: (rows, kv heads, *its tile's shape in this layout)."""
        return self.data[block] if self.row_dim else self.data[:, :, block]

    def span(self, t: int) -> int:
        """The columns a step at column ``t`` attends over: ``t + 1`` where the buffer is cut there, else whole blocks."""
        return t + 1 if self.cut else (t // self.block + 1) * self.block

    def write(self, rows: slice | torch.Tensor, start: int, src: torch.Tensor) -> None:
        """Columns ``[start, start + src.shape[2])`` of ``rows`` set to ``src`` (rows, kv heads, columns, head dim)."""
        end, c = start + src.shape[2], start
        while c < end:
            block, offset = divmod(c, self.block)
            whole = (end - c) // self.block if offset == 0 and self.layout in PAIRED else 0
            if whole:  # whole blocks in one copy: a prefill's or an admission's columns
                self._put_blocks(block, rows, src[:, :, c - start : c - start + whole * self.block])
                c += whole * self.block
                continue
            n = min(self.block - offset, end - c)
            self._put(block, rows, offset, src[:, :, c - start : c - start + n])
            c += n

    def _put_blocks(self, first: int, rows: slice | torch.Tensor, piece: torch.Tensor) -> None:
        """Blocks ``first ..`` of ``rows`` set to ``piece`` (rows, kv heads, whole blocks' columns, head dim), a kernel layout."""
        r, kv, columns, d = piece.shape
        n, p = columns // BLOCK, self.pair
        if self.layout == "keys":  # (chunks, 16 columns, pairs, 2) -> (chunks, pairs, 16 columns, 2)
            tiles = piece.reshape(r, kv, n, BLOCK // 16, 16, d // p, p).transpose(4, 5)
        else:  # values: (column pairs, 2, features) -> (column pairs, features, 2)
            tiles = piece.reshape(r, kv, n, BLOCK // p, p, d).transpose(4, 5)
        self.data[rows, :, first : first + n] = tiles

    def _put(self, block: int, rows: slice | torch.Tensor, offset: int, piece: torch.Tensor) -> None:
        """Columns ``offset ..`` of one block set to ``piece`` (rows, kv heads, columns, head dim)."""
        n, tile, p = piece.shape[2], self.tile(block), self.pair
        if self.layout == "plain":
            tile[rows, :, offset : offset + n] = piece
        elif self.layout == "keys":  # a chunk of 16 columns at a time
            lo = offset
            while lo < offset + n:
                hi = min(offset + n, (lo // 16 + 1) * 16)
                part = piece[:, :, lo - offset : hi - offset].unflatten(-1, (-1, p)).transpose(2, 3)
                tile[rows, :, lo // 16, :, lo % 16 : lo % 16 + hi - lo] = part
                lo = hi
        else:  # values, columns in pairs (bf16): a column whose partner is not written here goes alone
            lo, hi = offset, offset + n
            if lo % p:
                tile[rows, :, lo // p, :, 1] = piece[:, :, 0]
                lo += 1
            if hi % p and hi > lo:
                tile[rows, :, hi // p, :, 0] = piece[:, :, hi - 1 - offset]
                hi -= 1
            if hi > lo:
                tile[rows, :, lo // p : hi // p] = piece[:, :, lo - offset : hi - offset].unflatten(2, (-1, p)).transpose(3, 4)

    def read(self, start: int, end: int) -> torch.Tensor:
        """A copy of columns ``[start, end)`` of every row: (rows, kv heads, end - start, head dim)."""
        pieces, c = [], start
        while c < end:
            block, offset = divmod(c, self.block)
            n = min(self.block - offset, end - c)
            pieces.append(self._columns(block)[:, :, offset : offset + n])
            c += n
        if not pieces:
            return self.data.new_zeros((self.rows, self.kv_heads, 0, self.head_dim))
        return torch.cat(pieces, dim=2)

    def _columns(self, block: int) -> torch.Tensor:
        """One block as (rows, kv heads, columns, head dim): the data itself in the plain layout, else a copy."""
        tile = self.tile(block)
        if self.layout == "plain":
            return tile
        if self.layout == "keys":  # (rows, kv, chunks, pairs, 16, 2) -> (rows, kv, chunks, 16, pairs, 2)
            return tile.transpose(3, 4).flatten(-2).flatten(2, 3)
        return tile.transpose(-1, -2).flatten(2, 3)

    def grow_rows(self, extra: int) -> None:
        shape = list(self.data.shape)
        shape[self.row_dim] = extra
        self.data = torch.cat([self.data, self.data.new_zeros(shape)], dim=self.row_dim)

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.row_dim:
            self.data[:, dst] = self.data[:, src]
        else:
            self.data[dst] = self.data[src]

    def resized(self, columns: int) -> KVBlocks:
        """Empty buffers of the same rows and layout with ``columns`` columns (rounded up to whole blocks)."""
        return KVBlocks.zeros(self.rows, self.kv_heads, columns, self.head_dim, self.data, self.layout)


def step_bias(bias: torch.Tensor, rows: int, t: int, span: int) -> torch.Tensor:
    """The additive mask one step's attention uses, for every layer: ``bias``'s first ``rows`` rows over the
    ``span`` columns it attends over (:meth:`KVBlocks.span`), those past ``t`` (not yet written) masked."""
    out = bias[:rows, :span].clone()
    out[:, t + 1 :] = float("-inf")
    return out


def block_rows(bias: torch.Tensor, block: int) -> list[int]:
    """For each block of ``block`` columns of a step's mask ``bias`` (rows, columns; the last block may be cut):
    how many leading rows cover every row with a column in that block it may attend to (0: no row has one).

    Rows are left-padded to the longest prompt of their batch, and the engine fills a batch longest prompt
    first, so a short prompt's row has nothing in the first blocks and the rows that do form a prefix:
    :func:`attend` multiplies only those rows' keys and values there. After refills and compactions the
    prefix is wider than it needs to be, never narrower."""
    rows, columns = bias.shape
    n = -(-columns // block)
    finite = torch.nn.functional.pad(torch.isfinite(bias), (0, n * block - columns))
    wanted = finite.view(rows, n, block).any(-1)  # (rows, blocks)
    index = torch.arange(1, rows + 1, device=bias.device)[:, None]
    return (index * wanted).amax(0).tolist()


def attend(q: torch.Tensor, keys: KVBlocks, values: KVBlocks, bias: torch.Tensor, spans: list[int] | None = None) -> torch.Tensor:
    """Attention of one query per row over the columns of ``bias``.

    ``q`` (rows x kv heads, group, head dim), contiguous and already scaled; ``bias`` (rows, the step's span of
    columns) from :func:`step_bias`; ``spans``: :func:`block_rows` of it (None: every row in every block). Scores
    are added to the float32 mask in one op (type promotion) and the softmax runs in float32. A row past a
    block's span has every column of that block masked, so its scores there are left 0 (made -inf by the mask)
    and its products with that block's values skipped (they would add exact zeros). Returns (rows, kv heads x
    group x head dim)."""
    batch, group, d = q.shape
    rows, columns = bias.shape
    kv, block = batch // rows, keys.block
    n = -(-columns // block)  # blocks holding the columns attended over
    spans = spans if spans is not None else [rows] * n

    def part(buffer: KVBlocks, i: int, hi: int) -> torch.Tensor:  # (hi x kv heads, block i's columns, head dim)
        return buffer.data[i, :hi, :, : min(block, columns - i * block)].view(hi * kv, -1, d)

    if all(hi == rows for hi in spans):
        scores = [torch.bmm(q, part(keys, i, rows).transpose(1, 2)) for i in range(n)]
        scores = scores[0] if n == 1 else torch.cat(scores, dim=-1)
    else:
        scores = q.new_zeros((batch, group, columns))
        for i, hi in enumerate(spans):
            if hi:
                scores[: hi * kv, :, i * block : (i + 1) * block] = torch.bmm(q[: hi * kv], part(keys, i, hi).transpose(1, 2))
    probs = (scores.view(rows, kv, group, columns) + bias[:, None, None]).softmax(-1).to(q.dtype).view(batch, group, columns)
    out = None
    for i, hi in enumerate(spans):
        if not hi:
            continue
        p, v = probs[: hi * kv, :, i * block : (i + 1) * block], part(values, i, hi)
        if out is None and hi == rows:
            out = torch.bmm(p, v)
        else:
            out = q.new_zeros((batch, group, d)) if out is None else out
            out[: hi * kv].baddbmm_(p, v)
    return out.view(rows, kv * group * d)
