"""
A Hugging Face Llama checkpoint on disk: a directory with config.json (the model's shape, read
into a ModelArgs) and model.safetensors, or shards named by model.safetensors.index.json.

    safetensors file = 8-byte little-endian header length
                     + JSON header {name: {dtype, shape, data_offsets: [begin, end]}}
                     + the raw little-endian bytes of every tensor

Its own file because the file format is not the model: model.py reads as the plain Llama, and the
loading, checking and writing live here, as nanoGPT and gpt-fast keep conversion apart. The state-dict
names need no mapping, since model.py's modules carry Hugging Face's names
(`model.layers.3.self_attn.q_proj.weight`); loading is checking each tensor against config.json and
copying it out of the memory-mapped file. load_model(path) gives a Transformer; tp.py loads one
rank's share through the same loop, the model built at the rank's shapes and each tensor sliced.
"""

import json
import math
import mmap
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from model import ModelArgs, Transformer

# ModelArgs field -> its key in a Hugging Face LlamaConfig (config.json), in config.json's order
HF_KEYS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
           "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
           "rope_scaling": "rope_scaling", "max_seq_len": "max_position_embeddings",
           "tie_embeddings": "tie_word_embeddings"}


def args_from_hf_config(cfg, source="config.json"):
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
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
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
    return ModelArgs(**kw)


def hf_config(args):
    """ModelArgs -> the config.json dict Hugging Face's LlamaForCausalLM reads."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **{key: getattr(args, name) for name, key in HF_KEYS.items()},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def load_args(path):
    """The ModelArgs of checkpoint directory `path`, from its config.json."""
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
    return args_from_hf_config(cfg, source=str(cfg_file))


def load_model(path, dtype=torch.float32, device="cpu", max_seq_len=None, shapes=None, part=None):
    """A Transformer (eval mode, no grads) from checkpoint directory `path`, cast to dtype on device,
    its context set to max_seq_len if given. shapes(args) -> the ModelArgs to build the model at
    (default: config.json's); part(name, t) -> the piece of checkpoint tensor t, a view of the
    memory-mapped file, that the model holds (default: all of it). Only that piece is copied, so only
    the file pages it lies on are read."""
    path = Path(path)
    args = load_args(path)
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len
    a = args if shapes is None else shapes(args)
    # a large model is built on the meta device (no memory, no init); a small one on the CPU, whose
    # init takes milliseconds where meta tensors first import torch._dynamo (1-2 s)
    n_params = 2 * a.vocab_size * a.dim + a.n_layers * (2 * a.dim * a.head_dim * (a.n_heads + a.n_kv_heads)
                                                        + 3 * a.dim * a.hidden_dim)
    with torch.device("meta" if n_params > 50_000_000 else "cpu"):
        model = Transformer(a)
    state = load_safetensors_dir(path)  # views of the mapping: nothing read yet
    params = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and a.tie_embeddings:
            continue  # tied back to embed_tokens below
        if name not in state:
            raise KeyError(f"{path}: tensor {name!r} is missing from the checkpoint")
        t = state[name]
        piece = t if part is None else part(name, t)
        if tuple(piece.shape) != tuple(p.shape):
            got = f"{tuple(t.shape)}" + ("" if part is None else f" (its part: {tuple(piece.shape)})")
            raise ValueError(f"{path}: tensor {name!r} has shape {got}, expected {tuple(p.shape)} from config.json")
        # copy out of the mapping, one tensor at a time: the file may be rewritten while we run
        params[name] = nn.Parameter(piece.to(device=device, dtype=dtype, copy=True), requires_grad=False)
    model.load_state_dict(params, strict=False, assign=True)
    if a.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def save_model(model, path, dtype=None):
    """Write config.json + model.safetensors (Hugging Face layout). dtype: cast on save."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(model.args), indent=2) + "\n")
    state = {k: v.to(dtype or v.dtype) for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:  # the file holds the shared matrix once, as embed_tokens
        state.pop("lm_head.weight")
    save_safetensors(state, path / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# safetensors, read and written by hand (the layout in the docstring above)

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
