"""The attention references are the spec; the Triton kernels in kernels.py must match them.

Kernels and references run on the same inputs, rounded to the dtype under test; the reference then
works in fp32 on those rounded values, so the only differences left are the kernels' own.
"""

import itertools
import math

import pytest
import torch
from hypothesis import given, strategies as st

import attention
from attention import attention_ref, decode_ref, merge_attention, paged_decode_ref
from conftest import ATOL, DEVICE, dtypes, gqa_heads, head_dims, rand, seq_lens
import kernels
from kvcache import page_scores_ref, select_pages

seeds = st.integers(0, 2**16)


def f32(*tensors):
    return [t.float() for t in tensors]


def assert_attention_close(o, lse, o_ref, lse_ref, dtype):
    """o and lse match the fp32 reference; -inf lse (no visible key) must be -inf on both sides.
    rtol as well as atol on o: rounding the output to fp16/bf16 costs more where |o| > 1."""
    assert not o.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(o.float(), o_ref.float(), atol=ATOL[dtype], rtol=ATOL[dtype])
    torch.testing.assert_close(lse, lse_ref, atol=ATOL[dtype], rtol=0)  # infinities must match exactly


# ------------------------------------------------------------------------------------------------
# The reference itself

def test_reference_matches_hand_loop():
    """attention_ref against the textbook formula, one query head and one key at a time."""
    B, Hq, Hkv, Tq, Tk, D, q_offset = 1, 4, 2, 3, 5, 8, 1
    q, k, v = rand(B, Hq, Tq, D, seed=1), rand(B, Hkv, Tk, D, seed=2), rand(B, Hkv, Tk, D, seed=3)
    o, lse = attention_ref(q, k, v, causal=True, q_offset=q_offset)
    for h, i in itertools.product(range(Hq), range(Tq)):
        hk = h // (Hq // Hkv)
        visible = [j for j in range(Tk) if j <= q_offset + i]
        s = torch.stack([q[0, h, i] @ k[0, hk, j] / math.sqrt(D) for j in visible])
        p = torch.exp(s) / torch.exp(s).sum()
        o_loop = sum(p[n] * v[0, hk, j] for n, j in enumerate(visible))
        torch.testing.assert_close(o[0, h, i], o_loop, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse[0, h, i], torch.log(torch.exp(s).sum()), atol=1e-5, rtol=0)


def test_reference_is_causal():
    """Changing keys and values after a query's position leaves that query's output unchanged."""
    B, H, T, D = 1, 2, 9, 16
    q, k, v = rand(B, H, T, D, seed=1), rand(B, H, T, D, seed=2), rand(B, H, T, D, seed=3)
    o, lse = attention_ref(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] += 1.0
    v2[:, :, 5:] -= 1.0
    o2, lse2 = attention_ref(q, k2, v2)
    torch.testing.assert_close(o2[:, :, :5], o[:, :, :5])
    torch.testing.assert_close(lse2[:, :, :5], lse[:, :, :5])
    assert not torch.allclose(o2[:, :, 5:], o[:, :, 5:])


def test_reference_rows_without_keys_are_zero():
    """A query placed before every key sees nothing: o = 0, lse = -inf, and no NaN."""
    q, k, v = rand(1, 2, 3, 16, seed=1), rand(1, 2, 4, 16, seed=2), rand(1, 2, 4, 16, seed=3)
    o, lse = attention_ref(q, k, v, q_offset=-2)  # positions -2, -1, 0: only the last sees key 0
    assert torch.equal(o[:, :, :2], torch.zeros_like(o[:, :, :2]))
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2]).all()
    torch.testing.assert_close(o[:, :, 2], v[:, :, 0])


# ------------------------------------------------------------------------------------------------
# Flash prefill

@given(Tk=seq_lens(), Tq_frac=st.floats(0, 1), offset=st.sampled_from(["default", "shifted", "before"]),
       heads=gqa_heads(), D=head_dims(), dtype=dtypes(), causal=st.booleans(), batch=st.integers(1, 2), seed=seeds)
