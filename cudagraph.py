"""
Speed from outside the lesson files: model.py's small elementwise steps swapped for one-launch
kernels, and a decode step captured once in a CUDA graph and replayed.

Why its own file: it is its own lesson (what bounds a batch-1 decode step once the attention reads
only what it must), and every method gets it without knowing. Eagerly, Python launches ~60 kernels
per layer and token; at a small batch that launch time, not the memory traffic, sets the speed
(bench.py: 29 tok/s for an 8B-shaped model at 32K). A CUDA graph records one step's kernels with
their arguments and replays them in one launch. That is only correct if nothing in the step depends
on a host value that changes: attention.py's protocol asks exactly that of every decode step
(positions and lengths on the device, state updated in place), so the step replayed here is the
very code that runs eagerly, as in nano-vllm's model runner. fuse_kernels changes model.py's
modules from outside, as gpt-fast's quantize.py swaps linear layers.
"""

import torch
import torch.nn as nn

import kernels
from model import MLP, Attention, RMSNorm, RoPE


def linear(x, weight):
    """x @ weight.T. A single row (a batch-1 decode step) goes to kernels.gemv: at batch 1 a product
    reads its whole weight for one row of output, and the GEMV streams it at 91-104% of copy
    bandwidth for the 8B shapes, where cuBLAS reaches 57% (4096 x 4096) to 88% (4096 x 14336)."""
    one_row = x.numel() == x.shape[-1] and weight.stride(1) == 1
    return kernels.gemv(x, weight) if one_row else nn.functional.linear(x, weight)


def concat_weights(*linears):
    """One weight for bias-free nn.Linear layers reading the same input (one product, one launch);
    theirs become views of it: the same memory and state_dict names."""
    w = torch.cat([m.weight.detach() for m in linears])
    for m, part in zip(linears, w.split([m.out_features for m in linears])):
        m.weight = nn.Parameter(part, requires_grad=False)
    return w


class FusedRMSNorm(RMSNorm):
    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class FusedRoPE(RoPE):
    def forward(self, x, cos, sin):
        return kernels.rope(x, cos, sin)


class FastLinear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight)


class FusedAttention(Attention):
    def project(self, x):  # qkv_weight: set by fuse_kernels
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return linear(x, self.qkv_weight).split([q, kv, kv], dim=-1)


class FusedMLP(MLP):
    def forward(self, x):  # gate_up_weight: set by fuse_kernels
        gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(kernels.silu_mul(gate, up))


FUSED = {RMSNorm: FusedRMSNorm, RoPE: FusedRoPE, nn.Linear: FastLinear, Attention: FusedAttention, MLP: FusedMLP}


def fuse_kernels(model):
    """Run model.py's RMSNorm, RoPE and SiLU-times-up as one Triton kernel each (kernels.rms_norm,
    rope, silu_mul; results equal to rounding), q/k/v and gate/up as one product each, and a single
    row's products as a GEMV (linear). For inference: the fused weights are not trained. -> model"""
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
        side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.model(self.tokens, self.pos, self.attn, last_only=True, decode=True)[:, -1]
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, does not run
            self.logits = self.model(self.tokens, self.pos, self.attn, last_only=True, decode=True)[:, -1]
        return logits
