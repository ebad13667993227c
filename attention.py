"""
Dense attention: the reference every sparse method is measured against, and the protocol every
method follows.

    o_i = sum_j softmax_j(q_i . k_j / sqrt(D) + mask_ij) v_j,   lse_i = log sum_j exp(q_i . k_j / sqrt(D) + mask_ij)

Everything here is naive PyTorch written to be read: these functions are the specification that
the Triton kernels in kernels.py must reproduce (same signatures, see test_attention.py).

Besides the output we return the log-sum-exp (lse) of each query row. It is what lets two partial
attentions over disjoint key sets A and B be merged into the attention over A u B
(FlashAttention's online softmax, flash-decoding's split-K, RetroAttention's revisions):

    lse = logaddexp(lse_A, lse_B);   o = exp(lse_A - lse) o_A + exp(lse_B - lse) o_B

Layout (heads first, like the cache): q (B, Hq, T, D) or (B, Hq, D) for one decode query,
k/v (B, Hkv, N, D). Grouped-query attention: query head h reads KV head h // G, G = Hq // Hkv.

The attention-object protocol (model.py calls it; every method here follows it, test_add_your_own.py
shows a new one). An object owns its KV cache: it writes k, v and decides what each query reads.

    o = attn.prefill(layer_idx, q, k, v, input_pos)  # T new tokens; input_pos (T,) int64 on the CPU
    o = attn.decode(layer_idx, q, k, v, input_pos)   # one decode step; input_pos (m,) on the cache's device

q (B, T, Hq, D) after RoPE, k, v (B, T, Hkv, D) -> o (B, T, Hq, D) in q's dtype. prefill appends
(input_pos continues the cache) and may read positions on the host. decode gets the newest token
(m = 1) or it and the m - 1 tokens before it (RetroAttention re-embeds them, rewriting their rows).
decode never reads a value on the host (no int(), no branch on a tensor) and updates its state in
place, so the same code runs eagerly and captured in a CUDA graph (cudagraph.py); the `stats`
property computes its statistics on the host from the lengths the cache logs on the device. An object that decodes from something of the
prompt besides the cache (RetroAttention: the last w - 1 rows' outputs) sets prefill_rows and takes
them through record_prefill(layer_idx, input_pos, o, lse) when another object prefills (token_sparse).
"""

import math

import torch

import kernels


def _check_gqa(q, k):
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    return Hq // Hkv


def _softmax_with_lse(scores):
    """scores (..., N) fp32 with -inf where masked -> (probs, lse); fully masked rows give 0, -inf."""
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) would be NaN: use a finite stand-in for empty rows, their probs are all 0 anyway
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(scores - safe_lse.unsqueeze(-1)), lse


def attention_ref(q, k, v, causal=True, q_offset=None, scale=None):
    """q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) -> o (B, Hq, Tq, D), lse (B, Hq, Tq) fp32.
    Query i sits at absolute position q_offset + i (default Tk - Tq: the queries are the last Tq
    keys' tokens); key j sits at position j. Causal masks keys that come after the query."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    G = _check_gqa(q, k)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q_offset = Tk - Tq if q_offset is None else q_offset
    k = k.repeat_interleave(G, dim=1).float()
    v = v.repeat_interleave(G, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    if causal:
        q_pos = torch.arange(Tq, device=q.device) + q_offset
        k_pos = torch.arange(Tk, device=q.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    p, lse = _softmax_with_lse(scores)
    return (p @ v).to(q.dtype), lse


def decode_ref(q, k_cache, v_cache, seq_len, scale=None):
    """One new query per sequence against the first seq_len cache rows.
    q (B, Hq, D); k_cache, v_cache (B, Hkv, Nmax, D) -> o (B, Hq, D), lse (B, Hq)."""
    o, lse = attention_ref(q.unsqueeze(2), k_cache[:, :, :seq_len], v_cache[:, :, :seq_len],
                           causal=False, scale=scale)
    return o.squeeze(2), lse.squeeze(2)


def paged_decode_ref(q, k_cache, v_cache, page_idx, seq_len, page_size, bias=None, scale=None):
    """Decode attention restricted to a list of pages per KV head (Quest-style sparse decoding).
    q (B, Hq, D); k_cache, v_cache (B, Hkv, Nmax, D); page_idx (B, Hkv, K) int, -1 = unused slot.
    Page p holds key positions [p*S, min((p+1)*S, seq_len)). All G query heads of a KV head read
    that head's pages. bias (B, Hkv, Nmax) fp32 is added to the scaled scores (KV compaction's beta).
    Returns o (B, Hq, D), lse (B, Hq) over exactly the selected keys."""
    B, Hq, D = q.shape
    Hkv, Nmax = k_cache.shape[1], k_cache.shape[2]
    G = _check_gqa(q, k_cache)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # A key is visible iff its page is in the list and it lies before seq_len.
    pos = torch.arange(Nmax, device=q.device)
    page_of_key = pos // page_size  # (Nmax,)
    visible = (page_of_key[None, None, :, None] == page_idx[:, :, None, :].long()).any(-1)
    visible &= (pos < seq_len)[None, None, :]  # (B, Hkv, Nmax)
    scores = torch.einsum("bhgd,bhnd->bhgn", q.float().view(B, Hkv, G, D), k_cache.float()) * scale
    if bias is not None:
        scores = scores + bias.float()[:, :, None, :]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    p, lse = _softmax_with_lse(scores)
    o = torch.einsum("bhgn,bhnd->bhgd", p, v_cache.float())
    return o.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def merge_attention(o1, lse1, o2, lse2):
    """Combine two attentions over disjoint key sets. o (..., D), lse (...) fp32.
    An empty set (lse = -inf) contributes nothing; two empty sets give o = 0, lse = -inf."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe).unsqueeze(-1)  # exp(-inf) = 0 for an empty side
    w2 = torch.exp(lse2 - safe).unsqueeze(-1)
    o = w1 * o1.float() + w2 * o2.float()
    return o.to(o1.dtype), lse


