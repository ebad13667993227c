"""
Speed from outside the lesson files: a decode step captured once in a CUDA graph and replayed, and
the model's small elementwise steps swapped for one-launch kernels.

Why its own file: it is its own lesson (what bounds a batch-1 decode step once the attention reads
only what it must), and every method gets it without knowing. Eagerly, Python launches ~60 kernels
per layer and token, and at a small batch that launch time, not the memory traffic, sets the speed
(bench.py: 29 tok/s for an 8B-shaped model at 32K). A CUDA graph records the kernels of one step with
their arguments and replays them with one launch. That is only correct if nothing in the step
depends on a host value that changes; attention.py's protocol asks exactly that of every decode
step (positions and lengths on the device, state updated in place), so the step replayed here is
the very code that runs eagerly (nano-vllm's model runner works this way).

fuse_kernels swaps modules of model.py for fused ones, as gpt-fast's quantize.py swaps linear
layers: model.py stays the plain Llama.
"""

import torch
import torch.nn as nn

import kernels
from model import MLP, RMSNorm, RoPE


class FusedRMSNorm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class FusedRoPE(nn.Module):
    def forward(self, x, cos, sin):
        return kernels.rope(x, cos, sin)


class FusedMLP(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


FUSED = {RMSNorm: FusedRMSNorm, RoPE: lambda _: FusedRoPE(), MLP: FusedMLP}


def fuse_kernels(model):
    """Swap model.py's RMSNorm, RoPE and SiLU-times-up for one Triton kernel each (kernels.rms_norm,
    rope, silu_mul) instead of ~25 PyTorch ops per layer; same weights, same state_dict names.
    Results agree to rounding; what drops is the number of launches, which bounds a batch-1 decode
    step under a CUDA graph (eagerly, Python per launch costs more than it saves). -> model"""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in FUSED:
                setattr(parent, name, FUSED[type(child)](child))
    return model


def unsupported(attn, device):
    """Why attn's decode step cannot be captured (None if it can)."""
    if device.type != "cuda":
        return "CUDA graphs need --device cuda"
    if not attn.use_kernels:
        return "a captured decode step runs the Triton kernels (--kernels triton or auto)"
    return None


class GraphDecodeStep:
    """model(tokens, pos, attn, decode=True), captured in a CUDA graph on its first call and replayed
    on every later one. The first call runs the step eagerly (its real work, and the warm-up: Triton
    compiles, cuBLAS picks kernels), then records it; a replay copies the new tokens and positions
    into the recorded input tensors and re-runs the kernels, which update the cache in place."""

    def __init__(self, model, attn):
        self.model, self.attn, self.graph = model, attn, None

    def _step(self):
        return self.model(self.tokens, self.pos, self.attn, last_only=True, decode=True)[:, -1]

    def __call__(self, tokens, pos):
        """tokens (B, m) long and their positions pos (m,) int64, on the GPU, the last one new ->
        the last row's next-token logits (B, V) fp32. m must stay the same from call to call."""
        if self.graph is None:
            self.tokens, self.pos = tokens.clone(), pos.clone()
            side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs asks
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, does not run
                self.logits = self._step()
            return logits
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits
