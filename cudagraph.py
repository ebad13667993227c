"""
Speed from outside the lesson files: model.py's small elementwise steps swapped for the one-launch
Triton kernels written here, and a decode step captured once in a CUDA graph and replayed. The kernels
live here, not in kernels.py: no idea shares them, and model.py holds their references.

Why its own file: it is its own lesson (what bounds a batch-1 decode step once the attention reads
only what it must), and every method gets it without knowing. Eagerly, Python launches ~60 kernels
per layer and token; at a small batch that launch time, not the memory traffic, sets the speed
(bench.py: 29 tok/s for an 8B-shaped model at 32K). A CUDA graph records one step's kernels with
their arguments and replays them in one launch. That is only correct if nothing in the step depends
on a host value that changes: attention.py's protocol asks exactly that of every decode step
(positions and lengths on the device, state updated in place), so the step replayed here is the
very code that runs eagerly, as in nano-vllm's model runner. fuse_kernels changes model.py's
modules from outside, as gpt-fast's quantize.py swaps linear layers. On a Hopper GPU each Triton
kernel of the step may launch before the one before it has finished, and waits for its inputs
(kernels.pdl): the launch is hidden behind the last kernel's tail.
"""

import torch
import torch.nn as nn
import triton
import triton.language as tl

from kernels import dot_precision, pdl, wait_for_inputs
from model import MLP, Attention, Block, RMSNorm, RoPE


# ----------------------------------------------------------------------------------------------
# The model's small elementwise steps, one launch each (references: model.RMSNorm, model.apply_rope,
# model.MLP). At batch 1 under a CUDA graph a decode step is a chain of ~30 kernels per layer, and
# each costs microseconds whatever its size: these three replace ~22 of them. Then the batch-1
# matrix-vector product (reference: F.linear; linear() below says why).

