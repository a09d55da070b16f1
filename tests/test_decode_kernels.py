"""The decode kernels (generate/decode_kernels.c for bf16, decode_kernels_f32.c for float32): the same attention as
torch's path and as a plain float32 softmax, over blocks, left padding, spare row capacity and both head sizes; the
norm, SiLU and rotary kernels against torch's ops; built, cached and refused where they cannot run. bf16's tests are
skipped on CPUs without AVX512-BF16, all of them where there is no C compiler (the kernels are never used there)."""

from __future__ import annotations

import logging

import pytest
import torch

from posttrain.generate import decode_kernels
from posttrain.generate.kv_blocks import BLOCK, KVBlocks, attend, block_rows, step_bias

BF16, FP32 = torch.bfloat16, torch.float32
needs_kernel = pytest.mark.skipif(
    not decode_kernels.usable(BF16, torch.device("cpu"), 3, 64), reason="no AVX512-BF16 or no C compiler here"
)
EITHER = [
    pytest.param(BF16, marks=needs_kernel, id="bf16"),
    pytest.param(
        FP32,
        marks=pytest.mark.skipif(not decode_kernels.usable(FP32, torch.device("cpu"), 3, 64), reason="not x86-64 or no C compiler"),
        id="fp32",
    ),
]


def close(dtype: torch.dtype, bf16: float, fp32: float) -> dict:
    """assert_close's tolerances for ``dtype``: ``bf16`` (one bf16 rounding) or ``fp32`` (float32's, summed in another order)."""
    return {"rtol": bf16, "atol": bf16} if dtype == BF16 else {"rtol": fp32, "atol": fp32}


