"""
A Llama decoder and its Hugging Face checkpoint format, in one file (the tokenizer is tokenizer.py).

    x = embed(tokens)
    for each layer:  x = x + o_proj(attn(rope(q_proj(n(x))), rope(k_proj(n(x))), v_proj(n(x))))
                     x = x + down_proj(silu(gate_proj(n(x))) * up_proj(n(x)))      (n = RMSNorm)
    logits = lm_head(norm(x))

The model knows nothing of sparse attention, nor of speed tricks (cudagraph.py swaps in fused
kernels from outside). Each layer hands its rotated q and its k, v to the attention object it is
given, `attn.prefill(layer_idx, q, k, v, input_pos)` or `attn.decode(...)` (protocol: attention.py),
which owns the KV cache and decides what to read (dense, Quest, RetroAttention, Token Sparse,
compacted); with attn=None the layer runs plain causal attention (training, full-sequence eval).

Module names mirror Hugging Face's LlamaForCausalLM, so loading a checkpoint is a matter of
dropping nothing and renaming nothing: `model.layers.3.self_attn.q_proj.weight` is
`self.model.layers[3].self_attn.q_proj.weight` here too.
"""

import json
import math
import mmap
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ModelArgs field -> its key in a Hugging Face LlamaConfig (config.json), in config.json's order
HF_KEYS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
           "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
           "rope_scaling": "rope_scaling", "max_seq_len": "max_position_embeddings",
           "tie_embeddings": "tie_word_embeddings"}


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

    @classmethod
    def from_hf_config(cls, cfg, source="config.json"):
        """Read a Hugging Face LlamaConfig dict (Llama 2/3/3.1/3.2 and Llama-compatible)."""
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object of config keys, got a JSON {type(cfg).__name__}")
        if "model_type" not in cfg:
            arch = cfg.get("architectures") or []
            if arch != ["LlamaForCausalLM"] and arch:
                raise ValueError(f"{source}: no model_type, and architectures {arch} is not LlamaForCausalLM "
                                 f"(only Llama checkpoints are supported)")
            print(f"[config] {source} has no model_type: loading it as Llama", file=sys.stderr)
        elif cfg["model_type"] != "llama":
            raise ValueError(f"{source}: model_type {cfg.get('model_type')!r} is not supported (only 'llama')")
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "vocab_size")
        integers = required + ("num_key_value_heads", "head_dim", "max_position_embeddings")
        for key in integers + ("rms_norm_eps", "rope_theta"):
            value, kind = cfg.get(key), "integer" if key in integers else "number"
            if value is None and key in required:
                raise ValueError(f"{source}: missing key {key!r}")
            types = (int, float) if kind == "number" else int
            if value is not None and (not isinstance(value, types) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{source}: {key} must be a positive {kind}, got {value!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError(f"{source}: attention_bias / mlp_bias are not supported")
        # RoPE settings: on the Hub as top-level rope_theta + rope_scaling; transformers 5 writes
        # them together as rope_parameters.
        rope = cfg.get("rope_parameters") or {}
        scaling = {k: v for k, v in (cfg.get("rope_scaling") or rope).items() if k != "rope_theta"}
        scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        kw = {name: cfg[key] for name, key in HF_KEYS.items() if cfg.get(key) is not None}
        kw.setdefault("n_kv_heads", kw["n_heads"])
        kw.setdefault("head_dim", kw["dim"] // kw["n_heads"])
        kw.update(rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                  rope_scaling=None if scaling["rope_type"] == "default" else scaling,
                  tie_embeddings=bool(kw.get("tie_embeddings", False)))
        return cls(**kw)

    def to_hf_config(self):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                **{key: getattr(self, name) for name, key in HF_KEYS.items()},
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


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

    def forward(self, x, cos, sin, input_pos, attn, decode):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = self.rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = self.rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if attn is None:  # plain causal attention over these T tokens, no cache
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
            o = o.transpose(1, 2)
        else:
            o = (attn.decode if decode else attn.prefill)(self.layer_idx, q, k, v, input_pos)
        return self.o_proj(o.reshape(B, T, -1))


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

    # -- checkpoints ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", max_seq_len=None):
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} is missing: a checkpoint directory needs a Hugging Face config.json")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        args = ModelArgs.from_hf_config(cfg, source=str(cfg_file))
        if max_seq_len is not None:
            args.max_seq_len = max_seq_len
        # a large model is built on the meta device (no memory, no init); a small one on the CPU, whose
        # init takes milliseconds where meta tensors first import torch._dynamo (1-2 s)
        a = args
        n_params = 2 * a.vocab_size * a.dim + a.n_layers * (2 * a.dim * a.head_dim * (a.n_heads + a.n_kv_heads)
                                                            + 3 * a.dim * a.hidden_dim)
        with torch.device("meta" if n_params > 50_000_000 else "cpu"):
            model = cls(args)
        state = load_safetensors_dir(path)
        params = {}
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and args.tie_embeddings:
                continue  # tied back to embed_tokens below
            if name not in state:
                raise KeyError(f"{path}: tensor {name!r} is missing from the checkpoint")
            t = state[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)} "
                                 f"from config.json")
            # copy out of the mapping, one tensor at a time: the file may be rewritten while we run
            params[name] = nn.Parameter(t.to(device=device, dtype=dtype, copy=True), requires_grad=False)
        model.load_state_dict(params, strict=False, assign=True)
        if args.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def save_pretrained(self, path, dtype=None):
        """Write config.json + model.safetensors (Hugging Face layout). dtype: cast on save."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.args.to_hf_config(), indent=2) + "\n")
        state = {k: v.to(dtype or v.dtype) for k, v in self.state_dict().items()}
        if self.args.tie_embeddings:  # the file holds the shared matrix once, as embed_tokens
            state.pop("lm_head.weight")
        save_safetensors(state, path / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# safetensors, read and written by hand: 8-byte little-endian header length, a JSON header
# {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian tensor bytes.

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def load_safetensors(file):
    """Memory-map one .safetensors file -> {name: tensor} viewing the mapped bytes (no copy)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n <= 0 or 8 + n > size:
            raise ValueError(f"{file} is not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{file} is not a safetensors file (header is not JSON)") from None
        # copy-on-write mapping: pages are read lazily and the tensors may be written without touching the file
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the safetensors header must be a JSON object {{name: {{dtype, shape, "
                         f"data_offsets}}}}, got a JSON {type(header).__name__}")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info] if isinstance(info, dict) else None
        if missing is None or missing:
            raise ValueError(f"{file}: header entry for tensor {name!r} must be an object with dtype, shape and "
                             f"data_offsets; " + (f"it lacks {', '.join(missing)}" if missing else f"got {info!r:.60}"))
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype, shape, offsets = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{file}: tensor {name!r} needs shape a list of sizes and data_offsets [begin, end], "
                             f"got {shape!r} and {offsets!r}")
        begin, end = offsets
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or 8 + n + end > size:
            raise ValueError(f"{file}: tensor {name!r} has inconsistent data_offsets")
        if count == 0:  # (torch.frombuffer refuses an empty view)
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin).view(shape)
    return out


def load_safetensors_dir(path):
    """A checkpoint directory's tensors: model.safetensors, or the shards named by model.safetensors.index.json."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
    return {name: t for shard in shards for name, t in load_safetensors(path / shard).items()}


def save_safetensors(state, file):
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
