"""
KV cache: contiguous storage split into pages, with per-page key metadata for Quest.

Every layer keeps K and V for all positions up to max_seq_len, heads first: (B, Hkv, N, D).
Positions [p*S, (p+1)*S) form page p (S = page_size). For each page and KV head we also keep the
elementwise minimum and maximum of its keys; Quest (arXiv 2406.10774) bounds the score of any key
in the page by them, which is how a decode step chooses pages without reading them.

The cache is the one place K/V are written. A write may overwrite positions already filled
(RetroAttention re-embeds its past tokens), so the metadata of every touched page is recomputed
from that page's keys rather than updated incrementally. Only full pages have bounds: the page still
filling is the newest, which Quest reads whatever its bound, so its bounds stay zero until the write of
its last row sets them (a decode step then recomputes bounds once per S tokens, not at every token).

The bounds are read at every decode step for every page, so at long context they outweigh the K/V a
small budget reads (128K tokens, budget 4096: 2x). page_meta_dtype="int8" stores them in a quarter
(fp32 cache) or half (bf16) of the bytes: per page and KV head one fp32 scale s, kmin as floor(kmin / s)
and kmax as ceil(kmax / s), so the dequantized interval still holds every key and the bound stays a bound.
"""

import torch

import kernels
from attention import DenseAttention, decode_attention, paged_decode


PAGE_META_DTYPES = ("auto", "int8")  # generate.py's --page-meta: auto = the cache's dtype


