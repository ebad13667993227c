"""KV compaction by attention matching: the invariants of compaction.py (DESIGN.md, "KV compaction")."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import compaction
import kernels
from attention import DenseAttention, attention_ref, paged_decode_ref
from compaction import (AUTHORS_W_BOX, CompactedAttention, CompactingAttention, biased_attention_ref, compact_cache,
                        compact_prompt, repeat_separator)
from conftest import DEVICE, gqa_heads, rand, tiny_model
from generate import generate
from kvcache import KVCache


def _errors(c, k, v, q):
    """Relative output error and mean relative mass error of a compaction on queries q (B, Hq, M, D)."""
    o, lse = attention_ref(q, k, v, causal=False)
    oc, lse_c = biased_attention_ref(q, c.ck, c.cv, c.beta)
    return float((oc - o).norm() / o.norm()), float((torch.exp(lse_c - lse) - 1).abs().mean())


@settings(max_examples=4)
@given(T=st.integers(1, 40), heads=gqa_heads(), select=st.sampled_from(["top", "omp"]), seed=st.integers(0, 99))
def test_full_size_reproduces_cache(T, heads, select, seed):
    Hq, Hkv = heads
    D = 16
    k, v = rand(1, Hkv, T, D, seed=seed), rand(1, Hkv, T, D, seed=seed + 1)
    q_ref = rand(1, Hq, T + 4, D, seed=seed + 2)  # >= T pooled queries per KV head: a determined fit
    c = compact_cache(k, v, q_ref, budget=T, select=select)
    assert torch.equal(c.idx, torch.arange(T, device=DEVICE).expand(1, Hkv, T))
    assert c.beta.abs().max() < 1e-2  # every key keeps its own mass
    torch.testing.assert_close(c.cv, v, atol=3e-2, rtol=0)  # up to ill-determined directions
    q = rand(1, Hq, 5, D, seed=seed + 3)  # queries the fit never saw
    o, lse = attention_ref(q, k, v, causal=False)
    oc, lse_c = biased_attention_ref(q, c.ck, c.cv, c.beta)
    torch.testing.assert_close(oc, o, atol=1e-3, rtol=0)
    torch.testing.assert_close(lse_c, lse, atol=1e-3, rtol=0)


def _clustered(seed, Hkv=2, G=2, T=256, M=192, C=12, D=16):
    """Keys around C centres (many near-duplicates to merge), queries near the same centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(Hkv, C, D, generator=g)
    pick = torch.randint(0, C, (Hkv, T), generator=g)
    k = 2 * (centres.gather(1, pick[..., None].expand(Hkv, T, D)) + 0.3 * torch.randn(Hkv, T, D, generator=g))
    v = torch.randn(Hkv, T, D, generator=g)

    def queries(s):
        gq = torch.Generator().manual_seed(s)
        cq = centres.repeat_interleave(G, 0)
        pq = torch.randint(0, C, (Hkv * G, M), generator=gq)
        return cq.gather(1, pq[..., None].expand(Hkv * G, M, D)) + 0.5 * torch.randn(Hkv * G, M, D, generator=gq)
    return k[None], v[None], queries(seed + 1)[None], queries(seed + 2)[None]


@pytest.mark.parametrize("t", [16, 32])
def test_fitted_beats_top_t_on_heldout_queries(t):
    k, v, q_ref, q_held = _clustered(0)
    fitted = compact_cache(k, v, q_ref, t)
    top = compact_cache(k, v, q_ref, t, fit_bias=False, fit_values=False)  # plain top-t eviction
    out_fit, mass_fit = _errors(fitted, k, v, q_held)
    out_top, mass_top = _errors(top, k, v, q_held)
    assert out_fit < 0.5 * out_top and mass_fit < 0.75 * mass_top, (out_fit, out_top, mass_fit, mass_top)


