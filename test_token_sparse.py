"""Token Sparse Attention (token_sparse.py): the invariants of DESIGN.md, kernels against references,
and the method object inside a tiny model."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import token_sparse as ts
from attention import DenseAttention, attention_ref
from conftest import ATOL, DEVICE, dtypes, gqa_heads, head_dims, rand, seq_lens, tiny_model
from kvcache import KVCache


def qkv(B, Hq, Hkv, T, D, dtype=torch.float32, seed=0):
    return (rand(B, Hq, T, D, dtype=dtype, seed=seed), rand(B, Hkv, T, D, dtype=dtype, seed=seed + 1),
            rand(B, Hkv, T, D, dtype=dtype, seed=seed + 2))


def random_selection(B, Hq, T, seed):
    """Every (row, head) keeps its own random ascending subset, of its own size; the padding past
    n_keep holds random positions that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    n_keep = torch.randint(1, T + 1, (B, Hq), generator=g)
    N = int(n_keep.max())
    idx = torch.randint(0, T, (B, Hq, N), generator=g)
    for b in range(B):
        for h in range(Hq):
            n = int(n_keep[b, h])
            idx[b, h, :n] = torch.randperm(T, generator=g)[:n].sort().values
    return idx.to(DEVICE, torch.int32), n_keep.to(DEVICE, torch.int32)


def model_prefill(model, attn, tokens):
    return model(tokens, torch.arange(tokens.shape[1]), attn=attn)


def make_cache(model, B=1):
    a = model.args
    return KVCache(a.n_layers, B, a.n_kv_heads, a.max_seq_len, a.head_dim, torch.float32, DEVICE)


def tokens_for(model, B=1, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.args.vocab_size, (B, T), generator=g).to(DEVICE)


# ----------------------------------------------------------------------------------------------

def test_coverage_zero_equals_dense():
    q, k, v = qkv(2, 4, 2, 50, 64)
    o, n_keep = ts.token_sparse_attention(q, k, v, coverage=0.0, min_tokens=8, window=8)
    assert (n_keep == 50).all()  # nothing has mass below 0: every token is kept
    torch.testing.assert_close(o, attention_ref(q, k, v)[0], atol=1e-6, rtol=1e-6)
    # a prompt of at most min_tokens + window tokens is never sparsified, whatever the coverage
    o, n_keep = ts.token_sparse_attention(q, k, v, coverage=0.9, min_tokens=42, window=8)
    assert n_keep is None  # the dense path: attention.attention on the CPU, flash_prefill on a GPU
    torch.testing.assert_close(o, attention_ref(q, k, v)[0], atol=1e-6, rtol=1e-6)

    model = tiny_model()
    tokens = tokens_for(model)
    dense = model_prefill(model, DenseAttention(make_cache(model)), tokens)
    cache = make_cache(model)
    attn = ts.TokenSparseAttention(cache, DenseAttention(cache), coverage=0.0, min_tokens=4, window=8,
                                   sparse_layers="all")
    torch.testing.assert_close(model_prefill(model, attn, tokens), dense, atol=1e-5, rtol=1e-5)
    assert attn.stats["ts_kept_fraction"] == 1.0
    cache = make_cache(model)
    short = ts.TokenSparseAttention(cache, DenseAttention(cache), coverage=0.5, min_tokens=56, window=8,
                                    sparse_layers="all")
    assert torch.equal(model_prefill(model, short, tokens), dense)


@given(heads=gqa_heads(), D=head_dims(), W=st.integers(1, 40), extra=st.integers(0, 40), dtype=dtypes())
def test_scoring_kernel_matches_reference(heads, D, W, extra, dtype):
    Hq, Hkv = heads
    q, k, _ = qkv(1, Hq, Hkv, W + extra, D, dtype, seed=W + extra)
    ref = ts.window_scores_ref(q[:, :, extra:], k)
    out = ts.window_scores(q[:, :, extra:], k)
    torch.testing.assert_close(out, ref, atol=ATOL[dtype], rtol=1e-3)
    torch.testing.assert_close(out.sum(-1), torch.full_like(out[..., 0], W), atol=1e-3, rtol=1e-3)


