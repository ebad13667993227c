"""
RetroAttention: later decode steps revise the attention outputs of recent tokens
(paper: "RetroAttention", arXiv 2508.09001, ICLR 2026; no public code, this file is our reading).

Quest (kvcache.py) lets each decode step read only budget // S pages of the KV cache, so a token's
attention output is fixed by the pages *its* step picked, though the next steps load other pages
anyway. RetroAttention reuses those pages to revise the outputs of the previous w - 1 tokens, kept
in a small output cache with their log-sum-exp (lse):

    step t loads S_t (Quest's pages for the current token t); A[p] = last step that loaded page p
    for each past token tau = t-w+1 .. t-1 (the retrospective window; w counts the current token):
        new pages  N_tau = { p in S_t : A[p] < tau }        (pages tau has not seen yet)
        (o_s, lse_s) = attention of tau's (fresh) query over the keys j <= tau of N_tau
        lse' = logaddexp(lse, lse_s),   o' = exp(lse - lse') o + exp(lse_s - lse') o_s
    then A[p] = t for every p in S_t.

Over disjoint key sets this merge is one attention over their union, so once the window has passed,
tau's output has covered S_tau u ... u S_{tau+w-1} instead of S_tau. A revised output changes tau's
hidden state, so at the next layer tau is re-embedded: its new k, v overwrite its stale cache rows
(later tokens read the corrected K/V for free) and its new q serves its supplement. A decode step is
therefore a forward pass over the last w rows, positions t-w+1 .. t; w = 1 is Quest (the paper uses
w = 2 and ablates 4 and 8). The pages are loaded once for all w rows: decoding is memory bound, so the
extra queries cost little (paper: < 1 ms per token over Quest at w = 2).

generate.py (--method retro): after the prefill, with n tokens so far (the newest not yet fed), feed
the last m = min(w, n) at input_pos = arange(n - m, n) and sample from the last row; the object reads
from input_pos which rows to overwrite.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels
from attention import (decode_attention, gathered_attention, merge_attention, page_rows, paged_decode_ref,
                       prefill_attention)
from kvcache import check_sparse_args, page_reads, quest_pages


# ----------------------------------------------------------------------------------------------
# Output cache: what the window's past tokens have attended to so far

class OutputCache:
    """Per layer, the attention outputs (before o_proj) and lse of the w - 1 tokens before the current
    one, oldest first: o (L, B, Hq, w-1, D), lse (L, B, Hq, w-1), fp32 as a row is merged into up to
    w - 1 times. Fixed buffers updated in place (a CUDA graph replays them), of a size independent of
    the generation (paper: (w-1, B, L, hidden) plus normalizers). A slot with no token yet (a prompt
    shorter than w - 1) holds o = 0, lse = -inf, which a merge leaves unchanged."""

    def __init__(self, n_layers, size):
        self.n_layers, self.size = n_layers, size
        self.o = self.lse = None  # allocated by the first push, which knows B, Hq, D

    def push(self, layer, o, lse):
        """Append rows o (B, Hq, R, D), lse (B, Hq, R) (a prefill's last ones); beyond w - 1 rows the oldest leave."""
        if self.o is None:
            B, Hq, _, D = o.shape
            self.o = torch.zeros(self.n_layers, B, Hq, self.size, D, dtype=torch.float32, device=o.device)
            self.lse = torch.full((self.n_layers, B, Hq, self.size), float("-inf"), device=o.device)
        if self.size:
            self.o[layer] = torch.cat([self.o[layer], o.float()], 2)[:, :, -self.size:]
            self.lse[layer] = torch.cat([self.lse[layer], lse.float()], 2)[:, :, -self.size:]


# ----------------------------------------------------------------------------------------------
# Reference: the attention of one decode step, all window rows

def retro_decode_ref(q, k_cache, v_cache, page_idx, last_loaded, seq_len, page_size, scale=None,
                     update_last_loaded=False, partials=False):
    """One RetroAttention step's attention over the pages loaded for the current token.
    q (B, Hq, W, D): the window's queries, oldest first; row i sits at position tau = seq_len - W + i,
        the last row is the current token t = seq_len - 1.
    k_cache, v_cache (B, Hkv, Nmax, D); page_idx (B, Hkv, K) int: S_t, -1 = unused slot.
    last_loaded (B, Hkv, Pmax) int: A, the last step that loaded each page, *before* this step.
    Row tau attends to the keys j <= tau of the pages p in S_t with A[p] < tau. For the current row
    every page qualifies (A < t), so it gets Quest's attention over S_t; a past row gets its supplement.
    Returns o (B, Hq, W, D) in q.dtype, lse (B, Hq, W) fp32 (empty rows: o = 0, lse = -inf).
    update_last_loaded: then also set A[p] = t (= seq_len - 1) for every listed page p.
    seq_len may be an int or a (1,) device tensor. partials: return (o, lse) as retro_decode's one split,
    fp32 (B, Hq, W, 1, D) and (B, Hq, W, 1), for window_merge_ref."""
    W = q.shape[2]
    A = last_loaded.gather(-1, page_idx.clamp(min=0).long())  # (B, Hkv, K): A of each listed page
    rows = []
    for i in range(W):
        tau = seq_len - W + i
        new_pages = torch.where((page_idx >= 0) & (A < tau), page_idx, -1)
        # seq_len tau + 1 is the causal mask: a listed page may hold keys newer than tau (the page
        # of the current token always does); they do not exist for tau
        rows.append(paged_decode_ref(q[:, :, i], k_cache, v_cache, new_pages, tau + 1, page_size,
                                     scale=scale))
    if update_last_loaded:
        b, h, slot = (page_idx >= 0).nonzero(as_tuple=True)
        last_loaded[b, h, page_idx[b, h, slot].long()] = seq_len - 1
    o, lse = (torch.stack(parts, 2) for parts in zip(*rows))
    return (o.float().unsqueeze(3), lse.unsqueeze(3)) if partials else (o, lse)


def retro_decode_torch(q, k_cache, v_cache, page_idx, last_loaded, seq_len, page_size, scale=None,
                       update_last_loaded=False, partials=False):
    """retro_decode_ref's contract on PyTorch ops, for the CPU run path: the pages of S_t gathered
    once (attention.gathered_attention), every window row masked by its own rule in one pass."""
    W = q.shape[2]
    pos, listed = page_rows(page_idx, page_size)  # (B, Hkv, K * S)
    A = last_loaded.gather(-1, page_idx.clamp(min=0).long()).repeat_interleave(page_size, dim=-1)
    tau = (seq_len - W + torch.arange(W, device=q.device))[:, None]  # (W, 1): each row's position
    visible = listed[:, :, None] & (A[:, :, None] < tau) & (pos[:, :, None] <= tau)  # (B, Hkv, W, K * S)
    o, lse = gathered_attention(q, k_cache, v_cache, pos.clamp(max=k_cache.shape[2] - 1), visible, scale=scale)
    if update_last_loaded:
        b, h, slot = (page_idx >= 0).nonzero(as_tuple=True)
        last_loaded[b, h, page_idx[b, h, slot].long()] = seq_len - 1
    return (o.float().unsqueeze(3), lse.unsqueeze(3)) if partials else (o, lse)


# ----------------------------------------------------------------------------------------------
# Triton kernel: every row of the window from one pass over S_t
#
# One program per (split of the page list, batch * KV head); its tile's rows are the KV head's G query
# heads times the W window rows (row r = g * W + i), so each K/V tile is loaded once for all G * W
# queries, each (row, key) masked by the row's own rule. Pages are walked as in kernels.paged_decode
# (paged_keys, attend_tile; splits merged by merge_partials). With update_last_loaded each program
# then sets A = t for its own pages, once it has read their A.

@triton.jit(do_not_specialize=["n_slots", "seq_len", "chunk", "num_splits"])
def _retro_decode_kernel(Q, K, V, PAGES, LAST, OP, LP, SEQ_LEN,
                         sqb, sqh, sqw, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                         spb, sph, spk, sab, sah, sap,
                         Hkv, G, W, n_slots, seq_len, page_size, chunk, num_splits, qk_scale,
                         UPDATE_LAST: tl.constexpr, LEN_ON_DEVICE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_PAD: tl.constexpr,
                         BLOCK_D: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    kernels.wait_for_inputs(PDL)
    if LEN_ON_DEVICE:  # see kernels.device_length
        seq_len = tl.load(SEQ_LEN)
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    r = tl.arange(0, BLOCK_M)  # rows r >= G * W are padding (tl.dot wants >= 16 rows)
    g = r // W
    i = r % W
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * sqb + (hk * G + g[:, None]) * sqh + i[:, None] * sqw + d[None, :] * sqd,
                mask=(r[:, None] < G * W) & d_ok[None, :], other=0.0)
    q_pos = seq_len - W + i  # absolute position of each row
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    PAGES += b * spb + hk * sph
    LAST += b * sab + hk * sah

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_slots * PAGE_PAD)
    for start in range(lo, hi, BLOCK_N):
        k_pos, k_ok, page = kernels.paged_keys(PAGES, spk, start + tl.arange(0, BLOCK_N), hi, seq_len, page_size,
                                               PAGE_PAD)
        seen_at = tl.load(LAST + page * sap, mask=page >= 0, other=0)  # A[page] of each key
        # row tau sees a key iff its page is new to tau and the key is not after tau
        visible = k_ok[None, :] & (seen_at[None, :] < q_pos[:, None]) & (k_pos[None, :] <= q_pos[:, None])
        m, l, acc = kernels.attend_tile(q, K, V, k_pos, k_ok, visible, m, l, acc, skn, skd, svn, svd, d, d_ok,
                                        qk_scale, PRECISION)

    kernels.store_split(OP, LP, m, l, acc, pid_bh.to(tl.int64) * G * W + r, r < G * W, split, num_splits, d, D)

    if UPDATE_LAST:  # A[p] = t for this program's pages (a chunk holds whole pages: no other program reads them)
        tl.debug_barrier()  # every thread has read A
        for start in range(lo, hi, BLOCK_N * PAGE_PAD):
            slot = start // PAGE_PAD + tl.arange(0, BLOCK_N)
            page = tl.load(PAGES + slot * spk, mask=slot * PAGE_PAD < hi, other=-1)
            tl.store(LAST + page * sap, seq_len - 1, mask=page >= 0)