def prefill_attention(q, k_cache, v_cache, input_pos, use_kernels):
    """Attention of T new queries (already written to the cache) over the cache, causally.
    q (B, T, Hq, D) at host positions input_pos; caches (B, Hkv, Nmax, D) -> (o (B, T, Hq, D), lse (B, Hq, T))."""
    n = int(input_pos[-1]) + 1  # keys [0, n) are valid; we always write before attending
    attend = kernels.flash_prefill if use_kernels else attention_ref
    o, lse = attend(q.transpose(1, 2), k_cache[:, :, :n], v_cache[:, :, :n], causal=True)
    return o.transpose(1, 2), lse


def decode_attention(q, k_cache, v_cache, seq_len, use_kernels):
    """The m rows q (B, m, Hq, D) of the last m positions attend causally to the keys [0, seq_len),
    seq_len a (1,) int32 device tensor (nothing read on the host) -> o (B, m, Hq, D)."""
    qh = q.transpose(1, 2)
    m, G = qh.shape[2], _check_gqa(qh, k_cache)
    if not use_kernels:  # keys past seq_len lie after every query: the causal mask hides them
        o, _ = attention_ref(qh, k_cache, v_cache, causal=True, q_offset=seq_len - m)
    elif m * G <= kernels.MAX_DECODE_ROWS:  # split over the keys, all rows in one tile
        o, _ = kernels.flash_decode(qh if m > 1 else qh[:, :, 0], k_cache, v_cache, seq_len)
        o = o if m > 1 else o.unsqueeze(2)
    else:
        o, _ = kernels.flash_prefill(qh, k_cache, v_cache, causal=True, seq_len=seq_len)
    return o.transpose(1, 2)


class DenseAttention:
    """The dense method: write the new K/V into the cache, attend to everything before them."""

    prefill_rows = 0  # keeps nothing of the prompt but its cache

    def __init__(self, cache, use_kernels=False):
        self.cache = cache
        self.use_kernels = use_kernels

    def prefill(self, layer_idx, q, k, v, input_pos):
        self.cache.write(layer_idx, k, v, input_pos)
        return prefill_attention(q, self.cache.k[layer_idx], self.cache.v[layer_idx], input_pos, self.use_kernels)[0]

    def decode(self, layer_idx, q, k, v, input_pos):
        seq_len = self.cache.append(layer_idx, k, v, input_pos, self.use_kernels)
        return decode_attention(q, self.cache.k[layer_idx], self.cache.v[layer_idx], seq_len, self.use_kernels)

    def record_prefill(self, layer_idx, input_pos, o, lse):
        pass

    @property
    def stats(self):
        n, steps = self.cache.decoded_lengths()  # every layer read the n rows of each KV head
        return {"kv_bytes_read": int((n * steps).sum()) * self.cache.row_bytes() * self.cache.k.shape[0],
                "decode_steps": int(steps.sum())}
