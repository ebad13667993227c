"""RetroAttention's invariants (DESIGN.md): w = 1 is Quest; a covering budget is dense for every w; a
merged supplement is attention over the union of pages; exposure grows with w; the kernel is the
reference; a past token's overwritten K/V are a fresh forward of it given its revised outputs.

Two drivers: `drive` feeds one attention layer a fixed stream of q, k, v (as if the layers below
never changed, so Quest picks the same pages whatever w is), and `greedy` runs a tiny model through
generate.generate, the loop generate.py uses.
"""

import itertools

import pytest
import torch
from hypothesis import given, strategies as st

from attention import DenseAttention, attention_ref, merge_attention
from conftest import ATOL, DEVICE, dtypes, gqa_heads, head_dims, rand, tiny_model
from generate import generate
from kvcache import KVCache, QuestAttention, page_scores_ref, select_pages
from retro import (OutputCache, RetroAttention, retro_decode, retro_decode_ref, retro_decode_torch, window_merge,
                   window_merge_ref)

seeds = st.integers(0, 2**16)


def make_cache(n_layers=1, B=1, Hkv=2, N=64, D=16, page_size=4):
    return KVCache(n_layers, B, Hkv, N, D, torch.float32, DEVICE, page_size=page_size)


def stream(B, N, Hq, Hkv, D, seed):
    """q (B, N, Hq, D), k, v (B, N, Hkv, D): one layer's inputs at every position."""
    return rand(B, N, Hq, D, seed=seed), rand(B, N, Hkv, D, seed=seed + 1), rand(B, N, Hkv, D, seed=seed + 2)


def drive(attn, q, k, v, n_prompt, last, window):
    """Prefill [0, n_prompt), then decode steps t = n_prompt .. last feeding the last `window` rows.
    Returns each step's output, (B, rows, Hq, D)."""
    pos = torch.arange(n_prompt)
    attn.prefill(0, q[:, pos], k[:, pos], v[:, pos], pos)
    outs = []
    for t in range(n_prompt, last + 1):
        pos = torch.arange(max(0, t - window + 1), t + 1)
        outs.append(attn.decode(0, q[:, pos], k[:, pos], v[:, pos], pos.to(DEVICE)))  # (on the CPU: rows checked)
    return outs


def greedy(model, attn, prompt, n_new, window=1):
    return generate(model, attn, prompt, n_new, window=window)[0]


def model_cache(model, n, page_size=4):
    a = model.args
    return KVCache(a.n_layers, 1, a.n_kv_heads, n, a.head_dim, torch.float32, DEVICE, page_size=page_size)


def prompt_of(n, seed=0):
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def attend_to_keys(q, k_cache, v_cache, keys):
    """Oracle: q (Hq, D) of one token attends to the listed key positions of k/v (Hkv, N, D)."""
    keys = torch.tensor(sorted(keys), dtype=torch.long, device=q.device)
    o, lse = attention_ref(q[None, :, None], k_cache[None, :, keys], v_cache[None, :, keys], causal=False)
    return o[0, :, 0], lse[0, :, 0]


# ------------------------------------------------------------------------------------------------
# The invariants

def test_window_one_equals_quest():
    q, k, v = stream(2, 40, 4, 2, 16, seed=3)
    quest = QuestAttention(make_cache(B=2, N=40), 8, 4, dense_layers=0)
    retro = RetroAttention(make_cache(B=2, N=40), 8, 4, window=1, dense_layers=0)
    for o_q, o_r in zip(drive(quest, q, k, v, 20, 39, 1), drive(retro, q, k, v, 20, 39, 1)):
        torch.testing.assert_close(o_r, o_q, atol=1e-6, rtol=0)  # bit-equal on CPU: the same paged_decode_ref call
    assert {key: retro.stats[key] for key in quest.stats} == quest.stats

    model, prompt = tiny_model(seed=1), prompt_of(40)
    n = 40 + 10
    tokens_quest = greedy(model, QuestAttention(model_cache(model, n), 8, 4, dense_layers=1), prompt, 10)
    tokens_retro = greedy(model, RetroAttention(model_cache(model, n), 8, 4, window=1, dense_layers=1), prompt, 10)
    assert torch.equal(tokens_retro, tokens_quest)