def _case(rows: int, capacity: int, kv: int, group: int, d: int, t: int, starts: list[int], seed: int = 0, dtype: torch.dtype = BF16):
    """q, keys and values in ``dtype`` in blocks with ``capacity`` rows (the first ``rows`` in use), a float32 mask (with a boost)
    over the buffer's columns with row r's columns before ``starts[r]`` masked, and the float32 reference attention."""
    gen = torch.Generator().manual_seed(seed)
    columns = -(-(t + 1) // BLOCK) * BLOCK + BLOCK  # a spare block past the current column, as the decoder keeps
    k, v = (torch.randn(capacity, kv, t + 1, d, generator=gen).to(dtype) for _ in range(2))
    q = (torch.randn(rows * kv, group, d, generator=gen) / d**0.5).to(dtype)
    keys, values = (KVBlocks.zeros(capacity, kv, columns, d, k, layout) for layout in ("keys", "values"))
    keys.write(slice(None), 0, k)
    values.write(slice(None), 0, v)
    mask = torch.zeros(capacity, columns)
    mask[:, 100:110] = 0.7  # InstABoost's log m at an instruction's columns: added to the scores like the padding's -inf
    for r, first in enumerate(starts):
        mask[r, :first] = float("-inf")
    want = []
    for r, first in enumerate(starts):
        qr = q.view(rows, kv, group, d)[r].float()
        probs = (qr @ k[r, :, first:].float().transpose(1, 2) + mask[r, first : t + 1]).softmax(-1)
        want.append((probs @ v[r, :, first:].float()).reshape(-1))
    return q, keys, values, mask, torch.stack(want)


@pytest.mark.parametrize("dtype", EITHER)
@pytest.mark.parametrize("group, d", [(3, 64), (7, 128), (1, 64), (8, 128)])
def test_the_kernel_equals_a_float32_softmax_and_torchs_path(group, d, dtype):
    """Rows left-padded by different amounts (one with nothing in the first two blocks), a last block cut at
    the current column, more rows in the buffer than in use: the kernel's output is the float32 attention
    (rounded once to bf16 in bf16), and within bf16 rounding of torch's path (which rounds scores and
    probabilities), float32's of it in float32."""
    rows, kv, t = 4, 2, 150
    starts = [0, 17, 64, 130]
    q, keys, values, mask, want = _case(rows, rows + 3, kv, group, d, t, starts, dtype=dtype)
    got = decode_kernels.attend(q, keys, values, mask, rows, t + 1)
    assert got.dtype == dtype and got.shape == (rows, kv * group * d)
    # one rounding to bf16 of the float32 result: within half a bf16 ulp of it, plus the exponential's 1e-7
    torch.testing.assert_close(got.float(), want.to(dtype).float(), **close(dtype, 8e-3, 1e-5))
    plain = [KVBlocks.zeros(rows + 3, kv, mask.shape[1], d, q) for _ in range(2)]
    for buffer, paired in zip(plain, (keys, values)):
        buffer.write(slice(None), 0, paired.read(0, t + 1))
    bias = step_bias(mask, rows, t, keys.span(t))
    torchs = attend(q, *plain, bias, block_rows(bias, plain[0].block))
    torch.testing.assert_close(got.float(), torchs.float(), **close(dtype, 2e-2, 1e-5))
    if dtype == BF16:  # and the kernel is closer to the float32 truth than torch's bf16 products are
        assert (got.float() - want).abs().mean() < (torchs.float() - want).abs().mean()


@pytest.mark.parametrize("dtype", EITHER)
def test_a_row_with_every_column_masked_gives_zeros_and_columns_past_the_count_are_not_read(dtype):
    """A row with nothing to attend to (a free row) gives zeros, not NaN; columns at and past ``columns`` are never
    read: filling them with NaN changes nothing."""
    rows, kv, group, d, t = 3, 3, 3, 64, 70
    q, keys, values, mask, want = _case(rows, rows, kv, group, d, t, [0, 5, 0], dtype=dtype)
    mask[2] = float("-inf")
    unwritten = torch.full((rows, kv, 2 * BLOCK - t - 1, d), float("nan"), dtype=dtype)
    keys.write(slice(None), t + 1, unwritten)  # columns 71..127, the rest of block 1
    values.write(slice(None), t + 1, unwritten)
    got = decode_kernels.attend(q, keys, values, mask, rows, t + 1).float()
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    assert not got.isnan().any()
    torch.testing.assert_close(got[:2], want[:2].to(dtype).float(), **close(dtype, 8e-3, 1e-5))


@pytest.mark.parametrize("dtype", EITHER)
def test_masked_columns_are_never_read_so_the_buffers_may_start_uninitialised(dtype):
    """Every column a row may not see holds NaN (as an uninitialised buffer may), including masked columns that share a
    value pair or a 16-column chunk with open ones (odd starts, a masked stretch in the middle): the output is the
    same as with the columns written, as if those columns were not there."""
    rows, kv, group, d, t = 4, 3, 3, 64, 150
    starts = [0, 17, 63, 131]
    q, keys, values, mask, _ = _case(rows, rows, kv, group, d, t, starts, dtype=dtype)
    mask[0, 33:40] = float("-inf")  # a masked stretch inside row 0, odd at both ends
    mask[1, 96] = float("-inf")  # a single masked column, the first of its pair
    want = decode_kernels.attend(q, keys, values, mask, rows, t + 1)
    nan = torch.full((1, kv, 1, d), float("nan"), dtype=dtype)
    for r in range(rows):
        for c in range(t + 1):
            if mask[r, c] == float("-inf"):
                keys.write(torch.tensor([r]), c, nan)
                values.write(torch.tensor([r]), c, nan)
    got = decode_kernels.attend(q, keys, values, mask, rows, t + 1)
    assert not got.isnan().any()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", EITHER)
@pytest.mark.parametrize("start, width, index", [(0, 150, None), (37, 21, [5, 1, 3]), (64, 1, [0]), (15, 2, [2, 4])])
def test_put_columns_writes_what_the_layouts_write(start, width, index, dtype):
    """The kernel's copy of a prefilled cache into the layouts sets exactly the slots :meth:`KVBlocks.write` sets (from
    a buffer full of other values: a pair's or chunk's other columns keep theirs), rows through an index or in order."""
    rows, kv, d, columns = 6, 3, 64, 192
    gen = torch.Generator().manual_seed(4)
    n = rows if index is None else len(index)
    k, v = (torch.randn(n, kv, width, d, generator=gen).to(dtype) for _ in range(2))
    before = torch.randn(rows, kv, columns, d, generator=gen).to(dtype)
    pairs = []
    for _ in range(2):
        keys, values = (KVBlocks.zeros(rows, kv, columns, d, k, layout) for layout in ("keys", "values"))
        keys.write(slice(None), 0, before)
        values.write(slice(None), 0, -before)
        pairs.append((keys, values))
    rows_at = None if index is None else torch.tensor(index)
    decode_kernels.put_columns(*pairs[0], k, v, start, rows_at)
    pairs[1][0].write(slice(None) if index is None else rows_at, start, k)
    pairs[1][1].write(slice(None) if index is None else rows_at, start, v)
    assert torch.equal(pairs[0][0].data, pairs[1][0].data)
    assert torch.equal(pairs[0][1].data, pairs[1][1].data)
    assert not torch.equal(pairs[0][0].data, KVBlocks.zeros(rows, kv, columns, d, k, "keys").data)
    with pytest.raises(ValueError, match="outside"):
        decode_kernels.put_columns(*pairs[0], k, v, columns - width + 1, rows_at)


@pytest.mark.parametrize("dtype", EITHER)
def test_the_fast_decoder_uses_the_kernel_and_its_logits_match_torchs_path(monkeypatch, dtype):
    """A decode step through the kernels gives the logits of the same step through torch's ops, to bf16 rounding in
    bf16 and float32's in float32; POSTTRAIN_CPU_KERNELS=0 switches the kernels off."""
    from posttrain.generate.fast import FastDecoder

    model, ids, mask, positions = tiny_llama(dtype)
    calls = []
    real = decode_kernels.attend
    monkeypatch.setattr(decode_kernels, "attend", lambda *a: calls.append(a[-1]) or real(*a))
    logits = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", setting)
        with torch.inference_mode():
            decoder = FastDecoder(model)
            decoder.start(_prefill(model, ids[:, :-1], mask[:, :-1]), mask[:, :-1], max_new_tokens=4)
            logits[setting] = decoder.step(ids[:, -1], positions[:, -1]).float()
    assert calls == [ids.shape[1]] * model.config.num_hidden_layers  # every layer, over every column, with the kernel on only
    torch.testing.assert_close(logits["1"], logits["0"], **close(dtype, 5e-2, 1e-4))
    assert logits["1"].argmax(-1).tolist() == logits["0"].argmax(-1).tolist()


@pytest.mark.parametrize("dtype", EITHER)
def test_greedy_steps_hand_on_the_vocabulary_projection_untransposed(dtype):
    """With every row greedy the logits are the transpose of the (vocabulary, rows) product, not copied, holding the
    same numbers as the (rows, vocabulary) logits a sampled step gets; greedy picks from them equal torch's argmax."""
    from posttrain.generate.fast import FastDecoder
    from posttrain.generate.params import SamplingParams
    from posttrain.generate.sampling import pick

    model, ids, mask, positions = tiny_llama(dtype)
    logits = {}
    for greedy in (True, False):
        with torch.inference_mode():
            decoder = FastDecoder(model)
            decoder.start(_prefill(model, ids[:, :-1], mask[:, :-1]), mask[:, :-1], max_new_tokens=4)
            logits[greedy] = decoder.step(ids[:, -1], positions[:, -1], greedy=greedy)
    assert logits[False].is_contiguous() and not logits[True].is_contiguous() and logits[True].T.is_contiguous()
    torch.testing.assert_close(logits[True], logits[False], **close(dtype, 2e-2, 1e-5))
    rows = len(ids)
    assert torch.equal(pick(logits[True], [SamplingParams()] * rows, [None] * rows).tokens, logits[True].float().argmax(-1))


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    from transformers import DynamicCache

    from posttrain.models.load import cache_kwarg

    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, **{cache_kwarg(model): cache}, use_cache=True)
    return cache


