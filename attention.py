"""
Dense attention: the reference every sparse method is measured against, and the protocol every
method follows.

    o_i = sum_j softmax_j(q_i . k_j / sqrt(D) + mask_ij) v_j,   lse_i = log sum_j exp(q_i . k_j / sqrt(D) + mask_ij)

The references here are naive PyTorch written to be read: the specification the Triton kernels in
kernels.py reproduce (same signatures, see test_attention.py). Each also returns the log-sum-exp (lse)
of every query row, which merges two attentions over disjoint key sets A and B into the one over A u B
(FlashAttention's online softmax, flash-decoding's split-K, RetroAttention's revisions):

    lse = logaddexp(lse_A, lse_B);   o = exp(lse_A - lse) o_A + exp(lse_B - lse) o_B

Layout (heads first, like the cache): q (B, Hq, T, D) or (B, Hq, D) for one decode query,
k/v (B, Hkv, N, D). Grouped-query attention: query head h reads KV head h // G, G = Hq // Hkv.

The attention-object protocol (model.py calls it; every method follows it, test_add_your_own.py adds
one). An object owns its KV cache: it writes k, v and decides what each query reads.

    o = attn.prefill(layer_idx, q, k, v, input_pos)  # T new tokens; input_pos (T,) int64 on the CPU
    o = attn.decode(layer_idx, q, k, v, input_pos)   # one decode step; input_pos (m,) on the cache's device

q (B, T, Hq, D) after RoPE, k, v (B, T, Hkv, D) -> o (B, T, Hq, D) in q's dtype. prefill appends (input_pos
continues the cache) and may read positions on the host. decode gets the newest token (m = 1), or it and
the m - 1 before it (RetroAttention re-embeds them, rewriting their rows). With the Triton kernels decode
reads no value on the host (no int(), no branch on a tensor) and updates its state in place, so the same
code runs eagerly and in a CUDA graph (cudagraph.py); the PyTorch run path, for a CPU, may read the length.
The `stats` property computes the statistics on the host from the lengths the cache logs on the device.
An object that decodes from more of the prompt than its cache (RetroAttention: the last w - 1 rows'
outputs) sets prefill_rows to their number and takes them through record_prefill(layer_idx, input_pos,
o, lse) when another object prefills (token_sparse); with prefill_rows = 0 it needs no record_prefill.
"""

import math

import torch
import torch.nn.functional as F

import kernels


def _check_gqa(q, k):
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    return Hq // Hkv


def masked_attention(q, k, v, visible, scale=None, bias=None):
    """The attention every function here computes, each with its own mask. q (B, Hkv, G, R, D): R rows of
    each of the G query heads that share a KV head; k, v (B, Hkv, N, D); visible: which row sees which key,
    broadcastable to (B, Hkv, G, R, N), or None for all; bias (B, Hkv, N) or None, added to the scaled
    scores -> o (B, Hkv, G, R, D), lse (B, Hkv, G, R), fp32; a row that sees no key gets o = 0, lse = -inf."""
    B, Hkv, G, R, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q.float().reshape(B, Hkv, G * R, D) @ k.float().transpose(-1, -2) * scale).view(B, Hkv, G, R, -1)
    if bias is not None:
        s = s + bias.float()[:, :, None, None, :]
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # exp(-inf - -inf) would be NaN: use a finite stand-in for empty rows, their probs are all 0 anyway
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    return (p.view(B, Hkv, G * R, -1) @ v.float()).view(B, Hkv, G, R, D), lse


