"""
Token Sparse Attention: per-head token selection for prefill (Jo et al., arXiv 2602.03216, ICML 2026).

At a sparse layer every query head h keeps its own subset S_h of the L prompt tokens, gathers the
Q, K, V rows of those tokens into short dense tensors, runs ordinary causal attention on them and
scatters the output back to full length, with zeros in the skipped rows ("compress, then
decompress"). Nothing is evicted: the full K/V go into the cache, the residual stream carries the
skipped tokens on, and the next sparse layer chooses again. Positions keep their order inside S_h,
so causality in the compressed sequence is causality in the original one.

    score_h(j) = avgpool_7( sum_{i in last W queries} softmax_j(q_i . k_j / sqrt(D)) )   (j < L - W)
    mass(j)    = mean_h score_h(j) / sum_j' mean_h score_h(j')           (heads averaged, then normalized)
    n          = the number of sorted-ascending tokens whose cumulative mass stays < tau
    dropped    = 0 if n = 0 (the layer stays dense), else n + 1         ("Dynamic Token Coverage")
    |S_h|      = max(min_tokens, L - W - dropped) top tokens of score_h, plus the last W tokens

The coverage rule is the authors' get_index (github dongwonjo/Token-Sparse-Attention); the paper's
text leaves the order of averaging and normalizing open. No sparsity when L <= min_tokens + W.
Defaults (paper): tau = 0.005, min_tokens = 1024, W = 128; sparse layers: the second half, the
authors' code's rule for a model it has no profile of (for Llama-3.1-8B it uses 15..30, profiled on
that model: --sparse-layers 15-30; a profile of one model says nothing about another).

Read top to bottom: the reference, the Triton kernels with the same signatures, then
TokenSparseAttention. Layout is heads first: q (B, Hq, T, D), k, v (B, Hkv, T, D).
"""

import functools
import math
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels
from attention import attention, attention_ref, prefill_attention

POOL_KERNEL = 7  # paper: scores are average-pooled along the tokens with a window of 7


# ----------------------------------------------------------------------------------------------
# Reference

