"""
RetroAttention: let later decode steps revise the attention outputs of recent tokens
(paper: "RetroAttention", arXiv 2508.09001, ICLR 2026; no public code, this file is our reading).

Quest (kvcache.py) lets each decode step read only budget // S pages of the KV cache. A token's
attention output is then fixed by the pages *its* step happened to pick, though the next steps load
other pages anyway. RetroAttention reuses those pages to revise the outputs of the previous w - 1
tokens, whose outputs are kept in a small output cache with their log-sum-exp (lse):

    step t loads S_t (Quest's pages for the current token t); A[p] = last step that loaded page p
    for each past token tau = t-w+1 .. t-1 (the retrospective window; w counts the current token):
        new pages  N_tau = { p in S_t : A[p] < tau }        (pages tau has not seen yet)
        (o_s, lse_s) = attention of tau's (fresh) query over the keys j <= tau of N_tau
        lse' = logaddexp(lse, lse_s),   o' = exp(lse - lse') o + exp(lse_s - lse') o_s
    then A[p] = t for every p in S_t.

The merge is FlashAttention's: over disjoint key sets it equals one attention over their union, so
after the window has passed, tau's output has covered S_tau u ... u S_{tau+w-1} instead of S_tau.
A revised output changes tau's hidden state, so at the next layer tau is re-embedded: new q, k, v
come from its revised hidden state, k and v overwrite tau's stale cache rows (later tokens read the
corrected K/V for free) and the new q is the one its supplement uses. A decode step is therefore a
forward pass over the last w rows, positions t-w+1 .. t. w = 1 is Quest; the paper uses w = 2 and
ablates 4 and 8 (gains saturate past 8). The pages are loaded once for all w rows: decoding is
memory bound, so the extra queries cost little (paper: < 1 ms per token over Quest at w = 2).

Layout of this file: the output cache; the reference of one step's attention (a loop over the window
rows, each a Quest paged decode over its new pages); the Triton kernel that serves all w rows from
one pass over S_t; RetroAttention, the attention object generate.py drives.

What generate.py does for --method retro (generate.generate(..., window=w)): prefill the prompt as
usual; then, with n tokens so far (the newest just sampled, not yet fed), feed the last m = min(w, n)
tokens at input_pos = arange(n - m, n) and sample from the logits of the last row. model.py knows
nothing of this: the object tells the rows to overwrite from the new one by input_pos.
"""

import math

import torch
import triton
import triton.language as tl

import kernels
from attention import (_check_gqa, gathered_attention, merge_attention, page_rows, paged_decode_ref,
                       prefill_decode_attention)
from kvcache import check_sparse_args, count_page_reads, quest_pages


# ----------------------------------------------------------------------------------------------
# Output cache: what the window's past tokens have attended to so far

class OutputCache:
    """Per layer, the attention outputs (before o_proj) and lse of the last w - 1 tokens, oldest first:
    o (B, Hq, R, D) and lse (B, Hq, R) fp32, R <= w - 1 rows, with the rows' positions. Its size does
    not grow with the generation (paper: an output cache of (w-1, B, L, hidden) plus normalizers).
    Kept in fp32: a row is merged into up to w - 1 times and should not be rounded each time."""

    def __init__(self, n_layers, size):
        self.size = size
        self.pos = [[] for _ in range(n_layers)]
        self.o = [None] * n_layers
        self.lse = [None] * n_layers

    def push(self, layer, pos, o, lse):
        """Append rows (positions pos, o (B, Hq, R, D), lse (B, Hq, R)); beyond w - 1 rows the oldest leave."""
        pos = list(pos)
        if self.pos[layer]:
            pos = self.pos[layer] + pos
            o, lse = torch.cat([self.o[layer], o.float()], 2), torch.cat([self.lse[layer], lse], 2)
        drop = len(pos) - min(self.size, len(pos))
        # copies of the kept rows, never views: a view of a prefill's output would hold the whole
        # (B, Hq, T, D) tensor in memory for the rest of the generation
        self.pos[layer] = pos[drop:]
        self.o[layer] = o[:, :, drop:].to(torch.float32, copy=True).contiguous()
        self.lse[layer] = lse[:, :, drop:].to(torch.float32, copy=True).contiguous()

    def update(self, layer, o_s, lse_s):
        """Merge supplements (B, Hq, R, D), (B, Hq, R) into all R rows; returns the revised (o, lse)."""
        self.o[layer], self.lse[layer] = merge_attention(self.o[layer], self.lse[layer], o_s, lse_s)
        return self.o[layer], self.lse[layer]

    def pop(self, layer):
        """Remove the oldest row (its token leaves the window); returns its position."""
        pos = self.pos[layer].pop(0)
        self.o[layer], self.lse[layer] = self.o[layer][:, :, 1:], self.lse[layer][:, :, 1:]
        return pos


