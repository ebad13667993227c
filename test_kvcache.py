"""The KV cache stores what it is given and keeps true page bounds; Quest reads the right pages.

Quest's defining property is checked end to end: with a budget that covers the whole sequence it is
dense attention, bit for bit, and decodes the same greedy tokens on a tiny model.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import kernels
from attention import DenseAttention, attention_ref, decode_ref, paged_decode_ref
from conftest import DEVICE, ON_GPU, gqa_heads, rand, tiny_model
from kvcache import KVCache, QuestAttention, check_budget, page_scores_ref, quest_pages, select_pages

seeds = st.integers(0, 2**16)


def make_cache(n_layers=1, B=1, Hkv=2, N=40, D=8, page_size=4, dtype=torch.float32, page_meta="auto"):
    return KVCache(n_layers, B, Hkv, N, D, dtype, DEVICE, page_size=page_size, page_meta_dtype=page_meta)


def kv(B, T, Hkv, D, seed):
    """k, v in the model's layout (B, T, Hkv, D)."""
    return rand(B, T, Hkv, D, seed=seed), rand(B, T, Hkv, D, seed=seed + 1)


def recomputed_bounds(cache, layer):
    """Page min/max straight from the stored keys, one page at a time; the page still filling, if any,
    has none yet (zeros)."""
    S, n = cache.page_size, cache.length(layer)
    keys = cache.k[layer]  # (B, Hkv, N, D)
    pages = [keys[:, :, p * S:(p + 1) * S] if (p + 1) * S <= n else None for p in range(-(-n // S))]
    zeros = torch.zeros_like(keys[:, :, 0])
    kmin = torch.stack([zeros if x is None else x.amin(2) for x in pages], dim=2)
    kmax = torch.stack([zeros if x is None else x.amax(2) for x in pages], dim=2)
    return kmin, kmax


# ------------------------------------------------------------------------------------------------
# KVCache

def test_write_stores_keys_and_values_heads_first():
    cache = make_cache(n_layers=2)
    k, v = kv(1, 7, 2, 8, seed=1)
    cache.write(1, k, v, torch.arange(3, 10))
    assert torch.equal(cache.k[1, :, :, 3:10], k.transpose(1, 2))
    assert torch.equal(cache.v[1, :, :, 3:10], v.transpose(1, 2))
    assert cache.lengths.tolist() == [0, 10]
    assert not cache.k[0].any()  # the other layer is untouched


def test_overwrite_replaces_rows_and_keeps_length():
    cache = make_cache()
    k, v = kv(1, 10, 2, 8, seed=1)
    cache.write(0, k, v, torch.arange(10))
    k2, v2 = kv(1, 3, 2, 8, seed=5)
    cache.write(0, k2, v2, torch.arange(4, 7))
    assert torch.equal(cache.k[0, :, :, 4:7], k2.transpose(1, 2))
    assert torch.equal(cache.v[0, :, :, 7:10], v[:, 7:10].transpose(1, 2))
    assert cache.length(0) == 10


def test_write_past_the_end_raises():
    cache = make_cache(N=10)
    k, v = kv(1, 3, 2, 8, seed=1)
    cache.write(0, k, v, torch.arange(7, 10))  # exactly full is fine
    with pytest.raises(ValueError, match="does not fit the KV cache of 10"):
        cache.write(0, k, v, torch.arange(8, 11))


def test_page_bounds_match_recompute_after_appends_and_overwrite():
    """Token-by-token appends, a prefill-sized write, then overwriting rows that span a page border
    (as RetroAttention does): the bounds always equal a recomputation from the stored keys of each full
    page, and the page still filling has none."""
    cache = make_cache(B=2, N=40, page_size=4)
    k, v = kv(2, 9, 2, 8, seed=1)
    cache.write(0, k, v, torch.arange(9))
    for t in range(9, 23):
        k1, v1 = kv(2, 1, 2, 8, seed=10 + t)
        cache.write(0, k1 * 3, v1, torch.tensor([t]))
        kmin, kmax = recomputed_bounds(cache, 0)
        assert torch.equal(cache.kmin[0, :, :, :kmin.shape[2]], kmin)
        assert torch.equal(cache.kmax[0, :, :, :kmax.shape[2]], kmax)
    k2, v2 = kv(2, 3, 2, 8, seed=99)
    cache.write(0, k2 * 0.01, v2, torch.arange(19, 22))  # shrinks the bounds of pages 4 and 5
    kmin, kmax = recomputed_bounds(cache, 0)
    assert torch.equal(cache.kmin[0, :, :, :6], kmin) and torch.equal(cache.kmax[0, :, :, :6], kmax)


# ------------------------------------------------------------------------------------------------
# Quest page scores and selection

@given(n=st.integers(1, 45), page_size=st.sampled_from([1, 3, 4, 16]), heads=gqa_heads(), seed=seeds)
def test_page_bound_holds_for_every_key(n, page_size, heads, seed):
    """For keys written through the cache, no key of a full page scores above its page's bound (its
    score summed over the query heads of its KV head); the page still filling has none (zeros)."""
    Hq, Hkv = heads
    D = 8
    cache = make_cache(Hkv=Hkv, N=48, D=D, page_size=page_size)
    k, v = kv(1, n, Hkv, D, seed=seed)
    cache.write(0, k, v, torch.arange(n))
    q = rand(1, Hq, D, seed=seed + 7)
    P = -(-n // page_size)
    bound = page_scores_ref(q, cache.kmin[0], cache.kmax[0], P)  # (1, Hkv, P)
    assert bound.shape == (1, Hkv, P) and bound.dtype == torch.float32
    full = n // page_size * page_size
    key_scores = torch.einsum("bhgd,bhnd->bhn", q.view(1, Hkv, Hq // Hkv, D), cache.k[0, :, :, :full])
    page_of_key = torch.arange(full) // page_size
    assert (key_scores <= bound[:, :, page_of_key] + 1e-5).all()
    assert not cache.kmin[0, :, :, full // page_size:].any() and not cache.kmax[0, :, :, full // page_size:].any()


def top_pages(scores, seq_len, page_size, budget_pages):
    """The selection written out, independent of kvcache: per row, the newest page of the length, then
    the others by score (NaN as +inf) through Python's stable sort (ties: the lower page), in ascending
    order, then -1 up to min(budget_pages, Pmax) slots."""
    num_pages, K = -(-seq_len // page_size), min(budget_pages, scores.shape[-1])
    rows = []
    for row in scores.double().reshape(-1, scores.shape[-1]).tolist():
        s = [math.inf if math.isnan(x) else x for x in row]
        others = sorted(range(num_pages - 1), key=lambda p: -s[p])[:budget_pages - 1]
        rows.append(sorted(others + [num_pages - 1]) + [-1] * (K - min(budget_pages, num_pages)))
    return torch.tensor(rows, dtype=torch.int32, device=scores.device).view(*scores.shape[:-1], K)


@given(num_pages=st.integers(1, 30), budget_pages=st.integers(1, 12), page_size=st.integers(1, 4),
       last_page_keys=st.integers(1, 4), seed=seeds)
def test_select_pages_includes_newest_and_has_budget_count(num_pages, budget_pages, page_size, last_page_keys, seed):
    seq_len = (num_pages - 1) * page_size + min(last_page_keys, page_size)
    newest = num_pages - 1
    scores = rand(2, 3, num_pages + 2, seed=seed)  # columns past the length's pages must be ignored
    scores[..., num_pages:] = 1e9
    scores[..., newest] = -1e9  # the newest page is kept even when it scores worst
    page_idx = select_pages(scores, seq_len, page_size, budget_pages)
    assert torch.equal(page_idx, top_pages(scores, seq_len, page_size, budget_pages))
    K = min(budget_pages, num_pages)
    assert page_idx.shape == (2, 3, min(budget_pages, num_pages + 2)) and page_idx.dtype == torch.int32
    assert (page_idx[..., K:] == -1).all()
    page_idx = page_idx[..., :K]
    assert (page_idx == newest).any(-1).all()
    assert ((page_idx >= 0) & (page_idx < num_pages)).all()
    assert (page_idx.diff(dim=-1) > 0).all()  # distinct, ascending
    # the others are the best-scoring pages
    others = scores[..., :num_pages].clone()
    others[..., newest] = float("-inf")
    best = others.topk(K - 1, dim=-1).values.amin(-1, keepdim=True) if K > 1 else None
    for b in range(2):
        for h in range(3):
            chosen = [p for p in page_idx[b, h].tolist() if p != newest]
            if best is not None:
                assert (others[b, h, chosen] >= best[b, h]).all()


def test_select_pages_with_a_budget_of_zero_pages_raises():
    scores = rand(1, 2, 5, seed=0)
    for fn in (select_pages, kernels.select_pages):
        with pytest.raises(ValueError, match="select_pages: need budget_pages >= 1, got 0"):
            fn(scores, 20, 4, 0)


def test_non_finite_keys_are_selected_and_propagate_like_dense():
    """Defined behaviour (ours): a page holding a NaN key gets a NaN bound, which both selections
    count as +inf (above every finite score; ties: lower page first), so a sparse step reads it and its
    output is NaN for that KV head's query heads, as dense attention's is. Nothing is silently dropped."""
    S, n = 4, 40
    cache = make_cache(Hkv=2, N=48, D=8, page_size=S)
    k, v = kv(1, n, 2, 8, seed=3)
    k[0, 13, 1, 2] = float("nan")  # page 3, KV head 1
    cache.write(0, k, v, torch.arange(n))
    q = rand(1, 4, 8, seed=4)
    P = -(-n // S)
    scores = page_scores_ref(q, cache.kmin[0], cache.kmax[0], P)
    assert torch.isnan(scores[0, 1, 3]) and torch.isfinite(scores[0, 0]).all()
    for fn in (select_pages, kernels.select_pages):
        page_idx = fn(scores, n, S, 2)
        assert 3 in page_idx[0, 1].tolist()
        for decode in (paged_decode_ref, kernels.paged_decode):
            o, _ = decode(q, cache.k[0], cache.v[0], page_idx, n, S)
            assert torch.isnan(o[0, 2:]).all() and torch.isfinite(o[0, :2]).all()
    assert torch.isnan(decode_ref(q, cache.k[0], cache.v[0], n)[0][0, 2:]).all()  # dense: NaN too


def test_bad_budgets_raise_naming_the_flags():
    cache = make_cache(page_size=16)
    with pytest.raises(ValueError, match="--budget 8 is smaller than one page.*--page-size 16"):
        QuestAttention(cache, 8, 16)
    with pytest.raises(ValueError, match="--budget 40 is not a multiple of --page-size 16"):
        QuestAttention(cache, 40, 16)
    with pytest.raises(ValueError, match="--page-size 8 differs"):
        QuestAttention(cache, 32, 8)
    check_budget(32, 16)


# ------------------------------------------------------------------------------------------------
# QuestAttention

def quest_and_dense_decode(budget, n_prompt=21, steps=5, Hq=4, Hkv=2, D=16, page_size=4, dense_layers=0,
                           use_kernels=False, seed=0, page_choice="kv_head", page_meta="auto"):
    """Drive QuestAttention and DenseAttention with the same q/k/v (one layer, B = 2): prefill, then
    decode steps. Returns the decode outputs of both, (steps, B, 1, Hq, D) each, and the Quest object."""
    N = n_prompt + steps
    quest = QuestAttention(make_cache(B=2, Hkv=Hkv, N=N, D=D, page_size=page_size, page_meta=page_meta), budget, page_size,
                           dense_layers=dense_layers, use_kernels=use_kernels, page_choice=page_choice)
    dense = DenseAttention(make_cache(B=2, Hkv=Hkv, N=N, D=D, page_size=page_size))
    q, k, v = rand(2, N, Hq, D, seed=seed), *kv(2, N, Hkv, D, seed=seed + 1)
    pos = torch.arange(n_prompt)
    torch.testing.assert_close(quest.prefill(0, q[:, pos], k[:, pos], v[:, pos], pos),
                               dense.prefill(0, q[:, pos], k[:, pos], v[:, pos], pos))
    outs_q, outs_d = [], []
    for t in range(n_prompt, N):
        pos = torch.tensor([t])
        outs_q.append(quest.decode(0, q[:, pos], k[:, pos], v[:, pos], pos.to(DEVICE)))
        outs_d.append(dense.decode(0, q[:, pos], k[:, pos], v[:, pos], pos.to(DEVICE)))
    return torch.stack(outs_q), torch.stack(outs_d), quest


def test_full_budget_equals_dense_exactly():
    o_quest, o_dense, quest = quest_and_dense_decode(budget=28)
    assert torch.equal(o_quest, o_dense)
    assert quest.stats["decode_steps"] == 5


def test_small_budget_attends_to_exactly_the_selected_pages():
    """Decode output = exact attention over the keys of the pages Quest selects (recomputed here
    from the bound), and it differs from dense."""
    n_prompt, S, budget = 21, 4, 8
    o_quest, o_dense, quest = quest_and_dense_decode(budget=budget, n_prompt=n_prompt, steps=1)
    cache = quest.cache
    N = n_prompt + 1
    q = rand(2, N, 4, 16, seed=0)[:, -1]  # (B, Hq, D) of the decode step
    P = -(-N // S)
    page_idx = select_pages(page_scores_ref(q, cache.kmin[0], cache.kmax[0], P), N, S, budget // S)
    for b in range(2):
        for hk in range(2):
            keys = torch.cat([torch.arange(p * S, min((p + 1) * S, N)) for p in page_idx[b, hk].tolist()])
            o, _ = attention_ref(q[b:b + 1, 2 * hk:2 * hk + 2, None], cache.k[0, b:b + 1, hk:hk + 1, keys],
                                 cache.v[0, b:b + 1, hk:hk + 1, keys], causal=False)
            torch.testing.assert_close(o_quest[0, b, 0, 2 * hk:2 * hk + 2], o[0, :, 0])
    assert not torch.allclose(o_quest, o_dense)
    # pages read: 2 per (b, hk); bytes: 7 full rows + 2 rows of the newest page, plus the bounds of 6 pages
    assert quest.stats["pages_read"] == 2 * 2 * 2
    assert quest.stats["kv_bytes_read"] == 2 * 2 * 2 * (4 + 2 + 6) * 16 * 4


def test_per_query_head_choice_attends_to_each_heads_own_pages():
    """page_choice="query_head" (Quest's GQA path): every query head ranks the pages by its own bound
    (the definition, from the stored keys) and attends to exactly its own top pages."""
    n_prompt, S, budget = 21, 4, 8
    o_quest, o_dense, quest = quest_and_dense_decode(budget=budget, n_prompt=n_prompt, steps=1,
                                                     page_choice="query_head")
    cache, N = quest.cache, n_prompt + 1
    q = rand(2, N, 4, 16, seed=0)[:, -1]  # (B, Hq, D)
    P = -(-N // S)
    differ = 0
    for b in range(2):
        for h in range(4):
            # this head's own bound per page, sum_d max(q_d kmin_d, q_d kmax_d), from the stored keys
            keys_of = cache.k[0, b, h // 2, :N]
            lo = torch.stack([keys_of[p * S:(p + 1) * S].amin(0) for p in range(P)])
            hi = torch.stack([keys_of[p * S:(p + 1) * S].amax(0) for p in range(P)])
            qb = torch.maximum(q[b, h] * lo, q[b, h] * hi).sum(-1)
            order = [p for p in qb.argsort(descending=True, stable=True).tolist() if p != P - 1]
            pages = sorted(order[:budget // S - 1] + [P - 1])
            keys = torch.cat([torch.arange(p * S, min((p + 1) * S, N)) for p in pages])
            o, _ = attention_ref(q[b:b + 1, h:h + 1, None], cache.k[0, b:b + 1, h // 2:h // 2 + 1, keys],
                                 cache.v[0, b:b + 1, h // 2:h // 2 + 1, keys], causal=False)
            torch.testing.assert_close(o_quest[0, b, 0, h], o[0, 0, 0])
            differ += h % 2 == 1 and pages != prev
            prev = pages
    assert quest.stats["pages_read"] == 2 * 4 * 2  # budget // S pages per query head
    _, _, per_kv = quest_and_dense_decode(budget=budget, n_prompt=n_prompt, steps=1)
    assert quest.stats["kv_bytes_read"] == 2 * per_kv.stats["kv_bytes_read"]  # G = 2 page lists per KV head
    assert differ, "the two heads of a group never chose differently: the test would prove nothing"


@pytest.mark.parametrize("use_kernels", [False, True])
def test_per_query_head_choice_full_budget_is_dense_and_kernels_match(use_kernels):
    o_q, o_d, _ = quest_and_dense_decode(budget=28, page_choice="query_head", use_kernels=use_kernels)
    torch.testing.assert_close(o_q, o_d, atol=2e-4, rtol=0)
    o_ref, _, s_ref = quest_and_dense_decode(budget=8, steps=3, seed=3, page_choice="query_head")
    o_ker, _, s_ker = quest_and_dense_decode(budget=8, steps=3, seed=3, page_choice="query_head", use_kernels=True)
    torch.testing.assert_close(o_ker, o_ref, atol=2e-4, rtol=0)
    assert s_ker.stats == s_ref.stats
    with pytest.raises(ValueError, match="--page-choice"):
        QuestAttention(make_cache(), 8, 4, page_choice="x")


def test_dense_layers_stay_dense():
    o_quest, o_dense, _ = quest_and_dense_decode(budget=4, dense_layers=1)
    assert torch.equal(o_quest, o_dense)


def test_kernel_path_matches_reference_path():
    o_ref, _, s_ref = quest_and_dense_decode(budget=8, steps=3, use_kernels=False, seed=3)
    o_ker, _, s_ker = quest_and_dense_decode(budget=8, steps=3, use_kernels=True, seed=3)
    torch.testing.assert_close(o_ker, o_ref, atol=2e-4, rtol=0)
    assert s_ker.stats == s_ref.stats


# ------------------------------------------------------------------------------------------------
# End to end on a tiny model

def greedy(model, attn, prompt, n_new):
    from generate import generate
    tokens, _ = generate(model, attn, prompt, n_new)
    return tokens


def tiny_cache(model, n, page_size=4):
    a = model.args
    return KVCache(a.n_layers, 1, a.n_kv_heads, n, a.head_dim, torch.float32, DEVICE, page_size=page_size)


def test_full_budget_decodes_the_same_greedy_tokens_as_dense():
    model = tiny_model(seed=1)
    prompt = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    n = 30 + 12
    dense = greedy(model, DenseAttention(tiny_cache(model, n)), prompt, 12)
    quest = greedy(model, QuestAttention(tiny_cache(model, n), 44, 4, dense_layers=0), prompt, 12)
    assert torch.equal(quest, dense)


def test_kernel_path_decodes_the_same_greedy_tokens():
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 300, (1, 26), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = greedy(model, QuestAttention(tiny_cache(model, 32), 8, 4, dense_layers=1), prompt, 6)
    ker = greedy(model, QuestAttention(tiny_cache(model, 32), 8, 4, dense_layers=1, use_kernels=True), prompt, 6)
    assert torch.equal(ker, ref)


# ------------------------------------------------------------------------------------------------
# The one decode step: positions on the device, the cache updated in place

@pytest.mark.parametrize("page_meta", ["auto", "int8"])
@pytest.mark.parametrize("use_kernels", [False, True])
def test_append_equals_write(use_kernels, page_meta):
    """Appending at device positions (torch, or kernels.append_kv) stores the K/V, page bounds (int8
    ones and their scales too) and length that write() stores for the same rows."""
    a, b = make_cache(B=2, N=40, page_meta=page_meta), make_cache(B=2, N=40, page_meta=page_meta)
    k, v = kv(2, 13, 2, 8, seed=3)
    a.write(0, k, v, torch.arange(13))
    b.write(0, k, v, torch.arange(13))
    for pos in range(13, 22):  # crosses a page boundary (page size 4)
        k1, v1 = kv(2, 1, 2, 8, seed=pos)
        a.write(0, k1, v1, torch.tensor([pos]))
        seq_len = b.append(0, k1, v1, torch.tensor([pos], device=DEVICE), use_kernels)
        assert seq_len.tolist() == [pos + 1] and seq_len.dtype == torch.int32
    # RetroAttention's step: overwrite the last m - 1 rows, append one (m = 8: 2-3 pages of 4; 20: two blocks of rows)
    for m, last in [(3, 22), (3, 23), (3, 24), (3, 25), (3, 26), (8, 27), (8, 28), (8, 29), (8, 30), (20, 31)]:
        k3, v3 = kv(2, m, 2, 8, seed=100 + last)
        a.write(0, k3, v3, torch.arange(last - m + 1, last + 1))
        b.append(0, k3, v3, torch.arange(last - m + 1, last + 1, device=DEVICE), use_kernels)
    for name in ("k", "v", "kmin", "kmax", "kscale", "lengths"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (b.kmin.dtype == torch.int8) == (page_meta == "int8") and b.kscale.numel() == (page_meta == "int8") * 2 * 2 * 10


@pytest.mark.parametrize("num_pages, budget_pages", [(3, 5), (6, 2), (6, 6), (9, 4), (10, 12)])
def test_select_pages_keeps_the_pages_of_the_length_and_pads_with_minus_one(num_pages, budget_pages):
    """Only the pages of the keys [0, seq_len) are chosen; with fewer pages than the budget all are kept
    and the other slots hold -1; an int and a device length agree, and so does the kernel."""
    S, P = 4, 10
    scores = rand(2, 3, P, seed=num_pages)
    scores[0, 0, :4] = 1.0  # ties: the lower page wins
    scores[1, 2, num_pages:] = 1e9  # past the length: never chosen
    n = (num_pages - 1) * S + 2
    want = top_pages(scores, n, S, budget_pages)
    assert (want[..., min(budget_pages, num_pages):] == -1).all() and want.shape[-1] == min(budget_pages, P)
    for seq_len in (n, torch.tensor([n], dtype=torch.int32, device=DEVICE)):
        assert torch.equal(select_pages(scores, seq_len, S, budget_pages), want)
        assert torch.equal(kernels.select_pages(scores, seq_len, S, budget_pages), want)


def test_newest_page_is_kept_above_infinite_and_nan_bounds():
    """The newest page outranks every score, +inf and NaN (of either sign) included, for an int and a
    device length, reference and kernel: here 3 pages of 5 are kept, 3 others have such bounds."""
    scores = torch.tensor([[[float("inf"), float("nan"), -float("nan"), 1.0, 2.0]]], device=DEVICE)
    want = torch.tensor([[[0, 1, 4]]], dtype=torch.int32)
    seq_len = torch.tensor([5 * 4 - 1], dtype=torch.int32, device=DEVICE)  # page_size 4: 5 pages, the last newest
    for n in (19, seq_len):
        for got in (select_pages(scores, n, 4, 3), kernels.select_pages(scores, n, 4, 3)):
            assert torch.equal(got.cpu(), want)
    assert torch.equal(top_pages(scores, 19, 4, 3).cpu(), want)


def test_select_pages_rejects_a_length_past_the_scores():
    scores = rand(1, 2, 5, seed=0)
    for fn in (select_pages, kernels.select_pages):
        with pytest.raises(ValueError, match="seq_len 21 must lie in"):
            fn(scores, 21, 4, 2)


def test_quest_pages_beyond_the_kernel_limit_falls_back_to_the_reference(monkeypatch):
    """Past SELECT_MAX_PAGES pages the kernel refuses, and quest_pages (kernels on) selects with the
    reference instead: the same pages."""
    S, n = 4, 37
    cache = make_cache(Hkv=2, N=48, D=8, page_size=S)
    cache.write(0, *kv(1, n, 2, 8, seed=5), torch.arange(n))
    q, seq_len = rand(1, 4, 8, seed=6), torch.tensor([n], dtype=torch.int32, device=DEVICE)
    want = quest_pages(q, cache, 0, 3 * S, seq_len, use_kernels=False)
    assert torch.equal(quest_pages(q, cache, 0, 3 * S, seq_len, use_kernels=True), want)
    monkeypatch.setattr(kernels, "SELECT_MAX_PAGES", cache.num_pages_max - 1)
    with pytest.raises(ValueError, match=f"kernels.select_pages handles up to {cache.num_pages_max - 1} pages"):
        kernels.select_pages(torch.zeros(1, 2, cache.num_pages_max, device=DEVICE), seq_len, S, 3)
    assert torch.equal(quest_pages(q, cache, 0, 3 * S, seq_len, use_kernels=True), want)


@pytest.mark.parametrize("method,w", [("dense", 1), ("quest", 1), ("quest_covering", 1), ("quest_query_head", 1), ("retro", 1), ("retro", 3),
                                      ("retro_short_prompt", 4), ("quest_int8", 1), ("retro_int8", 3)])
def test_decode_step_with_kernels_equals_reference(method, w):
    """The one decode step, fed device positions as generate.py (and a CUDA graph) feeds them: the
    Triton kernels give the PyTorch references' logits, step after step, and count the same statistics.
    quest_covering: a budget covering the whole cache (every layer dense); retro_short_prompt: the
    first steps feed fewer rows than the window (2 prompt tokens, w = 4); _int8: int8 page bounds."""
    from retro import RetroAttention
    m = tiny_model(seed=4)
    a = m.args
    n_prompt = 2 if method == "retro_short_prompt" else 36
    toks = torch.randint(0, a.vocab_size, (1, n_prompt + 1), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits, stats = [], []
    page_meta = "int8" if method.endswith("_int8") else "auto"
    method = method.removesuffix("_int8")
    for use_kernels in (False, True):
        cache = KVCache(a.n_layers, 1, a.n_kv_heads, 48, a.head_dim, torch.float32, DEVICE, page_size=4,
                        page_meta_dtype=page_meta)
        attn = {"dense": lambda: DenseAttention(cache, use_kernels),
                "quest": lambda: QuestAttention(cache, budget=16, page_size=4, dense_layers=1, use_kernels=use_kernels),
                "quest_covering": lambda: QuestAttention(cache, budget=48, page_size=4, use_kernels=use_kernels),
                "quest_query_head": lambda: QuestAttention(cache, budget=16, page_size=4, dense_layers=1,
                                                           use_kernels=use_kernels, page_choice="query_head"),
                "retro": lambda: RetroAttention(cache, budget=16, page_size=4, window=w, dense_layers=1,
                                                use_kernels=use_kernels),
                "retro_short_prompt": lambda: RetroAttention(cache, budget=8, page_size=4, window=w, dense_layers=1,
                                                             use_kernels=use_kernels)}[method]()
        seq, steps = toks, []
        with torch.no_grad():
            m(seq[:, :-1], torch.arange(n_prompt), attn)
            for n in range(n_prompt + 1, n_prompt + 8):  # the step that makes the sequence n tokens long
                rows = min(w, n)
                out = m(seq[:, -rows:], torch.arange(n - rows, n, device=DEVICE), attn, decode=True)[:, -1]
                seq = torch.cat([seq, out.argmax(-1, keepdim=True)], 1)
                steps.append(out)
        logits.append(torch.stack(steps))
        stats.append(attn.stats)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)
    assert stats[1] == pytest.approx(stats[0]) and stats[0]["decode_steps"] == 7



# ------------------------------------------------------------------------------------------------
# int8 page bounds (page_meta_dtype="int8", generate.py --page-meta int8)

KEY_KINDS = ["normal", "zero page", "one key", "extremes", "grid", "tiny", "magnitudes"]


def edge_keys(kind, B, n, Hkv, D, page_size, dtype, seed):
    """Keys (B, n, Hkv, D) that stress the rounding of int8 bounds: a page of zeros; a last page of one
    key (still filling: no bounds yet); the dtype's largest values of both signs; integers up to 127
    (quotients k / s land next to integers); values near the smallest normal (subnormals); magnitudes
    spread over 10^-4 .. 10^4."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, n, Hkv, D, generator=g, dtype=torch.float64)
    big = torch.finfo(dtype).max
    if kind == "zero page":
        p = int(torch.randint(0, -(-n // page_size), (1,), generator=g))
        k[:, p * page_size:(p + 1) * page_size] = 0
    elif kind == "extremes":
        pick = torch.rand(k.shape, generator=g)
        k = torch.where(pick < 0.2, big, torch.where(pick < 0.4, -big, k))
    elif kind == "grid":
        k = torch.randint(-127, 128, k.shape, generator=g).double()
        k[:, ::3, :, 0] = 127.0
    elif kind == "tiny":
        k = k * torch.finfo(dtype).tiny * 4
    elif kind == "magnitudes":
        k = k * 10.0 ** torch.randint(-4, 5, (1, n, Hkv, 1), generator=g).double()
    return k.to(dtype).to(DEVICE)


def check_int8_bounds(cache, Hq, seed):
    """The defining property, with a float64 oracle: for every page and KV head, the stored integers lo,
    hi (in [-127, 127]) and scale s enclose every key of the page exactly, lo s <= k <= hi s (products
    of an int8 and an fp32 are exact in float64), the integers are the tightest ones, and so no key
    scores above the bound, q . k <= sum_d max(q_d lo_d s, q_d hi_d s), for queries of all signs.
    Those are the full pages; the page still filling has none yet (zeros)."""
    S, n = cache.page_size, cache.length(0)
    P = n // S
    if n % S:
        assert not any(x[0, :, :, P].any() for x in (cache.kmin, cache.kmax, cache.kscale))
    n = P * S
    B, Hkv, _, D = cache.k[0].shape
    q = rand(B, Hq, D, seed=seed).double()
    if P == 0:
        return q, torch.zeros(B, Hkv, 0, dtype=torch.float64, device=q.device)
    keys = cache.k[0, :, :, :n].double()  # (B, Hkv, n, D)
    lo, hi, s = cache.kmin[0, :, :, :P], cache.kmax[0, :, :, :P], cache.kscale[0, :, :, :P].double()
    assert lo.dtype == hi.dtype == torch.int8 and cache.kscale.dtype == torch.float32
    assert lo.min() >= -127 and hi.max() <= 127 and (lo <= hi).all()
    lo64, hi64 = lo.double() * s[..., None], hi.double() * s[..., None]
    page = torch.arange(n, device=keys.device) // S
    assert (lo64[:, :, page] <= keys).all() and (keys <= hi64[:, :, page]).all()
    for p in range(P):  # tight: one step less would cut a key off
        block = keys[:, :, p * S:(p + 1) * S]
        assert ((lo.double()[:, :, p] + 1) * s[:, :, p, None] > block.amin(2)).all()
        assert ((hi.double()[:, :, p] - 1) * s[:, :, p, None] < block.amax(2)).all()
    amax = torch.maximum(keys.abs().amax(2, keepdim=True), torch.zeros(1, device=keys.device))
    page_amax = torch.stack([keys[:, :, p * S:(p + 1) * S].abs().amax((2, 3)) for p in range(P)], 2)
    assert (127 * s >= page_amax).all() and amax.isfinite().all()
    qg = q.view(B, Hkv, Hq // Hkv, 1, D)
    bound = torch.maximum(qg * lo64[:, :, None], qg * hi64[:, :, None]).sum((2, 4))  # (B, Hkv, P)
    key_scores = torch.einsum("bhgd,bhnd->bhn", qg[:, :, :, 0], keys)
    # (float64 sums of D terms: rounding far below the int8 step the bound has to spare)
    slack = 1e-12 * torch.einsum("bhgd,bhnd->bhn", qg[:, :, :, 0].abs(), keys.abs())
    assert (key_scores <= bound[:, :, page] + slack).all()
    return q, bound


# (bf16 on the GPU only: the CPU interpreter converts bf16 subnormals to fp32 wrongly, e.g. 1.0e-39 -> 4.4e-39)
CACHE_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@given(n=st.integers(1, 45), page_size=st.sampled_from([1, 3, 4, 16]), heads=st.sampled_from([(2, 2), (4, 2), (8, 2), (8, 1)]),
       D=st.sampled_from([8, 64]), dtype=st.sampled_from(CACHE_DTYPES),
       kind=st.sampled_from(KEY_KINDS), appended=st.integers(0, 6), seed=seeds)
def test_int8_bounds_hold_every_key(n, page_size, heads, D, dtype, kind, appended, seed):
    """Keys written by a prefill and then `appended` decode appends (kernels.append_kv, the newest page
    filling up): the int8 bounds equal a full refresh of every page (write() of all keys at once), and
    they bound every key (check_int8_bounds), whatever the keys (edge_keys). The fp32 scores of the
    reference and the kernel are that float64 bound up to fp32 rounding."""
    Hq, Hkv = heads
    if kind == "one key":
        n = (n - 1) // page_size * page_size + 1
    appended = min(appended, n - 1)
    k = edge_keys(kind, 1, n, Hkv, D, page_size, dtype, seed)
    v = torch.zeros_like(k)
    decoded = make_cache(Hkv=Hkv, N=48, D=D, page_size=page_size, dtype=dtype, page_meta="int8")
    decoded.write(0, k[:, :n - appended], v[:, :n - appended], torch.arange(n - appended))
    for t in range(n - appended, n):
        decoded.append(0, k[:, t:t + 1], v[:, t:t + 1], torch.tensor([t], device=DEVICE), use_kernels=True)
    full = make_cache(Hkv=Hkv, N=48, D=D, page_size=page_size, dtype=dtype, page_meta="int8")
    full.write(0, k, v, torch.arange(n))
    for name in ("kmin", "kmax", "kscale"):
        assert torch.equal(getattr(decoded, name), getattr(full, name)), name
    q, bound = check_int8_bounds(full, Hq, seed + 1)
    P = bound.shape[-1]  # (full pages)
    if kind != "extremes" and P:  # (there the fp32 sums overflow, as with bounds in the cache's dtype)
        mass = torch.einsum("bhgd,bhpd->bhp", q.view(1, Hkv, Hq // Hkv, D).abs(),
                            torch.maximum(full.kmin[0, :, :, :P].abs(), full.kmax[0, :, :, :P].abs()).double()
                            * full.kscale[0, :, :, :P, None].double())
        for scores in (page_scores_ref(q.float(), *full.page_bounds(0)[:2], P, full.kscale[0]),
                       kernels.page_scores(q.float(), *full.page_bounds(0)[:2], P, scale=full.kscale[0])):
            assert (scores.double() - bound).abs().max() <= 1e-5 * mass.max() + 1e-30


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (NaN pages on purpose)
def test_int8_bounds_at_the_dtype_limits_and_of_non_finite_pages():
    """quantize_bounds on its own: the largest and the smallest (subnormal) values of each dtype are
    enclosed exactly; an all-zero page gets lo = hi = 0; a page with an inf or NaN key gets a NaN
    scale (score NaN, which selection counts as +inf: the page is read), in the kernel too."""
    from kvcache import quantize_bounds
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        f = torch.finfo(dtype)
        vals = torch.tensor([[f.max, -f.max, 0.0, 1.0], [f.tiny, -f.tiny / 8, f.tiny / 2**5, 0.0],
                             [0.0, 0.0, 0.0, 0.0], [-f.max, -f.tiny, 127.0, f.eps]], dtype=dtype)
        lo, hi, s = quantize_bounds(vals, vals)
        v64, s64 = vals.double(), s.double()[:, None]
        assert (lo.double() * s64 <= v64).all() and (hi.double() * s64 >= v64).all(), dtype
        assert (lo[2] == 0).all() and (hi[2] == 0).all() and s[2] > 0
    lo, hi, s = quantize_bounds(torch.tensor([[1.0, float("inf")], [float("nan"), 0.0], [1.0, 2.0]]),
                                torch.tensor([[2.0, float("inf")], [float("nan"), 0.0], [1.0, 2.0]]))
    assert s[:2].isnan().all() and s[2].isfinite() and (lo[:2] == 0).all() and (hi[:2] == 0).all()
    cache = make_cache(Hkv=1, N=12, D=8, page_size=4, page_meta="int8")
    k = rand(1, 12, 1, 8, seed=2)
    k[0, 5, 0, 3] = float("nan")  # page 1
    k[0, 9, 0, 0] = float("-inf")  # page 2, the newest: its bounds set by the kernel with its last row
    cache.write(0, k[:, :11], k[:, :11], torch.arange(11))
    cache.append(0, k[:, 11:], k[:, 11:], torch.tensor([11], device=DEVICE), use_kernels=True)
    assert cache.kscale[0, 0, 0, 1:3].isnan().all() and cache.kscale[0, 0, 0, 0].isfinite()
    q = rand(1, 2, 8, seed=3)
    for scores in (page_scores_ref(q, *cache.page_bounds(0)[:2], 3, cache.kscale[0]),
                   kernels.page_scores(q, *cache.page_bounds(0)[:2], 3, scale=cache.kscale[0])):
        assert scores[0, 0, 1:].isnan().all() and scores[0, 0, 0].isfinite()
        assert select_pages(scores, 12, 4, 2)[0, 0].tolist() == [1, 2]


@given(num_pages=st.integers(0, 150), spare=st.integers(0, 3), heads=st.sampled_from([(2, 2), (4, 2), (8, 2), (8, 1)]),
       D=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.float32, torch.float16]), batch=st.integers(1, 2),
       seed=seeds)
def test_int8_page_scores_kernel_matches_reference(num_pages, spare, heads, D, dtype, batch, seed):
    """kernels.page_scores on int8 bounds (dequantized in registers) = page_scores_ref (dequantized
    first), group sizes 1, 2, 4, 8; with a length the pages past it score -inf."""
    from kvcache import quantize_bounds
    Hq, Hkv = heads
    q = rand(batch, Hq, D, dtype=dtype, seed=seed)
    a = rand(batch, Hkv, num_pages + spare, D, dtype=dtype, seed=seed + 1)
    b = rand(batch, Hkv, num_pages + spare, D, dtype=dtype, seed=seed + 2) * 3
    lo, hi, scale = quantize_bounds(torch.minimum(a, b), torch.maximum(a, b))
    want = page_scores_ref(q, lo, hi, num_pages, scale)
    got = kernels.page_scores(q, lo, hi, num_pages, scale=scale)
    assert got.shape == (batch, Hkv, num_pages) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)
    S, n = 4, max(0, 4 * num_pages - 4 * spare - 1)
    in_use = -(-n // S)
    for seq_len in (n, torch.tensor([n], dtype=torch.int32, device=DEVICE)):
        got = kernels.page_scores(q, lo, hi, num_pages, seq_len, S, scale)
        torch.testing.assert_close(got[..., :in_use], want[..., :in_use], atol=1e-3, rtol=1e-5)
        assert (got[..., in_use:] == float("-inf")).all()


def test_int8_bounds_need_their_scale():
    from kvcache import quantize_bounds
    lo, hi, scale = quantize_bounds(rand(1, 2, 3, 8, seed=0), rand(1, 2, 3, 8, seed=0) + 1)
    q = rand(1, 2, 8, seed=1)
    with pytest.raises(ValueError, match="int8 bounds need"):
        kernels.page_scores(q, lo, hi, 3)
    with pytest.raises(ValueError, match="int8 bounds need"):
        kernels.page_scores(q, lo.float(), hi.float(), 3, scale=scale)
    with pytest.raises(ValueError, match=r"--page-meta 'fp8': expected one of auto, int8"):
        make_cache(page_meta="fp8")


def test_int8_bounds_bytes_and_reads():
    """nbytes counts the int8 bounds and their scales; a Quest step counts the bounds it reads at their
    size: (2 D + 4) bytes per page and KV head instead of 2 D x the dtype's size."""
    auto, int8 = make_cache(B=2, N=40, D=16), make_cache(B=2, N=40, D=16, page_meta="int8")
    kv_bytes = 2 * 2 * 2 * 40 * 16 * 4
    assert auto.nbytes() == kv_bytes + 2 * 2 * 2 * 10 * 16 * 4
    assert int8.nbytes() == kv_bytes + 2 * 2 * 2 * 10 * 16 + 2 * 2 * 10 * 4
    assert auto.bound_bytes() == auto.row_bytes() == 2 * 2 * 2 * 16 * 4 and int8.bound_bytes() == 2 * 2 * (2 * 16 + 4)
    _, _, quest = quest_and_dense_decode(budget=8, steps=1, page_meta="int8")
    assert quest.stats["kv_bytes_read"] == 6 * 2 * 2 * 2 * 16 * 4 + 6 * 2 * 2 * (2 * 16 + 4)  # 6 rows + 6 pages' bounds


@pytest.mark.parametrize("use_kernels", [False, True])
def test_int8_quest_attends_to_the_pages_its_bounds_select(use_kernels):
    """QuestAttention on int8 bounds: the output is exact attention over the pages that select_pages
    picks from page_scores_ref of the stored int8 bounds; a covering budget is still dense exactly."""
    n_prompt, S, budget = 21, 4, 8
    o_quest, _, quest = quest_and_dense_decode(budget=budget, n_prompt=n_prompt, steps=1, page_meta="int8",
                                               use_kernels=use_kernels)
    cache, N = quest.cache, n_prompt + 1
    q = rand(2, N, 4, 16, seed=0)[:, -1]
    page_idx = select_pages(page_scores_ref(q, *cache.page_bounds(0)[:2], -(-N // S), cache.kscale[0]), N, S, budget // S)
    o, _ = paged_decode_ref(q, cache.k[0], cache.v[0], page_idx, N, S)
    torch.testing.assert_close(o_quest[0, :, 0], o, atol=2e-4, rtol=0)
    o_q, o_d, _ = quest_and_dense_decode(budget=28, page_meta="int8", use_kernels=use_kernels)
    if use_kernels:  # (the dense side here is the PyTorch reference)
        torch.testing.assert_close(o_q, o_d, atol=2e-4, rtol=0)
    else:
        assert torch.equal(o_q, o_d)
