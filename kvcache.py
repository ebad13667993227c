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

import kernels
from attention import DenseAttention, decode_attention, paged_decode


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
        # per layer: positions [0, length) have been written (on the device: decode steps update it there)
        self.lengths = torch.zeros(n_layers, dtype=torch.int64, device=device)
        # per sequence length n, how many decode steps made the sequence n long: the statistics' source
        self.decoded = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self._one = torch.ones(1, dtype=torch.int32, device=device)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.kmin, self.kmax))

    def row_bytes(self):
        """Bytes of one position's K and V rows in one layer, all batch rows and KV heads."""
        _, B, Hkv, _, D = self.k.shape
        return 2 * B * Hkv * D * self.k.element_size()

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
            meta = (self.kmin[layer], self.kmax[layer]) if self.page_meta else (None, None)
            kernels.append_kv(self.k[layer], self.v[layer], *meta, k, v, pos, self.page_size)  # one launch
        return self.seq_len

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
    bounds: (kmin, kmax) to score instead of the layer's (a per-query-head view, see group_view)."""
    S, P = cache.page_size, cache.num_pages_max
    kmin, kmax = bounds if bounds is not None else (cache.kmin[layer_idx], cache.kmax[layer_idx])
    if use_kernels:
        scores = kernels.page_scores(q, kmin, kmax, P, seq_len, S)  # (only the pages in use are read)
        if P <= kernels.SELECT_MAX_PAGES:
            return kernels.select_pages(scores, seq_len, S, budget // S)
    else:
        scores = page_scores_ref(q, kmin, kmax, P)
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
    bounds of every page (each the size of a K/V row). -> (K/V rows read, pages read, K per step)."""
    L, B, Hkv = cache.k.shape[:3]
    S = cache.page_size
    pages = torch.ceil(n / S)
    K = pages.clamp(max=budget // S)
    sparse_rows = lists * ((K - 1) * S + n - (pages - 1) * S + pages)
    rows = (steps * (n_dense * n + (L - n_dense) * sparse_rows)).sum()
    return int(rows), int(B * Hkv * (steps * (n_dense * pages + (L - n_dense) * lists * K)).sum()), K


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
            bounds = (group_view(cache.kmin[layer_idx], G), group_view(cache.kmax[layer_idx], G))
        page_idx = quest_pages(qh, cache, layer_idx, self.budget, seq_len, self.use_kernels, bounds)
        attend = kernels.paged_decode if self.use_kernels else paged_decode  # (attention.paged_decode: the CPU run path)
        return attend(qh, kc, vc, page_idx, seq_len, cache.page_size)[0].reshape(q.shape)

    @property
    def stats(self):
        n, steps = self.cache.decoded_lengths()  # a sparse layer reads self.group page lists per KV head
        rows, pages, _ = page_reads(self.cache, self.budget, n, steps, self.n_dense, self.group)
        return {"kv_bytes_read": rows * self.cache.row_bytes(), "pages_read": pages, "decode_steps": int(steps.sum())}