# ----------------------------------------------------------------------------------------------
# Reference: the attention of one decode step, all window rows

def retro_decode_ref(q, k_cache, v_cache, page_idx, last_loaded, seq_len, page_size, scale=None,
                     update_last_loaded=False):
    """One RetroAttention step's attention over the pages loaded for the current token.
    q (B, Hq, W, D): the window's queries, oldest first; row i sits at position tau = seq_len - W + i,
        the last row is the current token t = seq_len - 1.
    k_cache, v_cache (B, Hkv, Nmax, D); page_idx (B, Hkv, K) int: S_t, -1 = unused slot.
    last_loaded (B, Hkv, Pmax) int: A, the last step that loaded each page, *before* this step.
    Row tau attends to the keys j <= tau of the pages p in S_t with A[p] < tau. For the current row
    every page qualifies (A < t), so it gets Quest's attention over S_t; a past row gets its supplement.
    Returns o (B, Hq, W, D) in q.dtype, lse (B, Hq, W) fp32 (empty rows: o = 0, lse = -inf).
    update_last_loaded: then also set A[p] = t (= seq_len - 1) for every listed page p."""
    W = q.shape[2]
    A = last_loaded.gather(-1, page_idx.clamp(min=0).long())  # (B, Hkv, K): A of each listed page
    outs, lses = [], []
    for i in range(W):
        tau = seq_len - W + i
        new_pages = torch.where((page_idx >= 0) & (A < tau), page_idx, -1)
        # seq_len tau + 1 is the causal mask: a listed page may hold keys newer than tau (the page
        # of the current token always does); they do not exist for tau
        o, lse = paged_decode_ref(q[:, :, i], k_cache, v_cache, new_pages, tau + 1, page_size, scale=scale)
        outs.append(o)
        lses.append(lse)
    if update_last_loaded:
        b, h, slot = (page_idx >= 0).nonzero(as_tuple=True)
        last_loaded[b, h, page_idx[b, h, slot].long()] = seq_len - 1
    return torch.stack(outs, 2), torch.stack(lses, 2)


def retro_decode_torch(q, k_cache, v_cache, page_idx, last_loaded, seq_len, page_size, scale=None,
                       update_last_loaded=False):
    """retro_decode_ref's contract on PyTorch ops, for the CPU run path: the pages of S_t gathered
    once (attention.gathered_attention), every window row masked by its own rule in one pass."""
    W = q.shape[2]
    pos, listed = page_rows(page_idx, page_size)  # (B, Hkv, K * S)
    A = last_loaded.gather(-1, page_idx.clamp(min=0).long()).repeat_interleave(page_size, dim=-1)
    tau = torch.arange(seq_len - W, seq_len, device=q.device)[:, None]  # (W, 1): each row's position
    visible = listed[:, :, None] & (A[:, :, None] < tau) & (pos[:, :, None] <= tau)  # (B, Hkv, W, K * S)
    o, lse = gathered_attention(q, k_cache, v_cache, pos.clamp(max=k_cache.shape[2] - 1), visible, scale=scale)
    if update_last_loaded:
        b, h, slot = (page_idx >= 0).nonzero(as_tuple=True)
        last_loaded[b, h, page_idx[b, h, slot].long()] = seq_len - 1
    return o, lse


# ----------------------------------------------------------------------------------------------
# Triton kernel: every row of the window from one pass over S_t
#
# One program per (split of the page list, batch * KV head). The tile's rows are the G query heads of
# the KV head times the W window rows (row r = g * W + i), so each K/V tile is loaded once for all
# G * W queries; each (row, key) pair is masked by the row's own rule (page new to it, key not after
# it). The page list is walked as in kernels.paged_decode (kernels.paged_keys), the keys attended by
# kernels.attend_tile, the splits merged by kernels.merge_partials (flash-decoding). With
# update_last_loaded each program then sets A = t for its own pages, once it has read their A.

