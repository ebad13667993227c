"""
The attention tile and the Triton kernels the ideas share: flash prefill, split-K and paged decode,
Quest's page scores and top-k, the KV-cache append of a captured step, and how a decode step's
kernels launch on a Hopper GPU (pdl). Each has a PyTorch reference (attention.py, kvcache.py) that
test_attention.py and test_kvcache.py hold it to. The model's own one-launch kernels (RMSNorm, RoPE,
SwiGLU, the products of 1-16 rows) are cudagraph.py's: no idea shares them.

Online softmax (FlashAttention, arXiv 2205.14135). Keys are visited a tile at a time while each
query row keeps the largest score m seen so far, l = sum_j exp(s_j - m) and acc = sum_j exp(s_j - m) v_j.
When a tile raises the max to m', l and acc are rescaled by exp(m - m'). At the end o = acc / l and
lse = m + log l; no (Tq, Tk) matrix is ever stored. attend_tile is that step, written once: every
attention kernel (here, retro.py, token_sparse.py) is a loop over key tiles that calls it with its own
keys and mask.

Split-K decode (flash-decoding). One decode query is too little work to fill a GPU, so the keys are
cut into num_splits chunks (plan_splits), each attended to by its own program, and the partials merged:
    lse = log sum_s exp(lse_s),   o = sum_s exp(lse_s - lse) o_s.
The G query heads that share a KV head are the rows of one tile, so each K/V tile is read once.

Page-sparse decode (Quest, arXiv 2406.10774): the same split-K decode kernel, its keys read from a
list of pages in any order; page_scores computes the bound Quest ranks pages by. Scores are kept in
base 2 (exp2 is the hardware exponential): s2 = s * log2(e), so lse = m2 * ln 2 + log l.
"""

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side: folded into the scale passed to the kernels
# kernels may only read globals that are constexpr (the CPU interpreter does not enforce this)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(0.6931471805599453)
MAX_SPLITS = 128  # merge_partials holds all splits of a row in one tile


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter runs programs one by one: keep their number small


def dot_precision(dtype):
    # fp32 inputs must not be rounded to tf32 (tests compare fp32 results at 2e-4)
    return "ieee" if dtype == torch.float32 else "tf32"


# Programmatic dependent launch (Hopper and later). In a batch-1 decode step each kernel is small, and
# the gap between two (the next one's launch and ramp-up) is a large part of its time. A kernel
# launched with launch_pdl=True may start while the one before it still runs, once every program of
# that one has got past its wait. Its first step, before it reads or writes any memory, is
# wait_for_inputs: it returns once the kernel before has finished and its writes are visible (so,
# by induction, every kernel before that too), then lets the kernel after start in turn. A CPU, an
# older GPU or PDL = False: it does nothing, and kernels run one after the other.
PDL = True


@functools.lru_cache(maxsize=None)
def _pdl_device(device):
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl(device):
    """The launch options of a kernel on device that calls wait_for_inputs: its PDL constexpr and Triton's
    launch_pdl, both True where programmatic dependent launch is on."""
    on = PDL and _pdl_device(device)
    return dict(PDL=on, launch_pdl=on)


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()  # the kernel before has finished: its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after may launch once every program got here


def tile_size(n):
    return max(16, triton.next_power_of_2(n))  # a power of two, and tl.dot wants at least 16


def _check(q, k, v, q_dims):
    if q.dim() != q_dims or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q with {q_dims} dims and two (B, Hkv, N, D) tensors of one shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)}: need the same batch and "
                         f"head dim, and query heads a multiple of KV heads")
    return q.shape[1] // k.shape[1]


def device_length(seq_len, Nmax):
    """A kernel's key count: an int, or a (1,) int32 device tensor the kernel reads itself (no host
    sync: the call can be captured in a CUDA graph and replayed as the sequence grows; the work is
    planned for Nmax, programs past the real length find no keys). -> (length to plan for, tensor or None)."""
    if torch.is_tensor(seq_len):
        if seq_len.dtype != torch.int32 or seq_len.numel() != 1:
            raise ValueError(f"a device length must be one int32 value, got {seq_len.dtype} {tuple(seq_len.shape)}")
        return Nmax, seq_len
    seq_len = int(seq_len)
    if not 0 <= seq_len <= Nmax:
        raise ValueError(f"seq_len {seq_len} must lie in [0, {Nmax}] (the cache length)")
    return seq_len, None


