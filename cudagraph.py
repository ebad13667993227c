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

import kernels
from model import MLP, RMSNorm, RoPE


class FusedRMSNorm(RMSNorm):
    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class FusedRoPE(RoPE):
    def forward(self, x, cos, sin):
        return kernels.rope(x, cos, sin)


class FusedMLP(MLP):
    def forward(self, x):
        return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


FUSED = {RMSNorm: FusedRMSNorm, RoPE: FusedRoPE, MLP: FusedMLP}


def fuse_kernels(model):
    """Run model.py's RMSNorm, RoPE and SiLU-times-up as one Triton kernel each (kernels.rms_norm,
    rope, silu_mul; results equal to rounding). -> model"""
    for module in model.modules():
        if type(module) in FUSED:  # the same module, weights and state_dict names: only forward changes
            module.__class__ = FUSED[type(module)]
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