@pytest.mark.parametrize("dtype", EITHER)
def test_admissions_compactions_and_moved_columns_keep_the_kernels_buffers_as_torchs(monkeypatch, dtype):
    """The engine's buffer operations on the kernel's layouts: a decoder through the kernel and one through torch's
    attention, fed the same tokens through steps, an admission of a prompt longer than the current column (every
    kept column moves right), a compaction (a live row moves into a finished one's place) and an admission past the
    rows in use (the buffers grow). Layer 0's keys and values do not depend on attention, so after every operation
    they must agree in the two layouts to the rounding of the kernels' norm and rotary embedding (one bf16 step;
    a column or row out of place would differ by the values' own size); the logits agree to bf16 rounding (float32's
    in float32)."""
    from posttrain.generate.fast import FastDecoder

    model, ids, mask, _ = tiny_llama(dtype)
    gen = torch.Generator().manual_seed(2)
    decoders = {}
    with torch.inference_mode():
        for setting in ("1", "0"):
            monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", setting)
            decoders[setting] = FastDecoder(model)
            decoders[setting].start(_prefill(model, ids[:, :-1], mask[:, :-1]), mask[:, :-1], max_new_tokens=8, capacity=6)
        assert decoders["1"].kernel and not decoders["0"].kernel
        positions = mask[:, :-1].sum(-1)

        def step(positions: torch.Tensor) -> None:
            tokens = torch.randint(3, model.config.vocab_size, positions.shape, generator=gen)
            logits = {s: d.step(tokens, positions).float() for s, d in decoders.items()}
            torch.testing.assert_close(logits["1"], logits["0"], **close(dtype, 5e-2, 1e-4))
            t = decoders["1"].length
            for buffers in ("keys", "values"):
                a, b = (getattr(d, buffers)[0].read(0, t).float() for d in decoders.values())
                torch.testing.assert_close(a, b, **close(dtype, 2e-2, 1e-5), msg=lambda m, buffers=buffers: f"{buffers}: {m}")

        for _ in range(3):
            step(positions)
            positions = positions + 1
        long = torch.randint(3, model.config.vocab_size, (1, 140), generator=gen)  # longer than the current column
        for d in decoders.values():
            d.admit([1], _prefill(model, long, torch.ones_like(long)), torch.ones_like(long), 8, keep=[0, 2])
        positions = torch.tensor([positions[0], 140, positions[2]])
        step(positions)
        positions = positions + 1
        order = {s: d.compact([1, 2]) for s, d in decoders.items()}  # row 2 moves into row 0
        assert order["1"] == order["0"] == [2, 1]
        positions = positions[[2, 1]]
        step(positions)
        positions = positions + 1
        short = torch.randint(3, model.config.vocab_size, (2, 5), generator=gen)
        for d in decoders.values():
            d.admit([2, 3], _prefill(model, short, torch.ones_like(short)), torch.ones_like(short), 8, keep=[0, 1])
        assert decoders["1"].keys[0].rows >= 4
        positions = torch.cat([positions, torch.tensor([5, 5])])
        for _ in range(2):
            step(positions)
            positions = positions + 1