def window_scores_ref(q_win, k, scale=None):
    """How much attention the last W queries pay to each key (Sec. 3, the scoring pass).
    q_win (B, Hq, W, D) are the queries at positions Tk - W .. Tk - 1; k (B, Hkv, Tk, D).
    Returns (B, Hq, Tk) fp32: sum over the W queries of their exact causal softmax rows."""
    B, Hq, W, D = q_win.shape
    Tk = k.shape[2]
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q_win.float() @ k.repeat_interleave(G, dim=1).float().transpose(-1, -2)) * scale  # (B, Hq, W, Tk)
    q_pos = torch.arange(Tk - W, Tk, device=k.device)
    s = s.masked_fill(torch.arange(Tk, device=k.device)[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).sum(dim=2)


def pool_scores(scores):
    """Average-pool (B, Hq, C) scores along the tokens (kernel 7, stride 1, zero padding): a token
    next to an important one counts as somewhat important too."""
    pooled = F.avg_pool1d(scores.flatten(0, 1)[:, None], POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)
    return pooled.view(scores.shape)


COVERAGE_RULES = ("authors", "per_head")


def coverage_budget(scores, coverage, min_tokens, rule="authors"):
    """Dynamic Token Coverage (the module docstring's mass, n and dropped): how many of the C candidate
    tokens each head keeps. scores (B, Hq, C) >= 0 (pooled) -> list of B ints (the heads of a row keep
    equally many). rule "authors" (default, their get_index) averages the heads, then normalizes, and
    drops n + 1, the prefix whose mass reaches tau (none if n = 0); "per_head" (ours before, kept to
    compare) normalizes each head first, then averages, and drops exactly n: a head with little mass on
    the candidates then counts as much as any other. At least min_tokens are kept. Normalizing divides
    by the plain sum (no epsilon: scaling every score leaves the budget unchanged); an all-zero row says
    nothing and keeps every token."""
    if rule not in COVERAGE_RULES:
        raise ValueError(f"coverage rule must be one of {COVERAGE_RULES}, got {rule!r}")
    C = scores.shape[-1]
    scores = scores.double()  # (B, Hq, C) is small; float64 keeps the running sums exact enough

    def normalized(x):  # (..., C) -> each row a distribution; an all-zero row stays 0
        total = x.sum(-1, keepdim=True)
        return torch.where(total > 0, x / torch.where(total > 0, total, 1.0), 0.0)

    mass = normalized(scores.mean(dim=1)) if rule == "authors" else normalized(scores).mean(dim=1)  # (B, C)
    cum = mass.sort(dim=-1).values.cumsum(dim=-1)
    below = (cum < coverage).sum(dim=-1)  # cum is non-decreasing: a prefix of the sorted tokens
    # dropped: none if n = 0 or the row is all zero, else n + 1 (authors) or n (per_head)
    dropped = torch.where(below > 0, below + (rule == "authors"), 0) * (mass.sum(-1) > 0)
    return (C - dropped).clamp(min=min(min_tokens, C)).tolist()


def select_tokens(q, k, coverage=0.005, min_tokens=1024, window=128, keep=None, use_kernels=False, scale=None,
                  coverage_rule="authors"):
    """Choose each query head's tokens. q (B, Hq, L, D), k (B, Hkv, L, D).
    Returns None when the prompt is too short to sparsify (L <= min_tokens + window), else
    idx (B, Hq, N) int32: kept positions per head, ascending, the last `window` always among them;
    entries past n_keep are padding; and n_keep (B, Hq) int32 (equal across the heads of a row)."""
    B, Hq, L, _ = q.shape
    if L <= min_tokens + window:
        return None
    C = L - window  # candidates; the window tokens are kept regardless
    score_fn = window_scores if use_kernels else window_scores_ref
    scores = pool_scores(score_fn(q[:, :, C:], k, scale=scale)[:, :, :C])
    if keep is None:
        budgets = coverage_budget(scores, coverage, min_tokens, coverage_rule)
    else:  # fixed-budget mode (ours, for speed curves): ceil(keep * C) candidates, at least min_tokens
        budgets = [min(C, max(min(min_tokens, C), math.ceil(keep * C)))] * B
    N = max(budgets) + window
    idx = torch.zeros(B, Hq, N, dtype=torch.int32, device=q.device)
    tail = torch.arange(C, L, dtype=torch.int32, device=q.device)
    for b, n in enumerate(budgets):  # rows of a batch may keep different numbers of tokens
        idx[b, :, :n] = scores[b].topk(n, dim=-1).indices.sort(dim=-1).values  # each head by its own scores
        idx[b, :, n:n + window] = tail
    n_keep = torch.tensor(budgets, dtype=torch.int32, device=q.device)[:, None].expand(B, Hq) + window
    return idx, n_keep.contiguous()


def sparse_attention_ref(q, k, v, idx, n_keep, scale=None, attend=attention_ref):
    """Causal attention of each query head over its own token subset, scattered back.
    q (B, Hq, T, D); k, v (B, Hkv, T, D); idx (B, Hq, N) ascending positions; n_keep (B, Hq).
    Returns o (B, Hq, T, D): rows not in a head's subset are 0. `attend` is the dense attention run
    on each subset (attention_ref here; sparse_attention_torch hands in the fast one)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    o = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            rows = idx[b, h, :int(n_keep[b, h])].long()
            # rows are ascending, so "compressed key index <= compressed query index" (causal on the
            # short sequence) is exactly "original key position <= original query position"
            o_h, _ = attend(q[b, h, rows][None, None], k[b, h // G, rows][None, None],
                            v[b, h // G, rows][None, None], causal=True, scale=scale)
            o[b, h, rows] = o_h[0, 0]
    return o


# sparse_attention_ref on the CPU run path: each head's subset through attention.attention (sdpa), no lse
sparse_attention_torch = functools.partial(sparse_attention_ref, attend=functools.partial(attention, need_lse=False))


# ----------------------------------------------------------------------------------------------
# Triton kernels (same signatures as the references), on kernels.py's tile. Scores are kept in base 2.

@triton.jit(do_not_specialize=["W", "Tk"])
def _window_lse_kernel(Q, K, LSE, sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                       Hq, G, W, Tk, qk_scale, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Pass 1: the base-2 log-sum-exp of each window query's causal score row (FlashAttention without V)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :] * sqd,
                mask=(rows[:, None] < W) & (d[None, :] < D), other=0.0)
    K += b * skb + (h // G) * skh
    q_pos = Tk - W + rows
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, tl.minimum(Tk, Tk - W + pid_m * BLOCK_M + BLOCK_M), BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + k_pos[:, None] * skt + d[None, :] * skd,
                    mask=(k_pos[:, None] < Tk) & (d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        m, l, _, _ = kernels.online_softmax(m, l, tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf")))
    tl.store(LSE + pid_bh.to(tl.int64) * W + rows, m + tl.log2(tl.where(l > 0, l, 1.0)), mask=rows < W)


@triton.jit(do_not_specialize=["W", "Tk"])
def _window_scores_kernel(Q, K, LSE, OUT, sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                          Hkv, G, W, Tk, qk_scale, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Pass 2: one program per (block of keys, KV head) sums the normalized probabilities
    exp2(s - lse) over the W queries of each of the G query heads; the key tile is loaded once.
    Every key column is owned by one program, so no atomics are needed."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    k_pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    k = tl.load(K + b * skb + hk * skh + k_pos[:, None] * skt + d[None, :] * skd,
                mask=(k_pos[:, None] < Tk) & (d[None, :] < D), other=0.0)
    for g in range(G):
        h = hk * G + g
        row_bh = b * Hkv * G + h  # index of (b, query head) in B * Hq
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, W, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :] * sqd,
                        mask=(rows[:, None] < W) & (d[None, :] < D), other=0.0)
            lse = tl.load(LSE + row_bh * W + rows, mask=rows < W, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            visible = (rows[:, None] < W) & (k_pos[None, :] <= Tk - W + rows[:, None])
            acc += tl.sum(tl.where(visible, tl.exp2(s - lse[:, None]), 0.0), 0)
        tl.store(OUT + row_bh * Tk + k_pos, acc, mask=k_pos < Tk)


def window_scores(q_win, k, scale=None):
    """Kernel version of window_scores_ref: q_win (B, Hq, W, D), k (B, Hkv, Tk, D) -> (B, Hq, Tk) fp32.
    Two passes because a probability needs its row's normalizer before it can be summed."""
    G = kernels._check(q_win, k, k, 4)  # shapes checked before a launch (a mismatch would read out of bounds)
    B, Hq, W, D = q_win.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if W > Tk:
        raise ValueError(f"window_scores: a window of {W} queries needs at least as many keys, got {Tk}")
    qk_scale = (1.0 / math.sqrt(D) if scale is None else scale) * kernels.LOG2E
    lse = torch.empty(B, Hq, W, dtype=torch.float32, device=q_win.device)
    out = torch.empty(B, Hq, Tk, dtype=torch.float32, device=q_win.device)
    BLOCK = 64 if q_win.device.type == "cuda" else 32  # queries and keys per tile
    common = dict(PRECISION=kernels.dot_precision(q_win.dtype), BLOCK_M=BLOCK, BLOCK_N=BLOCK,
                  BLOCK_D=kernels.tile_size(D), D=D, num_warps=4)
    _window_lse_kernel[(triton.cdiv(W, BLOCK), B * Hq)](q_win, k, lse, *q_win.stride(), *k.stride(),
                                                        Hq, G, W, Tk, qk_scale, **common)
    _window_scores_kernel[(triton.cdiv(Tk, BLOCK), B * Hkv)](q_win, k, lse, out, *q_win.stride(), *k.stride(),
                                                             Hkv, G, W, Tk, qk_scale, **common)
    return out


@triton.jit
def _sparse_attn_kernel(Q, K, V, O, IDX, NKEEP,
                        sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
                        sib, sih, sit, Hq, G, qk_scale, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Varlen causal flash attention over per-head index lists: gather, attend and scatter in one
    pass. One program per (block of BLOCK_M kept rows, batch * query head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    n = tl.load(NKEEP + pid_bh)  # this head's kept tokens (NKEEP is contiguous (B, Hq))
    IDX += b * sib + h * sih
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # indices into the compressed sequence
    row_ok = rows < n
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_pos = tl.load(IDX + rows * sit, mask=row_ok, other=0).to(tl.int64)  # original positions
    q = tl.load(Q + b * sqb + h * sqh + q_pos[:, None] * sqt + d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    K += b * skb + (h // G) * skh
    V += b * svb + (h // G) * svh

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # the list is ascending, so compressed keys past this block's last row are later tokens
    hi = tl.where(pid_m * BLOCK_M < n, tl.minimum(n, pid_m * BLOCK_M + BLOCK_M), 0)
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        k_pos = tl.load(IDX + cols * sit, mask=col_ok, other=0).to(tl.int64)
        visible = col_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        m, l, acc = kernels.attend_tile(q, K, V, k_pos, col_ok, visible, m, l, acc, skt, skd, svt, svd, d, d_ok,
                                        qk_scale, PRECISION)

    o, _ = kernels.finish_rows(m, l, acc)
    tl.store(O + b * sob + h * soh + q_pos[:, None] * sot + d[None, :] * sod, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def _check_idx(q, k, v, idx, n_keep):
    """The shapes sparse_attention needs, checked before a launch (a mismatch would read out of bounds)."""
    G = kernels._check(q, k, v, 4)
    B, Hq, T = q.shape[:3]
    if k.shape[2] != T:
        raise ValueError(f"sparse_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in length")
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (B, Hq) or tuple(n_keep.shape) != (B, Hq):
        raise ValueError(f"sparse_attention: idx {tuple(idx.shape)}, n_keep {tuple(n_keep.shape)}: expected "
                         f"(B, Hq, N) and (B, Hq) = ({B}, {Hq})")
    if n_keep.numel() and int(n_keep.max()) > idx.shape[2]:  # a prefill: one sync is cheap here
        raise ValueError(f"sparse_attention: n_keep up to {int(n_keep.max())} exceeds the {idx.shape[2]} slots of idx")
    return G


def sparse_attention(q, k, v, idx, n_keep, scale=None):
    """Kernel version of sparse_attention_ref (option 1: one varlen kernel, no gathered copies)."""
    G = _check_idx(q, k, v, idx, n_keep)
    B, Hq, T, D = q.shape
    # zeros laid out as the model's (B, T, Hq, D): the attention object transposes them back for free
    o = torch.zeros(B, T, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    idx = idx.to(torch.int32)
    n_keep = n_keep.to(torch.int32).contiguous()
    if idx.shape[2] == 0 or T == 0:
        return o
    BLOCK_M, BLOCK_N, warps, stages = kernels.prefill_tiles(q)  # as flash_prefill: the options compare like for like
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    grid = (triton.cdiv(idx.shape[2], BLOCK_M), B * Hq)
    _sparse_attn_kernel[grid](q, k, v, o, idx, n_keep, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                              *idx.stride(), Hq, G, scale * kernels.LOG2E, PRECISION=kernels.dot_precision(q.dtype),
                              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=kernels.tile_size(D), D=D,
                              num_warps=warps, num_stages=stages)
    return o


def sparse_attention_gathered(q, k, v, idx, n_keep, scale=None):
    """Option 2, same result: gather the rows into dense (B, Hq, N, D) tensors (K/V repeated per
    query head), run kernels.flash_prefill, scatter back. Padding rows (past n_keep) come after every
    kept row, so causally they never touch a kept row; they are scattered into a dummy row T."""
    G = _check_idx(q, k, v, idx, n_keep)
    B, Hq, T, D = q.shape
    N = idx.shape[2]
    pos = idx.long().clamp(0, T - 1)
    bi = torch.arange(B, device=q.device)[:, None, None]
    hi = torch.arange(Hq, device=q.device)[None, :, None]
    og, _ = kernels.flash_prefill(q[bi, hi, pos], k[bi, hi // G, pos], v[bi, hi // G, pos], causal=True, scale=scale)
    out = torch.zeros(B, T + 1, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    kept = torch.arange(N, device=q.device)[None, None, :] < n_keep[:, :, None].to(q.device)
    out[bi, hi, torch.where(kept, pos, T)] = og
    return out[:, :, :T]


# ----------------------------------------------------------------------------------------------
# Glue: the whole sparse prefill of one layer, and the method object

def token_sparse_attention(q, k, v, coverage=0.005, min_tokens=1024, window=128, keep=None,
                           use_kernels=False, attn_kernel="varlen", scale=None, coverage_rule="authors"):
    """Causal prefill attention with per-head token selection. q (B, Hq, L, D); k, v (B, Hkv, L, D).
    Returns (o (B, Hq, L, D), n_keep (B, Hq) or None when the prompt was too short to sparsify)."""
    sel = select_tokens(q, k, coverage, min_tokens, window, keep, use_kernels, scale, coverage_rule)
    if sel is None:  # too short to sparsify: dense
        dense = kernels.flash_prefill if use_kernels else functools.partial(attention, need_lse=False)
        return dense(q, k, v, causal=True, scale=scale)[0], None
    idx, n_keep = sel
    return attend_selected(use_kernels, attn_kernel)(q, k, v, idx, n_keep, scale), n_keep


def attend_selected(use_kernels, attn_kernel="varlen"):
    """The attention over the selected tokens, sparse_attention_ref's result: the varlen kernel
    (sparse_attention), the gathered one (attn_kernel "gather") or, without kernels, the PyTorch run path."""
    if not use_kernels:
        return sparse_attention_torch
    return sparse_attention if attn_kernel == "varlen" else sparse_attention_gathered


def parse_sparse_layers(spec, n_layers):
    """None or "half" -> the second half of the layers (paper default); "all"; or "15-30" / "3,5,7"
    (both ends of a range included). Returns a sorted list of layer indices."""
    if spec in (None, "half", "all"):
        return list(range(0 if spec == "all" else n_layers // 2, n_layers))
    if isinstance(spec, str):
        layers = []
        try:
            for part in spec.split(","):
                lo, _, hi = part.partition("-")
                layers += range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise ValueError(f"--sparse-layers: expected 'half', 'all', a range like 15-30 or a list like "
                             f"3,5,7; got {spec!r}") from None
    else:
        layers = [int(i) for i in spec]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"--sparse-layers: layers {bad} do not exist (the model has {n_layers} layers)")
    return sorted(set(layers))


class TokenSparseAttention:
    """Token Sparse Attention in prefill, any method's decoding after it.

    The prefill from position 0 of a sparse layer writes the full K/V into the cache, then attends
    sparsely, and hands decode_attn the prompt's last prefill_rows outputs (record_prefill); every
    other call (dense layers' prefill, chunked prefill, decode) goes to decode_attn (a DenseAttention,
    Quest or Retro object sharing the same cache)."""

    def __init__(self, cache, decode_attn, coverage=0.005, min_tokens=1024, window=128, sparse_layers=None,
                 keep=None, use_kernels=False, attn_kernel="varlen", coverage_rule="authors"):
        if not 0.0 <= coverage < 1.0:
            raise ValueError(f"--coverage must lie in [0, 1), got {coverage}")
        if min_tokens < 0 or window < 1:
            raise ValueError(f"--min-tokens must be >= 0 and --ts-window >= 1, got {min_tokens} and {window}")
        if keep is not None and not 0.0 < keep <= 1.0:
            raise ValueError(f"--keep must lie in (0, 1], got {keep}")
        if coverage_rule not in COVERAGE_RULES:
            raise ValueError(f"--coverage-rule must be one of {COVERAGE_RULES}, got {coverage_rule!r}")
        if attn_kernel not in ("varlen", "gather"):
            raise ValueError(f"attn_kernel must be 'varlen' or 'gather', got {attn_kernel!r}")
        self.cache, self.decode_attn = cache, decode_attn
        self.coverage, self.min_tokens, self.window, self.keep = coverage, min_tokens, window, keep
        self.sparse_layers = set(parse_sparse_layers(sparse_layers, cache.k.shape[0]))
        self.use_kernels, self.coverage_rule = use_kernels, coverage_rule
        self.attend = attend_selected(use_kernels, attn_kernel)  # the fast path, picked once
        self.kept_fraction = {}  # sparse layer -> fraction of tokens kept in the last prefill (mean over rows)
        self.selection_s = 0.0   # wall time spent choosing tokens (a GPU sync before and after)

    @property
    def stats(self):
        kept = list(self.kept_fraction.values())
        return {**self.decode_attn.stats,
                "ts_kept_fraction": sum(kept) / len(kept) if kept else 1.0,
                "ts_kept_fraction_per_layer": dict(sorted(self.kept_fraction.items())),
                "ts_selection_s": self.selection_s}

    @property
    def prefill_rows(self):
        return self.decode_attn.prefill_rows

    def decode(self, layer_idx, q, k, v, input_pos):
        return self.decode_attn.decode(layer_idx, q, k, v, input_pos)

    def record_prefill(self, layer_idx, input_pos, o, lse):
        self.decode_attn.record_prefill(layer_idx, input_pos, o, lse)

    def prefill(self, layer_idx, q, k, v, input_pos):
        L = q.shape[1]
        if int(input_pos[0]) != 0 or layer_idx not in self.sparse_layers:
            return self.decode_attn.prefill(layer_idx, q, k, v, input_pos)
        if L <= self.min_tokens + self.window:  # too short to sparsify: exactly the dense prefill
            self.kept_fraction[layer_idx] = 1.0
            return self.decode_attn.prefill(layer_idx, q, k, v, input_pos)
        self.cache.write(layer_idx, k, v, input_pos)  # the full K/V: decoding sees every token
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        _sync(q.device)
        t0 = time.perf_counter()
        idx, n_keep = select_tokens(qh, kh, self.coverage, self.min_tokens, self.window, self.keep,
                                    self.use_kernels, coverage_rule=self.coverage_rule)
        _sync(q.device)
        self.selection_s += time.perf_counter() - t0
        self.kept_fraction[layer_idx] = float(n_keep.float().mean()) / L

        # Skipped rows are 0 here; the layer adds o_proj(0) = 0 (no bias) to the residual stream,
        # so a skipped token passes this attention unchanged and a later layer may select it again.
        o = self.attend(qh, kh, vh, idx, n_keep).transpose(1, 2)
        rows = self.decode_attn.prefill_rows
        if rows:
            # The decoder keeps the prompt's last rows' outputs with their lse (RetroAttention: w - 1,
            # to revise them). Ours: those few rows attend densely, so the kept (o, lse) are exact.
            o_rows, lse_rows = prefill_attention(q[:, -rows:], self.cache.k[layer_idx], self.cache.v[layer_idx],
                                                 input_pos[-rows:], self.use_kernels)
            o[:, -rows:] = o_rows
            self.decode_attn.record_prefill(layer_idx, input_pos[-rows:], o_rows, lse_rows)
        return o


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