class KVCache:
    def __init__(self, n_layers, batch, n_kv_heads, max_seq_len, head_dim, dtype, device, page_size=16,
                 page_meta=True, page_meta_dtype="auto"):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if page_meta_dtype not in PAGE_META_DTYPES:
            raise ValueError(f"--page-meta {page_meta_dtype!r}: expected one of {', '.join(PAGE_META_DTYPES)}")
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.num_pages_max = -(-max_seq_len // page_size)
        n = self.num_pages_max * page_size  # room for whole pages keeps page loads in bounds
        shape = (n_layers, batch, n_kv_heads, n, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        meta = (n_layers, batch, n_kv_heads, self.num_pages_max, head_dim)
        # page_meta=False (dense decoding reads no bounds) skips their upkeep: ~10 small ops per layer and step
        self.page_meta = page_meta
        # int8 bounds (see quantize_bounds): kmin, kmax hold integers, kscale (layers, B, Hkv, Pmax) their fp32 scale
        self.quantized = page_meta and page_meta_dtype == "int8"
        meta_dtype = torch.int8 if self.quantized else dtype
        self.kmin = torch.zeros(meta if page_meta else (0,), dtype=meta_dtype, device=device)
        self.kmax = torch.zeros(meta if page_meta else (0,), dtype=meta_dtype, device=device)
        self.kscale = torch.zeros(meta[:-1] if self.quantized else (0,), dtype=torch.float32, device=device)
        # per layer: positions [0, length) have been written (on the device: decode steps update it there)
        self.lengths = torch.zeros(n_layers, dtype=torch.int64, device=device)
        # per sequence length n, how many decode steps made the sequence n long: the statistics' source
        self.decoded = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self._one = torch.ones(1, dtype=torch.int32, device=device)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.kmin, self.kmax, self.kscale))

    def row_bytes(self):
        """Bytes of one position's K and V rows in one layer, all batch rows and KV heads."""
        _, B, Hkv, _, D = self.k.shape
        return 2 * B * Hkv * D * self.k.element_size()

    def bound_bytes(self):
        """Bytes of one page's bounds in one layer, all batch rows and KV heads: kmin and kmax (as many
        bytes as a K/V row in the cache's dtype; half of them in bf16 as int8) and the int8 bounds' scale."""
        _, B, Hkv, _, D = self.k.shape
        meta = self.kmin.element_size() if self.page_meta else self.k.element_size()
        return B * Hkv * (2 * D * meta + (self.kscale.element_size() if self.quantized else 0))

    def page_bounds(self, layer):
        """What Quest scores one layer's pages by: (kmin, kmax (B, Hkv, Pmax, D), scale (B, Hkv, Pmax) fp32
        of int8 bounds, or None when they are stored in the cache's dtype)."""
        return self.kmin[layer], self.kmax[layer], self.kscale[layer] if self.quantized else None

    def length(self, layer=0):
        return int(self.lengths[layer])

    def decoded_lengths(self):
        """-> (n, steps): the sequence lengths decode steps made, and how many steps made each
        (float64 CPU tensors; one sync)."""
        steps = self.decoded.cpu()
        n = steps.nonzero().squeeze(1)
        return n.double(), steps[n].double()

    def write(self, layer, k, v, input_pos):
        """Prefill: k, v (B, T, Hkv, D) for the contiguous host positions input_pos (T,)."""
        start = int(input_pos[0])
        end = start + k.shape[1]
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens does not fit the KV cache of {self.max_seq_len} "
                             f"positions (raise --max-seq-len or shorten the prompt)")
        self.k[layer, :, :, start:end] = k.transpose(1, 2)
        self.v[layer, :, :, start:end] = v.transpose(1, 2)
        self.lengths[layer:layer + 1].clamp_(min=end)
        if self.page_meta:
            self.refresh_pages(layer, start // self.page_size, (end - 1) // self.page_size + 1)

    def append(self, layer, k, v, pos, use_kernels=False):
        """Decode: k, v (B, m, Hkv, D) at the positions pos (m,) int64 on the device, consecutive, the
        last one the newest (the rows before it may be rewritten), and the bounds of their pages.
        With the kernels nothing is read on the host. Layer 0 opens the step: it computes the length once for
        all layers and logs it. -> seq_len (1,) int32 on the device, the keys [0, seq_len) now valid."""
        if layer == 0:
            n = pos[-1:] + 1
            self.seq_len = n.to(torch.int32)
            torch.maximum(self.lengths, n, out=self.lengths)
            self.decoded.index_add_(0, n, self._one)
        if not use_kernels:  # the PyTorch path (a CPU, never captured) may read the positions on the host
            self.write(layer, k, v, pos)
        else:
            meta = self.page_bounds(layer) if self.page_meta else (None, None, None)
            kernels.append_kv(self.k[layer], self.v[layer], *meta[:2], k, v, pos, self.page_size, meta[2])  # one launch
        return self.seq_len

    def refresh_pages(self, layer, first, last):
        """Recompute the key min/max of pages [first, last) of one layer from their keys; a page not yet
        full gets none (zeros: see the top)."""
        S = self.page_size
        keys = self.k[layer, :, :, first * S:last * S]  # (B, Hkv, (last-first)*S, D)
        B, H, _, D = keys.shape
        keys = keys.reshape(B, H, last - first, S, D)
        pos = torch.arange(first * S, last * S, device=keys.device).view(last - first, S)
        full = (pos < self.lengths[layer]).all(1)  # (pages,): every row written (on the device, no sync)
        kmin = torch.where(full[:, None], keys.amin(dim=3), 0)
        kmax = torch.where(full[:, None], keys.amax(dim=3), 0)
        if self.quantized:
            # A page's int8 bounds are a function of its keys alone, recomputed whenever one of them is
            # written (the decode step that fills the page, RetroAttention's overwrites), never updated
            # from the old integers, which would widen them step after step. kernels.append_kv does the
            # same from the same keys: equal bits.
            kmin, kmax, scale = quantize_bounds(kmin, kmax)
            self.kscale[layer, :, :, first:last] = torch.where(full, scale, 0)
        self.kmin[layer, :, :, first:last] = kmin
        self.kmax[layer, :, :, first:last] = kmax


# ----------------------------------------------------------------------------------------------
# int8 page bounds (ours)
#
# Per page and KV head, one scale s >= max_d max(|kmin_d|, |kmax_d|) / 127, and the integers
#       lo_d = floor(kmin_d / s),   hi_d = ceil(kmax_d / s)      in [-127, 127],
# so that lo_d s <= kmin_d <= k_d <= kmax_d <= hi_d s for every key k of the page: Quest's bound computed
# from [lo s, hi s] is at least the one from [kmin, kmax] (the same argument, a wider interval), at most
# one step s per dimension and end looser. Rounding is where this could fail, so every step is exact:
# - s = max(fl32(amax * c), 2^-126) with c = 1/127 (1 + 2^-20) in fp32: a rounded product is within
#   2^-24 of the exact one, so s >= amax / 127 and no integer leaves [-127, 127]; the floor 2^-126
#   (the smallest normal fp32) keeps s > 0 for an all-zero page (then lo = hi = 0).
# - floor and ceil are taken on the float64 quotient, then corrected by one step where lo s > kmin (or
#   hi s < kmax) or where the next integer also holds; lo s and hi s are exact in float64 (8 + 24
#   significant bits), so the comparisons are. (A quotient of fp32s lies >= 2^-24 from every nonzero
#   integer it is not, float64 keeps its sign and rounds |k / s| <= 128 by < 2^-45: the correction should
#   never fire; it makes the result independent of how a compiler divides: the tightest integers, in
#   the kernel and here alike.)
# - Dequantizing in fp32 (lo * s) rounds to a nearest float, and rounding never crosses a float: a value
#   <= kmin (an fp32) rounds to a value <= kmin, so the fp32 interval still holds the keys.
# A page with a non-finite key gets s = NaN and lo = hi = 0: its bound is NaN, which selection counts as
# +inf (the page is read, as with bounds in the cache's dtype).

INT8_LEVELS = 127
SCALE_PER_LEVEL = kernels.SCALE_PER_LEVEL  # 1/127 (1 + 2^-20), an fp32: see above (one value for both paths)
FP32_MIN_NORMAL = kernels.FP32_MIN_NORMAL


def quantize_bounds(kmin, kmax):
    """Page bounds kmin, kmax (..., D), any float dtype -> int8 lo, hi (..., D) and fp32 scale s (...)
    with lo * s <= kmin and hi * s >= kmax exactly (the integers as tight as s allows)."""
    lo32, hi32 = kmin.float(), kmax.float()
    finite = (lo32.isfinite() & hi32.isfinite()).all(-1)
    amax = torch.maximum(lo32.abs(), hi32.abs()).amax(-1)
    s = (amax * torch.tensor(SCALE_PER_LEVEL)).clamp_min(FP32_MIN_NORMAL)  # (an fp32 product, as in the kernel)
    s64, lo64, hi64 = s.double()[..., None], lo32.double(), hi32.double()
    lo = torch.floor(lo64 / s64)
    lo += ((lo + 1) * s64 <= lo64).double() - (lo * s64 > lo64).double()
    hi = torch.ceil(hi64 / s64)
    hi += (hi * s64 < hi64).double() - ((hi - 1) * s64 >= hi64).double()
    ok = finite[..., None]
    # (the clamp never binds, s >= amax / 127; it keeps the int8 casts defined)
    lo = torch.where(ok, lo, 0).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    hi = torch.where(ok, hi, 0).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return lo, hi, torch.where(finite, s, float("nan"))


def dequantize_bounds(kmin, kmax, scale):
    """int8 bounds (..., D) and their scale (...) -> fp32 bounds (...,  D) (see quantize_bounds)."""
    return kmin.float() * scale[..., None], kmax.float() * scale[..., None]


# ----------------------------------------------------------------------------------------------
# Quest: page-sparse decoding (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context
# LLM Inference", arXiv 2406.10774)
#
# For a decode query q and a page whose keys lie elementwise in [kmin, kmax], every key k of the page
# scores at most
#       q . k = sum_d q_d k_d  <=  sum_d max(q_d kmin_d, q_d kmax_d)
# (q_d k_d is linear in k_d, so it peaks at one end of the interval whatever the sign of q_d). Quest
# ranks pages by this bound, keeps the top budget // S pages (always the page of the newest token)
# and attends exactly within them. The first layers stay dense (the paper keeps two).

def page_scores_ref(q, kmin, kmax, num_pages, scale=None):
    """Quest's upper bound per page, summed over the G query heads of each KV head (ours: one page
    choice per KV head, so one load serves the whole group). The bound is on q . k; the softmax
    scale 1/sqrt(D) is left out because it does not change the ranking.
    q (B, Hq, D); kmin, kmax (B, Hkv, Pmax, D) -> scores (B, Hkv, num_pages) fp32.
    scale (B, Hkv, Pmax) fp32: kmin, kmax are int8 bounds of that scale (see quantize_bounds)."""
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    kmin, kmax = kmin[:, :, :num_pages], kmax[:, :, :num_pages]
    if scale is not None:
        kmin, kmax = dequantize_bounds(kmin, kmax, scale[:, :, :num_pages])
    qg = q.float().view(B, Hkv, Hq // Hkv, 1, D)  # (B, Hkv, G, 1, D)
    lo = kmin[:, :, None].float()                 # (B, Hkv, 1, P, D)
    hi = kmax[:, :, None].float()
    bound = torch.maximum(qg * lo, qg * hi).sum(-1)  # (B, Hkv, G, P): bound per query head
    return bound.sum(2)


def select_pages(scores, seq_len, page_size, budget_pages):
    """Top budget_pages pages by score among the pages of the keys [0, seq_len), always including the
    newest (the page of the token being decoded: the paper keeps the most recent tokens). seq_len: an int
    or a (1,) int32 device tensor, never read on the host (see kernels.device_length).
    scores (B, Hkv, Pmax) -> page_idx (B, Hkv, K) int32, K = min(budget_pages, Pmax): the chosen pages
    in ascending order, then -1 in the slots left when there are fewer pages than K."""
    if budget_pages < 1:
        raise ValueError(f"kvcache.select_pages: need budget_pages >= 1, got {budget_pages}")
    P = scores.shape[-1]
    kernels.device_length(seq_len, P * page_size)  # (checks seq_len only)
    page = torch.arange(P, device=scores.device)
    num_pages = (torch.as_tensor(seq_len, device=scores.device).long() + page_size - 1) // page_size
    # a NaN bound (from a non-finite key) counts as +inf, whatever its sign bit: the page is read, and
    # the order does not depend on how a sort ranks NaN (CPU and CUDA sorts differ). In float64 (exact for
    # fp32 scores) both rank at 1e300, below the newest page (+inf), which is always kept.
    s = scores.double().nan_to_num(nan=1e300, posinf=1e300)
    s = s.masked_fill(page == num_pages - 1, float("inf")).masked_fill(page >= num_pages, float("-inf"))
    # a stable sort settles ties: the lower page wins (kernels.select_pages does the same)
    order = s.sort(dim=-1, descending=True, stable=True).indices[..., :min(budget_pages, P)]
    chosen = torch.where(order < num_pages, order, P).sort(dim=-1).values  # the unused slots (P) last
    return torch.where(chosen < P, chosen, -1).to(torch.int32)


def quest_pages(q, cache, layer_idx, budget, seq_len, use_kernels, bounds=None):
    """Quest's top budget // S pages of one decode step for q (B, Hq, D), from the bounds of all
    cache pages (those past seq_len are never chosen) -> page_idx (B, Hkv, K) int32, -1 = unused.
    bounds: (kmin, kmax, scale) to score instead of the layer's cache.page_bounds (a per-query-head view,
    see group_view)."""
    S, P = cache.page_size, cache.num_pages_max
    kmin, kmax, scale = bounds if bounds is not None else cache.page_bounds(layer_idx)
    if use_kernels:
        scores = kernels.page_scores(q, kmin, kmax, P, seq_len, S, scale)  # (only the pages in use are read)
        if P <= kernels.SELECT_MAX_PAGES:
            return kernels.select_pages(scores, seq_len, S, budget // S)
    else:
        scores = page_scores_ref(q, kmin, kmax, P, scale)
    return select_pages(scores, seq_len, S, budget // S)


def group_view(x, G):
    """x (B, Hkv, ...) -> (B * Hkv, G, ...): each KV head's tensor once per query head of its group, a
    stride-0 view (no copy). With q (B, Hq, D) viewed as (B * Hkv, G, D), the scoring, selection and paged
    decode written for one page list per KV head give each query head its own (Quest's own GQA path)."""
    B, Hkv = x.shape[:2]
    return x.unsqueeze(2).expand(B, Hkv, G, *x.shape[2:]).flatten(0, 1)


def page_reads(cache, budget, n, steps, n_dense, lists=1):
    """The reads of decode steps (n, steps: cache.decoded_lengths()) over all layers: n_dense layers
    read the n valid rows of every KV head; the others, for each of `lists` page lists per KV head,
    Quest's K = min(budget // S, pages) pages (the newest holds only the keys before n) plus the min/max
    bounds of every page (cache.bound_bytes() each). -> (bytes read, pages read, K per step)."""
    L, B, Hkv = cache.k.shape[:3]
    S = cache.page_size
    pages = torch.ceil(n / S)
    K = pages.clamp(max=budget // S)
    sparse_rows = lists * ((K - 1) * S + n - (pages - 1) * S)
    rows = (steps * (n_dense * n + (L - n_dense) * sparse_rows)).sum()
    bounds = (steps * (L - n_dense) * lists * pages).sum()
    read = int(rows) * cache.row_bytes() + int(bounds) * cache.bound_bytes()
    return read, int(B * Hkv * (steps * (n_dense * pages + (L - n_dense) * lists * K)).sum()), K


def check_budget(budget, page_size):
    """A budget is a whole number of pages, at least one."""
    if page_size < 1:
        raise ValueError(f"--page-size {page_size}: expected a page of >= 1 tokens")
    if budget < page_size:
        raise ValueError(f"--budget {budget} is smaller than one page (--page-size {page_size})")
    if budget % page_size:
        raise ValueError(f"--budget {budget} is not a multiple of --page-size {page_size}")


def check_sparse_args(cache, budget, page_size, dense_layers):
    """The arguments Quest and RetroAttention share: the cache's page size, a whole-page budget, dense_layers >= 0."""
    if page_size != cache.page_size:
        raise ValueError(f"--page-size {page_size} differs from the KV cache's page size {cache.page_size}")
    check_budget(budget, page_size)
    if dense_layers < 0:
        raise ValueError(f"--dense-layers must be >= 0, got {dense_layers}")


PAGE_CHOICES = ("kv_head", "query_head")


class QuestAttention:
    """Quest as an attention object: prefill is dense; each decode step attends to the budget // S
    pages whose bound is highest. The first dense_layers layers stay dense, and so does every layer
    when the budget covers the whole cache.

    budget: KV tokens read per decode step per page list (a multiple of the page size).
    page_choice "kv_head" (default, ours): one page list per KV head, the bounds of its G query heads
      summed; a page is loaded once for the whole group, so budget = KV tokens read per KV head.
    page_choice "query_head" (Quest's own Llama-3.1 code): each query head ranks pages by its own
      bound and reads its own budget // S pages; a KV head then serves up to G lists, G x the reads."""

    prefill_rows = 0

    def __init__(self, cache, budget, page_size, dense_layers=2, use_kernels=False, page_choice="kv_head"):
        check_sparse_args(cache, budget, page_size, dense_layers)
        if page_choice not in PAGE_CHOICES:
            raise ValueError(f"--page-choice must be one of {PAGE_CHOICES}, got {page_choice!r}")
        self.page_choice = page_choice
        self.group = 1  # page lists per KV head: G with "query_head" (known at the first sparse decode)
        self.cache = cache
        self.budget = budget
        self.n_dense = cache.k.shape[0] if budget >= cache.max_seq_len else min(dense_layers, cache.k.shape[0])
        self.use_kernels = use_kernels
        self.prefill = DenseAttention(cache, use_kernels).prefill  # the prompt is attended densely

    def decode(self, layer_idx, q, k, v, input_pos):
        # q (B, 1, Hq, D) after RoPE; k, v (B, 1, Hkv, D) -> (B, 1, Hq, D)
        cache = self.cache
        seq_len = cache.append(layer_idx, k, v, input_pos, self.use_kernels)
        qh, kc, vc = q[:, 0], cache.k[layer_idx], cache.v[layer_idx]
        if layer_idx < self.n_dense:
            return decode_attention(q, kc, vc, seq_len, self.use_kernels)
        bounds = None  # the layer's: one page list per KV head
        if self.page_choice == "query_head":  # one per query head: a KV head's tensors seen G times
            B, Hq, D = qh.shape
            G = self.group = Hq // kc.shape[1]
            qh, kc, vc = qh.reshape(B * kc.shape[1], G, D), group_view(kc, G), group_view(vc, G)
            bounds = tuple(x if x is None else group_view(x, G) for x in cache.page_bounds(layer_idx))
        page_idx = quest_pages(qh, cache, layer_idx, self.budget, seq_len, self.use_kernels, bounds)
        attend = kernels.paged_decode if self.use_kernels else paged_decode  # (attention.paged_decode: the CPU run path)
        return attend(qh, kc, vc, page_idx, seq_len, cache.page_size)[0].reshape(q.shape)

    @property
    def stats(self):
        n, steps = self.cache.decoded_lengths()  # a sparse layer reads self.group page lists per KV head
        read, pages, _ = page_reads(self.cache, self.budget, n, steps, self.n_dense, self.group)
        return {"kv_bytes_read": read, "pages_read": pages, "decode_steps": int(steps.sum())}
