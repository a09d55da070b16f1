"""The projections' kernel (generate/decode_matmul.c, through ``decode_kernels.matmul``): W @ x in bf16 and float32
against a float64 product and torch's, over tile and vector tails, both layouts x arrives in and a slice of a wider
output; each row's result the same, bit for bit, whatever other rows share the call; refused where it does not
apply; the float32 half in an AVX2 build; and the fast decoder's steps going through it. bf16's tests are skipped on
CPUs without AVX512-BF16, all of them where there is no C compiler."""

from __future__ import annotations

import pytest
import torch

from posttrain.generate import decode_kernels

BF16, FP32 = torch.bfloat16, torch.float32
needs_bf16 = pytest.mark.skipif(not decode_kernels.usable(BF16, torch.device("cpu"), 3, 64), reason="no AVX512-BF16 or no C compiler here")
needs_fp32 = pytest.mark.skipif(not decode_kernels.usable(FP32, torch.device("cpu"), 3, 64), reason="not x86-64 or no C compiler")
EITHER = [pytest.param(BF16, marks=needs_bf16, id="bf16"), pytest.param(FP32, marks=needs_fp32, id="fp32")]


def _operands(n: int, k: int, rows: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen).to(dtype), torch.randn(k, rows, generator=gen).to(dtype)


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x`` (k, rows) as the decoder hands it over: features down the columns (a norm's output), the transpose of a
    (rows, k) tensor (attention's output), and a strided view of neither kind."""
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
    wide[:, ::2] = x
    return {"features down": x.contiguous(), "rows of features": x.T.contiguous().T, "strided": wide[:, ::2]}


def _reference(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.double() @ x.double()


@pytest.mark.parametrize("dtype", EITHER)
@pytest.mark.parametrize(
    "n, k, rows",
    [(960, 576, 64), (7, 10, 1), (13, 64, 17), (5, 576, 100), (50, 1536, 130), (6, 2, 16), (49, 128, 15), (12, 96, 65)],
)
def test_the_product_equals_float64s_to_the_output_rounding_in_every_layout(n, k, rows, dtype):
    """Outputs not a whole number of tiles (6 a tile), rows not a whole number of vectors, 1 to 130 rows (3 groups
    of 64), k from 2 to 1536: within one rounding of the output (bf16) or float32's sums in another order of the
    float64 product, in each layout; and, in bf16, torch's bf16 product within one bf16 step of it."""
    weight, x = _operands(n, k, rows, dtype)
    want = _reference(weight, x)
    tol = {"rtol": 8e-3, "atol": 8e-3 * k**0.5} if dtype == BF16 else {"rtol": 1e-5, "atol": 1e-5 * k**0.5}
    results = []
    for name, view in _layouts(x).items():
        got = decode_kernels.matmul(weight, view)
        assert got is not None and got.shape == (n, rows) and got.dtype == dtype and got.is_contiguous(), name
        torch.testing.assert_close(got.double(), want, **tol, msg=name)
        results.append(got)
    assert all(torch.equal(results[0], r) for r in results[1:])  # the packing alone differs between layouts
    if dtype == BF16:
        torch.testing.assert_close(results[0].float(), torch.mm(weight, x).float(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("dtype", EITHER)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype):
    """Rows 0-129 multiplied together, in groups of other sizes (1, 3, 16, 17, 64) and one at a time give the same
    bits for every row: each output's sum runs over k in one order, whatever the row count (batched decoding equals
    one-at-a-time decoding in the projections)."""
    weight, x = _operands(100, 576, 130, dtype, seed=1)
    together = decode_kernels.matmul(weight, x)
    for size in (1, 3, 16, 17, 64):
        for start in range(0, 130, size):
            part = decode_kernels.matmul(weight, x[:, start : start + size])
            assert torch.equal(part, together[:, start : start + size]), (size, start)


@pytest.mark.parametrize("dtype", EITHER)
def test_into_a_slice_of_a_wider_output(dtype):
    """``out`` a block of rows of a bigger buffer, as the vocabulary projection writes its slices: written there and
    nowhere else, and the result the same as a fresh tensor's."""
    weight, x = _operands(40, 64, 9, dtype)
    buffer = torch.full((100, 9), float("nan"), dtype=dtype)
    into = buffer[30:70]
    assert decode_kernels.matmul(weight, x, out=into) is into
    assert torch.equal(into, decode_kernels.matmul(weight, x))
    assert buffer[:30].isnan().all() and buffer[70:].isnan().all()
    with pytest.raises(ValueError, match="out must be"):
        decode_kernels.matmul(weight, x, out=torch.empty(40, 8, dtype=dtype))


@needs_fp32
def test_refused_where_it_does_not_apply(monkeypatch):
    """None, so the caller multiplies with torch: a weight that is not contiguous, mixed dtypes, float16, an odd k in
    bf16 (pairs of features), and the kernels turned off."""
    weight, x = _operands(8, 10, 4, FP32)
    assert decode_kernels.matmul(weight.T.contiguous().T, x) is None
    assert decode_kernels.matmul(weight, x.to(BF16)) is None
    assert decode_kernels.matmul(weight.half(), x.half()) is None
    assert decode_kernels.matmul(weight[:, :9].contiguous(), x[:9]) is not None  # an odd k is fine in float32
    if decode_kernels.usable(BF16, torch.device("cpu"), 3, 64):
        assert decode_kernels.matmul(weight[:, :9].contiguous().to(BF16), x[:9].to(BF16)) is None
    monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", "0")
    assert decode_kernels.matmul(weight, x) is None


def test_an_avx2_build_multiplies_in_float32(avx2_kernels):
    """Built as for an AVX2 CPU (``-march=haswell``, 8 lanes and 3 outputs a tile): float32 products equal float64's
    to float32's rounding and stay row-independent; bf16 is refused (no AVX512-BF16)."""
    weight, x = _operands(13, 576, 37, FP32)
    for view in _layouts(x).values():
        got = decode_kernels.matmul(weight, view)
        torch.testing.assert_close(got.double(), _reference(weight, x), rtol=1e-5, atol=1e-5 * 24)
    assert torch.equal(decode_kernels.matmul(weight, x[:, 5:6]), got[:, 5:6])
    assert decode_kernels.matmul(weight.to(BF16), x.to(BF16)) is None


@pytest.mark.parametrize("dtype", EITHER)
def test_the_fast_decoders_projections_go_through_it(dtype, monkeypatch):
    """Every projection of a decode step, the vocabulary's included, is the kernel's (counted), and the step's logits
    equal those of the same step with torch's products to the dtype's rounding."""
    from transformers import DynamicCache

    from posttrain.generate import fast
    from posttrain.models.load import cache_kwarg
    from posttrain.models.zoo import build_tiny

    model, _ = build_tiny("llama")
    model = model.to(dtype).eval()
    calls = []
    real = decode_kernels.matmul
    monkeypatch.setattr(decode_kernels, "matmul", lambda w, x, out=None: calls.append(tuple(w.shape)) or real(w, x, out))
    cache_rows, length = 3, 5
    ids = torch.randint(0, model.config.vocab_size, (cache_rows, length), generator=torch.Generator().manual_seed(0))
    logits = {}
    for mode in ("kernel", "torch"):
        if mode == "torch":
            monkeypatch.setattr(decode_kernels, "matmul", lambda w, x, out=None: None)
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True)
            decoder = fast.FastDecoder(model)
            decoder.start(cache, torch.ones(cache_rows, length, dtype=torch.long), max_new_tokens=4)
            logits[mode] = decoder.step(ids[:, -1], torch.full((cache_rows,), length)).float()
    layers = model.config.num_hidden_layers
    assert len(calls) >= 4 * layers + 1 and calls[-1][0] == model.config.vocab_size
    tol = 3e-2 if dtype == BF16 else 1e-4
    torch.testing.assert_close(logits["kernel"], logits["torch"], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", EITHER)
def test_a_rows_decode_steps_are_the_same_batched_or_alone(dtype):
    """With the kernels (projections, norms, rotary, attention; head size 64), an unpadded row's logits over several
    decode steps are the same bit for bit whether it is stepped beside four other rows (two of them left-padded) or
    alone from the same cache: nothing in a step mixes rows or picks its order by their number. A padded row alone
    loses its padding columns, so its keys sit at other places in the buffers' groups of columns and attention sums
    them in another grouping: equal to float rounding, not bit for bit. With torch's products (``use_matmul`` off)
    float32 rows differ (MKL blocks by shape), which is what the projections' kernel fixes."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from posttrain.generate import fast
    from posttrain.models.load import cache_kwarg

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype).eval()
    rows, length = 5, 20
    ids = torch.randint(0, 300, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, :7] = 0  # left padding, as a batch of prompts of several lengths has
    mask[3, :12] = 0

    def steps(which: list[int]) -> list[torch.Tensor]:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids, attention_mask=mask, position_ids=positions, **{cache_kwarg(model): cache}, use_cache=True)
            cache.batch_select_indices(torch.tensor(which))
            decoder = fast.FastDecoder(model)
            decoder.start(cache, mask[which], max_new_tokens=4)
            assert decoder.kernel
            token, position, out = ids[which, -1], mask[which].sum(-1), []
            for _ in range(3):
                logits = decoder.step(token, position)
                out.append(logits.clone())
                token, position = logits.float().argmax(-1), position + 1
            return out

    together = steps(list(range(rows)))
    for r in range(rows):
        alone = steps([r])
        for a, t in zip(alone, together):
            if r in (1, 3):  # the padded rows
                torch.testing.assert_close(a[0], t[r], **({"rtol": 2e-2, "atol": 2e-2} if dtype == BF16 else {}))
            else:
                assert torch.equal(a[0], t[r]), r
    if dtype == FP32:
        decode_kernels.use_matmul = False
        try:
            together, alone = steps(list(range(rows))), steps([0])
        finally:
            decode_kernels.use_matmul = True
        assert not all(torch.equal(a[0], t[0]) for a, t in zip(alone, together))