def prefill_tiles(q):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a prefill kernel: the Triton tutorial's H100 choice for
    2-byte inputs, smaller tiles for fp32 (shared memory) and the CPU interpreter (numpy cost per tile)."""
    if q.device.type != "cuda":
        return 32, 32, 4, 1
    if q.element_size() <= 2 and q.shape[-1] <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


# ----------------------------------------------------------------------------------------------
# The tile every attention kernel shares

@triton.jit
def online_softmax(m, l, s):
    """Fold a tile of base-2 scores s (M, N), -inf where a row may not see a key, into each row's running
    max m (M,) and sum l (M,). -> (m', l', alpha = exp2(m - m') to rescale the sums over earlier keys,
    p = exp2(s - m') (M, N), this tile's weights)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    # a row with no visible key so far keeps m = -inf; shift it by 0 so exp gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def attend_tile(q, K, V, k_pos, k_ok, visible, m, l, acc, skn, skd, svn, svd, d, d_ok, qk_scale,
                PRECISION: tl.constexpr, BIAS=0, sbn=0, HAS_BIAS: tl.constexpr = False):
    """One online-softmax step: the rows q (M, BLOCK_D) attend to the keys at rows k_pos (N,) of K and
    V (pointers to one head's (N, D) matrices, strides skn, skd / svn, svd; rows ~k_ok are not read).
    visible (M, N): which row sees which key. With HAS_BIAS, BIAS[k_pos * sbn] (one head's per-key
    bias) is added to the natural-log scores. -> the running (m, l, acc) after this tile."""
    kv_ok = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + k_pos[:, None] * skn + d[None, :] * skd, mask=kv_ok, other=0.0)
    v = tl.load(V + k_pos[:, None] * svn + d[None, :] * svd, mask=kv_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:  # convert the bias to base 2 like the scores
        s += tl.load(BIAS + k_pos * sbn, mask=k_ok, other=0.0)[None, :] * LOG2E_C
    m, l, alpha, p = online_softmax(m, l, tl.where(visible, s, float("-inf")))
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m, l, acc


@triton.jit
def finish_rows(m, l, acc):
    """-> o = acc / l (M, BLOCK_D) and lse = m ln 2 + log l (M,), natural log; a row that saw no key
    gets o = 0 and lse = -inf."""
    has_keys = l > 0
    l_safe = tl.where(has_keys, l, 1.0)
    return acc / l_safe[:, None], tl.where(has_keys, m * LN2_C + tl.log(l_safe), float("-inf"))


@triton.jit
def store_split(OP, LP, m, l, acc, row, row_ok, split, num_splits, d, D: tl.constexpr):
    """Write one split's (o, lse) of the rows row (M,) (indices into B * Hq, or B * Hq * W with a window)
    into OP (rows, num_splits, D) and LP (rows, num_splits) fp32."""
    o, lse = finish_rows(m, l, acc)
    tl.store(OP + (row[:, None] * num_splits + split) * D + d[None, :], o, mask=row_ok[:, None] & (d[None, :] < D))
    tl.store(LP + row * num_splits + split, lse, mask=row_ok)


@triton.jit
def merge_splits(lse_s, o_s):
    """The split-K merge of a block of rows (merge_partials, retro.window_merge): lse_s (M, NS), o_s (M, NS,
    BLOCK_D) fp32 of attentions over disjoint key sets -> their union's o (M, BLOCK_D), lse (M,); empty
    parts (lse = -inf) add nothing."""
    m = tl.max(lse_s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # every part empty: all weights 0, no NaN
    w = tl.exp(lse_s - m[:, None])
    total = tl.sum(w, 1)
    total_safe = tl.where(total > 0, total, 1.0)
    o = tl.sum(w[:, :, None] * o_s, 1) / total_safe[:, None]
    return o, tl.where(total > 0, m + tl.log(total_safe), float("-inf"))


def plan_splits(n, batch_heads, device, waves, block_n, num_splits=None, unit=None):
    """Split-K plan for n key rows and batch_heads (batch, KV head) pairs: by default enough programs
    to fill the GPU `waves` times over, each chunk a whole number of `unit` rows (default: the tile,
    block_n); a caller forcing num_splits gets chunks of 16 rows at least. Never more than MAX_SPLITS.
    -> (chunk, num_splits) with num_splits = ceil(n / chunk) >= 1."""
    if num_splits is None:
        num_splits = triton.cdiv(waves * _num_sms(device), batch_heads)
        unit = unit or block_n
    unit = unit or 16
    num_splits = max(1, min(num_splits, triton.cdiv(n, 16), MAX_SPLITS))
    chunk = max(unit, triton.cdiv(triton.cdiv(n, num_splits), unit) * unit)
    return chunk, max(1, triton.cdiv(n, chunk))


# ----------------------------------------------------------------------------------------------
# Flash prefill: one program per (block of BLOCK_M queries, batch * query head)

# lengths vary per call: no specialisation on their value (saves a JIT compile per new length class)
@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset"])
def _prefill_kernel(Q, K, V, O, LSE, SEQ_LEN, BIAS,
                    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                    sob, soh, sot, sod, sbb, sbh, sbn,
                    Hq, G, Tq, Tk, q_offset, qk_scale,
                    LEN_ON_DEVICE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    if LEN_ON_DEVICE:  # keys [0, Tk) with Tk on the device; the queries are the last Tq of them
        Tk = tl.load(SEQ_LEN)
        q_offset = Tk - Tq
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # int64: batch offsets of a long cache overflow int32
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :] * sqd,
                mask=(rows[:, None] < Tq) & d_ok[None, :], other=0.0)
    q_pos = q_offset + rows  # absolute position of each query
    K += b * skb + (h // G) * skh
    V += b * svb + (h // G) * svh
    BIAS += b * sbb + (h // G) * sbh  # (read only with HAS_BIAS)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Tk
    if CAUSAL:  # keys after the last query of this block are invisible to all of it
        hi = tl.maximum(tl.minimum(Tk, q_offset + pid_m * BLOCK_M + BLOCK_M), 0)
    for start in range(0, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        visible = k_pos[None, :] < Tk
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        m, l, acc = attend_tile(q, K, V, k_pos, k_pos < Tk, visible, m, l, acc, skt, skd, svt, svd, d, d_ok,
                                qk_scale, PRECISION, BIAS, sbn, HAS_BIAS)

    o, lse = finish_rows(m, l, acc)
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + d[None, :] * sod, o.to(O.dtype.element_ty),
             mask=(rows[:, None] < Tq) & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + rows, lse, mask=rows < Tq)


def flash_prefill(q, k, v, causal=True, q_offset=None, scale=None, seq_len=None, bias=None):
    """FlashAttention forward, same contract as attention.attention_ref.
    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D), any strides -> o (B, Hq, Tq, D) q.dtype, lse (B, Hq, Tq) fp32.
    seq_len: a device length (see device_length): then only keys [0, seq_len) of k, v exist and the
    queries are the last Tq of them (q_offset = seq_len - Tq).
    bias (B, Hkv, Tk) fp32 or None: added to each key's scaled score (-inf: the key is absent), as in
    compaction.biased_attention_ref; a compacted cache's keys carry one."""
    G = _check(q, k, v, 4)
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    if bias is not None and (tuple(bias.shape) != (B, k.shape[1], Tk) or bias.dtype != torch.float32):
        raise ValueError(f"flash_prefill: bias must be fp32 (B, Hkv, Tk) = ({B}, {k.shape[1]}, {Tk}), got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    len_t = None
    if seq_len is not None:
        Tk, len_t = device_length(seq_len, Tk)
        if len_t is None:
            raise ValueError("flash_prefill: seq_len is for a device length; slice k, v for a host one")
    q_offset = Tk - Tq if q_offset is None else int(q_offset)
    o = torch.empty(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    BLOCK_M, BLOCK_N, warps, stages = prefill_tiles(q)
    _prefill_kernel[(triton.cdiv(Tq, BLOCK_M), B * Hq)](
        q, k, v, o, lse, len_t if len_t is not None else lse, bias if bias is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *(bias.stride() if bias is not None else (0, 0, 0)),
        Hq, G, Tq, Tk, q_offset, scale * LOG2E, LEN_ON_DEVICE=len_t is not None, CAUSAL=causal,
        HAS_BIAS=bias is not None, PRECISION=dot_precision(q.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=tile_size(D), D=D, num_warps=warps, num_stages=stages)
    return o, lse


# ----------------------------------------------------------------------------------------------
# Merging split partials: one program per block of output rows

@triton.jit(do_not_specialize=["NS"])
def _merge_kernel(OP, LP, O, LSE, NS, D: tl.constexpr, BLOCK_NS: tl.constexpr, BLOCK_D: tl.constexpr,
                  PDL: tl.constexpr):
    wait_for_inputs(PDL)
    r = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)  # one output row per program (a block of one)
    s = tl.arange(0, BLOCK_NS)
    d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LP + r[:, None] * NS + s[None, :], mask=s[None, :] < NS, other=float("-inf"))
    o_s = tl.load(OP + (r[:, None, None] * NS + s[None, :, None]) * D + d[None, None, :],
                  mask=(s[None, :, None] < NS) & (d[None, None, :] < D), other=0.0)
    o, lse = merge_splits(lse_s, o_s)
    tl.store(O + r[:, None] * D + d[None, :], o.to(O.dtype.element_ty), mask=d[None, :] < D)
    tl.store(LSE + r, lse)


def merge_partials(o_parts, lse_parts, out_dtype=None):
    """Merge attentions over disjoint key sets (the splits): o_parts (..., NS, D), lse_parts (..., NS)
    -> o (..., D) in out_dtype (default o_parts.dtype), lse (...) fp32. Empty splits (lse = -inf) add nothing."""
    *lead, NS, D = o_parts.shape
    if tuple(lse_parts.shape) != (*lead, NS) or NS > MAX_SPLITS:
        raise ValueError(f"merge_partials: o_parts {tuple(o_parts.shape)} and lse_parts {tuple(lse_parts.shape)} "
                         f"must be (..., NS, D) and (..., NS) with NS <= {MAX_SPLITS}")
    op = o_parts.reshape(-1, NS, D).float().contiguous()
    lp = lse_parts.reshape(-1, NS).float().contiguous()
    o = torch.empty(op.shape[0], D, dtype=out_dtype or o_parts.dtype, device=o_parts.device)
    lse = torch.empty(op.shape[0], dtype=torch.float32, device=o_parts.device)
    if op.shape[0] > 0:
        _merge_kernel[(op.shape[0],)](op, lp, o, lse, NS, D=D, BLOCK_NS=triton.next_power_of_2(NS),
                                      BLOCK_D=triton.next_power_of_2(D), num_warps=4, **pdl(o.device))
    return o.view(*lead, D), lse.view(*lead)


# ----------------------------------------------------------------------------------------------
# Split-K decode: one program per (split, batch * KV head); the G query heads are the rows of a tile.
# The keys are the cache rows [0, seq_len), or those of a list of pages (paged decode, Quest).
#
# A page list is walked as a virtual sequence in which every listed page is padded to PAGE_PAD (a power
# of two) rows: row c is row c % PAGE_PAD of the page in slot c // PAGE_PAD. A tile then holds several
# small pages or a piece of a large one, and any page_size works (padding rows masked). retro.py walks
# its page list the same way (paged_keys).

@triton.jit
def paged_keys(PAGES, spk, c, hi, seq_len, page_size, PAGE_PAD: tl.constexpr):
    """The cache rows k_pos of the virtual rows c (N,) of a page list, whether they exist (k_ok), and their pages."""
    page = tl.load(PAGES + (c // PAGE_PAD) * spk, mask=c < hi, other=-1)
    in_page = c % PAGE_PAD
    k_pos = page * page_size + in_page
    return k_pos, (page >= 0) & (in_page < page_size) & (k_pos < seq_len) & (c < hi), page


@triton.jit(do_not_specialize=["n_slots", "seq_len", "chunk", "num_splits"])
def _decode_kernel(Q, K, V, PAGES, BIAS, OP, LP, SEQ_LEN,
                   sqb, sqh, sqw, sqd, skb, skh, skn, skd, svb, svh, svn, svd, spb, sph, spk, sbb, sbh, sbn,
                   Hkv, G, W, n_slots, seq_len, page_size, chunk, num_splits, qk_scale,
                   PAGED: tl.constexpr, HAS_BIAS: tl.constexpr, LEN_ON_DEVICE: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE_PAD: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    if LEN_ON_DEVICE:  # see device_length()
        seq_len = tl.load(SEQ_LEN)
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    # row r = (query head hk*G + g, window row i); rows r >= G * W are padding (tl.dot wants >= 16 rows)
    r = tl.arange(0, BLOCK_M)
    g = r // W
    i = r % W
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * sqb + (hk * G + g[:, None]) * sqh + i[:, None] * sqw + d[None, :] * sqd,
                mask=(r[:, None] < G * W) & d_ok[None, :], other=0.0)
    q_pos = seq_len - W + i  # window row i sits at this position and sees the keys up to it
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    PAGES += b * spb + hk * sph
    BIAS += b * sbb + hk * sbh

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_slots * PAGE_PAD if PAGED else seq_len)
    for start in range(lo, hi, BLOCK_N):
        c = start + tl.arange(0, BLOCK_N)
        if PAGED:  # c: virtual rows of the page list (one decode row, which sees every listed key)
            k_pos, k_ok, _ = paged_keys(PAGES, spk, c, hi, seq_len, page_size, PAGE_PAD)
            visible = k_ok[None, :]
        else:  # c: the cache rows
            k_pos, k_ok = c, c < hi
            visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        m, l, acc = attend_tile(q, K, V, k_pos, k_ok, visible, m, l, acc, skn, skd, svn, svd, d, d_ok, qk_scale,
                                PRECISION, BIAS, sbn, HAS_BIAS)

    store_split(OP, LP, m, l, acc, pid_bh.to(tl.int64) * G * W + r, r < G * W, split, num_splits, d, D)


KV_TILE_BYTES = 64 * 1024  # one pipeline stage's K and V tiles at most; more fails on shared memory


def kv_tiles(block_n, num_stages, D, element_size):
    """(BLOCK_N, num_stages) for a decode loop loading a BLOCK_N x D tile of K and one of V per step. The
    tuned defaults fit head dim 128 in 2 bytes; a wide fp32 head (160, 256: padded to 256) would need ~280 KB
    of shared memory, more than an H100/H200 has (~228 KB): then one stage, and the keys per tile halved
    until K + V fit KV_TILE_BYTES."""
    tile = lambda n: 2 * n * tile_size(D) * element_size  # noqa: E731
    if tile(block_n) <= KV_TILE_BYTES:
        return block_n, num_stages
    while block_n > 16 and tile(block_n) > KV_TILE_BYTES:
        block_n //= 2
    return block_n, 1


# keys per tile (64 x 128 bf16 = 16 KB per K or V tile: wide coalesced loads), programs per SM, launch options
DECODE_TUNING = dict(block_n=64, waves=2, num_warps=4, num_stages=3)
PAGED_TUNING = dict(block_n=128, waves=2, num_warps=4, num_stages=2)
MAX_DECODE_ROWS = 64  # query rows of a flash_decode tile (G heads x W window rows)


def _split_decode(qw, k_cache, v_cache, seq_len, len_t, G, scale, num_splits, tuning, pages=None, page_size=1,
                  bias=None):
    """The launch flash_decode and paged_decode share: qw (B, Hq, W, D) over the keys [0, seq_len) of
    the caches, or of the pages listed in pages (B, Hkv, n_slots) int32 -> o (B, Hq, W, D), lse (B, Hq, W)."""
    B, Hq, W, D = qw.shape
    Hkv = k_cache.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    page_pad = triton.next_power_of_2(page_size)
    n_slots = pages.shape[2] if pages is not None else 0
    n_rows = n_slots * page_pad if pages is not None else seq_len
    chunk, num_splits = plan_splits(n_rows, B * Hkv, qw.device, tuning["waves"], tuning["block_n"],
                                    num_splits)
    o_part = torch.empty(B, Hq, W, num_splits, D, dtype=torch.float32, device=qw.device)
    lse_part = torch.empty(B, Hq, W, num_splits, dtype=torch.float32, device=qw.device)
    block_n, stages = kv_tiles(tuning["block_n"], tuning["num_stages"] if qw.device.type == "cuda" else 1, D,
                               qw.element_size())
    absent = (lse_part, 0, 0, 0)  # stands for a page list or bias not given: never read
    PAGES, spb, sph, spk = (pages, *pages.stride()) if pages is not None else absent
    BIAS, sbb, sbh, sbn = (bias, *bias.stride()) if bias is not None else absent
    _decode_kernel[(num_splits, B * Hkv)](
        qw, k_cache, v_cache, PAGES, BIAS, o_part, lse_part, len_t if len_t is not None else lse_part,
        *qw.stride(), *k_cache.stride(), *v_cache.stride(), spb, sph, spk, sbb, sbh, sbn,
        Hkv, G, W, n_slots, seq_len, page_size, chunk, num_splits, scale * LOG2E,
        PAGED=pages is not None, HAS_BIAS=bias is not None, LEN_ON_DEVICE=len_t is not None,
        PRECISION=dot_precision(qw.dtype), BLOCK_M=tile_size(G * W), BLOCK_N=block_n, PAGE_PAD=page_pad,
        BLOCK_D=tile_size(D), D=D, num_warps=tuning["num_warps"], num_stages=stages, **pdl(qw.device))
    return merge_partials(o_part, lse_part, out_dtype=qw.dtype)


def flash_decode(q, k_cache, v_cache, seq_len, scale=None, num_splits=None):
    """Flash-decoding, same contract as attention.decode_ref: q (B, Hq, D); k_cache, v_cache (B, Hkv,
    Nmax, D); keys [0, seq_len) -> o (B, Hq, D), lse (B, Hq) fp32. q may also be (B, Hq, W, D): the last
    W positions (a RetroAttention window, a short chunk), attended causally -> o (B, Hq, W, D), lse (B, Hq,
    W); each K/V tile is still read once. seq_len: an int or a device length (device_length). num_splits:
    how many chunks the keys are cut into (default: from seq_len and the SM count)."""
    window = q.dim() == 4
    G = _check(q[:, :, 0] if window else q, k_cache, v_cache, 3)
    qw = q if window else q.unsqueeze(2)  # (B, Hq, W, D); with one row its W stride is never used
    W = qw.shape[2]
    if window and G * W > MAX_DECODE_ROWS:
        raise ValueError(f"flash_decode: {W} window rows x {G} query heads per KV head exceed "
                         f"{MAX_DECODE_ROWS} rows of a tile; use flash_prefill")
    seq_len, len_t = device_length(seq_len, k_cache.shape[2])
    if len_t is None and W > seq_len:
        raise ValueError(f"flash_decode: {W} window rows need at least as many keys, got seq_len {seq_len}")
    o, lse = _split_decode(qw, k_cache, v_cache, seq_len, len_t, G, scale, num_splits, DECODE_TUNING)
    return (o, lse) if window else (o[:, :, 0], lse[:, :, 0])


def paged_decode(q, k_cache, v_cache, page_idx, seq_len, page_size, bias=None, scale=None, num_splits=None):
    """Decode attention over a list of pages per KV head, same contract as attention.paged_decode_ref.
    q (B, Hq, D); k_cache, v_cache (B, Hkv, Nmax, D); page_idx (B, Hkv, K) int, -1 = unused slot, pages in
    any order but each listed once; bias (B, Hkv, Nmax) fp32 or None -> o (B, Hq, D), lse (B, Hq) fp32.
    seq_len: an int or a device length (see device_length).
    num_splits: how many chunks the page list is cut into (default: from its length and the SM count)."""
    G = _check(q, k_cache, v_cache, 3)
    B, Hkv, Nmax = k_cache.shape[:3]
    seq_len, len_t = device_length(seq_len, Nmax)
    if page_idx.dim() != 3 or tuple(page_idx.shape[:2]) != (B, Hkv):
        raise ValueError(f"page_idx must be (B, Hkv, K) = ({B}, {Hkv}, K), got {tuple(page_idx.shape)}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if bias is not None and tuple(bias.shape) != (B, Hkv, Nmax):
        raise ValueError(f"bias must be (B, Hkv, Nmax) = ({B}, {Hkv}, {Nmax}), got {tuple(bias.shape)}")
    o, lse = _split_decode(q.unsqueeze(2), k_cache, v_cache, seq_len, len_t, G, scale, num_splits,
                           PAGED_TUNING, page_idx.to(torch.int32), page_size, bias)
    return o[:, :, 0], lse[:, :, 0]


# ----------------------------------------------------------------------------------------------
# Appending to the KV cache at device positions (the CUDA-graph decode step), page bounds included

# int8 page bounds: the constants and steps of kvcache.quantize_bounds (where the exactness argument is)
SCALE_PER_LEVEL = float.fromhex("0x1.020418p-7")  # 1/127 (1 + 2^-20), an fp32 (kvcache.quantize_bounds says why)
FP32_MIN_NORMAL = 2.0 ** -126
SCALE_PER_LEVEL_C = tl.constexpr(SCALE_PER_LEVEL)
FP32_MIN_NORMAL_C = tl.constexpr(FP32_MIN_NORMAL)


@triton.jit
def quantize_bounds(kmin, kmax, finite, d_ok):
    """kvcache.quantize_bounds of one page: fp32 kmin, kmax (BLOCK_D,), finite: no key of the page is
    inf or NaN -> int8 lo, hi (BLOCK_D,) and the fp32 scale, bit for bit the reference's."""
    amax = tl.max(tl.where(d_ok, tl.maximum(tl.abs(kmin), tl.abs(kmax)), 0.0), 0)
    s = tl.maximum(amax * SCALE_PER_LEVEL_C, FP32_MIN_NORMAL_C)
    s64, lo64, hi64 = s.to(tl.float64), kmin.to(tl.float64), kmax.to(tl.float64)
    lo = tl.floor(lo64 / s64)  # then one exact correction step: the tightest integer whatever the division's rounding
    lo += tl.where((lo + 1) * s64 <= lo64, 1.0, 0.0) - tl.where(lo * s64 > lo64, 1.0, 0.0)
    hi = tl.ceil(hi64 / s64)
    hi += tl.where(hi * s64 < hi64, 1.0, 0.0) - tl.where((hi - 1) * s64 >= hi64, 1.0, 0.0)
    lo = tl.minimum(tl.maximum(tl.where(finite, lo, 0.0), -127.0), 127.0)
    hi = tl.minimum(tl.maximum(tl.where(finite, hi, 0.0), -127.0), 127.0)
    return lo.to(tl.int8), hi.to(tl.int8), tl.where(finite, s, float("nan"))


@triton.jit
def _append_kv_kernel(KN, VN, POS, KC, VC, KMIN, KMAX, KSCALE,
                      sknb, sknt, sknh, sknd, svnb, svnt, svnh, svnd,
                      skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smp, smd, ssb, ssh, ssp,
                      Hkv, T, page_size, HAS_META: tl.constexpr, QUANTIZED: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
                      PDL: tl.constexpr):
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    b = (pid // Hkv).to(tl.int64)
    hk = (pid % Hkv).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    for t0 in range(0, T, BLOCK_T):  # the new rows, BLOCK_T at a time
        t = t0 + tl.arange(0, BLOCK_T)
        new = (t < T)[:, None] & d_ok[None, :]
        p = tl.load(POS + t, mask=t < T, other=0)[:, None]
        k = tl.load(KN + b * sknb + t[:, None] * sknt + hk * sknh + d[None, :] * sknd, mask=new)
        v = tl.load(VN + b * svnb + t[:, None] * svnt + hk * svnh + d[None, :] * svnd, mask=new)
        tl.store(KC + b * skb + hk * skh + p * skn + d[None, :] * skd, k, mask=new)
        tl.store(VC + b * svb + hk * svh + p * svn + d[None, :] * svd, v, mask=new)
    if HAS_META:  # bounds of the new rows' pages that are full (consecutive rows: a range of pages)
        tl.debug_barrier()  # the rows stored above are visible to the whole program
        last = tl.load(POS + T - 1)  # the newest row: a page is full once its last row is at most this
        r = tl.arange(0, BLOCK_S)
        for page in range(tl.load(POS) // page_size, (last + 1) // page_size):  # most steps: none
            rows = page * page_size + r
            ok = r < page_size
            keys = tl.load(KC + b * skb + hk * skh + rows[:, None] * skn + d[None, :] * skd,
                           mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            kmin = tl.min(tl.where(ok[:, None], keys, float("inf")), 0)
            kmax = tl.max(tl.where(ok[:, None], keys, float("-inf")), 0)
            if QUANTIZED:  # the page requantized from its keys so far (see KVCache.refresh_pages)
                # (from the keys, not kmin/kmax: a GPU min/max may drop a NaN)
                bad = (keys != keys) | (tl.abs(keys) == float("inf"))  # (rows not loaded are 0)
                finite = tl.sum(tl.sum(bad.to(tl.int32), 1), 0) == 0
                kmin, kmax, scale = quantize_bounds(kmin, kmax, finite, d_ok)
                tl.store(KSCALE + b * ssb + hk * ssh + page * ssp, scale)
            tl.store(KMIN + b * smb + hk * smh + page * smp + d * smd, kmin.to(KMIN.dtype.element_ty), mask=d_ok)
            tl.store(KMAX + b * smb + hk * smh + page * smp + d * smd, kmax.to(KMAX.dtype.element_ty), mask=d_ok)


def append_kv(k_cache, v_cache, kmin, kmax, k, v, pos, page_size, scale=None):
    """Write k, v (B, T, Hkv, D) at the device positions pos (T,) int64 (consecutive, the last one the
    newest) into k_cache, v_cache (B, Hkv, Nmax, D), and recompute the bounds kmin, kmax (B, Hkv, Pmax, D)
    of those of their pages that are full (None: no bounds kept; the page still filling gets its bounds
    when its last row is written, see kvcache.py); with scale (B, Hkv, Pmax) fp32 they are int8 bounds of
    that scale (kvcache.quantize_bounds). One launch and no host sync, for a step captured in a CUDA graph;
    the reference is KVCache.write."""
    B, T, Hkv, D = k.shape
    has_meta = kmin is not None
    if not has_meta:  # any (B, Hkv, ., D) tensor: never read without bounds
        kmin = kmax = k_cache
    quantized = scale is not None
    if quantized != (kmin.dtype == torch.int8):
        raise ValueError(f"append_kv: int8 bounds need their scale and a scale needs int8 bounds; got {kmin.dtype} "
                         f"bounds and scale {None if scale is None else tuple(scale.shape)}")
    if not quantized:  # never read
        scale = kmin
    _append_kv_kernel[(B * Hkv,)](k, v, pos, k_cache, v_cache, kmin, kmax, scale,
                                  *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
                                  *kmin.stride(), *scale.stride()[:3],
                                  Hkv, T, page_size, HAS_META=has_meta, QUANTIZED=quantized,
                                  BLOCK_S=tile_size(page_size), BLOCK_T=16, BLOCK_D=tile_size(D), D=D,
                                  num_warps=4, **pdl(k.device))


# ----------------------------------------------------------------------------------------------
# Quest page scores: one program per (block of pages, batch * KV head)
#
# Per dimension, q_d * k_d is largest at one end of [kmin_d, kmax_d]: max(q_d, 0) kmax_d + min(q_d, 0) kmin_d.
# Summed over the G query heads of a KV head, the bound is two dot products per page, with
# Q+ = sum_g max(q_g, 0) and Q- = sum_g min(q_g, 0) computed once: the group costs nothing extra, and the
# kernel is a stream over the bounds.

@triton.jit(do_not_specialize=["num_pages", "seq_len"])
def _page_scores_kernel(Q, KMIN, KMAX, SCALE, OUT, SEQ_LEN,
                        sqb, sqh, sqd, sab, sah, sap, sad, sbb, sbh, sbp, sbd, ssb, ssh, ssp,
                        Hkv, G, num_pages, seq_len, page_size, LEN_ON_DEVICE: tl.constexpr, QUANTIZED: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
                        PDL: tl.constexpr):
    wait_for_inputs(PDL)
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    if LEN_ON_DEVICE:  # see device_length
        seq_len = tl.load(SEQ_LEN)
    in_use = tl.minimum(tl.cdiv(seq_len, page_size), num_pages)  # pages past it hold no keys: -inf, bounds unread
    score = tl.full([BLOCK_P], float("-inf"), tl.float32)
    if pid_p * BLOCK_P < in_use:
        d = tl.arange(0, BLOCK_D)
        gi = tl.arange(0, BLOCK_G)
        q = tl.load(Q + b * sqb + (hk * G + gi[:, None]) * sqh + d[None, :] * sqd,
                    mask=(gi[:, None] < G) & (d[None, :] < D), other=0.0).to(tl.float32)
        q_pos = tl.sum(tl.maximum(q, 0.0), 0)
        q_neg = tl.sum(tl.minimum(q, 0.0), 0)
        ok = (p[:, None] < in_use) & (d[None, :] < D)
        kmin = tl.load(KMIN + b * sab + hk * sah + p[:, None] * sap + d[None, :] * sad, mask=ok, other=0.0).to(tl.float32)
        kmax = tl.load(KMAX + b * sbb + hk * sbh + p[:, None] * sbp + d[None, :] * sbd, mask=ok, other=0.0).to(tl.float32)
        # a zero weight drops its term, as the per-head bound does (0 * inf would be NaN)
        hi_part = tl.where(q_pos[None, :] > 0, q_pos[None, :] * kmax, 0.0)
        lo_part = tl.where(q_neg[None, :] < 0, q_neg[None, :] * kmin, 0.0)
        score = tl.sum(hi_part + lo_part, 1)
        if QUANTIZED:  # int8 bounds: every term is a multiple of the page's scale, applied once to the sum
            score *= tl.load(SCALE + b * ssb + hk * ssh + p * ssp, mask=p < in_use, other=0.0)
        score = tl.where(p < in_use, score, float("-inf"))
    tl.store(OUT + pid_bh.to(tl.int64) * num_pages + p, score, mask=p < num_pages)


SCORES_TUNING = dict(block_p=64, num_warps=8)  # pages per program and warps (H200, 8K pages: 13 us, was 17)


def page_scores(q, kmin, kmax, num_pages, seq_len=None, page_size=1, scale=None):
    """Quest's upper bound on each page's score, summed over the G query heads of each KV head.
    q (B, Hq, D); kmin, kmax (B, Hkv, Pmax, D) -> (B, Hkv, num_pages) fp32 (reference: kvcache.page_scores_ref).
    seq_len (an int or a device length; default: every page in use): pages past its keys score -inf and
    their bounds are not read, so a step captured for a cache of Pmax pages reads only the pages in use.
    scale (B, Hkv, Pmax) fp32: kmin, kmax are int8 bounds of that scale (kvcache.quantize_bounds),
    dequantized in registers."""
    G = _check(q, kmin, kmax, 3)
    B, Hq, D = q.shape
    Hkv, Pmax = kmin.shape[1], kmin.shape[2]
    if not 0 <= num_pages <= Pmax:
        raise ValueError(f"num_pages {num_pages} must lie in [0, {Pmax}] (pages in the metadata)")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    quantized = scale is not None
    if quantized != (kmin.dtype == torch.int8) or (quantized and tuple(scale.shape) != tuple(kmin.shape[:3])):
        raise ValueError(f"page_scores: int8 bounds need a (B, Hkv, Pmax) = {tuple(kmin.shape[:3])} scale and a "
                         f"scale needs int8 bounds; got {kmin.dtype} bounds and scale "
                         f"{None if scale is None else tuple(scale.shape)}")
    n, len_t = device_length(num_pages * page_size if seq_len is None else seq_len, Pmax * page_size)
    out = torch.empty(B, Hkv, num_pages, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    BLOCK_P = SCORES_TUNING["block_p"]
    sc = scale if quantized else out  # (never read without int8 bounds)
    _page_scores_kernel[(triton.cdiv(num_pages, BLOCK_P), B * Hkv)](
        q, kmin, kmax, sc, out, len_t if len_t is not None else out, *q.stride(), *kmin.stride(), *kmax.stride(),
        *sc.stride()[:3] if quantized else (0, 0, 0),
        Hkv, G, num_pages, n, page_size, LEN_ON_DEVICE=len_t is not None, QUANTIZED=quantized, BLOCK_P=BLOCK_P,
        BLOCK_G=triton.next_power_of_2(G), BLOCK_D=triton.next_power_of_2(D), D=D, num_warps=SCORES_TUNING["num_warps"],
        **pdl(q.device))
    return out


# ----------------------------------------------------------------------------------------------
# Quest page selection: the programs of a (batch, KV head) row find the k-th largest score, then each
# stores the kept pages of its chunk of the row
#
# torch.topk + sort on a row of 8K scores costs more than reading the selected pages. Here the k-th
# largest score is found by bisection instead: each score is mapped to an int32 key in the same order
# (flip the magnitude bits of negative floats), and halvings of [smallest key, largest key but the
# newest page's] find the largest T with at least k keys >= T, the k-th largest key (10-17 halvings for
# 8K Quest scores of random keys; fewer when a T with exactly k keys >= T turns up first). Pages above
# T are kept, then pages equal to T, lowest first, until k are kept; one running sum counts both, and
# gives each kept page its slot, so the output comes out in ascending page order without a sort.
# The halvings cannot be shared between programs (they would have to wait on each other), so every
# program of a row does them all; the running sum is what is cut in chunks: a program counts the pages
# kept before its chunk (one more reduction) and runs its sum over its own chunk only.
# Measured on an H200, 8 rows of 8K + 8 Quest scores (a 128K cache with room for new tokens), K = 256:
# the load ~4.5 us, the halvings ~7 us, one running sum over the whole row ~4.8 us; in chunks of 1024
# pages the kernel takes 12.2 us, against 16.4 in one program per row. Slower, on the same rows: cutting the range
# at 3-15 keys per pass, counts packed in one reduction (27-45 us); tl.histogram (65-150 us);
# interpolating the count instead of halving (14-16 us); the row as (rows, 16-128 pages) with two short
# scans (12.1-14.2 us, 16.5-28.6 at 8K + 20 pages); 2-4 cuts per pass in one int64 reduction (13.2-14.1 us).
# It launches the plain way, after the scores kernel has finished (no kernels.pdl): with PDL, the page
# scores + selection of 30 layers at 128K took 0.81 ms a step against 0.72-0.74 without (H200).

@triton.jit
def _select_keys(SCORES, row, ss_row, ss_p, p, num_pages):
    """The int32 keys of the scores of pages p: the newest page above all, padding below all."""
    ok = p < num_pages
    s = tl.load(SCORES + row * ss_row + p * ss_p, mask=ok, other=0.0)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 and +0.0 are one score (their bits differ)
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
    # NaN (exponent all ones, mantissa not 0; either sign) counts as +inf, as in kvcache.select_pages
    key = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7F800000, key)
    key = tl.where(p == num_pages - 1, 0x7FFFFFFF, key)  # the newest page ranks above every score
    return tl.where(ok, key, -2147483648)  # padding ranks last (and is never kept: see `ok` below)


@triton.jit
def _kept_counts(key, ok, lo):
    """Whether each page (key, ok: a page of the length) is above lo or equal to it, as one int32: above | tie << 16."""
    return (ok & (key > lo)).to(tl.int32) | ((ok & (key == lo)).to(tl.int32) << 16)


@triton.jit
def _keep_pages(OUT, row, so_row, p, key, ok, lo, ties_kept, before):
    """Store the pages of one segment kept for threshold lo at their slots; before: the packed counts
    (above | ties << 16) of the pages before it."""
    c = before + tl.cumsum(_kept_counts(key, ok, lo), 0)  # above and ties so far, one scan
    keep = ok & ((key > lo) | ((key == lo) & ((c >> 16) <= ties_kept)))  # the lowest pages among the ties
    slot = (c & 0xFFFF) + tl.minimum(c >> 16, ties_kept) - 1
    tl.store(OUT + row * so_row + slot, p, mask=keep)


@triton.jit(do_not_specialize=["num_pages", "k"])
def _select_pages_kernel(SCORES, OUT, SEQ_LEN, ss_row, ss_p, so_row, num_pages, k, n_slots, page_size,
                         LEN_ON_DEVICE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    if LEN_ON_DEVICE:  # the pages of a device length (see device_length)
        num_pages = tl.cdiv(tl.load(SEQ_LEN), page_size)
    newest = num_pages - 1  # the page of the token being decoded
    row = tl.program_id(0).to(tl.int64)
    # the row in two segments, [0, BLOCK_P) and a tail of BLOCK_T (0: none) after it, both powers of
    # two: a row of 8K + 20 pages (a 128K cache with room for the new tokens) costs 8K + 32 lanes, not 16K
    p = tl.arange(0, BLOCK_P)
    key = _select_keys(SCORES, row, ss_row, ss_p, p, num_pages)
    k = tl.minimum(k, num_pages)
    # T lies in [lo, hi): count(key >= lo) = count_lo >= k > count(key >= hi) = count_hi; at the start
    # only the newest page is >= hi. k == 1 is the newest page alone.
    lo = tl.min(tl.where(p < num_pages, key, 2147483647), 0)
    hi = tl.max(tl.where(p == newest, -2147483648, key), 0)
    if BLOCK_T > 0:
        pt = BLOCK_P + tl.arange(0, BLOCK_T)
        key_t = _select_keys(SCORES, row, ss_row, ss_p, pt, num_pages)
        lo = tl.minimum(lo, tl.min(tl.where(pt < num_pages, key_t, 2147483647), 0))
        hi = tl.maximum(hi, tl.max(tl.where(pt == newest, -2147483648, key_t), 0))
    lo = tl.where(k == 1, 2147483647, lo)
    hi = tl.maximum(hi + 1, lo + 1)
    count_lo = tl.where(k == 1, 1, num_pages)
    count_hi = 1
    while (count_lo != k) & (lo + 1 < hi):  # stop early once exactly k keys are >= lo: they are the top k
        mid = (lo & hi) + ((lo ^ hi) >> 1)  # (lo + hi) // 2 without int32 overflow
        count = tl.sum((key >= mid).to(tl.int32), 0)
        if BLOCK_T > 0:
            count += tl.sum((key_t >= mid).to(tl.int32), 0)
        enough = count >= k
        lo = tl.where(enough, mid, lo)
        count_lo = tl.where(enough, count, count_lo)
        hi = tl.where(enough, hi, mid)
        count_hi = tl.where(enough, count_hi, count)
    # exactly k keys >= lo: all kept; else lo + 1 == hi, and the count_hi pages above lo leave k - count_hi ties
    ties_kept = tl.where(count_lo == k, k, k - count_hi)
    # this program's chunk of the row, and the packed counts of the pages before it
    start = tl.program_id(1) * CHUNK
    before = tl.sum(tl.where(p < start, _kept_counts(key, p < num_pages, lo), 0), 0)
    if BLOCK_T > 0:
        before += tl.sum(tl.where(pt < start, _kept_counts(key_t, pt < num_pages, lo), 0), 0)
    pc = start + tl.arange(0, CHUNK)
    _keep_pages(OUT, row, so_row, pc, _select_keys(SCORES, row, ss_row, ss_p, pc, num_pages), pc < num_pages,
                lo, ties_kept, before)
    if tl.program_id(1) == 0:
        unused = k + tl.arange(0, BLOCK_K)  # the slots past the pages of the length
        tl.store(OUT + row * so_row + unused, tl.full([BLOCK_K], -1, tl.int32), mask=unused < n_slots)


SELECT_MAX_PAGES = 16384  # one program holds a whole score row in registers (the scan packs 16-bit counts)


def select_tuning(num_pages, rows, device):
    """(chunk, num_warps) of select_pages. H200, 8 rows, K = 256, against one program per row: 512-page
    chunks and 4 warps at 2K pages, 6.3 us against 7.0; 1024 and 8 warps at 8K, 12.2 us against 16.4
    (256-page chunks: 7.4 and 19.3 us, 2048: 7.3 and 13.2). Larger chunks when the rows alone fill the GPU."""
    chunk = 128 if num_pages <= 1024 else 512 if num_pages <= 4096 else 1024
    most = max(1, 2 * _num_sms(device) // max(rows, 1))  # programs per row
    chunk = max(chunk, triton.next_power_of_2(triton.cdiv(num_pages, most)))
    return chunk, 8 if num_pages > 4096 else 4


def select_pages(scores, seq_len, page_size, budget_pages, chunk=None):
    """Triton version of kvcache.select_pages (same arguments, same result, ties included; seq_len an int
    or a device length, see device_length), for up to SELECT_MAX_PAGES pages (kvcache.quest_pages uses
    the reference beyond). scores (B, Hkv, Pmax) -> (B, Hkv, min(budget_pages, Pmax)) int32, -1 = unused.
    chunk (a power of two >= 16; default select_tuning's): the pages one program stores."""
    if budget_pages < 1:
        raise ValueError(f"kernels.select_pages: need budget_pages >= 1, got {budget_pages}")
    *lead, P = scores.shape
    n, len_t = device_length(seq_len, P * page_size)
    num_pages = triton.cdiv(n, page_size)  # (for a device length: all Pmax, the kernel counts its own)
    if num_pages > SELECT_MAX_PAGES:
        raise ValueError(f"kernels.select_pages handles up to {SELECT_MAX_PAGES} pages, got {num_pages}")
    s, K = scores.reshape(-1, P), min(budget_pages, P)
    auto_chunk, num_warps = select_tuning(num_pages, s.shape[0], scores.device)
    chunk = chunk or auto_chunk
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"kernels.select_pages: chunk must be a power of two >= 16, got {chunk}")
    block = max(16, 1 << max(num_pages.bit_length() - 1, 0))  # the largest power of two <= num_pages, then a tail
    out = torch.empty((s.shape[0], K), dtype=torch.int32, device=scores.device)  # every slot is written
    if out.numel() == 0:
        return out.view(*lead, K)
    _select_pages_kernel[(s.shape[0], max(1, triton.cdiv(num_pages, chunk)))](
        s, out, len_t if len_t is not None else out, s.stride(0), s.stride(1), out.stride(0), num_pages, K, K,
        page_size, LEN_ON_DEVICE=len_t is not None, BLOCK_P=block,
        BLOCK_T=0 if block >= num_pages else tile_size(num_pages - block), BLOCK_K=tile_size(K), CHUNK=chunk,
        num_warps=num_warps)
    return out.view(*lead, K)