@triton.jit(do_not_specialize=["n_slots", "seq_len", "chunk", "num_splits"])
def _retro_decode_kernel(Q, K, V, PAGES, LAST, OP, LP, SEQ_LEN,
                         sqb, sqh, sqw, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                         spb, sph, spk, sab, sah, sap,
                         Hkv, G, W, n_slots, seq_len, page_size, chunk, num_splits, qk_scale,
                         UPDATE_LAST: tl.constexpr, LEN_ON_DEVICE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_PAD: tl.constexpr,
                         BLOCK_D: tl.constexpr, D: tl.constexpr):
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


def _check_retro_shapes(q, k_cache, v_cache, page_idx, last_loaded, page_size):
    """retro_decode's shapes, checked before the launch (a mismatch would read out of bounds)."""
    if q.dim() != 4 or k_cache.dim() != 4 or page_idx.dim() != 3 or last_loaded.dim() != 3:
        raise ValueError(f"retro_decode: need q (B, Hq, W, D), caches (B, Hkv, Nmax, D), page_idx (B, Hkv, K) and "
                         f"last_loaded (B, Hkv, Pmax); got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(page_idx.shape)}, {tuple(last_loaded.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"retro_decode: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    for what, a, b in (("batch", q.shape[0], k_cache.shape[0]), ("head dim", q.shape[3], k_cache.shape[3])):
        if a != b:
            raise ValueError(f"retro_decode: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} differ in {what} "
                             f"({a} vs {b})")
    G = _check_gqa(q, k_cache)
    B, Hkv, Nmax = k_cache.shape[:3]
    if page_idx.shape[:2] != (B, Hkv) or last_loaded.shape[:2] != (B, Hkv):
        raise ValueError(f"page_idx {tuple(page_idx.shape)} and last_loaded {tuple(last_loaded.shape)} "
                         f"must start with (B, Hkv) = ({B}, {Hkv})")
    if page_size < 1 or last_loaded.shape[2] * page_size < Nmax:
        raise ValueError(f"retro_decode: last_loaded holds {last_loaded.shape[2]} pages of {page_size}, fewer than "
                         f"the cache's {Nmax} rows need")
    return G


RETRO_BLOCK_N = 128
RETRO_TUNING = dict(waves=2, num_stages=2)  # programs per SM; pipeline stages for 2-byte inputs (GPU)


def retro_decode(q, k_cache, v_cache, page_idx, last_loaded, seq_len, page_size, scale=None,
                 update_last_loaded=False, partials=False):
    """Triton version of retro_decode_ref (same arguments, same result). seq_len may also be a device
    length (kernels.device_length), for a step captured in a CUDA graph. partials: return the splits'
    unmerged (o (B, Hq, W, NS, D), lse (B, Hq, W, NS)) fp32, NS splits, for window_merge."""
    G = _check_retro_shapes(q, k_cache, v_cache, page_idx, last_loaded, page_size)
    B, Hq, W, D = q.shape
    Hkv = k_cache.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    seq_len, len_t = kernels.device_length(seq_len, k_cache.shape[2])
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
    # fp32 tiles are twice as large: two pipeline stages keep K and V within shared memory, and a
    # wide head (160, 256) in fp32 gets one stage and fewer keys per tile (kernels.kv_tiles)
    stages = 1 if q.device.type != "cuda" else 2 if q.element_size() == 4 else RETRO_TUNING["num_stages"]
    block_n, stages = kernels.kv_tiles(RETRO_BLOCK_N, stages, D, q.element_size())
    _retro_decode_kernel[(num_splits, B * Hkv)](
        q, k_cache, v_cache, page_idx, last_loaded, o_part, lse_part, len_t if len_t is not None else lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *page_idx.stride(), *last_loaded.stride(),
        Hkv, G, W, n_slots, seq_len, page_size, chunk, num_splits, scale * kernels.LOG2E,
        UPDATE_LAST=update_last_loaded, LEN_ON_DEVICE=len_t is not None, PRECISION=kernels.dot_precision(q.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, PAGE_PAD=page_pad, BLOCK_D=kernels.tile_size(D), D=D,
        num_warps=8 if BLOCK_M >= 128 else 4, num_stages=stages)
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
                         BLOCK_D: tl.constexpr):
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
                                    num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# The attention object

class RetroAttention:
    """RetroAttention as an attention object. forward(layer_idx, q, k, v, input_pos) takes the rows of
    input_pos: several new positions = prefill (dense, causal); otherwise a decode step, whose rows are
    the last min(w, t + 1) positions t-w+1 .. t, all but the last already in the cache.
    budget, page_size, dense_layers: as QuestAttention. window: w, counting the current token.
    track_exposure: keep the exposure statistic (a few small GPU ops per sparse layer and step)."""

    def __init__(self, cache, budget, page_size, window=2, dense_layers=2, use_kernels=False, track_exposure=True):
        check_sparse_args(cache, budget, page_size, dense_layers)
        if window < 1:
            raise ValueError(f"--window must be >= 1 (1 is Quest), got {window}")
        self.cache = cache
        self.budget = budget
        self.window = window
        self.dense_layers = dense_layers
        self.use_kernels = use_kernels
        n_layers, B, Hkv = cache.k.shape[:3]
        self.outputs = OutputCache(n_layers, window - 1)
        # A: per (layer, batch, KV head, page) the last step (= position of its current token) that loaded it
        self.last_loaded = torch.full((n_layers, B, Hkv, cache.num_pages_max), -1, dtype=torch.int32,
                                      device=cache.k.device)
        self.first_decoded = None  # position of the first token decoded (exposure counts decoded tokens)
        self.track_exposure = track_exposure
        self._page_start = torch.arange(cache.num_pages_max, device=cache.k.device) * cache.page_size
        self._exposure_sum = torch.zeros((), dtype=torch.float64, device=cache.k.device)
        self._exposure_count = 0
        # kv_bytes_read and pages_read count what Quest counts (K/V of the pages read, page bounds), so
        # the two compare; retro_aux_bytes is what Retro adds: the output cache (read and written), the
        # past rows' K/V overwrites, A (read and written).
        self._stats = {"kv_bytes_read": 0, "pages_read": 0, "decode_steps": 0, "retro_aux_bytes": 0}

    @property
    def stats(self):
        """Counters for generate.py. exposure: distinct KV tokens the final output of a decoded token
        covered / budget, averaged over sparse layers, KV heads and tokens that left the window."""
        if self._exposure_count:
            self._stats["exposure"] = float(self._exposure_sum) / self._exposure_count
        return self._stats

    graph_mode = False  # see forward_on_device

    def forward(self, layer_idx, q, k, v, input_pos):
        # q (B, T, Hq, D) after RoPE; k, v (B, T, Hkv, D); input_pos (T,) on the CPU -> (B, T, Hq, D)
        if self.graph_mode:
            return self.forward_on_device(layer_idx, q, k, v, input_pos)
        t = int(input_pos[-1])
        if t + 1 - self.cache.lengths[layer_idx] > 1:  # several new positions
            return self._prefill(layer_idx, q, k, v, input_pos)
        self._check_decode_rows(layer_idx, input_pos)
        self.cache.write(layer_idx, k, v, input_pos)  # overwrite the past rows, append the new one
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        B, Hkv, _, D = kc.shape
        self._stats["retro_aux_bytes"] += 2 * (len(input_pos) - 1) * B * Hkv * D * kc.element_size()  # overwrites
        if layer_idx == 0:
            self._stats["decode_steps"] += 1
            if self.first_decoded is None:
                self.first_decoded = t
        if layer_idx < self.dense_layers:
            # Dense layers attend every key anyway, so the past rows are simply recomputed, exactly,
            # with their fresh queries: no output cache, nothing to merge.
            count_page_reads(self._stats, self.cache, -(-(t + 1) // self.cache.page_size), t + 1, scored=False)
            return prefill_decode_attention(q, kc, vc, input_pos, self.use_kernels, need_lse=False)[0]
        return self._sparse_decode(layer_idx, q, input_pos)

    def _check_decode_rows(self, layer_idx, input_pos):
        """A decode step's rows are the tokens in the output cache plus one new token."""
        t, rows = int(input_pos[-1]), input_pos.tolist()
        sparse = max(layer_idx, self.dense_layers)  # dense layers keep no rows: ask the first sparse one
        held = self.outputs.pos[sparse] if sparse < len(self.outputs.pos) else rows[:-1]
        if t + 1 - self.cache.lengths[layer_idx] != 1 or rows[:-1] != held:
            raise ValueError(f"RetroAttention(window={self.window}): a decode step feeds the last min(w, n) "
                             f"positions, {held + [self.cache.lengths[layer_idx]]} now, the last one new; "
                             f"got {rows}")

    def _prefill(self, layer_idx, q, k, v, input_pos):
        if int(input_pos[0]) != self.cache.lengths[layer_idx]:
            raise ValueError(f"RetroAttention: a prefill must only append (positions {input_pos.tolist()}, "
                             f"{self.cache.lengths[layer_idx]} already in the cache)")
        self.cache.write(layer_idx, k, v, input_pos)
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        o, lse = prefill_decode_attention(q, kc, vc, input_pos, self.use_kernels, need_lse=self.use_kernels)
        if lse is None:  # the PyTorch path skipped it: only the last rows (the output cache's) need theirs
            r = max(1, self.window - 1)
            o_r, lse = prefill_decode_attention(q[:, -r:], kc, vc, input_pos[-r:], False)
            self.record_prefill(layer_idx, input_pos[-r:], o_r, lse)
        else:
            self.record_prefill(layer_idx, input_pos, o, lse)
        return o

    def record_prefill(self, layer_idx, input_pos, o, lse):
        """Remember the prompt's last w - 1 rows, which attended densely: every page so far counts as
        seen by them. o (B, T, Hq, D), lse (B, Hq, T) of the rows at input_pos (the last rows suffice).
        Also called by a prefill method that wrote the cache itself (token_sparse)."""
        if layer_idx >= self.dense_layers:
            n = int(input_pos[-1]) + 1
            self.last_loaded[layer_idx, :, :, :-(-n // self.cache.page_size)] = n - 1
            self.outputs.push(layer_idx, input_pos.tolist(), o.transpose(1, 2), lse)

    def _sparse_decode(self, layer_idx, q, input_pos):
        cache, w = self.cache, self.window
        n = int(input_pos[-1]) + 1
        past = input_pos[:-1].tolist()

        # S_t: Quest's pages for the current token (all pages while the budget covers the sequence)
        page_idx, scored = quest_pages(q[:, -1], cache, layer_idx, self.budget, n, self.use_kernels)
        if self.use_kernels and 0 < len(past) == w - 1:  # a full window: the fused path of forward_on_device
            out = self._fused_decode(layer_idx, q, page_idx, n, past)
        else:
            out = self._decode_and_merge(layer_idx, q, page_idx, n, past)
        count_page_reads(self._stats, cache, page_idx.shape[-1], n, scored)
        B, _, Hq, D = out.shape
        rows_moved = 2 * len(past) + (w > 1)  # output cache rows read and written (fp32), the new one pushed
        self._stats["retro_aux_bytes"] += rows_moved * B * Hq * (D + 1) * 4 + 2 * page_idx.numel() * 4  # + A
        return out

    def _decode_and_merge(self, layer_idx, q, page_idx, n, past):
        cache, S, w, t = self.cache, self.cache.page_size, self.window, n - 1
        kc, vc = cache.k[layer_idx], cache.v[layer_idx]
        A = self.last_loaded[layer_idx]  # (B, Hkv, Pmax)
        attend = retro_decode if self.use_kernels else retro_decode_torch
        # (B, Hq, T, D), (B, Hq, T); then A[p] = t for the pages of S_t
        o, lse = attend(q.transpose(1, 2), kc, vc, page_idx, A, n, S, update_last_loaded=True)

        # What a past row's cached (o, lse) is merged with (ours; the paper leaves it open): the
        # supplement computed now, with the row's fresh query (re-embedded from its revised lower-layer
        # outputs), over the keys <= tau of the pages new to it, read after this step's overwrite. The
        # cached part is not recomputed: it keeps the queries and window K/V of the steps that produced
        # it, since refreshing it would mean reloading every page tau has already seen, the traffic
        # Quest exists to avoid. The merge is therefore exactly one attention over the union of pages
        # while tau's lower layers stay unchanged (as with a budget covering the sequence), and an
        # approximation of it once a lower layer's revision has moved tau's q, k, v.
        if past:
            o_past, _ = self.outputs.update(layer_idx, o[:, :, :-1], lse[:, :, :-1])
        if w == 1:
            self._count_exposure(A, t)
        else:
            if len(self.outputs.pos[layer_idx]) == w - 1:
                self._count_exposure(A, self.outputs.pop(layer_idx))  # its output is final now
            self.outputs.push(layer_idx, [t], o[:, :, -1:], lse[:, :, -1:])
        if past:
            o = torch.cat([o_past.to(o.dtype), o[:, :, -1:]], dim=2)
        return o.transpose(1, 2)

    def _fused_decode(self, layer_idx, q, page_idx, n, past):
        """_decode_and_merge for a full window in two launches: retro_decode's splits, then window_merge
        (the splits merged, the past rows revised, the output cache shifted in place). The same kernels as
        forward_on_device, so an eager step and a replayed graph round alike; and the supplement
        stays in fp32 up to the merge (the unfused path rounds it to the model's dtype first)."""
        A = self.last_loaded[layer_idx]
        o_part, lse_part = retro_decode(q.transpose(1, 2), self.cache.k[layer_idx], self.cache.v[layer_idx], page_idx,
                                        A, n, self.cache.page_size, update_last_loaded=True, partials=True)
        out = window_merge(o_part, lse_part, self.outputs.o[layer_idx], self.outputs.lse[layer_idx], q.dtype)
        self._count_exposure(A, past[0])  # the oldest row's output is final now
        self.outputs.pos[layer_idx] = past[1:] + [n - 1]
        return out

    def forward_on_device(self, layer_idx, q, k, v, input_pos):
        """A decode step whose w rows' positions are on the device (input_pos (w,) int64), with no
        host sync, for generate.GraphDecodeStep: the same computation as forward, in kernels that read
        the length from the device. The caller guarantees a full window (w - 1 rows in the output
        cache) and a budget below the length at every step, and calls after_device_step. The output
        cache is updated in place (a replayed graph reads and writes the same buffers). No
        statistics and no exposure are counted here."""
        cache, S = self.cache, self.cache.page_size
        cache.write_on_device(layer_idx, k, v, input_pos)
        if layer_idx == 0:
            self.seq_len = (input_pos[-1:] + 1).to(torch.int32)
        kc, vc, qh = cache.k[layer_idx], cache.v[layer_idx], q.transpose(1, 2)  # qh (B, Hq, w, D)
        if layer_idx < self.dense_layers:
            o, _ = kernels.flash_decode(qh, kc, vc, self.seq_len)  # the w rows, causally
            return o.transpose(1, 2)
        scores = kernels.page_scores(qh[:, :, -1], cache.kmin[layer_idx], cache.kmax[layer_idx], cache.num_pages_max)
        page_idx = kernels.select_pages_device(scores, self.seq_len, S, self.budget // S)
        if self.window == 1:
            o, _ = retro_decode(qh, kc, vc, page_idx, self.last_loaded[layer_idx], self.seq_len, S,
                                update_last_loaded=True)
            return o.transpose(1, 2)
        o_part, lse_part = retro_decode(qh, kc, vc, page_idx, self.last_loaded[layer_idx], self.seq_len, S,
                                        update_last_loaded=True, partials=True)
        # the w - 1 past rows revised, the output cache shifted in place (the oldest leaves, t enters)
        return window_merge(o_part, lse_part, self.outputs.o[layer_idx], self.outputs.lse[layer_idx], q.dtype)

    def after_device_step(self, n):
        """Host-side bookkeeping after a device step that made the sequence n tokens long."""
        self.cache.lengths = [n] * len(self.cache.lengths)
        for layer in range(self.dense_layers, len(self.outputs.pos)):
            self.outputs.pos[layer] = list(range(n - self.window + 1, n))  # the w - 1 rows kept

    def _count_exposure(self, A, tau):
        """tau's output is final: count the keys <= tau of every page it has seen (A[p] >= tau)."""
        if not self.track_exposure or tau < self.first_decoded:
            return  # (a prompt token attended densely in prefill)
        keys_upto_tau = (tau + 1 - self._page_start).clamp_(0, self.cache.page_size)  # (Pmax,) keys j <= tau per page
        self._exposure_sum += torch.where(A >= tau, keys_upto_tau, 0).sum() / self.budget
        self._exposure_count += A.shape[0] * A.shape[1]