@pytest.mark.parametrize("window", [1, 2, 3, 4])
def test_full_budget_equals_dense_every_window(window):
    """No page is ever new to a past token, so nothing is revised and the overwritten K/V are the
    ones dense decoding wrote: same tokens, same cache."""
    model, prompt = tiny_model(seed=1), prompt_of(30)
    n = 30 + 12
    dense = DenseAttention(model_cache(model, n))
    retro = RetroAttention(model_cache(model, n), 48, 4, window=window, dense_layers=1)
    assert torch.equal(greedy(model, retro, prompt, 12, window), greedy(model, dense, prompt, 12))
    written = n - 1  # the last sampled token is never fed
    torch.testing.assert_close(retro.cache.k[:, :, :, :written], dense.cache.k[:, :, :, :written], atol=1e-5, rtol=0)
    torch.testing.assert_close(retro.cache.v[:, :, :, :written], dense.cache.v[:, :, :, :written], atol=1e-5, rtol=0)


def test_supplement_merge_equals_union_attention():
    """A window of 5 rows (positions 25..29, pages of 4) where A makes pages seen by some past rows
    and not by others. For every row, cached attention over the pages it has seen, merged with the
    reference's supplement, equals one attention over the union: pages already seen are not counted
    twice, and the current token's page 7 (keys 28, 29) stays masked for rows before 28."""
    S, n, W, Hq, Hkv, D = 4, 30, 5, 4, 2, 16
    kc, vc = rand(1, Hkv, 32, D, seed=1), rand(1, Hkv, 32, D, seed=2)
    q = rand(1, Hq, W, D, seed=3)
    A = torch.full((1, Hkv, 8), 20, dtype=torch.int32, device=DEVICE)  # loaded before the window began
    A[0, 0, [1, 6]] = 27      # head 0: seen by rows 25..27, new to row 28
    A[0, 0, 3] = 25           # seen by row 25 only
    A[0, 1, [2, 6, 7]] = 28   # head 1: seen by every past row
    page_idx = torch.tensor([[[0, 3, 6, 7], [2, 5, 6, 7]]], dtype=torch.int32, device=DEVICE)  # S_t
    o_s, lse_s = retro_decode_ref(q, kc, vc, page_idx, A, n, S)
    for hk, i in itertools.product(range(Hkv), range(W)):
        tau = n - W + i
        heads = slice(2 * hk, 2 * hk + 2)
        keys_of = lambda pages: {j for p in pages for j in range(p * S, (p + 1) * S) if j <= tau}  # noqa: E731
        seen = [p for p in range(8) if A[0, hk, p] >= tau]
        new = [p for p in page_idx[0, hk].tolist() if A[0, hk, p] < tau]
        if i == W - 1:
            assert new == page_idx[0, hk].tolist()  # the current row reads all of S_t
            torch.testing.assert_close(o_s[0, heads, i], attend_to_keys(q[0, heads, i], kc[0, hk:hk + 1],
                                                                        vc[0, hk:hk + 1], keys_of(new))[0])
            continue
        union = keys_of(seen) | keys_of(new)
        if not keys_of(new):  # nothing new for this row: an empty supplement
            assert torch.isneginf(lse_s[0, heads, i]).all() and not o_s[0, heads, i].any()
        o_c, lse_c = attend_to_keys(q[0, heads, i], kc[0, hk:hk + 1], vc[0, hk:hk + 1], keys_of(seen))
        o_m, lse_m = merge_attention(o_c, lse_c, o_s[0, heads, i], lse_s[0, heads, i])
        o_u, lse_u = attend_to_keys(q[0, heads, i], kc[0, hk:hk + 1], vc[0, hk:hk + 1], union)
        torch.testing.assert_close(o_m, o_u)
        torch.testing.assert_close(lse_m, lse_u)
    # keys after a row never reach it: change keys 28, 29 and rows 25..27 do not move
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[:, :, 28:] += 3.0
    vc2[:, :, 28:] -= 3.0
    o_s2, lse_s2 = retro_decode_ref(q, kc2, vc2, page_idx, A, n, S)
    assert torch.equal(o_s2[:, :, :3], o_s[:, :, :3]) and torch.equal(lse_s2[:, :, :3], lse_s[:, :, :3])