@given(B=st.integers(1, 2), heads=gqa_heads(), D=head_dims(), T=seq_lens(), dtype=dtypes(), seed=st.integers(0, 99))
def test_sparse_attention_kernel_matches_reference(B, heads, D, T, dtype, seed):
    Hq, Hkv = heads
    q, k, v = qkv(B, Hq, Hkv, T, D, dtype, seed)
    idx, n_keep = random_selection(B, Hq, T, seed)
    ref = ts.sparse_attention_ref(q, k, v, idx, n_keep)
    torch.testing.assert_close(ts.sparse_attention(q, k, v, idx, n_keep), ref, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(ts.sparse_attention_gathered(q, k, v, idx, n_keep), ref, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(ts.sparse_attention_torch(q, k, v, idx, n_keep), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("fn", [ts.sparse_attention_ref, ts.sparse_attention, ts.sparse_attention_gathered,
                                ts.sparse_attention_torch])
def test_skipped_rows_are_zero_and_kept_rows_are_causal(fn):
    B, Hq, Hkv, T, D, cut = 2, 4, 2, 45, 64, 20
    q, k, v = qkv(B, Hq, Hkv, T, D, seed=3)
    idx, n_keep = random_selection(B, Hq, T, seed=3)
    o = fn(q, k, v, idx, n_keep)
    kept = torch.zeros(B, Hq, T, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        for h in range(Hq):
            kept[b, h, idx[b, h, :n_keep[b, h]].long()] = True
    assert (o[~kept] == 0).all() and (o[kept].abs().sum(-1) > 0).all()
    # a kept row never sees a later token: change every key and value after `cut`
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1:] = rand(B, Hkv, T - cut - 1, D, seed=9) * 10
    v2[:, :, cut + 1:] = rand(B, Hkv, T - cut - 1, D, seed=10) * 10
    o2 = fn(q, k2, v2, idx, n_keep)
    assert torch.equal(o2[:, :, :cut + 1], o[:, :, :cut + 1])
    assert not torch.equal(o2[:, :, cut + 1:], o[:, :, cut + 1:])


class Recorder:
    """Wraps an attention object and remembers the K/V each layer was handed."""

    def __init__(self, attn):
        self.attn, self.kv = attn, {}

        self.prefill_rows = attn.prefill_rows

    def prefill(self, layer_idx, q, k, v, input_pos):
        self.kv[layer_idx] = (k.clone(), v.clone())
        return self.attn.prefill(layer_idx, q, k, v, input_pos)

    def decode(self, layer_idx, q, k, v, input_pos):
        self.kv[layer_idx] = (k.clone(), v.clone())
        return self.attn.decode(layer_idx, q, k, v, input_pos)


@pytest.mark.parametrize("keep", [None, 0.5])
def test_cache_after_sparse_prefill_equals_dense_cache(keep):
    model = tiny_model()  # 3 layers: "half" makes layers 1 and 2 sparse
    tokens = tokens_for(model, T=64)
    dense_cache = make_cache(model)
    model_prefill(model, DenseAttention(dense_cache), tokens)
    cache = make_cache(model)
    attn = ts.TokenSparseAttention(cache, DenseAttention(cache), coverage=0.3, min_tokens=8, window=8,
                                   sparse_layers="half", keep=keep)
    rec = Recorder(attn)
    model_prefill(model, rec, tokens)
    assert attn.sparse_layers == {1, 2} and attn.stats["ts_kept_fraction"] < 1.0  # sparsity engaged
    # Every row of every layer is in the cache, not only the kept ones. Up to the first sparse layer
    # the inputs are the dense model's, so the cache is the dense cache bit for bit; after it the K/V
    # are those the sparse model computed.
    for layer, (k, v) in rec.kv.items():
        assert torch.equal(cache.k[layer, :, :, :64], k.transpose(1, 2))
        assert torch.equal(cache.v[layer, :, :, :64], v.transpose(1, 2))
    for layer in (0, 1):
        assert torch.equal(cache.k[layer], dense_cache.k[layer]) and torch.equal(cache.v[layer], dense_cache.v[layer])
    assert cache.lengths.tolist() == [64, 64, 64]
    # decoding goes to the decode object and reads the full cache
    model(tokens[:, :1], torch.tensor([64], device=DEVICE), attn=attn, decode=True)
    assert attn.stats["decode_steps"] == 1 and cache.lengths.tolist() == [65, 65, 65]


def authors_budget(scores, tau, min_tokens):
    """The authors' get_index (github dongwonjo/Token-Sparse-Attention), re-derived in plain Python
    for one row: average the heads, normalize, count the sorted masses whose running sum stays below
    tau; none: keep all; else drop one more than counted."""
    heads = scores[0].tolist()
    C = len(heads[0])
    avg = [sum(h[j] for h in heads) / len(heads) for j in range(C)]
    mass = sorted(a / sum(avg) for a in avg)
    running, n = 0.0, 0
    for m in mass:
        running += m
        n += running < tau
    return C if n == 0 else max(min(min_tokens, C), C - (n + 1))


def test_coverage_budget_hand_worked_example():
    # head 0 sums to 8, head 1 to 4. Averaged first (authors): [2, .5, 0, 1.5, 0, 2] / 6, sorted
    # 0, 0, 1/12, 1/4, 1/3, 1/3, running sums 0, 0, .083, .333, ... : 3 below tau = 0.2, so 4 drop.
    # Normalized first (per_head): [.25, .125, 0, .25, 0, .375], running sums 0, 0, .125, .375: 3 drop.
    scores = torch.tensor([[[4., 0, 0, 2, 0, 2], [0, 1, 0, 1, 0, 2]]])
    assert ts.coverage_budget(scores, 0.2, 0) == [2]
    assert ts.coverage_budget(scores, 0.2, 0, rule="per_head") == [3]
    assert ts.coverage_budget(scores, 0.05, 0) == [3]   # 2 below 0.05 -> 3 drop
    assert ts.coverage_budget(scores, 0.0, 0) == [6]    # nothing below tau: the layer stays dense
    assert ts.coverage_budget(scores, 0.2, 5) == [5]    # min_tokens
    with pytest.raises(ValueError, match="coverage rule"):
        ts.coverage_budget(scores, 0.2, 0, rule="x")


@pytest.mark.parametrize("rule", ["authors", "per_head"])
def test_coverage_budget_is_scale_invariant(rule):
    # every token of every head holds 1/3 of its head's mass: nothing lies below tau = 0.3
    tiny = torch.tensor([[[1., 1., 1.], [1e-31, 1e-31, 1e-31]]])
    assert ts.coverage_budget(tiny, 0.3, 0, rule) == [3]
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 4, 40, generator=g) ** 4
    for c in (1e-35, 1e-20, 1.0, 1e20):
        assert ts.coverage_budget(scores * c, 0.05, 3, rule) == ts.coverage_budget(scores, 0.05, 3, rule)
    assert ts.coverage_budget(torch.zeros(1, 2, 5), 0.3, 0, rule) == [5]  # no information: keep all


@given(Hq=st.integers(1, 4), C=st.integers(1, 60), tau=st.floats(0.0, 0.6), min_tokens=st.integers(0, 70),
       seed=st.integers(0, 999))
def test_dynamic_coverage_matches_the_authors_rule(Hq, C, tau, min_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, Hq, C, generator=g, dtype=torch.float64) ** 4  # skewed, like attention
    kept = ts.coverage_budget(scores, tau, min_tokens)[0]
    assert kept == authors_budget(scores, tau, min_tokens)
    assert min(min_tokens, C) <= kept <= C


@given(B=st.integers(1, 2), heads=gqa_heads(), L=st.integers(20, 70), window=st.integers(1, 12),
       keep=st.sampled_from([None, 0.25, 0.6]), seed=st.integers(0, 99))
def test_each_head_keeps_its_top_tokens_and_the_window(B, heads, L, window, keep, seed):
    Hq, Hkv = heads
    q, k, _ = qkv(B, Hq, Hkv, L, 64, seed=seed)
    idx, n_keep = ts.select_tokens(q, k, coverage=0.2, min_tokens=4, window=window, keep=keep)
    C = L - window
    scores = ts.pool_scores(ts.window_scores_ref(q[:, :, C:], k)[:, :, :C])
    for b in range(B):
        n = int(n_keep[b, 0])
        assert (n_keep[b] == n).all() and n >= min(4, C) + window
        if keep is not None:
            assert n - window == min(C, max(4, math.ceil(keep * C)))  # the fraction, at least min_tokens
        for h in range(Hq):
            rows = idx[b, h, :n].long()
            assert (rows.diff() > 0).all() and rows[-window:].tolist() == list(range(C, L))
            chosen = torch.zeros(C, dtype=torch.bool, device=DEVICE)
            chosen[rows[:-window]] = True
            if (~chosen).any():
                assert scores[b, h][chosen].min() >= scores[b, h][~chosen].max()


def test_batch_rows_select_independently():
    q, k, v = qkv(2, 4, 2, 60, 64, seed=5)
    o, n_keep = ts.token_sparse_attention(q, k, v, coverage=0.3, min_tokens=8, window=8)
    for b in range(2):
        o_b, n_b = ts.token_sparse_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], coverage=0.3, min_tokens=8, window=8)
        assert torch.equal(n_keep[b:b + 1], n_b)
        torch.testing.assert_close(o[b:b + 1], o_b, atol=1e-6, rtol=0)
    assert n_keep[0, 0] != n_keep[1, 0]  # the two rows really kept different numbers of tokens


