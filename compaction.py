"""
KV compaction by attention matching (Zweiger, Fu, Guo, Kim: arXiv 2602.16284), written from the
paper's description.

Per layer and KV head, the T cached keys/values K, V of a context are replaced by t << T rows: keys
Ck (a subset of K), a scalar bias beta_j per kept key, and fitted values Cv, chosen so that for
reference queries q_m the compact attention reproduces both quantities that matter:

    output  softmax(q K^T / sqrt(D)) V          ~=  softmax(q Ck^T / sqrt(D) + beta) Cv
    mass    sum_i exp(q . K_i / sqrt(D))        ~=  sum_j exp(q . Ck_j / sqrt(D) + beta_j)

Matching the output alone is not enough: once new tokens are appended after the context, each part
is weighted by its mass (the softmax denominator), so a compact part with the right output but the
wrong mass takes too much or too little of the attention. The steps (paper):
  1. reference queries: "repeat-prefill": run `context + "Repeat the previous context verbatim." +
     context` and take the queries of the second copy; layer by layer, so a layer's queries come
     from a pass in which all earlier layers already attend to their compacted context ("on-policy");
     as in the authors' prompt, with one BOS and, for a chat model, the request as a user turn;
  2. keys: the t keys with the highest aggregate attention over the reference queries (ours: the
     RMS of their softmax weights; max, mean and greedy OMP are options);
  3. biases: w = exp(beta) >= 0 by non-negative least squares A w ~= z (nnls.py), with
     A[m, j] = exp(q_m . Ck_j / sqrt(D) - s_m),  z_m = sum_i exp(q_m . K_i / sqrt(D) - s_m).
     Ours: s_m = log of the full mass of query m, so A[m, j] is key j's full-attention weight,
     z_m = 1, and every query's relative mass error counts alike (the paper shifts by a max);
  4. values: least squares P Cv ~= softmax(Qr K^T / sqrt(D)) V with P = softmax(Qr Ck^T / sqrt(D) + beta).
GQA: a KV head is compacted once, with the reference queries of its G query heads pooled.

Decoding then attends to [compact part, bias beta] + [tokens appended after compaction, bias 0]
in one pass (the paged decode kernel's per-key bias). The compact keys keep their RoPE; tokens after
a context of L tokens get positions L, L+1, ... as if the context were still there.
"""

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from attention import attention, masked_attention, merge_attention, paged_decode
from kvcache import KVCache
from nnls import gram, nnls, nnls_gram, spd_solve, tf32_matmuls
from tokenizer import CHAT_TEMPLATES

REPEAT_INSTRUCTION = "Repeat the previous context verbatim."  # the authors' request (github adamzweiger/compaction)
REPEAT_PROMPT = f"\n\n{REPEAT_INSTRUCTION}\n\n"  # the separator for a model without a chat template
KEY_SCORES = ("rms", "max", "mean")
AUTHORS_W_BOX = (math.exp(-3), math.exp(3))  # the authors' bounds on a kept key's weight exp(beta)


# ----------------------------------------------------------------------------------------------
# Reference attention with a per-key bias

