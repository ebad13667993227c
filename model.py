"""
A Llama decoder, the model only (its checkpoint files: checkpoint.py; the tokenizer: tokenizer.py).

    x = embed(tokens)
    for each layer:  x = x + o_proj(attn(rope(q_proj(n(x))), rope(k_proj(n(x))), v_proj(n(x))))
                     x = x + down_proj(silu(gate_proj(n(x))) * up_proj(n(x)))      (n = RMSNorm)
    logits = lm_head(norm(x))

The model knows nothing of sparse attention, nor of speed tricks (cudagraph.py swaps in fused
kernels from outside). Each layer hands its rotated q and its k, v to the attention object it is
given, `attn.prefill(layer_idx, q, k, v, input_pos)` or `attn.decode(...)` (protocol: attention.py),
which owns the KV cache and decides what to read (dense, Quest, RetroAttention, Token Sparse,
compacted); with attn=None the layer runs plain causal attention (training, full-sequence eval).

Module names mirror Hugging Face's LlamaForCausalLM, so checkpoint.py loads one by dropping nothing
and renaming nothing: `model.layers.3.self_attn.q_proj.weight` is
`self.model.layers[3].self_attn.q_proj.weight` here too.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    rope_scaling: dict = field(default=None)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"num_attention_heads ({self.n_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.n_kv_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3, linear)")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), computed in fp32 as the reference implementations do (a
        # low-precision variance loses bits), then scaled by the learned weight
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(args):
    """cos, sin (max_seq_len, D) fp32 of the rotary embedding, built in fp64, with Llama 3's
    long-context rescaling if asked. Llama 3.1 ("llama3" type): wavelengths longer than
    original_context / low_freq_factor are slowed down by `factor`, shorter than
    original_context / high_freq_factor are kept, those between are interpolated smoothly."""
    D = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    s = args.rope_scaling or {}
    if s.get("rope_type") == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s.get("rope_type") == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / lo, inv_freq / factor,
                               torch.where(wavelen < old_ctx / hi, inv_freq, scaled))
    freqs = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)  # dimension i and i + D/2 turn by the same angle
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos, sin (T, D). HF layout: dimension i pairs with i + D/2 ("rotate_half")."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos[None, :, None] + rotated * sin[None, :, None]).to(x.dtype)


class RoPE(nn.Module):
    """apply_rope as a module, so that a faster one can be swapped in from outside (cudagraph.py)."""

    def forward(self, x, cos, sin):
        return apply_rope(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, args, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.rope = RoPE()

    def project(self, x):  # (cudagraph.FusedAttention makes the three one matrix product)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotate(self, q, k, cos, sin):  # (cudagraph.FusedAttention turns both in one launch)
        return self.rope(q, cos, sin), self.rope(k, cos, sin)

    def forward(self, x, cos, sin, input_pos, attn, decode):
        return self.o_proj(self.attend(x, cos, sin, input_pos, attn, decode))

    def attend(self, x, cos, sin, input_pos, attn, decode):
        """Everything but the output projection: x (B, T, dim) -> the heads' outputs (B, T, Hq * D)."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.rotate(q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim),
                           cos, sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if attn is None:  # plain causal attention over these T tokens, no cache
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
            o = o.transpose(1, 2)
        else:
            o = (attn.decode if decode else attn.prefill)(self.layer_idx, q, k, v, input_pos)
        return o.reshape(B, T, -1)


class MLP(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, input_pos, attn, decode):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, attn, decode)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(  # (Hugging Face's LlamaModel: its names, no code of its own)
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args, i) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps)))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_cache = None

    @property
    def layers(self):
        return self.model.layers

    def init_weights(self, seed=0):
        """GPT-2 style init: N(0, 0.02), residual projections scaled down by depth."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                std = 0.02 / math.sqrt(2 * self.args.n_layers) if residual else 0.02
                norm = name.endswith("norm.weight")
                p.copy_(torch.ones_like(p) if norm else torch.randn(p.shape, generator=g) * std)

    def rope(self, input_pos):
        """cos, sin (T, D) in fp32 for the given positions (table built once per device)."""
        dev = self.lm_head.weight.device
        if self._rope_cache is None or self._rope_cache[0].device != dev:
            self._rope_cache = [t.to(dev) for t in rope_tables(self.args)]
        pos = input_pos.to(dev)
        return self._rope_cache[0][pos], self._rope_cache[1][pos]

    def forward(self, tokens, input_pos=None, attn=None, last_only=False, decode=False):
        """tokens (B, T) -> logits (B, T, V) fp32 (or (B, 1, V) with last_only).
        input_pos (T,) int64: absolute positions of the tokens. attn: the attention object (see
        attention.py), or None for plain causal attention over the tokens. decode: the tokens are a
        decode step (attn.decode, input_pos on the model's device), else a prefill (attn.prefill,
        input_pos on the CPU)."""
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T)
        if input_pos.device.type == "cpu" and int(input_pos[-1]) >= self.args.max_seq_len:  # (no sync on a GPU)
            raise ValueError(f"position {int(input_pos[-1])} is beyond the model's context of "
                             f"{self.args.max_seq_len} tokens")
        cos, sin = self.rope(input_pos)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, input_pos, attn, decode)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()