@pytest.mark.parametrize("attn_kernel", ["varlen", "gather"])
def test_kernel_path_equals_reference_path(attn_kernel):
    model = tiny_model()
    tokens = tokens_for(model, B=2, T=48)
    logits = []
    for use_kernels in (False, True):
        cache = make_cache(model, B=2)
        attn = ts.TokenSparseAttention(cache, DenseAttention(cache, use_kernels=use_kernels), coverage=0.2,
                                       min_tokens=8, window=8, sparse_layers=[0, 2], use_kernels=use_kernels,
                                       attn_kernel=attn_kernel)
        logits.append(model_prefill(model, attn, tokens))
        kept = attn.stats["ts_kept_fraction_per_layer"]
    assert all(f < 1.0 for f in kept.values())
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_kernels_check_shapes_before_launch():
    q, k, v = qkv(1, 4, 2, 40, 64)
    idx, n_keep = random_selection(1, 4, 40, seed=0)
    for args, match in [((q, k[..., :32]), "head dim"), ((q.expand(2, -1, -1, -1), k), "batch"),
                        ((q[:, :3], k), "multiple")]:
        with pytest.raises(ValueError, match=match):
            ts.window_scores(args[0][:, :, -8:], args[1])
    for args, match in [((q, k[..., :32], v[..., :32]), "head dim"), ((q.expand(2, -1, -1, -1), k, v), "batch"),
                        ((q, k, v[:, :, :20]), "one shape"), ((q, k[:, :, :20], v[:, :, :20]), "length")]:
        for fn in (ts.sparse_attention, ts.sparse_attention_gathered):
            with pytest.raises(ValueError, match=match):
                fn(*args, idx, n_keep)
    with pytest.raises(ValueError, match="exceeds"):
        ts.sparse_attention(q, k, v, idx[:, :, :1], n_keep)


def test_sparse_layers_and_flags_are_checked():
    assert ts.parse_sparse_layers(None, 32) == list(range(16, 32))
    assert ts.parse_sparse_layers("15-30", 32) == list(range(15, 31))
    assert ts.parse_sparse_layers("3,5-6", 8) == [3, 5, 6]
    assert ts.parse_sparse_layers([2, 1], 4) == [1, 2]
    with pytest.raises(ValueError, match="sparse-layers"):
        ts.parse_sparse_layers("40", 32)
    with pytest.raises(ValueError, match="sparse-layers"):
        ts.parse_sparse_layers("x", 32)
    cache = KVCache(2, 1, 1, 16, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="coverage"):
        ts.TokenSparseAttention(cache, DenseAttention(cache), coverage=1.5)
    with pytest.raises(ValueError, match="keep"):
        ts.TokenSparseAttention(cache, DenseAttention(cache), keep=0.0)
