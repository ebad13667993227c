"""
KV cache: contiguous storage split into pages, with per-page key metadata for Quest.

Every layer keeps K and V for all positions up to max_seq_len, heads first: (B, Hkv, N, D).
Positions [p*S, (p+1)*S) form page p (S = page_size). For each page and KV head we also keep the
elementwise minimum and maximum of its keys; Quest (arXiv 2406.10774) bounds the score of any key
in the page by them, which is how a decode step chooses pages without reading them.

The cache is the one place K/V are written. A write may overwrite positions already filled
(RetroAttention re-embeds its past tokens), so the metadata of every touched page is recomputed
from that page's keys rather than updated incrementally.
"""

import torch

from attention import paged_decode, prefill_decode_attention


class KVCache:
    def __init__(self, n_layers, batch, n_kv_heads, max_seq_len, head_dim, dtype, device, page_size=16,
                 page_meta=True):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
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
        self.kmin = torch.zeros(meta if page_meta else (0,), dtype=dtype, device=device)
        self.kmax = torch.zeros(meta if page_meta else (0,), dtype=dtype, device=device)
        self.lengths = [0] * n_layers  # per layer: positions [0, length) have been written

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.kmin, self.kmax))

    def write(self, layer, k, v, input_pos):
        """k, v: (B, T, Hkv, D) for the contiguous positions input_pos (T,)."""
        T = k.shape[1]
        start = int(input_pos[0])
        end = start + T
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens does not fit the KV cache of {self.max_seq_len} "
                             f"positions (raise --max-seq-len or shorten the prompt)")
        self.k[layer, :, :, start:end] = k.transpose(1, 2)
        self.v[layer, :, :, start:end] = v.transpose(1, 2)
        self.lengths[layer] = max(self.lengths[layer], end)
        if self.page_meta:
            self.refresh_pages(layer, start // self.page_size, (end - 1) // self.page_size + 1)

    def write_on_device(self, layer, k, v, pos):
        """write() for the rows k, v (B, T, Hkv, D) whose positions are a device tensor pos (T,) int64,
        consecutive and ending at the newest position: one Triton kernel (kernels.append_kv) and no
        host sync, so a CUDA graph can capture it. The caller keeps self.lengths up to date."""
        import kernels
        meta = (self.kmin[layer], self.kmax[layer]) if self.page_meta else (None, None)
        kernels.append_kv(self.k[layer], self.v[layer], *meta, k, v, pos, self.page_size)

    @property
    def length(self):
        return self.lengths[0]

    def refresh_pages(self, layer, first, last):
        """Recompute the key min/max of pages [first, last) of one layer from its written keys."""
        S = self.page_size
        keys = self.k[layer, :, :, first * S:last * S]  # (B, Hkv, (last-first)*S, D)
        B, H, _, D = keys.shape
        keys = keys.reshape(B, H, last - first, S, D)
        # rows past the valid length (the unfilled tail of the last page) must not widen the bounds
        pos = torch.arange(first * S, last * S, device=keys.device).view(last - first, S, 1)
        valid = pos < self.lengths[layer]
        inf = torch.finfo(keys.dtype).max
        self.kmin[layer, :, :, first:last] = torch.where(valid, keys, inf).amin(dim=3)
        self.kmax[layer, :, :, first:last] = torch.where(valid, keys, -inf).amax(dim=3)


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

def page_scores_ref(q, kmin, kmax, num_pages):
    """Quest's upper bound per page, summed over the G query heads of each KV head (ours: one page
    choice per KV head, so one load serves the whole group). The bound is on q . k; the softmax
    scale 1/sqrt(D) is left out because it does not change the ranking.
    q (B, Hq, D); kmin, kmax (B, Hkv, Pmax, D) -> scores (B, Hkv, num_pages) fp32."""
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    qg = q.float().view(B, Hkv, Hq // Hkv, 1, D)  # (B, Hkv, G, 1, D)
    lo = kmin[:, :, None, :num_pages].float()     # (B, Hkv, 1, P, D)
    hi = kmax[:, :, None, :num_pages].float()
    bound = torch.maximum(qg * lo, qg * hi).sum(-1)  # (B, Hkv, G, P): bound per query head
    return bound.sum(2)


def select_pages(scores, num_pages, budget_pages, newest_page):
    """Top budget_pages pages by score, always including newest_page (the page of the token being
    decoded: the paper keeps the most recent tokens). scores (B, Hkv, >= num_pages) ->
    page_idx (B, Hkv, K) int32 in ascending page order, K = min(budget_pages, num_pages)."""
    if budget_pages < 1 or num_pages < 1:
        raise ValueError(f"select_pages: need budget_pages >= 1 and num_pages >= 1, got {budget_pages} and {num_pages}")
    scores = scores[..., :num_pages].float()
    # a NaN bound (from a non-finite key) counts as +inf, whatever its sign bit: the page is read, and
    # the order does not depend on how a sort ranks NaN (CPU and CUDA sorts differ)
    scores = torch.where(torch.isnan(scores), float("inf"), scores)
    K = min(budget_pages, num_pages)
    # the newest page, then the K - 1 best others; a stable sort settles ties: the lower page wins
    # (kernels.select_pages does the same)
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    others = order[order != newest_page].view(*scores.shape[:-1], num_pages - 1)
    page_idx = torch.cat([others[..., :K - 1], torch.full_like(order[..., :1], newest_page)], dim=-1)
    return page_idx.sort(dim=-1).values.to(torch.int32)


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


def quest_pages(q, cache, layer_idx, budget, n, use_kernels, bounds=None):
    """The pages one decode step attends to: Quest's top budget // S pages for q (B, Hq, D), or all
    pages when the budget covers the n valid keys (then the step is dense, exactly).
    bounds: (kmin, kmax) to score instead of the layer's (a per-query-head view, see group_view).
    Returns page_idx (B, Hkv, K) int32 and whether the pages were scored (metadata was read)."""
    S = cache.page_size
    num_pages = -(-n // S)
    if budget >= n:
        all_pages = torch.arange(num_pages, dtype=torch.int32, device=q.device)
        lists = cache.k.shape[2] if bounds is None else bounds[0].shape[1]
        return all_pages.expand(q.shape[0], lists, num_pages), False
    kmin, kmax = bounds if bounds is not None else (cache.kmin[layer_idx], cache.kmax[layer_idx])
    if use_kernels:
        import kernels
        scores = kernels.page_scores(q, kmin, kmax, num_pages)
    else:
        scores = page_scores_ref(q, kmin, kmax, num_pages)
    # the kernel holds a row of scores in registers: longer rows take the reference
    select = kernels.select_pages if use_kernels and num_pages <= kernels.SELECT_MAX_PAGES else select_pages
    return select(scores, num_pages, budget // S, (n - 1) // S), True


def group_view(x, G):
    """x (B, Hkv, ...) -> (B * Hkv, G, ...): each KV head's tensor once per query head of its group,
    as a stride-0 view (no copy). With q (B, Hq, D) viewed as (B * Hkv, G, D), the scoring,
    selection and paged decode written for one page list per KV head then give each query head its
    own page list (Quest's own GQA path)."""
    B, Hkv = x.shape[:2]
    return x.unsqueeze(2).expand(B, Hkv, G, *x.shape[2:]).flatten(0, 1)


def count_page_reads(stats, cache, K, n, scored, readers=1):
    """Add one decode step's reads of one layer to stats: the K/V rows of K pages per KV head (the
    newest page, always among them, holds only the keys before n), plus the min/max metadata of
    all pages when they were scored. readers: page lists per KV head (G when each query head
    chooses its own pages and reads them itself)."""
    _, B, Hkv, _, D = cache.k.shape
    B *= readers
    S, size = cache.page_size, cache.k.element_size()
    num_pages = -(-n // S)
    rows = (K - 1) * S + (n - (num_pages - 1) * S)
    stats["kv_bytes_read"] += 2 * B * Hkv * rows * D * size
    stats["pages_read"] += B * Hkv * K
    if scored:
        stats["kv_bytes_read"] += 2 * B * Hkv * num_pages * D * size


PAGE_CHOICES = ("kv_head", "query_head")


class QuestAttention:
    """Quest as an attention object: prefill is dense; each decode step (T == 1) attends to the
    budget // S pages whose bound is highest. The first dense_layers layers stay dense.

    budget: KV tokens read per decode step per page list (a multiple of the page size).
    page_choice "kv_head" (default, ours): one page list per KV head, the bounds of its G query heads
      summed; a page is loaded once for the whole group, so budget = KV tokens read per KV head.
    page_choice "query_head" (Quest's own Llama-3.1 code): each query head ranks pages by its own
      bound and reads its own budget // S pages; a KV head then serves up to G lists, G x the reads."""

    def __init__(self, cache, budget, page_size, dense_layers=2, use_kernels=False, page_choice="kv_head"):
        check_sparse_args(cache, budget, page_size, dense_layers)
        if page_choice not in PAGE_CHOICES:
            raise ValueError(f"--page-choice must be one of {PAGE_CHOICES}, got {page_choice!r}")
        self.page_choice = page_choice
        self.cache = cache
        self.budget = budget
        self.dense_layers = dense_layers
        self.use_kernels = use_kernels
        self.stats = {"kv_bytes_read": 0, "pages_read": 0, "decode_steps": 0}

    graph_mode = False  # see forward_on_device

    def forward(self, layer_idx, q, k, v, input_pos):
        # q (B, T, Hq, D) after RoPE; k, v (B, T, Hkv, D) -> (B, T, Hq, D)
        if self.graph_mode:
            return self.forward_on_device(layer_idx, q, k, v, input_pos)
        self.cache.write(layer_idx, k, v, input_pos)
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if q.shape[1] > 1:  # prefill: dense causal
            return prefill_decode_attention(q, kc, vc, input_pos, self.use_kernels, need_lse=False)[0]
        n = int(input_pos[-1]) + 1
        if layer_idx == 0:
            self.stats["decode_steps"] += 1
        if layer_idx < self.dense_layers or self.budget >= n:
            count_page_reads(self.stats, self.cache, -(-n // self.cache.page_size), n, scored=False)
            return prefill_decode_attention(q, kc, vc, input_pos, self.use_kernels, need_lse=False)[0]
        qh, kc, vc, bounds, G = self._page_lists(layer_idx, q[:, 0], kc, vc)
        page_idx, scored = quest_pages(qh, self.cache, layer_idx, self.budget, n, self.use_kernels, bounds)
        count_page_reads(self.stats, self.cache, page_idx.shape[-1], n, scored, readers=G)
        if self.use_kernels:
            import kernels
            o, _ = kernels.paged_decode(qh, kc, vc, page_idx, n, self.cache.page_size)
        else:
            o, _ = paged_decode(qh, kc, vc, page_idx, n, self.cache.page_size)
        return o.reshape(q.shape)

    def _page_lists(self, layer_idx, qh, kc, vc):
        """qh (B, Hq, D) and the layer's K/V and bounds, seen as one page list per KV head (as they
        are) or per query head (group_view). -> (qh, kc, vc, (kmin, kmax), lists per KV head)."""
        bounds = (self.cache.kmin[layer_idx], self.cache.kmax[layer_idx]) if self.cache.page_meta else None
        if self.page_choice == "kv_head":
            return qh, kc, vc, bounds, 1
        B, Hq, D = qh.shape
        G = Hq // kc.shape[1]
        return (qh.reshape(B * kc.shape[1], G, D), group_view(kc, G), group_view(vc, G),
                bounds and tuple(group_view(x, G) for x in bounds), G)

    def forward_on_device(self, layer_idx, q, k, v, input_pos):
        """A decode step with its position on the device (input_pos (1,) int64), in kernels that read
        the length there: no host sync, so generate.py can capture the step in a CUDA graph. The
        caller guarantees that the budget is below the length at every step (every step is sparse)
        and calls after_device_step. No statistics are counted here (they need the length on the host)."""
        import kernels
        cache, S = self.cache, self.cache.page_size
        cache.write_on_device(layer_idx, k, v, input_pos)
        if layer_idx == 0:
            self.seq_len = (input_pos + 1).to(torch.int32)  # keys [0, pos] after this write
        kc, vc, qh = cache.k[layer_idx], cache.v[layer_idx], q[:, 0]
        if layer_idx < self.dense_layers:
            o, _ = kernels.flash_decode(qh, kc, vc, self.seq_len)
        else:  # all pages are scored (those past the length are never selected)
            qh, kc, vc, (kmin, kmax), _ = self._page_lists(layer_idx, qh, kc, vc)
            scores = kernels.page_scores(qh, kmin, kmax, cache.num_pages_max)
            page_idx = kernels.select_pages_device(scores, self.seq_len, S, self.budget // S)
            o, _ = kernels.paged_decode(qh, kc, vc, page_idx, self.seq_len, S)
        return o.reshape(q.shape)

    def after_device_step(self, n):
        """Host-side bookkeeping after a device step that made the sequence n tokens long."""
        self.cache.lengths = [n] * len(self.cache.lengths)