def biased_attention_ref(q, k, v, bias, scale=None, chunk=4096):
    """Every query attends to every key, with a per-key additive bias (non-causal).
    q (B, Hq, T, D); k, v (B, Hkv, N, D); bias (B, Hkv, N) fp32 (-inf = key absent)
    -> o (B, Hq, T, D), lse (B, Hq, T). Queries are processed in chunks to bound memory."""
    B, Hq, T, D = q.shape
    qg = q.reshape(B, k.shape[1], Hq // k.shape[1], T, D)
    parts = [masked_attention(qg[:, :, :, s:s + chunk], k, v, None, scale, bias) for s in range(0, max(T, 1), chunk)]
    o, lse = torch.cat([o for o, _ in parts], 3), torch.cat([lse for _, lse in parts], 3)
    return o.view(B, Hq, T, D).to(q.dtype), lse.view(B, Hq, T)


def _biased_then_causal(q, ck, cv, beta, k, v, use_kernels):
    """q (B, Hq, T, D) over [ck, cv with bias beta, all visible] + [k, v, causal: q are their last T rows]."""
    o1, lse1 = (kernels.flash_prefill(q, ck, cv, causal=False, bias=beta) if use_kernels
                else biased_attention_ref(q, ck, cv, beta))
    o2, lse2 = (kernels.flash_prefill if use_kernels else attention)(q, k, v, causal=True)
    return merge_attention(o1, lse1, o2, lse2)[0]


# ----------------------------------------------------------------------------------------------
# Compacting one layer's cache: K, V and reference queries in, (Ck, beta, Cv) out

@dataclass
class CompactKV:
    ck: torch.Tensor        # (B, Hkv, t, D) kept keys (RoPE'd, as they were), in position order
    cv: torch.Tensor        # (B, Hkv, t, D) fitted values
    beta: torch.Tensor      # (B, Hkv, t) fp32 log-weights; -inf on slots past a head's budget
    idx: torch.Tensor       # (B, Hkv, t) int64 positions of the kept keys (0 on unused slots)
    budget: torch.Tensor    # (B, Hkv) int64 keys kept per head (t = its max)
    out_err: torch.Tensor   # (B, Hkv) ||o_compact - o||_F / ||o||_F on the reference queries
    mass_err: torch.Tensor  # (B, Hkv) mean_m |mass_compact / mass - 1| on the reference queries


def _scores(q, kT, scale, exact_tf32, add=None):
    """add + scale * (q @ kT) in fp32 for q (B, Hkv, c, D), kT (B, Hkv, D, n); add broadcasts to
    (B, Hkv, c, n) (default 0). One matrix product, the scale and the sum in its epilogue: no extra pass
    over the (c, n) result. exact_tf32 (q and k were bf16 or fp16: at most 10 mantissa bits, which
    TF32 keeps): on a GPU the product runs on the tensor cores, with the same inputs."""
    B, Hkv, c, D = q.shape
    n = kT.shape[-1]
    add = q.new_zeros((), dtype=torch.float32) if add is None else add.expand(B, Hkv, *add.shape[2:]).flatten(0, 1)
    with tf32_matmuls() if exact_tf32 else contextlib.nullcontext():
        out = torch.baddbmm(add, q.float().flatten(0, 1), kT.flatten(0, 1), beta=1.0 if add.dim() else 0.0,
                            alpha=scale)
    return out.view(B, Hkv, c, n)


def _softmax_lse(s):
    """softmax, logsumexp and max of s over its last dim -> (p, lse, max), in three passes over s (torch's
    logsumexp alone takes ~4: these passes over the scores are most of a compaction's memory traffic).
    softmax's largest weight is exp(max - lse), so lse = max - log(largest weight)."""
    p = torch.softmax(s, -1)
    mx = s.amax(-1)
    return p, mx - torch.log(p.amax(-1)), mx


def _reference_pass(k, v, qr, scale, key_score, chunk, exact_tf32):
    """Full attention of the reference queries, streamed over query chunks.
    k, v (B, Hkv, T, D); qr (B, Hkv, M, D) -> row max and lse of the scores (B, Hkv, M), target
    outputs y (B, Hkv, M, D) fp32, key importance (B, Hkv, T)."""
    B, Hkv, T, D = k.shape
    M = qr.shape[2]
    kf, vf = k.float(), v.float()
    row_max = torch.empty(B, Hkv, M, device=k.device)
    lse = torch.empty_like(row_max)
    y = torch.empty(B, Hkv, M, D, device=k.device)
    importance = torch.zeros(B, Hkv, T, device=k.device)
    for s in range(0, M, chunk):
        scores = _scores(qr[:, :, s:s + chunk], kf.transpose(-1, -2), scale, exact_tf32)
        p, lse[:, :, s:s + chunk], row_max[:, :, s:s + chunk] = _softmax_lse(scores)  # p: (B, Hkv, c, T)
        y[:, :, s:s + chunk] = p @ vf
        if key_score == "max":
            importance = torch.maximum(importance, p.amax(2))
        elif key_score == "mean":
            importance += p.sum(2)
        else:  # rms (the root is monotone: the sum of squares ranks the same)
            importance += torch.linalg.vector_norm(p, dim=2).square()
    return row_max, lse, y, importance


def _first_in_position_order(ranked, budget, T):
    """ranked (B, Hkv, t): key indices, best first -> (idx, valid) (B, Hkv, t): the first budget[b, h]
    of them in position order, then the unused slots (index 0, valid False)."""
    valid = torch.arange(ranked.shape[-1], device=ranked.device) < budget.unsqueeze(-1)
    idx = torch.where(valid, ranked, T).sort(-1).values  # unused slots sort last
    return torch.where(idx < T, idx, 0), valid


def _select_omp(k, qr, shift, z, budget, t, scale, keys_per_step):
    """Greedy selection on the mass residual (orthogonal matching pursuit with a NNLS refit): add the
    keys whose mass column best correlates with the residual z - A_S w, refit w on the chosen set.
    Materializes A for all T keys: (B, Hkv, M, T) fp32, so use it for moderate sizes."""
    B, Hkv, T, D = k.shape
    A = torch.exp(qr.float() @ k.float().transpose(-1, -2) * scale - shift.unsqueeze(-1))
    col_norm = A.norm(dim=2).clamp_min(1e-30)  # (B, Hkv, T)
    chosen = torch.zeros(B, Hkv, T, dtype=torch.bool, device=k.device)
    order = torch.zeros(B, Hkv, 0, dtype=torch.long, device=k.device)
    w_all = torch.zeros(B, Hkv, T, device=k.device)
    while order.shape[-1] < t:
        residual = z - (A @ w_all.unsqueeze(-1)).squeeze(-1)  # (B, Hkv, M)
        corr = (A.transpose(-1, -2) @ residual.unsqueeze(-1)).squeeze(-1) / col_norm
        n = min(keys_per_step, t - order.shape[-1])
        new = corr.masked_fill(chosen, float("-inf")).topk(n, dim=-1).indices
        order = torch.cat([order, new], dim=-1)
        chosen.scatter_(-1, new, True)
        As = A.gather(-1, order.unsqueeze(2).expand(B, Hkv, A.shape[2], order.shape[-1]))
        w = nnls(As, z, iters=100, polish_rounds=1)
        w_all = torch.zeros_like(w_all).scatter(-1, order, w)
    return _first_in_position_order(order, budget, T)


def compact_cache(k, v, q_ref, budget, key_score="rms", select="top", fit_bias=True, fit_values=True,
                  ridge=1e-3, nnls_iters=300, budget_mode="uniform", omp_keys_per_step=None,
                  mass_shift="lse", scale=None, chunk_elems=2**27, w_floor=1e-8, w_box=None):
    """Compact one layer: k, v (B, Hkv, T, D) (keys after RoPE); q_ref (B, Hq, M, D) reference queries
    (after RoPE, at positions after the context); budget: keys kept per KV head, an int or (B, Hkv).
    key_score: "rms" (default, ours), "max" or "mean" of the softmax weights a key receives over the
      reference queries; rms rewards keys that many queries use and keys that few use strongly.
    select: "top" (highest aggregate attention) or "omp" (greedy on the mass residual; memory M*T).
    fit_bias=False keeps beta = 0, fit_values=False keeps Cv = V[idx] (with both: plain top-t eviction).
    ridge (ours): Cv = V_S + (P^T P + lam I)^-1 P^T (Y - P V_S), lam = ridge * mean(diag(P^T P)), so
      ill-determined directions stay at the kept keys' original values instead of blowing up.
    budget_mode "error": compact once, then give each head 1/4 of the average budget plus a share of
      the rest proportional to its output error (same total) and compact again.
    w_box: None (exact NNLS, w >= 0; w = 0 becomes beta = log(w_floor)) or (lo, hi) bounds on every kept
      key's w = exp(beta); AUTHORS_W_BOX = (e^-3, e^3), the authors' setting: no kept key gets ~0 mass.
    chunk_elems: fp32 scores held at once (2^27 = 512 MiB) as the reference queries are streamed."""
    kernels._check(q_ref, k, v, 4)
    B, Hkv, T, D = k.shape
    if w_box is not None and not 0 <= w_box[0] < w_box[1]:
        raise ValueError(f"w_box must be (lo, hi) with 0 <= lo < hi, got {w_box!r}")
    for name, value, choices in (("key_score", key_score, KEY_SCORES), ("select", select, ("top", "omp")),
                                 ("budget_mode", budget_mode, ("uniform", "error")),
                                 ("mass_shift", mass_shift, ("lse", "max"))):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    b = torch.as_tensor(budget, dtype=torch.long, device=k.device)
    b = b.expand(B, Hkv) if b.dim() < 2 else b
    if b.shape != (B, Hkv) or int(b.min()) < 1:
        raise ValueError(f"budget must be a positive int or a (B, Hkv) = ({B}, {Hkv}) tensor of positive "
                         f"ints, got {budget!r}")
    budget = b.clamp(max=T).contiguous()
    kw = dict(key_score=key_score, select=select, fit_bias=fit_bias, fit_values=fit_values, ridge=ridge,
              nnls_iters=nnls_iters, omp_keys_per_step=omp_keys_per_step, scale=scale,
              mass_shift=mass_shift, chunk_elems=chunk_elems, w_floor=w_floor, w_box=w_box)
    if budget_mode == "error":
        first = compact_cache(k, v, q_ref, budget, **kw)
        budget = _budget_from_error(first.out_err, budget, T)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qr = q_ref.reshape(B, Hkv, -1, D)  # (B, Hkv, G*M, D): a KV head is fitted once, to its G heads' queries
    M = qr.shape[2]
    t = int(budget.max())
    chunk = max(1, chunk_elems // (B * Hkv * max(T, t)))

    # 1. full attention of the reference queries: the targets, and each key's importance
    exact_tf32 = {k.dtype, qr.dtype} <= {torch.bfloat16, torch.float16}  # (see _scores)
    row_max, lse, y, importance = _reference_pass(k, v, qr, scale, key_score, chunk, exact_tf32)
    chunk = max(1, chunk_elems // (B * Hkv * t))  # the fits' products have t columns, not T
    # the NNLS residual of query m in units of exp(shift_m): lse (ours) counts every query's relative
    # mass error the same (z_m = 1); "max" (the row max) weights queries by their mass
    shift = lse if mass_shift == "lse" else row_max
    z = torch.exp(lse - shift)

    # 2. which keys to keep
    if select == "omp":
        step = omp_keys_per_step or max(1, t // 16)
        idx, valid = _select_omp(k, qr, shift, z, budget, t, scale, step)
    else:
        idx, valid = _first_in_position_order(importance.topk(t, dim=-1).indices, budget, T)
    gidx = idx.unsqueeze(-1).expand(B, Hkv, t, D)
    ck = k.gather(2, gidx) * valid.unsqueeze(-1)
    v_sel = v.gather(2, gidx).float() * valid.unsqueeze(-1)
    ckf = ck.float().transpose(-1, -2)
    pad = torch.zeros(B, Hkv, 1, t, device=k.device).masked_fill(~valid.unsqueeze(2), float("-inf"))

    # 3. biases: NNLS on the mass, w = exp(beta)
    beta = torch.zeros(B, Hkv, t, device=k.device)
    if fit_bias:
        H = torch.zeros(B, Hkv, t, t, device=k.device)
        c = torch.zeros(B, Hkv, t, device=k.device)
        for s in range(0, M, chunk):
            A = torch.exp(_scores(qr[:, :, s:s + chunk], ckf, scale, exact_tf32, -shift[:, :, s:s + chunk, None]) + pad)
            gram(A, out=H)  # H += A^T A
            c += (A.transpose(-1, -2) @ z[:, :, s:s + chunk, None]).squeeze(-1)
        w = nnls_gram(H, c, iters=nnls_iters, box=w_box)
        beta = torch.log(w.clamp_min(w_floor))  # (a box keeps w >= its lower end > w_floor)
    beta = beta.masked_fill(~valid, float("-inf"))

    # 4. values: ridge least squares on the outputs, P = softmax(q Ck^T * scale + beta)
    cv = v_sel
    if fit_values:
        PtP = torch.zeros(B, Hkv, t, t, device=k.device)
        PtY = torch.zeros(B, Hkv, t, D, device=k.device)
        for s in range(0, M, chunk):
            P = torch.softmax(_scores(qr[:, :, s:s + chunk], ckf, scale, exact_tf32, beta.unsqueeze(2)), dim=-1)
            gram(P, out=PtP)  # PtP += P^T P
            PtY += P.transpose(-1, -2) @ y[:, :, s:s + chunk]
        lam = ridge * PtP.diagonal(dim1=-2, dim2=-1).sum(-1) / budget + 1e-12
        delta = spd_solve(PtP + lam[..., None, None] * torch.eye(t, device=k.device), PtY - PtP @ v_sel)
        cv = v_sel + delta * valid.unsqueeze(-1)
    cv = cv.to(v.dtype)

    # 5. how well it matches, on the reference queries (with the values as they will be stored)
    cvf = cv.float()
    out_se = torch.zeros(B, Hkv, device=k.device)
    mass_err = torch.zeros(B, Hkv, device=k.device)
    for s in range(0, M, chunk):
        logits = _scores(qr[:, :, s:s + chunk], ckf, scale, exact_tf32, beta.unsqueeze(2))
        p, lse_c, _ = _softmax_lse(logits)
        out_se += ((p @ cvf - y[:, :, s:s + chunk]) ** 2).sum((-1, -2))
        mass_err += (torch.exp(lse_c - lse[:, :, s:s + chunk]) - 1).abs().sum(-1)
    out_err = (out_se / (y * y).sum((-1, -2)).clamp_min(1e-30)).sqrt()
    return CompactKV(ck=ck, cv=cv, beta=beta, idx=idx, budget=budget, out_err=out_err, mass_err=mass_err / M)


def _budget_from_error(err, budget, T):
    """Per-head budgets with the same total: a floor of 1/4 of the mean, the rest shared by error."""
    Hkv = err.shape[1]
    total = budget.sum(-1, keepdim=True).float()  # per sequence of the batch
    floor = (total / Hkv / 4).floor()
    share = err / err.sum(-1, keepdim=True).clamp_min(1e-30)
    return (floor + share * (total - floor * Hkv)).floor().long().clamp(1, T)


# ----------------------------------------------------------------------------------------------
# Decoding over a compacted cache

class CompactedAttention:
    """The attention object after compaction. layers: one CompactKV per layer. Per layer, cache rows
    [0, t) hold (Ck, Cv) with bias beta, rows t, t+1, ... the tokens appended after the compacted
    context (bias 0): a token at position p >= ctx_len (the context's length) is stored in row t + p - ctx_len."""

    def __init__(self, layers, ctx_len, max_new_tokens, page_size=16, use_kernels=False):
        ref = layers[0].ck
        B, Hkv, _, D = ref.shape
        self.t = max(c.ck.shape[2] for c in layers)  # rows of the compact part, the same in every layer
        self.ctx_len, self.use_kernels = ctx_len, use_kernels
        self.cache = KVCache(len(layers), B, Hkv, self.t + max_new_tokens, D, ref.dtype, ref.device, page_size)
        self.bias = torch.zeros(self.cache.k.shape[:4], dtype=torch.float32, device=ref.device)
        self.bias[:, :, :, :self.t] = float("-inf")  # layers with fewer rows: the rest are padding
        rows = torch.arange(self.t)
        for i, c in enumerate(layers):
            n = c.ck.shape[2]
            self.cache.write(i, *(F.pad(x, (0, 0, 0, self.t - n)).transpose(1, 2) for x in (c.ck, c.cv)), rows)
            self.bias[i, :, :, :n] = c.beta
        self.compact_rows = sum(int(c.budget.sum()) for c in layers)  # kept (key, value) rows, all heads
        self.every_page = torch.arange(self.cache.num_pages_max, dtype=torch.int32, device=ref.device).expand(B, Hkv, -1)
        self.compaction_stats = {}  # compact_prompt's figures, reported with the decode counters

    prefill_rows = 0

    def _rows(self, input_pos):  # the cache rows of positions >= ctx_len
        return input_pos - self.ctx_len + self.t

    def decode(self, layer_idx, q, k, v, input_pos):
        """q (B, 1, Hq, D) at the device position input_pos (1,) >= ctx_len; k, v (B, 1, Hkv, D) -> (B, 1, Hq, D):
        one paged decode over every row, the compact ones with their bias."""
        seq_len = self.cache.append(layer_idx, k, v, self._rows(input_pos), self.use_kernels)  # rows [0, seq_len)
        decode = kernels.paged_decode if self.use_kernels else paged_decode  # (attention.paged_decode: CPU run path)
        o, _ = decode(q[:, 0], self.cache.k[layer_idx], self.cache.v[layer_idx], self.every_page, seq_len,
                      self.cache.page_size, bias=self.bias[layer_idx])
        return o.unsqueeze(1)

    def prefill(self, layer_idx, q, k, v, input_pos):
        """Several new tokens at host positions input_pos >= ctx_len."""
        p0 = int(input_pos[0])
        if p0 < self.ctx_len:
            raise ValueError(f"position {p0} lies inside the compacted context of {self.ctx_len} tokens; "
                             f"continue at position {self.ctx_len} or later")
        rows = self._rows(input_pos)
        self.cache.write(layer_idx, k, v, rows)
        kc, vc, bias = self.cache.k[layer_idx], self.cache.v[layer_idx], self.bias[layer_idx]
        n, t = int(rows[-1]) + 1, self.t
        o = _biased_then_causal(q.transpose(1, 2), kc[:, :, :t], vc[:, :, :t], bias[:, :, :t],
                                kc[:, :, t:n], vc[:, :, t:n], self.use_kernels)
        return o.transpose(1, 2)

    @property
    def stats(self):
        n, steps = self.cache.decoded_lengths()  # n: cache rows, compact ones included
        L, B, Hkv = self.cache.k.shape[:3]  # per layer and step: K and V of every row plus its fp32 bias
        return {"kv_bytes_read": int((n * steps).sum()) * (self.cache.row_bytes() + 4 * B * Hkv) * L,
                "decode_steps": int(steps.sum()), **self.compaction_stats}


class CompactingAttention:
    """The attention object for the one repeat-prefill forward of `context (ctx_len tokens) +
    separator (sep_len) + context again`. At each layer the first copy attends causally to itself (the
    context's true K/V for the next layer); its K/V are compacted with the second copy's queries as
    reference queries; the separator and second copy attend to the compacted context (bias beta) and,
    causally, to themselves, so the next layer's reference queries are those of a model reading a
    compacted cache (on-policy). decoder(max_new_tokens) then gives the CompactedAttention.
    budget: keys per KV head (int, or a function of the layer index); ref_queries: at most this many
    second-copy positions (evenly spaced); skip_first: the second copy leaves out the context's first
    skip_first tokens (its BOS); on_layer(layer_idx): called as each layer is compacted (progress)."""

    def __init__(self, ctx_len, sep_len, budget, ref_queries=None, use_kernels=False, page_size=16,
                 on_layer=None, skip_first=0, **compact_kwargs):
        self.ctx_len, self.sep_len, self.copy_len = ctx_len, sep_len, ctx_len - skip_first
        self.budget, self.ref_queries, self.on_layer = budget, ref_queries, on_layer
        self.use_kernels, self.page_size, self.compact_kwargs = use_kernels, page_size, compact_kwargs
        self.layers = {}
        self.stats = {"kv_bytes_read": 0, "decode_steps": 0}

    prefill_rows = 0

    def decode(self, layer_idx, q, k, v, input_pos):
        raise ValueError("CompactingAttention serves one prefill; decode with its decoder()")

    def prefill(self, layer_idx, q, k, v, input_pos):
        L, sep = self.ctx_len, self.sep_len
        T = q.shape[1]
        if int(input_pos[0]) != 0 or T != L + sep + self.copy_len:
            raise ValueError(f"CompactingAttention serves one forward of context + separator + context "
                             f"= {L + sep + self.copy_len} tokens from position 0; got {T} tokens from "
                             f"{int(input_pos[0])}")
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        prefill = kernels.flash_prefill if self.use_kernels else attention
        o_ctx, _ = prefill(qh[:, :, :L], kh[:, :, :L], vh[:, :, :L], causal=True)

        q_ref = qh[:, :, L + sep:]
        if self.ref_queries is not None and self.ref_queries < self.copy_len:
            pick = torch.linspace(0, self.copy_len - 1, self.ref_queries, device=q.device).round().long()
            q_ref = q_ref[:, :, pick]
        budget = self.budget(layer_idx) if callable(self.budget) else self.budget
        c = compact_cache(kh[:, :, :L], vh[:, :, :L], q_ref, budget, **self.compact_kwargs)
        self.layers[layer_idx] = c

        o_rest = _biased_then_causal(qh[:, :, L:], c.ck, c.cv, c.beta, kh[:, :, L:], vh[:, :, L:], self.use_kernels)
        if self.on_layer is not None:
            self.on_layer(layer_idx)
        return torch.cat([o_ctx, o_rest], dim=2).transpose(1, 2)

    def decoder(self, max_new_tokens):
        layers = [self.layers[i] for i in sorted(self.layers)]
        return CompactedAttention(layers, self.ctx_len, max_new_tokens, self.page_size, self.use_kernels)


# ----------------------------------------------------------------------------------------------
# Glue for generate.py

@dataclass
class CompactedPrompt:
    attn: CompactedAttention  # ready to decode; attn.stats holds the compaction figures too
    start_pos: int            # feed prompt[:, start_pos:] next, at positions start_pos, start_pos + 1, ...
    stats: dict


def repeat_separator(tokenizer):
    """The token ids between the two copies of the context, framed as in the authors' prompt: for a
    tokenizer with a chat template, the request as a user turn and then the assistant's header, with
    no BOS (the sequence has one, at its start); for one without, the plain REPEAT_PROMPT."""
    if tokenizer.chat_format in CHAT_TEMPLATES:
        turn = CHAT_TEMPLATES[tokenizer.chat_format].format(prompt=REPEAT_INSTRUCTION)
        return [i for i in tokenizer.encode(turn, allow_special=True) if i != tokenizer.bos_id]
    return tokenizer.encode(REPEAT_PROMPT)


@torch.no_grad()
def compact_prompt(model, prompt, ratio, separator_ids=(), keep_last=1, max_new_tokens=256,
                   ref_queries=None, use_kernels=False, page_size=16, bos_id=None, on_layer=None,
                   **compact_kwargs):
    """Compact a prompt's KV cache by a factor `ratio` (>= 1) with the repeat-prefill pass.
    prompt (B, N) long: the first N - keep_last tokens are compacted (the last stays out: its logits
    start generation). separator_ids: repeat_separator(tokenizer). bos_id: the tokenizer's BOS id or
    None; a context starting with it is repeated without it (one BOS, as in the authors' prompt).
    max_new_tokens: room after the compact part. Then: generate(model, res.attn,
    prompt[:, res.start_pos:], ..., start_pos=res.start_pos)."""
    B, N = prompt.shape
    L = N - keep_last
    if ratio < 1 or keep_last < 1 or L < 1:
        raise ValueError(f"need ratio >= 1 and 1 <= keep_last < prompt length; got ratio {ratio}, "
                         f"keep_last {keep_last}, prompt of {N} tokens")
    sep = torch.as_tensor(list(separator_ids), dtype=prompt.dtype, device=prompt.device).expand(B, -1)
    skip = int(bos_id is not None and L > 1 and bool((prompt[:, 0] == bos_id).all()))
    seq = torch.cat([prompt[:, :L], sep, prompt[:, skip:L]], dim=1)
    if seq.shape[1] > model.args.max_seq_len:
        raise ValueError(f"the repeat-prefill pass needs {L} + {sep.shape[1]} + {L - skip} = {seq.shape[1]} "
                         f"positions, more than the model's {model.args.max_seq_len} (shorten the prompt)")
    budget = max(1, round(L / ratio))
    compactor = CompactingAttention(L, sep.shape[1], budget, ref_queries, use_kernels, page_size, on_layer,
                                    skip_first=skip, **compact_kwargs)
    sync = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model(seq, torch.arange(seq.shape[1]), compactor, last_only=True)
    attn = compactor.decoder(keep_last + max_new_tokens)
    sync()
    args = model.args
    elem = attn.cache.k.element_size()
    dense_bytes = 2 * args.n_layers * B * args.n_kv_heads * L * args.head_dim * elem
    compact_bytes = attn.compact_rows * (2 * args.head_dim * elem + 4)  # keys, values, fp32 bias
    layers = compactor.layers.values()
    stats = {"compaction_s": time.perf_counter() - t0, "compacted_tokens": L, "keys_per_head": budget,
             "kv_mib_before": dense_bytes / 2**20, "kv_mib_after": compact_bytes / 2**20,
             "ref_out_err": sum(float(c.out_err.mean()) for c in layers) / len(layers),
             "ref_mass_err": sum(float(c.mass_err.mean()) for c in layers) / len(layers)}
    attn.compaction_stats = stats
    return CompactedPrompt(attn=attn, start_pos=L, stats=stats)