def test_error_budgets_keep_the_total_and_help_the_worst_head():
    k, v, q_ref, _ = _clustered(1)
    k = torch.cat([k[:, :1], k[:, 1:] * 0.05], dim=1)  # head 1: nearly flat attention, easy to compact
    uniform = compact_cache(k, v, q_ref, 24)
    by_error = compact_cache(k, v, q_ref, 24, budget_mode="error")
    assert int(by_error.budget.sum()) <= 2 * 24 and int(by_error.budget.min()) >= 1
    worst = int(uniform.out_err.argmax())
    assert by_error.out_err[0, worst] < uniform.out_err[0, worst]
    assert torch.isneginf(by_error.beta).sum() == by_error.beta.numel() - int(by_error.budget.sum())


def _concat_reference(q, k, v, bias, n_new):
    """Attention of the last n_new rows of k over [all rows before them] + [new rows, causally], with bias.
    q (B, Hq, n_new, D); k, v (B, Hkv, N, D); bias (B, Hkv, N)."""
    B, Hq, _, D = q.shape
    N, Hkv = k.shape[2], k.shape[1]
    scores = torch.einsum("bhtd,bhnd->bhtn", q.float(), k.repeat_interleave(Hq // Hkv, 1).float()) / D ** 0.5
    scores = scores + bias.repeat_interleave(Hq // Hkv, 1)[:, :, None, :]
    rows = torch.arange(N - n_new, N, device=k.device)[:, None]
    scores = scores.masked_fill(torch.arange(N, device=k.device)[None, :] > rows, float("-inf"))
    return torch.softmax(scores, -1) @ v.repeat_interleave(Hq // Hkv, 1).float()


@pytest.mark.parametrize("use_kernels", [False, True])
def test_append_after_compaction_equals_biased_concatenation(use_kernels):
    B, Hq, Hkv, T, D, ctx_len = 1, 4, 2, 40, 16, 40
    k, v = rand(B, Hkv, T, D, seed=0), rand(B, Hkv, T, D, seed=1)
    budget = torch.tensor([[9, 6]], device=DEVICE)  # per-head budgets: head 1 has 3 padding slots
    c = compact_cache(k, v, rand(B, Hq, 30, D, seed=2), budget)
    attn = CompactedAttention([c], ctx_len, max_new_tokens=24, page_size=4, use_kernels=use_kernels)
    keys, values, bias = c.ck, c.cv, c.beta
    done = 0
    for step, n in enumerate([3, 1, 1, 1]):  # a 3-token prefill of new text, then decode steps
        q, kn, vn = rand(B, n, Hq, D, seed=10 + step), rand(B, n, Hkv, D, seed=20 + step), rand(B, n, Hkv, D, seed=30 + step)
        pos = torch.arange(ctx_len + done, ctx_len + done + n)  # positions go on after L
        o = attn.prefill(0, q, kn, vn, pos) if n > 1 else attn.decode(0, q, kn, vn, pos.to(DEVICE))
        done += n
        keys, values = torch.cat([keys, kn.transpose(1, 2)], 2), torch.cat([values, vn.transpose(1, 2)], 2)
        bias = torch.cat([bias, torch.zeros(B, Hkv, n, device=DEVICE)], 2)
        expect = _concat_reference(q.transpose(1, 2), keys, values, bias, n)
        torch.testing.assert_close(o.transpose(1, 2).float(), expect, atol=2e-4, rtol=0)


@pytest.mark.parametrize("S, n", [(4, 23), (16, 40)])
def test_biased_decode_kernel_matches_reference(S, n):
    B, Hq, Hkv, D = 2, 4, 2, 32
    Nmax = 48
    q, k, v = rand(B, Hq, D, seed=0), rand(B, Hkv, Nmax, D, seed=1), rand(B, Hkv, Nmax, D, seed=2)
    bias = 2 * rand(B, Hkv, Nmax, seed=3)
    bias[0, 0, :S] = float("-inf")  # a whole page of absent keys (compaction's padding slots)
    bias[1, 1, 5:7] = float("-inf")
    pages = torch.arange(-(-n // S), device=DEVICE, dtype=torch.int32).flip(0).expand(B, Hkv, -1).contiguous()
    o, lse = kernels.paged_decode(q, k, v, pages, n, S, bias=bias)
    o_ref, lse_ref = paged_decode_ref(q, k, v, pages, n, S, bias=bias)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=2e-4, rtol=0)
    torch.testing.assert_close(lse, lse_ref, atol=2e-4, rtol=0)


def _greedy(model, prompt, n, compact_ratio=None):
    a = model.args
    if compact_ratio is None:
        attn = DenseAttention(KVCache(a.n_layers, 1, a.n_kv_heads, prompt.shape[1] + n, a.head_dim,
                                      torch.float32, DEVICE))
        return generate(model, attn, prompt, n)[0]
    res = compact_prompt(model, prompt, compact_ratio, separator_ids=[1, 2, 3], max_new_tokens=n)
    return generate(model, res.attn, prompt[:, res.start_pos:], n, start_pos=res.start_pos)[0], res


def test_compacted_prompt_decodes_and_ratio_one_matches_dense():
    model = tiny_model(0)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, model.args.vocab_size, (1, 48), generator=g).to(DEVICE)
    dense = _greedy(model, prompt, 8)
    same, res = _greedy(model, prompt, 8, compact_ratio=1)
    assert torch.equal(same, dense)
    assert res.stats["ref_out_err"] < 1e-2 and res.stats["ref_mass_err"] < 1e-3
    small, res = _greedy(model, prompt, 8, compact_ratio=6)
    assert small.shape == dense.shape and int(small.max()) < model.args.vocab_size
    assert res.attn.t == round(47 / 6) and res.stats["kv_mib_after"] < res.stats["kv_mib_before"] / 4


def _repeat_prefill(model, prompt, L, sep, budget, use_kernels=False):
    """One repeat-prefill pass of prompt[:, :L] + sep + prompt[:, :L] -> the CompactingAttention."""
    seq = torch.cat([prompt[:, :L], torch.tensor([sep], device=DEVICE), prompt[:, :L]], 1)
    compactor = CompactingAttention(L, len(sep), budget, use_kernels=use_kernels)
    with torch.no_grad():
        model(seq, torch.arange(seq.shape[1]), compactor, last_only=True)
    return compactor, seq


def test_kernel_decode_matches_reference_decode_of_one_compaction():
    """One compaction; its layers decoded by the kernels and by the references give the same logits."""
    model = tiny_model(1)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, model.args.vocab_size, (1, 24), generator=g).to(DEVICE)
    compactor, _ = _repeat_prefill(model, prompt, 22, [1, 2], budget=6)
    logits = []
    for use_kernels in (False, True):
        compactor.use_kernels = use_kernels
        attn = compactor.decoder(max_new_tokens=3)
        with torch.no_grad():
            model(prompt[:, 22:], torch.arange(22, 24), attn)  # 2 new tokens
            logits.append(model(prompt[:, :1], torch.arange(24, 25), attn))  # one decode step
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)


def test_reference_queries_are_on_policy(monkeypatch):
    """The reference queries of layer l are the second copy's queries in a model whose layers below l
    already read their compacted context: the queries a CompactedAttention of those layers produces
    when fed separator + copy, not those of the dense forward."""
    model = tiny_model(2)
    g = torch.Generator().manual_seed(2)
    L, sep = 30, [1, 2, 3]
    prompt = torch.randint(4, model.args.vocab_size, (1, L), generator=g).to(DEVICE)
    recorded = []
    real = compaction.compact_cache
    monkeypatch.setattr(compaction, "compact_cache", lambda k, v, q_ref, *a, **kw: (recorded.append(q_ref), real(k, v, q_ref, *a, **kw))[1])
    compactor, seq = _repeat_prefill(model, prompt, L, sep, budget=4)

    class Record:  # hands every layer to `inner`, keeping the queries (B, Hq, T, D) each layer sees
        def __init__(self, inner):
            self.inner, self.q = inner, {}

        def prefill(self, layer_idx, q, k, v, input_pos):
            self.q[layer_idx] = q.transpose(1, 2)
            return self.inner.prefill(layer_idx, q, k, v, input_pos)

        def __getattr__(self, name):  # everything else is the wrapped object's
            return getattr(self.inner, name)

    on_policy = Record(compactor.decoder(max_new_tokens=L + len(sep)))
    a = model.args
    dense = Record(DenseAttention(KVCache(a.n_layers, 1, a.n_kv_heads, seq.shape[1], a.head_dim, torch.float32, DEVICE)))
    with torch.no_grad():
        model(seq[:, L:], torch.arange(L, seq.shape[1]), on_policy)
        model(seq, torch.arange(seq.shape[1]), dense)
    for layer in range(a.n_layers):
        expect = on_policy.q[layer][:, :, len(sep):]  # the second copy's rows
        torch.testing.assert_close(recorded[layer], expect, atol=1e-5, rtol=0)
        if layer > 0:  # below it a compacted layer: not the dense forward's queries
            assert (recorded[layer] - dense.q[layer][:, :, L + len(sep):]).abs().max() > 1e-3
    torch.testing.assert_close(recorded[0], dense.q[0][:, :, L + len(sep):], atol=1e-5, rtol=0)


def test_one_bos_and_the_authors_framing():
    class Tok:  # the two tokenizer attributes and the encode repeat_separator uses
        def __init__(self, chat_format, bos_id):
            self.chat_format, self.bos_id = chat_format, bos_id

        def encode(self, text, allow_special=False):
            names = {"<|begin_of_text|>": 0, "<|start_header_id|>": 1, "<|end_header_id|>": 2, "<|eot_id|>": 3}
            out = []
            while text:
                name = next((n for n in names if allow_special and text.startswith(n)), None)
                out.append(names[name] if name else 10 + ord(text[0]))
                text = text[len(name) if name else 1:]
            return out

    chat = repeat_separator(Tok("llama3", 0))
    assert 0 not in chat and chat[:1] == [1] and chat[-1] == 10 + ord("\n")
    assert "".join(chr(i - 10) for i in chat if i >= 10).startswith("user\n\nRepeat the previous context verbatim.")
    assert repeat_separator(Tok(None, None)) == Tok(None, None).encode(compaction.REPEAT_PROMPT)

    model = tiny_model(0)
    fed = []

    class Spy:  # the model, recording the sequence of the repeat-prefill pass
        args = model.args

        def __call__(self, seq, *rest, **kw):
            fed.append(seq)
            return model(seq, *rest, **kw)

    bos = 7
    prompt = torch.tensor([[bos] + list(range(20, 40))], device=DEVICE)
    res = compact_prompt(Spy(), prompt, 4, separator_ids=[1, 2], bos_id=bos, max_new_tokens=2)
    assert fed[0][0].tolist() == [bos] + list(range(20, 39)) + [1, 2] + list(range(20, 39))  # one BOS
    assert res.start_pos == 20
    compact_prompt(Spy(), prompt, 4, separator_ids=[1, 2], max_new_tokens=2)  # no BOS id: the copy is whole
    assert fed[1][0].tolist().count(bos) == 2


def test_authors_box_bounds_every_kept_keys_bias():
    k, v, q_ref, _ = _clustered(0)
    c = compact_cache(k, v, q_ref, 16, w_box=AUTHORS_W_BOX)
    assert (c.beta >= -3 - 1e-4).all() and (c.beta <= 3 + 1e-4).all()
    free = compact_cache(k, v, q_ref, 16)
    assert float(free.beta.min()) < -3  # unbounded, some kept keys end with almost no mass
    with pytest.raises(ValueError, match="w_box"):
        compact_cache(k, v, q_ref, 16, w_box=(1.0, 0.5))