@triton.jit
def _rms_norm_kernel(X, WEIGHT, Y, n_cols, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < n_cols
    x = tl.load(X + row * n_cols + c, mask=ok, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    y = y.to(Y.dtype.element_ty).to(tl.float32)  # as the reference: normalize in fp32, round, then scale
    w = tl.load(WEIGHT + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + c, (w * y).to(Y.dtype.element_ty), mask=ok)


def rms_norm(x, weight, eps):
    """model.RMSNorm in one launch: x (..., dim), weight (dim,) -> same shape and dtype as x."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be (dim,) for x {tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty_like(x)
    _rms_norm_kernel[(x.numel() // n,)](x, weight.contiguous(), y, n, eps, BLOCK=triton.next_power_of_2(n),
                                        num_warps=8, **pdl(x.device))
    return y


@triton.jit
def _rope_kernel(X, COS, SIN, Y, sxb, sxt, sxh, syb, syt, syh, T, H, HALF: tl.constexpr, BLOCK: tl.constexpr,
                 PDL: tl.constexpr):
    wait_for_inputs(PDL)
    pid = tl.program_id(0)  # one (batch, token, head) row of D = 2 * HALF values
    b = (pid // (T * H)).to(tl.int64)
    t = ((pid // H) % T).to(tl.int64)
    h = (pid % H).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < HALF
    X += b * sxb + t * sxt + h * sxh
    x1 = tl.load(X + i, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + HALF + i, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(COS + t * 2 * HALF + i, mask=ok, other=0.0)
    c2 = tl.load(COS + t * 2 * HALF + HALF + i, mask=ok, other=0.0)
    s1 = tl.load(SIN + t * 2 * HALF + i, mask=ok, other=0.0)
    s2 = tl.load(SIN + t * 2 * HALF + HALF + i, mask=ok, other=0.0)
    Y += b * syb + t * syt + h * syh
    tl.store(Y + i, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=ok)  # dimension i pairs with i + D/2
    tl.store(Y + HALF + i, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=ok)


def rope(x, cos, sin):
    """model.apply_rope in one launch: x (B, T, H, D) with unit stride along D; cos, sin (T, D) fp32."""
    B, T, H, D = x.shape
    if x.stride(-1) != 1 or D % 2 or cos.shape != (T, D) or sin.shape != (T, D):
        raise ValueError(f"rope: x {tuple(x.shape)} needs an even head dim with unit stride and cos, sin (T, D), "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)}")
    y = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
    if y.numel():
        _rope_kernel[(B * T * H,)](x, cos.float().contiguous(), sin.float().contiguous(), y,
                                   x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
                                   T, H, HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), num_warps=1,
                                   **pdl(x.device))
    return y


@triton.jit
def _silu_mul_kernel(GATE, UP, Y, n, sg, su, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(GATE + row * sg + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(UP + row * su + i, mask=ok, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)  # silu rounded, as F.silu
    tl.store(Y + row * n + i, (a * u).to(Y.dtype.element_ty), mask=ok)


def silu_mul(gate, up):
    """F.silu(gate) * up (the SwiGLU of model.MLP) in one launch; tensors of one shape -> that shape, gate.dtype.
    Rows are read with their own stride: the two halves of a gate | up product need no copy."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    n = gate.shape[-1]
    g, u = (t.reshape(-1, n) for t in (gate, up))  # (views where the rows have one stride, as chunk's halves)
    g, u = (t if t.stride(-1) == 1 else t.contiguous() for t in (g, u))
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if y.numel():
        _silu_mul_kernel[(g.shape[0], triton.cdiv(n, 1024))](g, u, y, n, g.stride(0), u.stride(0), BLOCK=1024,
                                                             num_warps=4, **pdl(y.device))
    return y


@triton.jit
def _gemv_kernel(X, W, R, Y, N, K, swn, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    wait_for_inputs(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # per-lane partial sums, reduced once at the end
    for k0 in range(0, K, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(W + n[:, None].to(tl.int64) * swn + c[None, :], mask=(n[:, None] < N) & (c[None, :] < K), other=0.0)
        acc += w.to(tl.float32) * tl.load(X + c, mask=c < K, other=0.0).to(tl.float32)[None, :]
    y = tl.sum(acc, 1).to(Y.dtype.element_ty)
    if RESIDUAL:  # the residual stream's add, rounded after the product as x + linear(h) rounds
        y = (y.to(tl.float32) + tl.load(R + n, mask=n < N, other=0.0).to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + n, y, mask=n < N)


def gemv(x, weight, residual=None):
    """F.linear(x, weight) for x (..., K) holding one row; weight (N, K) with unit stride along K.
    Each program streams BLOCK_N whole rows of the weight, BLOCK_K columns at a time.
    residual (..., N): returned plus the product (residual + linear(x, weight), one launch)."""
    N, K = weight.shape
    if x.numel() != K or x.shape[-1] != K or weight.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} must be one row of {K} values and weight {tuple(weight.shape)} "
                         f"unit-stride along K")
    if residual is not None and (residual.numel() != N or residual.dtype != x.dtype):
        raise ValueError(f"gemv: residual {tuple(residual.shape)} {residual.dtype} must be one row of {N} {x.dtype} values")
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    r = residual.contiguous() if residual is not None else y  # (never read without a residual)
    block_k = 1024 if N <= 4096 else 512 if N <= 8192 else 256  # longer tiles when fewer programs (H200, 8B shapes)
    _gemv_kernel[(triton.cdiv(N, 16),)](x.contiguous(), weight, r, y, N, K, weight.stride(0),
                                        RESIDUAL=residual is not None, BLOCK_N=16, BLOCK_K=block_k,
                                        num_warps=8 if block_k > 256 else 4, num_stages=2, **pdl(y.device))
    return y


@triton.jit
def _few_rows_kernel(X, W, R, Y, M, N, K, swn, RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, 16)  # the rows, padded to the 16 tl.dot wants
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * K + c[None, :], mask=(m[:, None] < M) & (c[None, :] < K), other=0.0)
        w = tl.load(W + n[:, None].to(tl.int64) * swn + c[None, :], mask=(n[:, None] < N) & (c[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    y = acc.to(Y.dtype.element_ty)
    ok = (m[:, None] < M) & (n[None, :] < N)
    if RESIDUAL:  # as gemv's
        y = (y.to(tl.float32) + tl.load(R + m[:, None] * N + n[None, :], mask=ok, other=0.0).to(tl.float32)
             ).to(Y.dtype.element_ty)
    tl.store(Y + m[:, None] * N + n[None, :], y, mask=ok)


MAX_FEW_ROWS = 16  # rows of one tl.dot tile


def few_rows(x, weight, residual=None):
    """gemv for x (..., K) holding 1 to MAX_FEW_ROWS rows (Retro's window, a small batch): each program
    still reads its BLOCK_N rows of the weight once, now for all rows, the product on the tensor cores
    (tl.dot, the rows padded to 16). H200, 8B shapes, 2 or 8 rows, against cuBLAS: 4096 x 4096 11.2 us
    against 13.4 (one-row gemv 10.2), 4096 x 14336 29.7 against 31.4, 6144 x 4096 14.9 against 15.5,
    28672 x 4096 55.6 against 54.9. residual: as gemv's."""
    N, K = weight.shape
    M = x.numel() // max(K, 1)
    if x.shape[-1] != K or not 1 <= M <= MAX_FEW_ROWS or weight.stride(1) != 1:
        raise ValueError(f"few_rows: x {tuple(x.shape)} must be 1 to {MAX_FEW_ROWS} rows of {K} values and weight "
                         f"{tuple(weight.shape)} unit-stride along K")
    if residual is not None and (residual.shape != (*x.shape[:-1], N) or residual.dtype != x.dtype):
        raise ValueError(f"few_rows: residual {tuple(residual.shape)} {residual.dtype} must be "
                         f"{(*x.shape[:-1], N)} {x.dtype}")
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    r = residual.contiguous() if residual is not None else y  # (never read without a residual)
    wide = x.element_size() > 2  # fp32: tiles of 4 bytes, fewer in shared memory
    block_n, block_k, stages = ((32, 128, 2) if wide else (32, 512, 4) if N <= 4096 or K >= 8192 else
                                (32, 128, 3) if N > 16384 else (64, 256, 4))
    _few_rows_kernel[(triton.cdiv(N, block_n),)](
        x.contiguous(), weight, r, y, M, N, K, weight.stride(0), RESIDUAL=residual is not None,
        PRECISION=dot_precision(x.dtype), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        num_stages=stages, **pdl(y.device))
    return y


def linear(x, weight, residual=None):
    """x @ weight.T, plus residual (same shape as the product) if given. At a batch-1 decode step a
    product reads its whole weight for a row or a few: one row goes to gemv, which streams the weight at
    91-104% of copy bandwidth for the 8B shapes where cuBLAS reaches 57% (4096 x 4096) to 88% (4096 x
    14336); 2 to 16 rows to few_rows, but for the widest products (gate | up: 28672 outputs) where cuBLAS
    is 0.7 us faster; more rows to cuBLAS."""
    rows = x.numel() // max(x.shape[-1], 1)
    if weight.stride(1) == 1 and rows == 1:
        return gemv(x, weight, residual)
    if weight.stride(1) == 1 and 1 < rows <= MAX_FEW_ROWS and weight.shape[0] <= 16384:
        return few_rows(x, weight, residual)
    y = nn.functional.linear(x, weight)
    return y if residual is None else residual + y


def concat_weights(*linears):
    """One weight for bias-free nn.Linear layers reading the same input (one product, one launch);
    theirs become views of it: the same memory and state_dict names."""
    w = torch.cat([m.weight.detach() for m in linears])
    for m, part in zip(linears, w.split([m.out_features for m in linears])):
        m.weight = nn.Parameter(part, requires_grad=False)
    return w


class FusedRMSNorm(RMSNorm):
    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class FusedRoPE(RoPE):
    def forward(self, x, cos, sin):
        return rope(x, cos, sin)


class FastLinear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight)


class FusedAttention(Attention):
    def project(self, x):  # qkv_weight: set by fuse_kernels
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return linear(x, self.qkv_weight).split([q, kv, kv], dim=-1)

    def rotate(self, q, k, cos, sin):
        """q and k, side by side in each row of the q | k | v product, turned in one launch."""
        B, T, Hq, D = q.shape
        side_by_side = (q.stride() == k.stride() and q.stride()[2:] == (D, 1) and
                        k.data_ptr() == q.data_ptr() + Hq * D * q.element_size())
        if not side_by_side:
            return super().rotate(q, k, cos, sin)
        both = rope(q.as_strided((B, T, Hq + k.shape[2], D), q.stride()), cos, sin)
        return both[:, :, :Hq], both[:, :, Hq:]


class FusedMLP(MLP):
    def forward(self, x):
        return self.down_proj(self.swiglu(x))

    def swiglu(self, x):  # what down_proj reads; gate_up_weight: set by fuse_kernels
        gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return silu_mul(gate, up)


class FusedBlock(Block):
    """The residual adds of a decode step done by the products that end each half of the block (o_proj,
    down_proj: linear's residual): two launches fewer per layer (each ~1-2 us in a graph). The SwiGLU
    stays its own launch: computed inside the down GEMV, by every program for its whole input, it cost
    that GEMV 39 us against 32 for silu_mul + GEMV + add (H200, 8B shapes). A projection with hooks
    (tp.py's all-reduce must come before the add) runs model.Block."""

    def forward(self, x, cos, sin, input_pos, attn, decode):
        a, mlp = self.self_attn, self.mlp
        if a.o_proj._forward_hooks or mlp.down_proj._forward_hooks:
            return super().forward(x, cos, sin, input_pos, attn, decode)
        x = linear(a.attend(self.input_layernorm(x), cos, sin, input_pos, attn, decode), a.o_proj.weight, residual=x)
        return linear(mlp.swiglu(self.post_attention_layernorm(x)), mlp.down_proj.weight, residual=x)


FUSED = {RMSNorm: FusedRMSNorm, RoPE: FusedRoPE, nn.Linear: FastLinear, Attention: FusedAttention, MLP: FusedMLP,
         Block: FusedBlock}


def fuse_kernels(model):
    """Run model.py's RMSNorm, RoPE and SiLU-times-up as one Triton kernel each (rms_norm,
    rope, silu_mul; results equal to rounding), q/k/v and gate/up as one product each, the products of
    1-16 rows as a GEMV (linear), the residual adds inside those products (FusedBlock), and
    q and k turned in one launch (FusedAttention.rotate). For inference: the fused weights are not trained. -> model"""
    for m in model.modules():
        # the same module, weights and state_dict names: only forward changes (model.py's layers have no bias)
        if type(m) in FUSED and getattr(m, "bias", None) is None:
            m.__class__ = FUSED[type(m)]
        if type(m) is FusedAttention:
            m.qkv_weight = concat_weights(m.q_proj, m.k_proj, m.v_proj)
        if type(m) is FusedMLP:
            m.gate_up_weight = concat_weights(m.gate_proj, m.up_proj)
    return model


def unsupported(attn, device):
    """Why attn's decode step cannot be captured (None if it can)."""
    if device.type != "cuda":
        return "CUDA graphs need --device cuda"
    if not attn.use_kernels:
        return "a captured decode step runs the Triton kernels (--kernels triton or auto)"
    return None


class GraphDecodeStep:
    """model(tokens, pos, attn, decode=True), run eagerly on its first call (the real step and the
    warm-up: Triton compiles, cuBLAS picks kernels), then recorded in a CUDA graph; a later call copies
    its tokens and positions into the recorded inputs and replays the kernels (they update the cache)."""

    def __init__(self, model, attn, device):
        if why := unsupported(attn, device):
            raise ValueError(f"--cuda-graph: {why}")
        self.model, self.attn, self.graph = model, attn, None

    def __call__(self, tokens, pos):
        """tokens (B, m) long and their positions pos (m,) int64, on the GPU, the last one new ->
        the last row's next-token logits (B, V) fp32. m must stay the same from call to call."""
        if self.graph is not None:
            self.tokens.copy_(tokens)
            self.pos.copy_(pos)
            self.graph.replay()
            return self.logits
        self.tokens, self.pos = tokens.clone(), pos.clone()
        step = lambda: self.model(self.tokens, self.pos, self.attn, last_only=True, decode=True)[:, -1]  # noqa: E731
        side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, does not run
            self.logits = step()
        return logits