def attention_ref(q, k, v, causal=True, q_offset=None, scale=None):
    """q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) -> o (B, Hq, Tq, D), lse (B, Hq, Tq) fp32.
    Query i sits at absolute position q_offset + i (default Tk - Tq: the queries are the last Tq
    keys' tokens); key j sits at position j. Causal masks keys that come after the query."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = _check_gqa(q, k)
    q_offset = Tk - Tq if q_offset is None else q_offset
    q_pos = torch.arange(Tq, device=q.device) + q_offset
    visible = torch.arange(Tk, device=q.device)[None, :] <= q_pos[:, None] if causal else None  # (Tq, Tk)
    o, lse = masked_attention(q.view(B, Hkv, G, Tq, D), k, v, visible, scale)
    return o.view(B, Hq, Tq, D).to(q.dtype), lse.view(B, Hq, Tq)


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
    # A key is visible iff its page is in the list and it lies before seq_len.
    pos = torch.arange(Nmax, device=q.device)
    visible = ((pos // page_size)[None, None, :, None] == page_idx[:, :, None, :].long()).any(-1)
    visible &= (pos < seq_len)[None, None, :]  # (B, Hkv, Nmax)
    visible = visible[:, :, None, None]  # (B, Hkv, 1, 1, Nmax)
    o, lse = masked_attention(q.view(B, Hkv, G, 1, D), k_cache, v_cache, visible, scale, bias)
    return o.view(B, Hq, D).to(q.dtype), lse.view(B, Hq)


def merge_attention(o1, lse1, o2, lse2):
    """Combine two attentions over disjoint key sets. o (..., D), lse (...) fp32.
    An empty set (lse = -inf) contributes nothing; two empty sets give o = 0, lse = -inf."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe).unsqueeze(-1)  # exp(-inf) = 0 for an empty side
    w2 = torch.exp(lse2 - safe).unsqueeze(-1)
    o = w1 * o1.float() + w2 * o2.float()
    return o.to(o1.dtype), lse


# ----------------------------------------------------------------------------------------------
# The run path on PyTorch ops (a CPU, or --kernels torch): the references' contracts and results, minus
# what they spend to be plain (a (Tq, Tk) matrix of every score, a mask over every cache row).

SCORES_PER_CHUNK = 1 << 20  # fp32 scores held at once by attention() (4 MiB: they stay in cache)