@pytest.mark.parametrize("attend", [retro_decode, retro_decode_torch], ids=["triton", "torch"])
@given(W=st.integers(1, 16), extra=st.integers(0, 40), page_size=st.sampled_from([1, 4, 5, 16, 80]),
       n_listed=st.integers(0, 6), n_pad=st.integers(0, 2), heads=gqa_heads(), D=head_dims(), dtype=dtypes(),
       batch=st.integers(1, 2), seed=seeds)
def test_kernel_matches_reference(attend, W, extra, page_size, n_listed, n_pad, heads, D, dtype, batch, seed):
    """Window sizes 1..16, ragged page lists (different lengths per KV head, -1 slots anywhere), a
    partial last page, A values around the window (pages new to some rows and not to others).
    Both fast paths: the Triton kernel and the CPU run path's retro_decode_torch."""
    Hq, Hkv = heads
    n = W + extra
    n_pages = -(-n // page_size)
    Nmax = n_pages * page_size
    g = torch.Generator().manual_seed(seed)
    q = rand(batch, Hq, W, D, dtype=dtype, seed=seed)
    kc, vc = rand(batch, Hkv, Nmax, D, dtype=dtype, seed=seed + 1), rand(batch, Hkv, Nmax, D, dtype=dtype, seed=seed + 2)
    A = torch.randint(max(-1, n - W - 3), n - 1, (batch, Hkv, n_pages), generator=g, dtype=torch.int32)
    A[torch.rand(A.shape, generator=g) < 0.2] = -1
    page_idx = torch.full((batch, Hkv, n_listed + n_pad), -1, dtype=torch.int32)
    for b, h in itertools.product(range(batch), range(Hkv)):
        k = int(torch.randint(0, min(n_listed, n_pages) + 1, (1,), generator=g))
        slots = torch.randperm(n_listed + n_pad, generator=g)[:k]
        page_idx[b, h, slots] = torch.randperm(n_pages, generator=g)[:k].int()
    page_idx, A = page_idx.to(DEVICE), A.to(DEVICE)
    A_ref = A.clone()
    o_ref, lse_ref = retro_decode_ref(q.float(), kc.float(), vc.float(), page_idx, A_ref, n, page_size,
                                      update_last_loaded=True)
    o, lse = attend(q, kc, vc, page_idx, A, n, page_size, update_last_loaded=True)
    assert torch.equal(A, A_ref)  # A = t for exactly the listed pages, updated after they were read
    assert o.dtype == dtype and o.shape == q.shape and lse.shape == q.shape[:3]
    assert not o.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(o.float(), o_ref, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(lse, lse_ref, atol=ATOL[dtype], rtol=0)  # -inf (empty rows) on both sides


@pytest.mark.parametrize("D", [160, 256])
def test_kernel_runs_wide_heads_in_fp32(D):
    W, n, S = 4, 90, 16
    q, kc, vc = rand(1, 8, W, D, seed=1), rand(1, 2, 96, D, seed=2), rand(1, 2, 96, D, seed=3)
    page_idx = torch.tensor([[[0, 2, 5], [1, 5, -1]]], dtype=torch.int32, device=DEVICE)
    A = torch.tensor([[[-1, 88, -1, 87, -1, 86], [86, -1, 87, -1, 88, -1]]], dtype=torch.int32, device=DEVICE)
    o_ref, lse_ref = retro_decode_ref(q, kc, vc, page_idx, A, n, S)
    o, lse = retro_decode(q, kc, vc, page_idx, A, n, S)
    torch.testing.assert_close(o, o_ref, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(lse, lse_ref, atol=ATOL[torch.float32], rtol=0)


def test_kernel_checks_shapes_before_launch():
    q, kc, vc = rand(1, 4, 2, 64, seed=1), rand(1, 2, 32, 64, seed=2), rand(1, 2, 32, 64, seed=3)
    pages = torch.zeros(1, 2, 2, dtype=torch.int32, device=DEVICE)
    A = torch.full((1, 2, 8), -1, dtype=torch.int32, device=DEVICE)
    retro_decode(q, kc, vc, pages, A, 20, 4)  # fits
    for args, match in [((q, kc[..., :32], vc[..., :32], pages, A), "head dim"),
                        ((q.expand(2, -1, -1, -1), kc, vc, pages, A), "batch"),
                        ((q, kc, vc[:, :, :16], pages, A), "one shape"),
                        ((q, kc, vc, pages[:, :1], A), "must start with"),
                        ((q, kc, vc, pages, A[:, :, :4]), "last_loaded holds 4 pages")]:
        with pytest.raises(ValueError, match=match):
            retro_decode(*args, 20, 4)


@given(W=st.integers(2, 9), S=st.integers(1, 9), Hq=st.sampled_from([1, 4]), D=head_dims(), dtype=dtypes(),
       batch=st.integers(1, 2), seed=seeds)
def test_window_merge_matches_reference(W, S, Hq, D, dtype, batch, seed):
    """The fused end of a device step: splits merged, past rows merged with the cache, cache shifted.
    Empty splits, empty rows (lse = -inf on both sides) and a strided cache (a slice of a longer one)."""
    g = torch.Generator().manual_seed(seed)
    o_part = rand(batch, Hq, W, S, D, seed=seed)
    lse_part = (torch.randn(batch, Hq, W, S, generator=g) * 3).to(DEVICE)
    lse_part[(torch.rand(lse_part.shape, generator=g) < 0.3).to(DEVICE)] = float("-inf")
    o_cache = rand(batch, Hq, W, D, seed=seed + 1)[:, :, 1:]  # strided, as OutputCache keeps it
    lse_cache = (torch.randn(batch, Hq, W, generator=g) * 3).to(DEVICE)[:, :, 1:]
    lse_cache[(torch.rand(lse_cache.shape, generator=g) < 0.3).to(DEVICE)] = float("-inf")
    oc_ref, lc_ref = o_cache.clone(), lse_cache.clone()
    out_ref = window_merge_ref(o_part, lse_part, oc_ref, lc_ref, dtype)
    for max_tile in [2**30, 0]:  # the splits merged in the same launch, or in a separate one first
        oc = torch.empty(batch, Hq, W, D, device=DEVICE)[:, :, 1:]  # strided, as OutputCache keeps it
        lc = torch.empty(batch, Hq, W, device=DEVICE)[:, :, 1:]
        oc.copy_(o_cache), lc.copy_(lse_cache)
        out = window_merge(o_part, lse_part, oc, lc, dtype, max_tile=max_tile)
        assert out.dtype == dtype and out.shape == (batch, W, Hq, D) and not out.isnan().any()
        torch.testing.assert_close(out.float(), out_ref.float(), atol=ATOL[dtype], rtol=0)
        torch.testing.assert_close(oc, oc_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(lc, lc_ref, atol=1e-5, rtol=0)  # -inf where a row has no key yet
    with pytest.raises(ValueError, match="W - 1"):
        window_merge(o_part, lse_part, o_cache[:, :, 1:], lse_cache[:, :, 1:], dtype)


def test_exposure_non_decreasing_in_window():
    """With the layers below fixed, Quest picks the same pages whatever w is; a token that stays w
    steps in the window covers the union of w steps' pages, so its exposure can only grow with w.
    Every run finishes the same tokens (20..33). w = 1 (Quest) never covers more than the budget."""
    q, k, v = stream(2, 48, 4, 2, 16, seed=5)
    exposure = []
    for w in [1, 2, 3, 4, 8]:
        retro = RetroAttention(make_cache(B=2, N=48), 8, 4, window=w, dense_layers=0)
        drive(retro, q, k, v, 20, 33 + w - 1, w)
        exposure.append(retro.stats["exposure"])
    assert exposure[0] <= 1.0
    assert all(a <= b for a, b in zip(exposure, exposure[1:])) and exposure[-1] > exposure[0]


def test_overwritten_kv_equals_fresh_forward():
    """After a decode step, every past token's K/V in the cache, at every layer, are what a fresh
    forward of that token alone computes when each layer's attention returns the token's revised
    output of this step. And the step did revise: K/V above the first sparse layer moved."""
    model, prompt, w = tiny_model(seed=4), prompt_of(30, seed=2), 3
    n = 30 + 8
    retro = RetroAttention(model_cache(model, n), 8, 4, window=w, dense_layers=1)
    tokens = torch.cat([prompt, greedy(model, retro, prompt, 7, w)], dim=1)  # fed up to position 35
    t = tokens.shape[1] - 1
    k_before, v_before = retro.cache.k.clone(), retro.cache.v.clone()

    class Recorder:  # the step's attention outputs, per layer
        def __init__(self):
            self.out = {}

        def decode(self, layer, q, k, v, pos):
            self.out[layer] = retro.decode(layer, q, k, v, pos)
            return self.out[layer]

    rec = Recorder()
    model(tokens[:, t - w + 1:], torch.arange(t - w + 1, t + 1, device=DEVICE), rec, decode=True)

    class Replay:  # attention that answers with the recorded output of one row and keeps k, v
        def __init__(self, row):
            self.row, self.k, self.v = row, {}, {}

        def prefill(self, layer, q, k, v, pos):
            self.k[layer], self.v[layer] = k, v
            return rec.out[layer][:, self.row:self.row + 1]

    for row in range(w - 1):
        tau = t - w + 1 + row
        replay = Replay(row)
        model(tokens[:, tau:tau + 1], torch.tensor([tau]), replay)
        for layer in range(model.args.n_layers):
            torch.testing.assert_close(retro.cache.k[layer, :, :, tau], replay.k[layer][:, 0])
            torch.testing.assert_close(retro.cache.v[layer, :, :, tau], replay.v[layer][:, 0])
    moved = (retro.cache.k[2, :, :, t - w + 1:t] - k_before[2, :, :, t - w + 1:t]).abs().max()
    assert moved > 1e-4, "no supplement reached a past token: the test would prove nothing"
    torch.testing.assert_close(retro.cache.v[0, :, :, :t], v_before[0, :, :, :t])  # layer 0 input: embeddings


# ------------------------------------------------------------------------------------------------
# The object

@pytest.mark.parametrize("w", [2, 3, 4, 8])
def test_revised_output_equals_attention_over_pages_seen(w):
    """On a fixed stream, the final output of a decoded token tau (row 0 of step tau + w - 1, when it
    leaves the window) is its attention over the union of the pages Quest picks at steps tau .. tau +
    w - 1 (keys <= tau). The pages are recorded independently, one fresh Quest choice per step."""
    n_prompt, last, N = 20, 39, 40
    q, k, v = stream(1, N, 4, 2, 16, seed=7)
    retro = RetroAttention(make_cache(N=N), 8, 4, window=w, dense_layers=0)
    outs = drive(retro, q, k, v, n_prompt, last, w)
    kc, vc = retro.cache.k[0, 0], retro.cache.v[0, 0]  # the stream never changes, so neither does the cache

    def pages_at(step):  # Quest's choice at `step`, from the bounds of the keys [0, step]
        c = make_cache(N=N)
        c.write(0, k[:, :step + 1], v[:, :step + 1], torch.arange(step + 1))
        P = -(-(step + 1) // 4)
        return select_pages(page_scores_ref(q[:, step], c.kmin[0], c.kmax[0], P), step + 1, 4, 2)[0]

    recorded = {step: pages_at(step) for step in range(n_prompt, last + 1)}
    revised = 0
    for tau in range(n_prompt, last - w + 2):
        o_final = outs[tau + w - 1 - n_prompt][0, 0]  # (Hq, D): row 0 of step tau + w - 1
        for hk in range(2):
            pages = set().union(*(set(recorded[s][hk].tolist()) for s in range(tau, tau + w)))
            keys = {j for p in pages for j in range(4 * p, 4 * p + 4) if j <= tau}
            o_u, _ = attend_to_keys(q[0, tau, 2 * hk:2 * hk + 2], kc[hk:hk + 1], vc[hk:hk + 1], keys)
            torch.testing.assert_close(o_final[2 * hk:2 * hk + 2], o_u)
            revised += pages != set(recorded[tau][hk].tolist())
    assert revised > 5


def test_kernel_path_matches_reference_path():
    model, prompt, w = tiny_model(seed=2), prompt_of(26, seed=1), 3
    runs = []
    for use_kernels in (False, True):
        retro = RetroAttention(model_cache(model, 32), 8, 4, window=w, dense_layers=1, use_kernels=use_kernels)
        runs.append((greedy(model, retro, prompt, 6, w), retro))
    (tokens_ref, ref), (tokens_ker, ker) = runs
    assert torch.equal(tokens_ker, tokens_ref)
    torch.testing.assert_close(ker.cache.k, ref.cache.k, atol=1e-4, rtol=0)
    for layer in range(1, model.args.n_layers):
        torch.testing.assert_close(ker.outputs.o[layer], ref.outputs.o[layer], atol=1e-4, rtol=0)
    assert ker.stats == pytest.approx(ref.stats)


def test_output_cache_size_is_independent_of_length():
    q, k, v = stream(1, 64, 4, 2, 16, seed=1)
    retro = RetroAttention(make_cache(N=64), 8, 4, window=4, dense_layers=0)
    drive(retro, q, k, v, 10, 63, 4)
    assert retro.outputs.o[0].shape == (1, 4, 3, 16) and retro.outputs.lse[0].shape == (1, 4, 3)
    # the rows are those of positions 61, 62, 63 (the step of t = 63 shifted its row in): decode 64 and compare
    ref = RetroAttention(make_cache(N=65), 8, 4, window=4, dense_layers=0)
    drive(ref, q, k, v, 10, 63, 4)
    torch.testing.assert_close(retro.outputs.o, ref.outputs.o)


def test_output_cache_storage_does_not_grow_with_the_prompt():
    """The cache holds copies of the last w - 1 rows, not views of the whole prefill output."""
    sizes = []
    for n_prompt in (12, 60):
        q, k, v = stream(1, 64, 4, 2, 16, seed=1)
        retro = RetroAttention(make_cache(N=64), 8, 4, window=3, dense_layers=0)
        drive(retro, q, k, v, n_prompt, n_prompt - 1, 3)  # the prefill only
        o, lse = retro.outputs.o[0], retro.outputs.lse[0]
        sizes.append((o.untyped_storage().nbytes(), lse.untyped_storage().nbytes()))
    assert sizes[0] == sizes[1] == (2 * 4 * 16 * 4, 2 * 4 * 4)  # w - 1 = 2 rows, 4 heads, D 16, fp32


def test_output_cache_push_keeps_the_last_rows():
    cache = OutputCache(n_layers=2, size=2)
    o, lse = rand(1, 2, 3, 4, seed=1), rand(1, 2, 3, seed=2)
    cache.push(1, o, lse)  # a prefill: only the last w - 1 rows stay
    assert torch.equal(cache.o[1], o[:, :, 1:]) and torch.equal(cache.lse[1], lse[:, :, 1:])
    assert not cache.o[0].any() and (cache.lse[0] == float("-inf")).all()  # an untouched layer: empty rows
    short = OutputCache(n_layers=1, size=3)
    short.push(0, o[:, :, :1], lse[:, :, :1])  # a prompt shorter than w - 1: empty rows before it
    assert torch.equal(short.o[0, :, :, 2], o[:, :, 0]) and (short.lse[0, :, :, :2] == float("-inf")).all()
    short.push(0, o[:, :, 1:], lse[:, :, 1:])  # a second prefill chunk appends
    assert torch.equal(short.o[0], o) and torch.equal(short.lse[0], lse)


def test_misfed_steps_and_bad_flags_raise():
    q, k, v = stream(1, 30, 4, 2, 16, seed=1)
    retro = RetroAttention(make_cache(N=30), 8, 4, window=3, dense_layers=0)
    drive(retro, q, k, v, 20, 21, 3)
    pos = torch.tensor([22])  # one row where the window needs three
    with pytest.raises(ValueError, match=r"last min\(w, n\) positions, \[20, 21, 22\]"):
        retro.decode(0, q[:, pos], k[:, pos], v[:, pos], pos)
    with pytest.raises(ValueError, match="--budget 6 is not a multiple of --page-size 4"):
        RetroAttention(make_cache(), 6, 4)
    with pytest.raises(ValueError, match="--window must be >= 1"):
        RetroAttention(make_cache(), 8, 4, window=0)