RETRO_BLOCK_N = 128
RETRO_TUNING = dict(waves=2, num_stages=2)  # programs per SM; pipeline stages (GPU)


def retro_decode(q, k_cache, v_cache, page_idx, last_loaded, seq_len, page_size, scale=None,
                 update_last_loaded=False, partials=False):
    """Triton version of retro_decode_ref (same arguments, same result). seq_len may also be a device
    length (kernels.device_length), for a step captured in a CUDA graph. partials: return the splits'
    unmerged (o (B, Hq, W, NS, D), lse (B, Hq, W, NS)) fp32, NS splits, for window_merge."""
    G = kernels._check(q, k_cache, v_cache, 4)  # shapes checked before the launch (else: reads out of bounds)
    B, Hq, W, D = q.shape
    Hkv, Nmax = k_cache.shape[1:3]
    if page_idx.dim() != 3 or last_loaded.dim() != 3 or page_idx.shape[:2] != (B, Hkv) \
            or last_loaded.shape[:2] != (B, Hkv):
        raise ValueError(f"retro_decode: page_idx {tuple(page_idx.shape)} and last_loaded "
                         f"{tuple(last_loaded.shape)} must start with (B, Hkv) = ({B}, {Hkv})")
    if page_size < 1 or last_loaded.shape[2] * page_size < Nmax:
        raise ValueError(f"retro_decode: last_loaded holds {last_loaded.shape[2]} pages of {page_size}, "
                         f"fewer than the cache's {Nmax} rows need")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    seq_len, len_t = kernels.device_length(seq_len, Nmax)
    page_idx = page_idx.to(torch.int32)
    if update_last_loaded and last_loaded.dtype != torch.int32:
        raise ValueError(f"update_last_loaded needs last_loaded in int32 (updated in place), got {last_loaded.dtype}")
    last_loaded = last_loaded.to(torch.int32)
    n_slots = page_idx.shape[2]
    page_pad = triton.next_power_of_2(page_size)
    # a chunk holds whole tiles and whole pages (each page's A is updated by the program that read it)
    chunk, num_splits = kernels.plan_splits(n_slots * page_pad, B * Hkv, q.device, RETRO_TUNING["waves"],
                                            RETRO_BLOCK_N, unit=max(RETRO_BLOCK_N, page_pad))
    o_part = torch.empty(B, Hq, W, num_splits, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, W, num_splits, dtype=torch.float32, device=q.device)
    BLOCK_M = kernels.tile_size(G * W)
    stages = RETRO_TUNING["num_stages"] if q.device.type == "cuda" else 1
    block_n, stages = kernels.kv_tiles(RETRO_BLOCK_N, stages, D, q.element_size())
    _retro_decode_kernel[(num_splits, B * Hkv)](
        q, k_cache, v_cache, page_idx, last_loaded, o_part, lse_part, len_t if len_t is not None else lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *page_idx.stride(), *last_loaded.stride(),
        Hkv, G, W, n_slots, seq_len, page_size, chunk, num_splits, scale * kernels.LOG2E,
        UPDATE_LAST=update_last_loaded, LEN_ON_DEVICE=len_t is not None, PRECISION=kernels.dot_precision(q.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, PAGE_PAD=page_pad, BLOCK_D=kernels.tile_size(D), D=D,
        num_warps=8 if BLOCK_M >= 128 else 4, num_stages=stages, **kernels.pdl(q.device))
    if partials:
        return o_part, lse_part
    return kernels.merge_partials(o_part, lse_part, out_dtype=q.dtype)


# ----------------------------------------------------------------------------------------------
# The end of a device-side step in one launch: merge the splits, revise the cached rows, shift the
# output cache, write the layer's output. (Eagerly these are ~20 small PyTorch ops per layer, each a
# few microseconds of launch under a CUDA graph, more than the attention kernel itself at batch 1.)

def window_merge_ref(o_part, lse_part, o_cache, lse_cache, out_dtype):
    """o_part (B, Hq, W, NS, D), lse_part (B, Hq, W, NS): retro_decode's NS splits for the W window rows;
    o_cache (B, Hq, W-1, D), lse_cache (B, Hq, W-1) fp32: the past rows' outputs so far.
    -> out (B, W, Hq, D) in out_dtype: the past rows revised (cache merged with their supplement),
    then the current row. The cache is updated in place to the last W-1 rows of that (the oldest row
    leaves, its output is final; the current one enters)."""
    lse = torch.logsumexp(lse_part, -1)  # the splits merged: (B, Hq, W) ...
    weight = torch.exp(lse_part - torch.where(torch.isfinite(lse), lse, 0).unsqueeze(-1))  # 0 for an empty split
    o = (weight.unsqueeze(-1) * o_part).sum(-2)  # ... and (B, Hq, W, D) fp32
    o_past, lse_past = merge_attention(o_cache, lse_cache, o[:, :, :-1], lse[:, :, :-1])
    o_all, lse_all = torch.cat([o_past, o[:, :, -1:]], 2), torch.cat([lse_past, lse[:, :, -1:]], 2)
    o_cache.copy_(o_all[:, :, 1:])
    lse_cache.copy_(lse_all[:, :, 1:])
    return o_all.to(out_dtype).transpose(1, 2).contiguous()


@triton.jit(do_not_specialize=["NS"])
def _window_merge_kernel(OP, LP, OC, LC, OUT, NS, Hq, scb, sch, scw, slb, slh, slw, sob, sow, soh,
                         W: tl.constexpr, D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_NS: tl.constexpr,
                         BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    kernels.wait_for_inputs(PDL)
    pid = tl.program_id(0).to(tl.int64)  # one program per (batch, query head), all its W rows at once
    b = pid // Hq
    h = pid % Hq
    i = tl.arange(0, BLOCK_W)  # window row, oldest first
    s = tl.arange(0, BLOCK_NS)
    d = tl.arange(0, BLOCK_D)
    i_ok, d_ok = i < W, d < D
    # the splits of each row merged: (BLOCK_W, BLOCK_NS) lse, (BLOCK_W, BLOCK_NS, BLOCK_D) partial outputs
    row = pid * W + i
    lse_s = tl.load(LP + row[:, None] * NS + s[None, :], mask=i_ok[:, None] & (s[None, :] < NS), other=float("-inf"))
    o_s = tl.load(OP + (row[:, None, None] * NS + s[None, :, None]) * D + d[None, None, :],
                  mask=i_ok[:, None, None] & (s[None, :, None] < NS) & d_ok[None, None, :], other=0.0)
    o, lse = kernels.merge_splits(lse_s, o_s)
    # the past rows (all but the last) merged with what they attended to before, two more disjoint
    # parts: a cache row with lse = -inf (and the current row, which has none) leaves a row unchanged
    past = i < W - 1
    oc = tl.load(OC + b * scb + h * sch + i[:, None] * scw + d[None, :], mask=past[:, None] & d_ok[None, :], other=0.0)
    lc = tl.load(LC + b * slb + h * slh + i * slw, mask=past, other=float("-inf"))
    o, lse = kernels.merge_splits(tl.join(lc, lse), tl.permute(tl.join(oc, o), 0, 2, 1))  # (BLOCK_W, 2, BLOCK_D)
    tl.debug_barrier()  # every cache row is read before the shift overwrites one
    # shift: row i (i >= 1) enters the cache one slot older; row 0 leaves (its output is final)
    keep = i_ok & (i >= 1)
    tl.store(OC + b * scb + h * sch + (i[:, None] - 1) * scw + d[None, :], o, mask=keep[:, None] & d_ok[None, :])
    tl.store(LC + b * slb + h * slh + (i - 1) * slw, lse, mask=keep)
    tl.store(OUT + b * sob + i[:, None] * sow + h * soh + d[None, :], o.to(OUT.dtype.element_ty),
             mask=i_ok[:, None] & d_ok[None, :])


WINDOW_MERGE_MAX_TILE = 16384  # fp32 partials one window_merge program holds (W x NS x D, padded)


def window_merge(o_part, lse_part, o_cache, lse_cache, out_dtype, max_tile=WINDOW_MERGE_MAX_TILE):
    """Triton version of window_merge_ref (same arguments, same result, the cache updated in place).
    max_tile: above this many partial-output elements per program (W x NS x D, padded to powers of
    two), the splits are merged first, in a separate launch of one program per row."""
    B, Hq, W, NS, D = o_part.shape
    if W < 2 or tuple(o_cache.shape) != (B, Hq, W - 1, D) or tuple(lse_cache.shape) != (B, Hq, W - 1):
        raise ValueError(f"window_merge: o_part {tuple(o_part.shape)} needs W >= 2 rows and a cache of W - 1: "
                         f"got o_cache {tuple(o_cache.shape)}, lse_cache {tuple(lse_cache.shape)}")
    if o_cache.dtype != torch.float32 or lse_cache.dtype != torch.float32 or o_cache.stride(-1) != 1:
        raise ValueError("window_merge: the output cache must be fp32 with a unit stride along D")
    pow2 = triton.next_power_of_2
    if pow2(W) * pow2(NS) * pow2(D) > max_tile:
        o, lse = kernels.merge_partials(o_part, lse_part)
        o_part, lse_part, NS = o.unsqueeze(-2), lse.unsqueeze(-1), 1
    op, lp = o_part.contiguous(), lse_part.contiguous()
    out = torch.empty(B, W, Hq, D, dtype=out_dtype, device=o_part.device)
    _window_merge_kernel[(B * Hq,)](op, lp, o_cache, lse_cache, out, NS, Hq,
                                    *o_cache.stride()[:3], *lse_cache.stride(), out.stride(0), out.stride(1),
                                    out.stride(2), W=W, D=D, BLOCK_W=pow2(W), BLOCK_NS=pow2(NS), BLOCK_D=pow2(D),
                                    num_warps=4, **kernels.pdl(out.device))
    return out


# ----------------------------------------------------------------------------------------------
# The attention object

class RetroAttention:
    """RetroAttention as an attention object. prefill: dense and causal, the last w - 1 rows kept in the
    output cache. decode: the rows of the last m = min(w, t + 1) positions t-m+1 .. t, the last one new.
    budget, page_size, dense_layers: as QuestAttention. window: w, counting the current token.
    track_exposure: keep the exposure statistic (a few small GPU ops per sparse layer and step)."""

    def __init__(self, cache, budget, page_size, window=2, dense_layers=2, use_kernels=False, track_exposure=True):
        check_sparse_args(cache, budget, page_size, dense_layers)
        if window < 1:
            raise ValueError(f"--window must be >= 1 (1 is Quest), got {window}")
        self.cache, self.budget, self.window, self.use_kernels = cache, budget, window, use_kernels
        self.prefill_rows = window - 1
        n_layers, B, Hkv = cache.k.shape[:3]
        self.dense_layers = min(dense_layers, n_layers)
        self.outputs = OutputCache(n_layers, window - 1)
        # A: per (layer, batch, KV head, page) the last step (= position of its current token) that loaded it
        self.last_loaded = torch.full((n_layers, B, Hkv, cache.num_pages_max), -1, dtype=torch.int32,
                                      device=cache.k.device)
        # a budget covering the whole cache loads every page at every step (then nothing is ever revised)
        self.all_pages = budget >= cache.max_seq_len
        pages = torch.arange(cache.num_pages_max, device=cache.k.device)
        self._every_page = pages.int().expand(B, Hkv, -1)
        self.first_decoded = 0  # position of the first token decoded (exposure counts decoded tokens)
        self.track_exposure = track_exposure
        self._page_start = pages * cache.page_size
        self._exposure = torch.zeros(2, dtype=torch.float64, device=cache.k.device)  # sum, count

    def prefill(self, layer_idx, q, k, v, input_pos):
        if int(input_pos[0]) != self.cache.length(layer_idx):
            raise ValueError(f"RetroAttention: a prefill must only append (positions {input_pos.tolist()}, "
                             f"{self.cache.length(layer_idx)} already in the cache)")
        self.cache.write(layer_idx, k, v, input_pos)
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        o, lse = prefill_attention(q, kc, vc, input_pos, self.use_kernels, need_lse=self.use_kernels)
        if lse is None:  # the PyTorch path skipped it: only the last rows (the output cache's) need theirs
            r = max(1, self.window - 1)
            o_r, lse = prefill_attention(q[:, -r:], kc, vc, input_pos[-r:], False)
            self.record_prefill(layer_idx, input_pos[-r:], o_r, lse)
        else:
            self.record_prefill(layer_idx, input_pos, o, lse)
        return o

    def record_prefill(self, layer_idx, input_pos, o, lse):
        """Remember the prompt's last w - 1 rows, which attended densely: every page so far counts as
        seen by them. o (B, T, Hq, D), lse (B, Hq, T) of the rows at input_pos (the last rows suffice).
        Also called by a prefill method that wrote the cache itself (token_sparse)."""
        n = int(input_pos[-1]) + 1
        self.first_decoded = n
        if layer_idx >= self.dense_layers:
            self.last_loaded[layer_idx, :, :, :-(-n // self.cache.page_size)] = n - 1
            self.outputs.push(layer_idx, o.transpose(1, 2), lse)

    def decode(self, layer_idx, q, k, v, input_pos):
        # q (B, m, Hq, D) after RoPE; k, v (B, m, Hkv, D); input_pos (m,) -> (B, m, Hq, D)
        cache, S, w, m = self.cache, self.cache.page_size, self.window, q.shape[1]
        if layer_idx == 0 and input_pos.device.type == "cpu":
            self._check_rows(input_pos)
        seq_len = cache.append(layer_idx, k, v, input_pos, self.use_kernels)  # the past rows rewritten, t appended
        kc, vc = cache.k[layer_idx], cache.v[layer_idx]
        if layer_idx < self.dense_layers:
            # Dense layers attend every key anyway, so the past rows are simply recomputed, exactly,
            # with their fresh queries: no output cache, nothing to merge.
            return decode_attention(q, kc, vc, seq_len, self.use_kernels)

        # S_t: Quest's pages for the current token
        page_idx = self._every_page if self.all_pages else quest_pages(q[:, -1], cache, layer_idx, self.budget,
                                                                       seq_len, self.use_kernels)
        # The w window rows, oldest first. After a prompt shorter than w - 1 the first steps feed m < w
        # rows: the window is padded in front with rows of no position, which see no key.
        qh = q.transpose(1, 2) if m == w else F.pad(q.transpose(1, 2), (0, 0, w - m, 0))
        A = self.last_loaded[layer_idx]  # (B, Hkv, Pmax); then A[p] = t for the pages of S_t
        attend = retro_decode if self.use_kernels else retro_decode_torch  # (the CPU run path)
        if w == 1:  # Quest: nothing to revise
            out = attend(qh, kc, vc, page_idx, A, seq_len, S, update_last_loaded=True)[0].transpose(1, 2)
        else:
            # What a past row's cached (o, lse) is merged with (ours; the paper leaves it open): the
            # supplement computed now with the row's fresh (re-embedded) query, over the keys <= tau of the
            # pages new to it, read after this step's overwrite. The cached part is not recomputed (that
            # would reload every page tau has seen, the traffic Quest avoids): the merge is exactly one
            # attention over the union of pages while tau's lower layers are unchanged, and an
            # approximation of it once a lower layer's revision has moved tau's q, k, v.
            o_part, lse_part = attend(qh, kc, vc, page_idx, A, seq_len, S, update_last_loaded=True, partials=True)
            merge = window_merge if self.use_kernels else window_merge_ref
            # the past rows revised, the output cache shifted in place (the oldest leaves, t enters)
            out = merge(o_part, lse_part, self.outputs.o[layer_idx], self.outputs.lse[layer_idx], q.dtype)[:, w - m:]
        if self.track_exposure:
            self._count_exposure(A, seq_len - w)  # the oldest row, t - w + 1: its output is final now
        return out

    def _check_rows(self, input_pos):
        """Positions given on the host (a caller driving the object by hand) are checked: a decode step's
        rows are the last min(w, n) positions, the last one new."""
        n = self.cache.length(0)
        want = list(range(max(0, n - self.window + 1), n + 1))
        if input_pos.tolist() != want:
            raise ValueError(f"RetroAttention(window={self.window}): a decode step feeds the last min(w, n) "
                             f"positions, {want} now, the last one new; got {input_pos.tolist()}")

    def _count_exposure(self, A, tau):
        """tau's output is final: count the keys <= tau of every page it has seen (A[p] >= tau), if
        tau was decoded (a prompt token attended densely in prefill)."""
        keys_upto_tau = (tau + 1 - self._page_start).clamp_(0, self.cache.page_size)  # (Pmax,) keys j <= tau per page
        decoded = (tau >= self.first_decoded).double()
        seen = torch.where(A >= tau, keys_upto_tau, 0).sum() / self.budget
        self._exposure += torch.cat([seen * decoded, decoded * A.shape[0] * A.shape[1]])

    @property
    def stats(self):
        """Counters for generate.py. kv_bytes_read and pages_read count what Quest counts (K/V of the
        pages read, page bounds); retro_aux_bytes is what Retro adds: the past rows' K/V overwrites,
        the output cache and A (each read and written). exposure: distinct KV tokens the final output
        of a decoded token covered / budget, averaged over sparse layers, KV heads and tokens."""
        cache, w = self.cache, self.window
        L, B, Hkv = cache.k.shape[:3]
        n, steps = cache.decoded_lengths()
        read, pages, K = page_reads(cache, self.budget, n, steps, L if self.all_pages else self.dense_layers)
        m = n.clamp(max=w)  # rows fed per step
        aux = (m - 1) * cache.row_bytes() * L
        if self.outputs.o is not None:  # (the sparse layers')
            Hq, D = self.outputs.o.shape[2], self.outputs.o.shape[4]
            listed = torch.ceil(n / cache.page_size) if self.all_pages else K
            aux = aux + (L - self.dense_layers) * ((2 * (m - 1) + (w > 1)) * B * Hq * (D + 1) * 4 + 2 * B * Hkv * 4 * listed)
        s = {"kv_bytes_read": read, "pages_read": pages, "decode_steps": int(steps.sum()),
             "retro_aux_bytes": int((steps * aux).sum())}
        exposure_sum, exposure_count = self._exposure.tolist()
        if exposure_count:
            s["exposure"] = exposure_sum / exposure_count
        return s