def attention(q, k, v, causal=True, q_offset=None, scale=None, need_lse=True):
    """attention_ref, fast. Without need_lse: F.scaled_dot_product_attention (lse is None). With it:
    chunks of query rows, each scoring only the keys its rows can see (causally, half the matrix)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = _check_gqa(q, k)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q_offset = Tk - Tq if q_offset is None else q_offset
    if not need_lse and q_offset >= 0:  # (no fully masked row: sdpa would give NaN where the reference gives 0)
        square, mask = causal and q_offset == 0 and Tq == Tk, None  # sdpa's is_causal: query i sees keys <= i
        if causal and not square and q_offset < Tk - 1:  # some key lies after some query
            q_pos = torch.arange(Tq, device=q.device) + q_offset
            mask = torch.arange(Tk, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=square,
                                           scale=scale, enable_gqa=G > 1)
        return o, None
    o = torch.empty(B, Hkv, G, Tq, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hkv, G, Tq, device=q.device, dtype=torch.float32)
    qg = q.float().view(B, Hkv, G, Tq, D)
    kf, vf = k.float(), v.float()
    rows = max(1, SCORES_PER_CHUNK // max(1, B * Hq * Tk))
    for i0 in range(0, Tq, rows):
        i1 = min(Tq, i0 + rows)
        n = max(0, min(Tk, q_offset + i1)) if causal else Tk  # the keys any row of the chunk can see
        q_pos = torch.arange(i0, i1, device=q.device) + q_offset
        visible = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None] if causal else None
        o[:, :, :, i0:i1], lse[:, :, :, i0:i1] = masked_attention(
            qg[:, :, :, i0:i1], kf[:, :, :n], vf[:, :, :n], visible, scale)
    return o.view(B, Hq, Tq, D).to(q.dtype), lse.view(B, Hq, Tq)


def gathered_attention(q, k_cache, v_cache, pos, visible, bias=None, scale=None):
    """Attention of R rows per query head over the cache rows pos of their KV head only (gathered).
    q (B, Hq, R, D); k_cache, v_cache (B, Hkv, Nmax, D); pos (B, Hkv, M) long, each row listed once,
    in [0, Nmax); visible (B, Hkv, R, M) bool: which of them row r sees; bias (B, Hkv, Nmax) fp32 or
    None. -> o (B, Hq, R, D) in q.dtype, lse (B, Hq, R) fp32 (a row that sees nothing: 0, -inf)."""
    B, Hq, R, D = q.shape
    G = _check_gqa(q, k_cache)
    at = pos[..., None].expand(-1, -1, -1, D)
    k, v = k_cache.gather(2, at), v_cache.gather(2, at)  # (B, Hkv, M, D)
    bias = bias.gather(2, pos) if bias is not None else None
    o, lse = masked_attention(q.view(B, k.shape[1], G, R, D), k, v, visible[:, :, None], scale, bias)
    return o.view(B, Hq, R, D).to(q.dtype), lse.view(B, Hq, R)


def page_rows(page_idx, page_size):
    """page_idx (B, Hkv, K) int, -1 = unused -> the cache rows of those pages (B, Hkv, K * S) long
    (an unused slot's rows point at page 0) and whether each belongs to a listed page."""
    offs = torch.arange(page_size, device=page_idx.device)
    pos = (page_idx.long().clamp(min=0)[..., None] * page_size + offs).flatten(-2)
    return pos, (page_idx >= 0).repeat_interleave(page_size, dim=-1)


def paged_decode(q, k_cache, v_cache, page_idx, seq_len, page_size, bias=None, scale=None):
    """paged_decode_ref, fast: reads the listed pages (each listed once) instead of masking every row."""
    pos, listed = page_rows(page_idx, page_size)
    visible = listed & (pos < seq_len)
    pos = pos.clamp(max=k_cache.shape[2] - 1)  # the last page may end past the cache (masked anyway)
    o, lse = gathered_attention(q.unsqueeze(2), k_cache, v_cache, pos, visible[:, :, None], bias, scale)
    return o.squeeze(2), lse.squeeze(2)


def prefill_attention(q, k_cache, v_cache, input_pos, use_kernels, need_lse=True):
    """Attention of T new queries (already written to the cache) over the cache, causally.
    q (B, T, Hq, D) at host positions input_pos; caches (B, Hkv, Nmax, D) -> (o (B, T, Hq, D), lse (B, Hq, T)).
    need_lse=False lets the PyTorch path skip the lse (then None)."""
    n = int(input_pos[-1]) + 1  # keys [0, n) are valid; we always write before attending
    qh, k, v = q.transpose(1, 2), k_cache[:, :, :n], v_cache[:, :, :n]
    if use_kernels:
        o, lse = kernels.flash_prefill(qh, k, v, causal=True)
    else:
        o, lse = attention(qh, k, v, causal=True, need_lse=need_lse)
    return o.transpose(1, 2), lse


def decode_attention(q, k_cache, v_cache, seq_len, use_kernels):
    """The m rows q (B, m, Hq, D) of the last m positions attend causally to the keys [0, seq_len),
    seq_len a (1,) int32 device tensor (nothing read on the host) -> o (B, m, Hq, D)."""
    qh = q.transpose(1, 2)
    m, G = qh.shape[2], _check_gqa(qh, k_cache)
    if not use_kernels:  # the PyTorch run path (a CPU, never captured) may read the length
        n = int(seq_len)
        o, _ = attention(qh, k_cache[:, :, :n], v_cache[:, :, :n], causal=True, need_lse=False)
    elif m * G <= kernels.MAX_DECODE_ROWS:  # split over the keys, all rows in one tile
        o, _ = kernels.flash_decode(qh, k_cache, v_cache, seq_len)  # (the window form, also for m = 1)
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
        return prefill_attention(q, self.cache.k[layer_idx], self.cache.v[layer_idx], input_pos, self.use_kernels,
                                 need_lse=False)[0]

    def decode(self, layer_idx, q, k, v, input_pos):
        seq_len = self.cache.append(layer_idx, k, v, input_pos, self.use_kernels)
        return decode_attention(q, self.cache.k[layer_idx], self.cache.v[layer_idx], seq_len, self.use_kernels)

    @property
    def stats(self):
        n, steps = self.cache.decoded_lengths()  # every layer read the n rows of each KV head
        return {"kv_bytes_read": int((n * steps).sum()) * self.cache.row_bytes() * self.cache.k.shape[0],
                "decode_steps": int(steps.sum())}