def test_flash_prefill_matches_reference(Tk, Tq_frac, offset, heads, D, dtype, causal, batch, seed):
    """Tq <= Tk queries (Tq = 1 included), q_offset default / explicit / placing early rows before
    every key; q in the model's (B, T, H, D) layout transposed, k and v slices of a longer cache."""
    Hq, Hkv = heads
    Tq = max(1, round(Tq_frac * Tk))
    q_offset = {"default": None, "shifted": (Tk - Tq) // 2, "before": -min(Tq, 3)}[offset]
    q = rand(batch, Tq, Hq, D, dtype=dtype, seed=seed).transpose(1, 2)
    k_cache = rand(batch, Hkv, Tk + 7, D, dtype=dtype, seed=seed + 1)
    v_cache = rand(batch, Hkv, Tk + 7, D, dtype=dtype, seed=seed + 2)
    k, v = k_cache[:, :, :Tk], v_cache[:, :, :Tk]  # non-contiguous, as generate.py passes them
    o, lse = kernels.flash_prefill(q, k, v, causal=causal, q_offset=q_offset)
    o_ref, lse_ref = attention_ref(*f32(q, k, v), causal=causal, q_offset=q_offset)
    assert o.dtype == dtype and o.shape == q.shape and lse.dtype == torch.float32
    assert_attention_close(o, lse, o_ref, lse_ref, dtype)


@given(Tk=seq_lens(), Tq=st.integers(1, 40), heads=gqa_heads(), D=head_dims(), dtype=dtypes(),
       causal=st.booleans(), absent=st.floats(0, 1), seed=seeds)
def test_flash_prefill_with_bias_matches_float64(Tk, Tq, heads, D, dtype, causal, absent, seed):
    """bias (B, Hkv, Tk): a compacted cache's per-key bias, -inf for an absent key (a fraction `absent`
    of them, all of a head's keys included). Oracle: softmax(q k^T / sqrt(D) + bias) v in float64."""
    Hq, Hkv = heads
    q = rand(1, Hq, Tq, D, dtype=dtype, seed=seed)
    k, v = rand(1, Hkv, Tk, D, dtype=dtype, seed=seed + 1), rand(1, Hkv, Tk, D, dtype=dtype, seed=seed + 2)
    g = torch.Generator().manual_seed(seed)
    bias = 3 * torch.randn(1, Hkv, Tk, generator=g)
    bias = bias.masked_fill(torch.rand(1, Hkv, Tk, generator=g) < absent, float("-inf")).to(DEVICE)
    o, lse = kernels.flash_prefill(q, k, v, causal=causal, bias=bias)
    q64, k64, v64 = (x.double() for x in (q, k, v))
    s = q64 @ k64.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) / math.sqrt(D)
    s = s + bias.double().repeat_interleave(Hq // Hkv, 1)[:, :, None, :]
    if causal:  # the queries are the last Tq positions of the Tk keys
        s = s.masked_fill(torch.arange(Tk, device=DEVICE) > (Tk - Tq + torch.arange(Tq, device=DEVICE))[:, None],
                          float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.exp(s - lse_ref[..., None]))  # a row with no key: weights 0
    o_ref = p @ v64.repeat_interleave(Hq // Hkv, 1)
    assert_attention_close(o, lse, o_ref.float(), lse_ref.float(), dtype)


def test_flash_prefill_bias_shape_is_checked():
    q, k, v = rand(1, 4, 3, 64, seed=1), rand(1, 2, 5, 64, seed=2), rand(1, 2, 5, 64, seed=3)
    for bad in (torch.zeros(1, 2, 4, device=DEVICE), torch.zeros(1, 2, 5, dtype=torch.float64, device=DEVICE)):
        with pytest.raises(ValueError, match="flash_prefill: bias must be fp32"):
            kernels.flash_prefill(q, k, v, bias=bad)


@pytest.mark.parametrize("Tq, Tk", [(1, 1), (1, 33), (17, 17), (5, 40), (40, 40)])
def test_flash_prefill_edge_shapes(Tq, Tk):
    q, k, v = rand(1, 4, Tq, 64, seed=1), rand(1, 1, Tk, 64, seed=2), rand(1, 1, Tk, 64, seed=3)
    assert_attention_close(*kernels.flash_prefill(q, k, v), *attention_ref(q, k, v), torch.float32)


def test_flash_prefill_rows_without_keys_give_zero_and_minus_inf():
    q, k, v = rand(1, 2, 40, 64, seed=1), rand(1, 2, 40, 64, seed=2), rand(1, 2, 40, 64, seed=3)
    o, lse = kernels.flash_prefill(q, k, v, q_offset=-35)  # rows 0..34 come before key 0
    assert torch.equal(o[:, :, :35], torch.zeros_like(o[:, :, :35])) and torch.isneginf(lse[:, :, :35]).all()
    assert_attention_close(o, lse, *attention_ref(q, k, v, q_offset=-35), torch.float32)


# ------------------------------------------------------------------------------------------------
# Flash decode

@given(seq_len=seq_lens(), spare=st.integers(0, 20), heads=gqa_heads(), D=head_dims(), dtype=dtypes(),
       num_splits=st.sampled_from([None, 1, 2, 3, 7, 1000]), batch=st.integers(1, 2), seed=seeds)
def test_flash_decode_matches_reference(seq_len, spare, heads, D, dtype, num_splits, batch, seed):
    """Keys [0, seq_len) of a longer cache, cut into any number of splits (more splits than keys too)."""
    Hq, Hkv = heads
    q = rand(batch, Hq, D, dtype=dtype, seed=seed)
    k_cache = rand(batch, Hkv, seq_len + spare, D, dtype=dtype, seed=seed + 1)
    v_cache = rand(batch, Hkv, seq_len + spare, D, dtype=dtype, seed=seed + 2)
    o, lse = kernels.flash_decode(q, k_cache, v_cache, seq_len, num_splits=num_splits)
    assert o.dtype == dtype and o.shape == q.shape
    assert_attention_close(o, lse, *decode_ref(*f32(q, k_cache, v_cache), seq_len), dtype)


@given(seq_len=seq_lens(), spare=st.integers(0, 20), heads=gqa_heads(), window=st.integers(1, 8), D=head_dims(),
       dtype=dtypes(), num_splits=st.sampled_from([None, 1, 3, 1000]), device_len=st.booleans(), seed=seeds)
def test_flash_decode_window_matches_causal_attention(seq_len, spare, heads, window, D, dtype, num_splits,
                                                      device_len, seed):
    """q (B, Hq, W, D): the last W positions attend causally, as the reference with q_offset = seq_len - W."""
    Hq, Hkv = heads
    W = min(window, seq_len, kernels.MAX_DECODE_ROWS // (Hq // Hkv))
    q = rand(1, Hq, W, D, dtype=dtype, seed=seed)
    k_cache = rand(1, Hkv, seq_len + spare, D, dtype=dtype, seed=seed + 1)
    v_cache = rand(1, Hkv, seq_len + spare, D, dtype=dtype, seed=seed + 2)
    n = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE) if device_len else seq_len
    o, lse = kernels.flash_decode(q, k_cache, v_cache, n, num_splits=num_splits)
    assert o.dtype == dtype and o.shape == q.shape and lse.shape == q.shape[:3]
    ref = attention_ref(*f32(q, k_cache[:, :, :seq_len], v_cache[:, :, :seq_len]), causal=True)
    assert_attention_close(o, lse, *ref, dtype)


def test_flash_decode_window_refuses_too_many_rows():
    q, kc = rand(1, 8, 20, 64, seed=1), rand(1, 1, 32, 64, seed=2)  # 8 heads per KV head x 20 rows
    with pytest.raises(ValueError, match="window rows"):
        kernels.flash_decode(q, kc, kc, 32)
    with pytest.raises(ValueError, match="at least as many keys"):
        kernels.flash_decode(rand(1, 8, 4, 64, seed=1), kc, kc, 3)


@pytest.mark.parametrize("seq_len, num_splits", [(1, None), (1, 4), (65, 5), (200, 13)])
def test_flash_decode_edge_lengths(seq_len, num_splits):
    q, kc, vc = rand(2, 8, 64, seed=1), rand(2, 2, 256, 64, seed=2), rand(2, 2, 256, 64, seed=3)
    o, lse = kernels.flash_decode(q, kc, vc, seq_len, num_splits=num_splits)
    assert_attention_close(o, lse, *decode_ref(q, kc, vc, seq_len), torch.float32)


@pytest.mark.parametrize("D", [160, 256])
def test_decode_kernels_run_wide_heads_in_fp32(D):
    """Head dims 160 and 256 in fp32: the kernels pick smaller tiles (kernels.kv_tiles) and run;
    the tuned tiles of head dim 128 / 2-byte inputs are left as they are."""
    n, S = 150, 16
    q, kc, vc = rand(1, 8, D, seed=1), rand(1, 2, 160, D, seed=2), rand(1, 2, 160, D, seed=3)
    assert_attention_close(*kernels.flash_decode(q, kc, vc, n), *decode_ref(q, kc, vc, n), torch.float32)
    qw = rand(1, 8, 4, D, seed=4)  # a window of 4 rows x 4 query heads per KV head
    o, lse = kernels.flash_decode(qw, kc, vc, n)
    assert_attention_close(o, lse, *attention_ref(qw, kc[:, :, :n], vc[:, :, :n], q_offset=n - 4), torch.float32)
    pages = torch.tensor([[[0, 3, 9], [2, -1, 9]]], dtype=torch.int32, device=DEVICE)
    assert_attention_close(*kernels.paged_decode(q, kc, vc, pages, n, S), *paged_decode_ref(q, kc, vc, pages, n, S),
                           torch.float32)
    assert kernels.kv_tiles(64, 3, 128, 2) == (64, 3) and kernels.kv_tiles(128, 2, 128, 2) == (128, 2)
    assert kernels.kv_tiles(64, 3, D, 4) == (32, 1) and kernels.kv_tiles(128, 2, D, 4) == (32, 1)


def test_flash_decode_equals_prefill_of_last_query():
    q, kc, vc = rand(1, 8, 64, seed=1), rand(1, 2, 50, 64, seed=2), rand(1, 2, 50, 64, seed=3)
    o_d, lse_d = kernels.flash_decode(q, kc, vc, 50)
    o_p, lse_p = kernels.flash_prefill(q[:, :, None], kc, vc)
    assert_attention_close(o_d, lse_d, o_p[:, :, 0], lse_p[:, :, 0], torch.float32)


# ------------------------------------------------------------------------------------------------
# Quest page scores

@given(num_pages=st.integers(0, 150), spare=st.integers(0, 3), heads=gqa_heads(), D=head_dims(),
       dtype=dtypes(), batch=st.integers(1, 2), seed=seeds)
def test_page_scores_match_reference(num_pages, spare, heads, D, dtype, batch, seed):
    Hq, Hkv = heads
    q = rand(batch, Hq, D, dtype=dtype, seed=seed)
    a = rand(batch, Hkv, num_pages + spare, D, dtype=dtype, seed=seed + 1)
    b = rand(batch, Hkv, num_pages + spare, D, dtype=dtype, seed=seed + 2)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    scores = kernels.page_scores(q, kmin, kmax, num_pages)
    assert scores.shape == (batch, Hkv, num_pages) and scores.dtype == torch.float32
    want = page_scores_ref(q, kmin, kmax, num_pages).float()
    torch.testing.assert_close(scores, want, atol=1e-3, rtol=1e-5)
    # with a length (int or on the device) the pages past its keys score -inf, the others as before
    S, n = 4, max(0, 4 * num_pages - 4 * spare - 1)
    in_use = -(-n // S)
    for seq_len in (n, torch.tensor([n], dtype=torch.int32, device=DEVICE)):
        got = kernels.page_scores(q, kmin, kmax, num_pages, seq_len, S)
        torch.testing.assert_close(got[..., :in_use], want[..., :in_use], atol=1e-3, rtol=1e-5)
        assert (got[..., in_use:] == float("-inf")).all()


@given(heads=gqa_heads(), S=st.sampled_from([1, 2, 5, 16]), P=st.integers(1, 6), seed=seeds)
def test_page_score_bounds_every_key_score(heads, S, P, seed):
    """From the definition: no key of a page scores above the page's bound (scores summed over the
    group's query heads, as the bound is); a page of one key is bounded exactly by that key's score."""
    Hq, Hkv = heads
    D = 16
    q, k = rand(1, Hq, D, seed=seed).double(), rand(1, Hkv, P * S, D, seed=seed + 1).double()
    pages = k.view(1, Hkv, P, S, D)
    for scores in (kernels.page_scores(q.float(), pages.amin(3).float(), pages.amax(3).float(), P).double(),
                   page_scores_ref(q, pages.amin(3), pages.amax(3), P).double()):
        key_scores = torch.einsum("bhgd,bhpsd->bhps", q.view(1, Hkv, Hq // Hkv, D), pages)  # (1, Hkv, P, S)
        assert (key_scores <= scores[..., None] + 1e-4).all()
        if S == 1:
            torch.testing.assert_close(scores, key_scores[..., 0], atol=1e-4, rtol=1e-5)


@given(num_pages=st.integers(1, 300), spare=st.integers(0, 3), budget_pages=st.integers(1, 320),
       S=st.sampled_from([1, 4, 16]), last_page_keys=st.integers(1, 16), on_device=st.booleans(),
       kind=st.sampled_from(["normal", "ties", "signed zeros", "-inf", "nan"]), batch=st.integers(1, 2),
       chunk=st.sampled_from([None, 16, 32, 128]), seed=seeds)
def test_select_pages_kernel_matches_reference(num_pages, spare, budget_pages, S, last_page_keys, on_device, kind,
                                               batch, chunk, seed):
    """The bisection top-k picks exactly the reference's pages, ties (lower page first) included, for the
    pages of a length (int or on the device) shorter than the score rows, whichever chunks the programs
    of a row store (ties then span chunks)."""
    n = (num_pages - 1) * S + min(last_page_keys, S)
    seq_len = torch.tensor([n], dtype=torch.int32, device=DEVICE) if on_device else n
    scores = rand(batch, 3, num_pages + spare, seed=seed)
    if kind == "ties":
        scores = scores.mul(2).round()
    elif kind == "signed zeros":
        scores = torch.zeros_like(scores)
        scores[..., ::2] = -0.0
    elif kind == "-inf":
        scores[..., : num_pages // 2] = float("-inf")
    elif kind == "nan":  # a page bound from a non-finite key: NaN counts as +inf, whatever its sign bit
        scores[..., ::3] = float("nan")
        scores[..., 1::6] = -float("nan")
        scores[..., 2::5] = float("inf")
    got = kernels.select_pages(scores, seq_len, S, budget_pages, chunk)
    assert got.dtype == torch.int32 and got.shape == (batch, 3, min(budget_pages, num_pages + spare))
    assert torch.equal(got, select_pages(scores, seq_len, S, budget_pages))


@pytest.mark.parametrize("P, n", [(8192, 8192 * 16), (8212, 8192 * 16 + 1), (8212, 8212 * 16)])
def test_select_pages_kernel_on_a_128k_context(P, n):
    """8192 pages of 16 tokens, 8 warps; a cache of 8212 pages (128K and room for new tokens) splits its
    rows into 8192 pages and a tail of 32 lanes, and ties span both parts; chunks of 1024 pages (the
    H200's) put a chunk over the tail."""
    scores = rand(2, 8, P, seed=3).mul(8).round()
    want = select_pages(scores, n, 16, 256)
    for seq_len in (n, torch.tensor([n], dtype=torch.int32, device=DEVICE)):
        for chunk in (None, 1024):
            assert torch.equal(kernels.select_pages(scores, seq_len, 16, 256, chunk), want)


def test_select_pages_reads_a_device_length():
    """The length read on the device picks the same pages as the same length given as an int."""
    S, budget_pages = 4, 5
    scores = rand(2, 3, 40, seed=9)
    for n in [20, 21, 37, 160]:
        want = select_pages(scores, n, S, budget_pages)
        assert torch.equal(kernels.select_pages(scores, n, S, budget_pages), want)
        assert torch.equal(kernels.select_pages(scores, torch.tensor([n], dtype=torch.int32, device=DEVICE), S,
                                                budget_pages), want)


@pytest.mark.parametrize("seq_len", [1, 17, 64, 100])
def test_decode_kernels_read_a_device_length(seq_len):
    """flash_decode and paged_decode give the same result for an int length and a device length."""
    q, kc, vc = rand(1, 8, 64, seed=1), rand(1, 2, 112, 64, seed=2), rand(1, 2, 112, 64, seed=3)
    n_dev = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)
    for a, b in zip(kernels.flash_decode(q, kc, vc, seq_len), kernels.flash_decode(q, kc, vc, n_dev)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    pages = torch.tensor([[[0, -1, (seq_len - 1) // 16], [(seq_len - 1) // 16, -1, -1]]], dtype=torch.int32, device=DEVICE)
    for a, b in zip(kernels.paged_decode(q, kc, vc, pages, seq_len, 16), kernels.paged_decode(q, kc, vc, pages, n_dev, 16)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one int32 value"):
        kernels.flash_decode(q, kc, vc, n_dev.long())


# ------------------------------------------------------------------------------------------------
# Paged decode

def random_page_lists(batch, Hkv, n_pages, budget, n_pad, seed):
    """(batch, Hkv, budget + n_pad) int32: per KV head `budget` distinct pages of [0, n_pages) in random
    order with n_pad unused slots (-1) mixed in at random places."""
    g = torch.Generator().manual_seed(seed)
    lists = torch.full((batch, Hkv, budget + n_pad), -1, dtype=torch.int32)
    for b, h in itertools.product(range(batch), range(Hkv)):
        chosen = torch.cat([torch.randperm(n_pages, generator=g)[:budget], torch.full((n_pad,), -1)])
        lists[b, h] = chosen[torch.randperm(budget + n_pad, generator=g)].int()
    return lists.to(DEVICE)


@given(seq_len=seq_lens(), page_size=st.sampled_from([1, 5, 16, 32]), extra_pages=st.integers(0, 2),
       budget_frac=st.floats(0, 1), n_pad=st.integers(0, 3), with_bias=st.booleans(),
       num_splits=st.sampled_from([None, 1, 3, 50]), heads=gqa_heads(), D=head_dims(), dtype=dtypes(),
       batch=st.integers(1, 2), seed=seeds)
def test_paged_decode_matches_reference(seq_len, page_size, extra_pages, budget_frac, n_pad, with_bias,
                                        num_splits, heads, D, dtype, batch, seed):
    """Budgets from one page to every page of the cache (pages past seq_len included, they hold no
    visible key), a partial last page, -1 slots, pages in random order, with and without bias."""
    Hq, Hkv = heads
    n_pages = -(-seq_len // page_size) + extra_pages
    Nmax = n_pages * page_size
    budget = max(1, round(budget_frac * n_pages))
    q = rand(batch, Hq, D, dtype=dtype, seed=seed)
    k_cache = rand(batch, Hkv, Nmax, D, dtype=dtype, seed=seed + 1)
    v_cache = rand(batch, Hkv, Nmax, D, dtype=dtype, seed=seed + 2)
    bias = rand(batch, Hkv, Nmax, seed=seed + 3) if with_bias else None
    page_idx = random_page_lists(batch, Hkv, n_pages, budget, n_pad, seed)
    o, lse = kernels.paged_decode(q, k_cache, v_cache, page_idx, seq_len, page_size, bias=bias,
                                  num_splits=num_splits)
    o_ref, lse_ref = paged_decode_ref(*f32(q, k_cache, v_cache), page_idx, seq_len, page_size, bias=bias)
    assert o.dtype == dtype and o.shape == q.shape
    assert_attention_close(o, lse, o_ref, lse_ref, dtype)


@given(seq_len=seq_lens(), page_size=st.sampled_from([1, 3, 16]), heads=gqa_heads(), D=head_dims(),
       dtype=dtypes(), seed=seeds)
def test_paged_decode_all_pages_equals_dense_decode(seq_len, page_size, heads, D, dtype, seed):
    Hq, Hkv = heads
    n_pages = -(-seq_len // page_size)
    q = rand(1, Hq, D, dtype=dtype, seed=seed)
    k_cache = rand(1, Hkv, n_pages * page_size, D, dtype=dtype, seed=seed + 1)
    v_cache = rand(1, Hkv, n_pages * page_size, D, dtype=dtype, seed=seed + 2)
    all_pages = random_page_lists(1, Hkv, n_pages, n_pages, 0, seed)  # every page, shuffled
    o, lse = kernels.paged_decode(q, k_cache, v_cache, all_pages, seq_len, page_size)
    assert_attention_close(o, lse, *decode_ref(*f32(q, k_cache, v_cache), seq_len), dtype)
    o_dense, lse_dense = kernels.flash_decode(q, k_cache, v_cache, seq_len)
    assert_attention_close(o, lse, o_dense.float(), lse_dense, dtype)


def test_paged_decode_no_pages_gives_zero_and_minus_inf():
    q, kc, vc = rand(1, 4, 64, seed=1), rand(1, 2, 64, 64, seed=2), rand(1, 2, 64, 64, seed=3)
    page_idx = torch.tensor([[[-1, -1], [3, -1]]], dtype=torch.int32, device=DEVICE)  # head 0: nothing
    o, lse = kernels.paged_decode(q, kc, vc, page_idx, 64, 16)
    assert torch.equal(o[:, :2], torch.zeros_like(o[:, :2])) and torch.isneginf(lse[:, :2]).all()
    assert_attention_close(o, lse, *paged_decode_ref(q, kc, vc, page_idx, 64, 16), torch.float32)


# ------------------------------------------------------------------------------------------------
# Merging partial attentions

@given(seq_len=st.integers(1, 64), page_size=st.sampled_from([4, 16]), seed=seeds)
def test_merge_identity(seq_len, page_size, seed):
    """Attention over pages A u B == merge of attention over A and over B, for both merge_attention
    and kernels.merge_partials; an empty side (lse = -inf) changes nothing and gives no NaN."""
    n_pages = -(-seq_len // page_size)
    q, kc, vc = rand(1, 8, 64, seed=seed), rand(1, 2, n_pages * page_size, 64, seed=seed + 1), \
        rand(1, 2, n_pages * page_size, 64, seed=seed + 2)
    pages = random_page_lists(1, 2, n_pages, n_pages, 0, seed)
    cut = int(torch.randint(0, n_pages + 1, (1,), generator=torch.Generator().manual_seed(seed)))
    side_a = torch.where(torch.arange(n_pages, device=DEVICE) < cut, pages, -1)  # cut = 0: A is empty
    side_b = torch.where(torch.arange(n_pages, device=DEVICE) >= cut, pages, -1)
    o_all, lse_all = paged_decode_ref(q, kc, vc, pages, seq_len, page_size)
    o_a, lse_a = kernels.paged_decode(q, kc, vc, side_a, seq_len, page_size)
    o_b, lse_b = kernels.paged_decode(q, kc, vc, side_b, seq_len, page_size)
    assert_attention_close(*merge_attention(o_a, lse_a, o_b, lse_b), o_all, lse_all, torch.float32)
    o_m, lse_m = kernels.merge_partials(torch.stack([o_a, o_b], -2), torch.stack([lse_a, lse_b], -1))
    assert_attention_close(o_m, lse_m, o_all, lse_all, torch.float32)


def test_merge_partials_of_empty_splits():
    """Rows whose splits are all empty merge to o = 0, lse = -inf; empty splits among full ones vanish."""
    o_parts = rand(3, 4, 64, seed=1)
    lse_parts = rand(3, 4, seed=2)
    lse_parts[0] = float("-inf")     # row 0: nothing anywhere
    lse_parts[1, 1:] = float("-inf")  # row 1: only split 0 has keys
    o_parts[lse_parts.isinf()] = 0.0  # what the kernels write for an empty split
    o, lse = kernels.merge_partials(o_parts, lse_parts)
    assert torch.equal(o[0], torch.zeros(64, device=DEVICE)) and torch.isneginf(lse[0])
    torch.testing.assert_close(o[1], o_parts[1, 0])
    torch.testing.assert_close(lse[1], lse_parts[1, 0])
    o_ref, lse_ref = o_parts[2, 0], lse_parts[2, 0]
    for s in range(1, 4):
        o_ref, lse_ref = merge_attention(o_ref, lse_ref, o_parts[2, s], lse_parts[2, s])
    assert_attention_close(o[2], lse[2], o_ref, lse_ref, torch.float32)


def test_kernels_reject_bad_inputs():
    q, kc = rand(1, 6, 64, seed=1), rand(1, 4, 32, 64, seed=2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kernels.flash_decode(q, kc, kc, 32)
    with pytest.raises(ValueError, match="seq_len 33"):
        kernels.flash_decode(q[:, :4], kc, kc, 33)
    with pytest.raises(ValueError, match="page_idx"):
        kernels.paged_decode(q[:, :4], kc, kc, torch.zeros(1, 3, 2, dtype=torch.int32, device=DEVICE), 32, 16)


# ------------------------------------------------------------------------------------------------
# The PyTorch run path (CPU): same contracts as the references, checked against them


@given(Tk=seq_lens(), Tq_frac=st.floats(0, 1), offset=st.sampled_from(["default", "shifted", "before"]),
       heads=gqa_heads(), D=st.sampled_from([8, 64]), causal=st.booleans(), need_lse=st.booleans(),
       small_chunks=st.booleans(), batch=st.integers(1, 2), seed=seeds)
def test_fast_attention_matches_reference(Tk, Tq_frac, offset, heads, D, causal, need_lse, small_chunks, batch,
                                          seed):
    """attention.attention (sdpa without lse, query chunks with it) = attention_ref in float64,
    with rows placed before every key (o = 0, lse = -inf), Tq = 1 and chunks of a few rows."""
    Hq, Hkv = heads
    Tq = max(1, round(Tq_frac * Tk))
    q_offset = {"default": None, "shifted": Tk - Tq - min(2, Tk - Tq), "before": -min(3, Tq - 1)}[offset]
    q, k, v = rand(batch, Hq, Tq, D, seed=seed), rand(batch, Hkv, Tk, D, seed=seed + 1), rand(batch, Hkv, Tk, D, seed=seed + 2)
    chunk = attention.SCORES_PER_CHUNK
    attention.SCORES_PER_CHUNK = 3 * batch * Hq * Tk if small_chunks else chunk  # 3 rows per chunk
    try:
        o, lse = attention.attention(q, k, v, causal=causal, q_offset=q_offset, need_lse=need_lse)
    finally:
        attention.SCORES_PER_CHUNK = chunk
    o_ref, lse_ref = attention_ref(q, k, v, causal=causal, q_offset=q_offset)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert_attention_close(o, lse if lse is not None else lse_ref, o_ref, lse_ref, torch.float32)
    if need_lse or (q_offset or 0) < 0:
        assert lse is not None
    else:
        assert lse is None


@given(seq_len=seq_lens(), page_size=st.sampled_from([1, 5, 16]), extra_pages=st.integers(0, 2),
       budget_frac=st.floats(0, 1), n_pad=st.integers(0, 3), with_bias=st.booleans(), heads=gqa_heads(),
       batch=st.integers(1, 2), seed=seeds)
def test_fast_paged_decode_matches_reference(seq_len, page_size, extra_pages, budget_frac, n_pad, with_bias, heads,
                                             batch, seed):
    """attention.paged_decode (the listed pages gathered) = paged_decode_ref."""
    Hq, Hkv, D = *heads, 16
    n_pages = -(-seq_len // page_size) + extra_pages
    Nmax = n_pages * page_size
    q = rand(batch, Hq, D, seed=seed)
    k_cache, v_cache = rand(batch, Hkv, Nmax, D, seed=seed + 1), rand(batch, Hkv, Nmax, D, seed=seed + 2)
    bias = rand(batch, Hkv, Nmax, seed=seed + 3) if with_bias else None
    page_idx = random_page_lists(batch, Hkv, n_pages, max(1, round(budget_frac * n_pages)), n_pad, seed)
    o, lse = attention.paged_decode(q, k_cache, v_cache, page_idx, seq_len, page_size, bias=bias)
    o_ref, lse_ref = paged_decode_ref(q, k_cache, v_cache, page_idx, seq_len, page_size, bias=bias)
    assert_attention_close(o, lse, o_ref, lse_ref, torch.float32)