def tiny_llama(dtype: torch.dtype):
    """A tiny random Llama in ``dtype`` with SmolLM2's head size (64) and grouping (3 queries per key/value head), and a
    left-padded batch of prompts spanning two blocks of the cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=384, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    lengths = [100, 70, 9]
    width = max(lengths)
    ids = torch.randint(3, config.vocab_size, (len(lengths), width + 1), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0] * (width - n) + [1] * (n + 1) for n in lengths])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model, ids, mask, positions


def _failing_compiler(monkeypatch, tmp_path) -> None:
    """``$CC`` set to a compiler that fails every command, saying so on stderr."""
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: no such compiler here' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))


def test_no_compiler_or_a_failed_build_leaves_torchs_path(monkeypatch, tmp_path, caplog):
    """A compiler that fails is reported (its output in the log) and the decoder keeps torch's attention; so does
    POSTTRAIN_CPU_KERNELS=0, without building anything."""
    monkeypatch.setattr(decode_kernels, "_loaded", False)
    monkeypatch.setattr(decode_kernels, "_library", None)
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", "0")
    assert decode_kernels.library() is None and not decode_kernels._loaded
    monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", "1")
    _failing_compiler(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING, logger=decode_kernels.__name__):
        assert not decode_kernels.usable(torch.bfloat16, torch.device("cpu"), 3, 64)
    if decode_kernels._target() is not None:  # elsewhere (not x86-64 Linux) the platform check refuses before any build
        assert "no such compiler here" in caplog.text
        assert not list((tmp_path / "kernels").glob("*.so"))
    assert not decode_kernels.usable(torch.float32, torch.device("cpu"), 3, 64)


def test_a_build_started_early_is_the_one_the_decoder_loads(monkeypatch, tmp_path, caplog):
    """build_soon() compiles into the cache in a thread of its own while the caller goes on; library() waits for that
    build and loads its file rather than compiling again. A failed build is reported once, however often it is asked for."""
    if decode_kernels._target() is None:
        pytest.skip("the kernels build only on x86-64 Linux with a C compiler")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setattr(decode_kernels, "_loaded", False)
    monkeypatch.setattr(decode_kernels, "_library", None)
    monkeypatch.setattr(decode_kernels, "_building", None)
    compiles = []
    real = decode_kernels._compile
    monkeypatch.setattr(decode_kernels, "_compile", lambda *a: compiles.append(a) or real(*a))
    with caplog.at_level(logging.INFO, logger=decode_kernels.__name__):
        decode_kernels.build_soon()
        thread = decode_kernels._building
        assert thread is not None and thread.name == "posttrain-decode-kernels"
        decode_kernels.build_soon()  # already started: no second thread
        assert decode_kernels._building is thread
        assert decode_kernels.library() is not None
    assert not thread.is_alive() and len(compiles) == 1 and caplog.text.count("built the decode kernels") == 1
    assert len(list((tmp_path / "fresh" / "kernels").glob("*.so"))) == 1
    assert not list((tmp_path / "fresh" / "kernels").glob("*/*.o"))  # the objects went with the build's directory

    _failing_compiler(monkeypatch, tmp_path)
    monkeypatch.setattr(decode_kernels, "_loaded", False)
    monkeypatch.setattr(decode_kernels, "_building", None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=decode_kernels.__name__):
        decode_kernels.build_soon()
        assert decode_kernels.library() is None
        assert not decode_kernels.usable(FP32, torch.device("cpu"), 3, 64)
    assert caplog.text.count("no such compiler here") == 3  # the three sources' complaints, in one warning
    assert caplog.text.count("building the decode kernels failed") == 1


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["plain", "keys", "values"])
def test_every_layout_holds_the_columns_written_to_it(layout, dtype):
    """Writes at odd and even columns, within and across blocks, to every row or some; rows grown, moved and
    buffers resized: what :meth:`KVBlocks.read` gives back is what was written, in every layout and dtype (bf16's
    kernel layouts keep pairs of elements together, float32's single ones; runs on any CPU)."""
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(5, 2, 150, 8, generator=gen).to(dtype)
    b = KVBlocks.zeros(5, 2, 200, 8, src, layout)
    for lo, hi in [(3, 64), (64, 65), (65, 67), (67, 153)]:  # column c of src goes to column c + 3
        b.write(slice(None), lo, src[:, :, lo - 3 : hi - 3])
    assert torch.equal(b.read(3, 153), src)
    other = torch.randn(2, 2, 5, 8, generator=gen).to(dtype)
    b.write(torch.tensor([1, 3]), 77, other)  # some rows, starting at an odd column
    got = b.read(3, 153)
    assert torch.equal(got[[1, 3], :, 74:79], other) and torch.equal(got[[0, 2, 4]], src[[0, 2, 4]])
    b.grow_rows(2)
    b.move_rows(torch.tensor([5, 6]), torch.tensor([0, 2]))
    assert b.rows == 7 and torch.equal(b.read(3, 153)[5:], src[[0, 2]])
    wider = b.resized(300)
    assert (wider.layout, wider.rows, wider.read(0, 0).shape) == (layout, 7, (7, 2, 0, 8))
    wider.write(slice(None), 0, b.read(0, 153))  # whole blocks in one copy, then a part of one
    wider.write(torch.tensor([6, 1]), 64, src[[0, 4], :, :128])
    got = wider.read(0, 192)
    assert torch.equal(got[:, :, :64], b.read(0, 64)) and torch.equal(got[[0, 2, 3, 4, 5], :, 64:153], b.read(64, 153)[[0, 2, 3, 4, 5]])
    assert torch.equal(got[[6, 1], :, 64:192], src[[0, 4], :, :128])


@pytest.mark.parametrize("dtype", EITHER)
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_the_norm_and_silu_kernels_equal_torchs_float32_ops_rounded_once(rows, dtype):
    """RMS norm down the columns of (features, rows) and silu(gate) * up, against the same float32 operations in torch
    (rounded once to bf16 in bf16): within one bf16 rounding, or float32's (the kernels sum and exponentiate in another
    order). Odd row counts exercise the tails."""
    from posttrain.generate.fast import _normed

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(576, rows, generator=gen) * 3).to(dtype)
    want = (x.float() * x.float().pow(2).mean(0, keepdim=True).add(1e-5).rsqrt()).to(dtype)
    got = decode_kernels.rms_norm(x, 1e-5)
    assert got.dtype == dtype
    tol = {"rtol": 8e-3 if dtype == BF16 else 2e-6, "atol": 1e-5}
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(got.float(), _normed(x, 1e-5).float(), **tol)  # the decoder's own norm
    gate_up = (torch.randn(2 * 96 + 2, rows, generator=gen) * 4).to(dtype)  # 97 x rows values: a tail past whole vectors
    gate, up = gate_up.float().chunk(2)
    want = (torch.nn.functional.silu(gate) * up).to(dtype)
    torch.testing.assert_close(decode_kernels.silu_mul(gate_up).float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", EITHER)
@pytest.mark.parametrize("rows, t", [(1, 0), (6, 77), (33, 150)])
def test_rotary_write_rotates_q_and_k_and_writes_k_and_v_at_the_column(rows, t, dtype):
    """q and k rotated as transformers rotates them (x cos + rotate_half(x) sin), in float32 rounded once; k and v
    land in column t of their buffers (even and odd columns, a chunk and block boundary) and nowhere else; q comes
    back as (rows x kv heads, group, head dim). One row, an odd count and more than 32 rows (the gathers' cases)."""
    from transformers.models.llama.modeling_llama import rotate_half

    heads, kv, d = 6, 2, 64
    gen = torch.Generator().manual_seed(t)
    qkv = torch.randn((heads + 2 * kv) * d, rows, generator=gen).to(dtype)
    angles = torch.rand(rows, d // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (rows, head dim), halves repeated
    keys, values = (KVBlocks.zeros(rows, kv, 256, d, qkv, layout) for layout in ("keys", "values"))
    before_k, before_v = keys.read(0, 256), values.read(0, 256)
    q = decode_kernels.rotary_write(qkv, cos, sin, heads, keys, values, t)
    x = qkv.float().view(heads + 2 * kv, d, rows).permute(2, 0, 1)  # (rows, units, head dim)
    rotated = x[:, : heads + kv] * cos[:, None] + rotate_half(x[:, : heads + kv]) * sin[:, None]
    assert q.shape == (rows * kv, heads // kv, d)
    tol = {"rtol": 8e-3, "atol": 1e-4} if dtype == BF16 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(q.float().view(rows, heads, d), rotated[:, :heads].to(dtype).float(), **tol)
    after_k, after_v = keys.read(0, 256), values.read(0, 256)
    torch.testing.assert_close(after_k[:, :, t].float(), rotated[:, heads:].to(dtype).float(), **tol)
    assert torch.equal(after_v[:, :, t], x[:, heads + kv :].to(dtype))
    others = [c for c in range(256) if c != t]
    assert torch.equal(after_k[:, :, others], before_k[:, :, others]) and torch.equal(after_v[:, :, others], before_v[:, :, others])


@pytest.mark.parametrize("dtype", EITHER[1:])
def test_a_damaged_build_in_the_cache_is_reported_and_torchs_ops_kept(monkeypatch, tmp_path, caplog, dtype):
    """A file in the kernels' cache that does not load (truncated, another machine's) gives a warning naming it
    and torch's ops, not a crash."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(decode_kernels, "_loaded", False)
    monkeypatch.setattr(decode_kernels, "_library", None)
    path, _ = decode_kernels._target()  # where this machine's build would go: write a broken one there
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")
    with caplog.at_level(logging.WARNING, logger=decode_kernels.__name__):
        assert not decode_kernels.usable(dtype, torch.device("cpu"), 3, 64)
    assert path.name in caplog.text


def test_a_cpu_without_avx512_bf16_gets_the_float32_kernels_alone(avx2_kernels):
    """Built as for an AVX2 CPU without AVX512-BF16 (``-march=haswell`` here, in a cache of its own): the library holds
    the float32 kernels, as vector code in AVX2 registers, and not the bf16 ones; float32 attention runs through it and
    equals the float32 softmax, and bf16 keeps torch's ops."""
    assert decode_kernels.usable(FP32, torch.device("cpu"), 3, 64)
    assert not decode_kernels.usable(BF16, torch.device("cpu"), 3, 64)
    assert decode_kernels.library().posttrain_attention_available() == 0
    rows, kv, group, d, t = 4, 2, 3, 64, 150
    q, keys, values, mask, want = _case(rows, rows, kv, group, d, t, [0, 17, 64, 130], dtype=FP32)
    torch.testing.assert_close(decode_kernels.attend(q, keys, values, mask, rows, t + 1), want, rtol=1e-5, atol=1e-5)
    x = torch.randn(576, 5)
    torch.testing.assert_close(decode_kernels.rms_norm(x, 1e-5), x * x.pow(2).mean(0, keepdim=True).add(1e-5).rsqrt(), rtol=2e-6, atol=1e-6)
    for dtype in (FP32, BF16):  # sampling's kernels take bf16 logits on any build: they convert them in vector code
        logits = _tied_logits(dtype)
        assert torch.equal(decode_kernels.argmax(logits), logits.float().argmax(-1))
        assert torch.equal(decode_kernels.argmax(_transposed(logits)), logits.float().argmax(-1))
        drawn = [0, 1, 2, 4, 5, 7, 8, 8]  # not row 3 (all -inf) or 6 (+inf): those go to torch
        u = torch.rand(len(drawn), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        assert torch.equal(decode_kernels.sample(logits, drawn, [0.7] * len(drawn), u), _torch_draw(logits[drawn], [0.7] * len(drawn), u))


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_folding_a_chunk_of_rows_at_a_time_gives_the_whole_products_numbers(dtype, monkeypatch):
    """The decoder's folded weights (norm weight times the columns, attention's scaling times q's rows), computed a few
    rows at a time in place of the joined weight, are bit for bit the float32 product of the whole, rounded once;
    row counts that are and are not a multiple of the chunk."""
    from posttrain.generate import fast

    monkeypatch.setattr(fast, "FOLD_ROWS", 7)
    gen = torch.Generator().manual_seed(0)
    weights = tuple(torch.randn(n, 24, generator=gen).to(dtype) for n in (12, 4, 5))
    columns, rows = torch.rand(24, generator=gen) + 0.5, torch.rand(21, generator=gen) * 2
    before = [w.clone() for w in weights]
    want = (torch.cat(weights).float() * columns * rows[:, None]).to(dtype)
    got = fast._folded(weights, columns, rows)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(fast._folded(weights[:2], columns), (torch.cat(weights[:2]).float() * columns).to(dtype))
    assert all(torch.equal(w, b) for w, b in zip(weights, before))  # the model's own weights untouched


def _tied_logits(dtype: torch.dtype) -> torch.Tensor:
    """Rows of 1,000 logits (not a multiple of 16: a tail past the vectors) whose maxima tie in awkward places: within
    one lane, across lanes, in the tail, at the first and last index, every value -inf, and -0.0 beside +0.0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1000, generator=g).to(dtype)
    x[0, [5, 21, 990]] = 7.0  # one lane (5, 21), and the tail
    x[1, [999, 3]] = 7.0  # the last index and an earlier one in another lane
    x[2, 0] = 7.0
    x[3] = float("-inf")
    x[4] = 0.0
    x[4, :500] = -1.0
    x[4, 600] = -0.0  # equal to the +0.0 at 500: the first wins
    x[5, 995] = 9.0  # the largest value alone in the tail
    x[6, [17, 33]] = float("inf")
    x[7] = float("-inf")
    x[7, 998] = -5.0
    return x


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, n) as the transpose of a contiguous (n, rows) tensor: the fast decoder's logits."""
    out = x.T.contiguous().T
    assert not out.is_contiguous()
    torch.testing.assert_close(out, x, rtol=0, atol=0, equal_nan=True)
    return out


@pytest.mark.parametrize("dtype", EITHER)
@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("shape", [(64, 49152), (3, 7), (2, 16), (150, 999), (17, 2)])
def test_the_argmax_kernel_gives_torchs_indices(shape, layout, dtype):
    """Row-major logits, and the transpose of (vocabulary, rows) read in place (the vocabulary split among threads,
    up to 128 rows a pass: 150 rows take two)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = _transposed(x) if layout == "columns" else x
    assert torch.equal(decode_kernels.argmax(x), x.float().argmax(-1))
    tied = _tied_logits(dtype)
    tied = _transposed(tied) if layout == "columns" else tied
    picked = decode_kernels.argmax(tied)
    assert torch.equal(picked, tied.float().argmax(-1))
    assert picked[:8].tolist() == [5, 3, 0, 0, 500, 995, 17, 998]  # what torch's argmax documents: the first maximum


@pytest.mark.parametrize("dtype", EITHER)
def test_the_argmax_kernel_of_one_row(dtype):
    x = torch.randn(1, 49152, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert torch.equal(decode_kernels.argmax(x), x.float().argmax(-1))
    assert torch.equal(decode_kernels.argmax(x.T.contiguous().T), x.float().argmax(-1))  # (n, 1) transposed: contiguous


@pytest.mark.parametrize("dtype", EITHER)
def test_the_argmax_kernel_leaves_a_nan_to_torch(dtype):
    x = torch.randn(4, 100).to(dtype)
    x[2, 40] = float("nan")
    assert decode_kernels.argmax(x) is None
    assert decode_kernels.argmax(_transposed(x)) is None
    assert torch.equal(decode_kernels.argmax(x[:, 50:]), x[:, 50:].float().argmax(-1))  # a view past the NaN


@pytest.mark.parametrize("dtype", EITHER)
def test_greedy_picks_through_the_kernel_equal_torchs(monkeypatch, dtype):
    """``pick`` takes greedy rows through the kernel, and the same tokens with log-probs, sampled rows or the kernels off."""
    from posttrain.generate.params import SamplingParams
    from posttrain.generate.sampling import generator, pick

    logits = _transposed(torch.randn(6, 3000, generator=torch.Generator().manual_seed(2)).to(dtype))  # as the decoder gives them
    greedy = [SamplingParams(temperature=0)] * 6
    want = logits.float().argmax(-1)
    assert torch.equal(pick(logits, greedy, [None] * 6).tokens, want)
    scored = pick(logits, [SamplingParams(temperature=0, logprobs=True)] * 6, [None] * 6)
    assert torch.equal(scored.tokens, want)
    torch.testing.assert_close(scored.logprobs, logits.float().log_softmax(-1).gather(-1, want[:, None])[:, 0])
    mixed = [SamplingParams(temperature=0)] * 3 + [SamplingParams(temperature=1.0, seed=3)] * 3
    gens = [None] * 3 + [generator(3, torch.device("cpu")) for _ in range(3)]
    got = pick(logits, mixed, gens).tokens
    assert torch.equal(got[:3], want[:3])
    monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", "0")
    assert decode_kernels.argmax(logits) is None
    gens = [None] * 3 + [generator(3, torch.device("cpu")) for _ in range(3)]
    assert torch.equal(pick(logits, mixed, gens).tokens, got)  # the same draws with torch's argmax


def _torch_draw(logits: torch.Tensor, temperatures: list[float], u: torch.Tensor) -> torch.Tensor:
    """sampling.choose's inverse-CDF draw without top-k or top-p, from the given uniform numbers."""
    scores = logits.float() / torch.tensor(temperatures)[:, None]
    cdf = scores.softmax(-1).double().cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=logits.shape[-1] - 1)


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_the_sampler_draws_torchs_tokens_from_the_same_numbers(dtype):
    """For the same uniform numbers the kernel draws the tokens torch's softmax, float64 cumulative sum and search
    draw (rows picked through an index, each at its own temperature, a vocabulary that is not a multiple of 16)."""
    if decode_kernels.library() is None:
        pytest.skip("no C compiler or not x86-64 Linux")
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(40, 1003, generator=gen) * 3).to(dtype)
    rows = [3, 0, 39, 17, 17, 8]
    temperatures = [0.7, 1.0, 1.3, 0.2, 0.2, 2.5]
    for _ in range(20):
        u = torch.rand(len(rows), generator=gen, dtype=torch.float64)
        got = decode_kernels.sample(logits, rows, temperatures, u)
        assert torch.equal(got, _torch_draw(logits[rows], temperatures, u))


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_the_sampler_never_draws_a_token_of_weight_zero_and_leaves_nan_to_torch(dtype):
    if decode_kernels.library() is None:
        pytest.skip("no C compiler or not x86-64 Linux")
    logits = torch.full((3, 50), float("-inf"), dtype=dtype)
    logits[:, [7, 20, 41]] = torch.tensor([1.0, 2.0, 0.5], dtype=dtype)
    for u, want in ((0.0, 7), (1 - 1e-16, 41), (0.5, 20)):
        got = decode_kernels.sample(logits, [0, 1, 2], [1.0, 1.0, 1.0], torch.full((3,), u, dtype=torch.float64))
        assert got.tolist() == [want] * 3
    logits[1, 30] = float("nan")
    assert decode_kernels.sample(logits, [0, 1], [1.0, 1.0], torch.zeros(2, dtype=torch.float64)) is None
    assert decode_kernels.sample(logits, [0, 2], [1.0, 1.0], torch.zeros(2, dtype=torch.float64)) is not None  # NaN row not asked
    masked = torch.full((1, 50), float("-inf"), dtype=dtype)
    assert decode_kernels.sample(masked, [0], [1.0], torch.zeros(1, dtype=torch.float64)) is None
    masked[0, 3] = float("inf")
    assert decode_kernels.sample(masked, [0], [1.0], torch.zeros(1, dtype=torch.float64)) is None
    with pytest.raises(ValueError, match="positive temperature"):
        decode_kernels.sample(logits, [0], [0.0], torch.zeros(1, dtype=torch.float64))


def test_the_samplers_draws_follow_the_softmax():
    """20,000 draws over 5 tokens at temperature 0.5: each token's share within 4 standard errors of its probability."""
    if decode_kernels.library() is None:
        pytest.skip("no C compiler or not x86-64 Linux")
    logits = torch.tensor([[0.0, 0.5, -1.0, 1.0, 0.2]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = decode_kernels.sample(logits, list(range(20000)), [0.5] * 20000, u)
    share = torch.bincount(got, minlength=5).double() / 20000
    p = (logits[0] / 0.5).softmax(-1).double()
    assert ((share - p).abs() < 4 * (p * (1 - p) / 20000).sqrt()).all(), (share, p)


@pytest.mark.parametrize("dtype", EITHER)
def test_pick_draws_through_the_sampler_as_through_torch(monkeypatch, dtype):
    """Sampled rows (temperature only) through the kernel and with the kernels off: the same tokens from the same seeds,
    and each generator left where torch's path leaves it; rows with top-p keep torch's path."""
    from posttrain.generate.params import SamplingParams
    from posttrain.generate.sampling import generator, pick

    logits = (torch.randn(8, 3000, generator=torch.Generator().manual_seed(8)) * 2).to(dtype)
    params = [SamplingParams(temperature=0.9, seed=s) for s in range(6)] + [SamplingParams()] * 2
    runs, called, real = {}, [], decode_kernels.sample
    monkeypatch.setattr(decode_kernels, "sample", lambda *a: called.append(1) or real(*a))
    for setting in ("1", "0"):
        monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", setting)
        gens = [generator(s, torch.device("cpu")) for s in range(6)] + [None, None]
        called.clear()
        tokens = [pick(logits, params, gens).tokens for _ in range(3)]
        runs[setting] = (torch.stack(tokens), [torch.rand(1, generator=g).item() for g in gens[:6]], len(called))
    assert torch.equal(runs["1"][0], runs["0"][0])
    assert runs["1"][1] == runs["0"][1]  # the generators stand where torch's path leaves them
    assert runs["1"][2] == 3 and runs["0"][2] == 0  # through the kernel at every step with the kernels on, never off
    nucleus = [SamplingParams(temperature=0.9, top_p=0.9, seed=1)]
    monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", "1")
    called.clear()
    pick(logits[:1], nucleus, [generator(1, torch.device("cpu"))])
    assert called == []


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_the_logprob_kernel_gives_the_log_softmax_at_each_token(dtype):
    if decode_kernels.library() is None:
        pytest.skip("no C compiler or not x86-64 Linux")
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(12, 1003, generator=gen) * 4).to(dtype)
    logits[5, 100:] = float("-inf")  # masked tokens count for nothing
    rows, tokens = [0, 5, 11, 5, 7], torch.tensor([3, 99, 1002, 0, 500])
    want = logits[rows].float().log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(decode_kernels.logprobs(logits, rows, tokens), want, rtol=1e-5, atol=1e-5)
    logits[7, 2] = float("nan")
    assert decode_kernels.logprobs(logits, rows, tokens) is None
    logits[7, 2] = float("inf")
    assert decode_kernels.logprobs(logits, rows, tokens) is None
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode_kernels.logprobs(logits, [0], torch.tensor([1003]))


@pytest.mark.parametrize("dtype", EITHER)
def test_pick_with_logprobs_through_the_kernels_as_through_torch(monkeypatch, dtype):
    """Sampled and greedy rows wanting log-probs: the same tokens and log-probs (to float32 rounding) with the kernels on
    and off; a row wanting top log-probs sends the step to torch's ops."""
    from posttrain.generate.params import SamplingParams
    from posttrain.generate.sampling import generator, pick

    logits = (torch.randn(6, 3000, generator=torch.Generator().manual_seed(10)) * 2).to(dtype)
    params = [SamplingParams(temperature=0.8, seed=s, logprobs=True) for s in range(4)] + [SamplingParams(logprobs=True)] * 2
    picked = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", setting)
        picked[setting] = pick(logits, params, [generator(s, torch.device("cpu")) for s in range(4)] + [None, None])
    assert torch.equal(picked["1"].tokens, picked["0"].tokens)
    torch.testing.assert_close(picked["1"].logprobs, picked["0"].logprobs, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", "1")
    called, real = [], decode_kernels.logprobs
    monkeypatch.setattr(decode_kernels, "logprobs", lambda *a: called.append(1) or real(*a))
    top = pick(logits, [SamplingParams(logprobs=True, top_logprobs=3)] * 6, [None] * 6)
    assert called == [] and top.top is not None and top.top[0].shape == (6, 3)
    pick(logits, params, [generator(s, torch.device("cpu")) for s in range(4)] + [None, None])
    assert called == [1]
