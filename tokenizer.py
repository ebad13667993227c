"""
Text <-> token ids: tiktoken BPE built from a checkpoint's tokenizer files.

Its own file because it is its own idea: the model (model.py) maps token ids to logits and knows
nothing of text; the attention methods know nothing of either. What is here turns a checkpoint's
tokenizer into tiktoken's mergeable ranks:

    tokenizer.model   a tiktoken rank file, "base64(token bytes) rank" per line (Llama 3.x, or one
                      train.py wrote, with tokenizer_config_nanokv.json beside it for the pattern,
                      special tokens and chat format)
    tokenizer.json    a Hugging Face byte-level BPE (GPT-2 / SmolLM2 / Llama 3 style): tokens are
                      spelled with GPT-2's byte->character map, ids are in merge order, so rank = id

and adds the special tokens, stop ids and a one-turn chat template. convert_gguf.py uses
bytes_to_unicode to spell a GGUF's vocabulary the same way.
"""

import base64
import json
from pathlib import Path

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CHAT_TEMPLATES = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
}


def _llama3_specials(n_base):
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
    return {name: n_base + i for i, name in enumerate(names)}


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters (how byte-level BPE vocabs are spelled)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_rank_file(file):
    try:
        text = Path(file).read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not a tiktoken rank file ('base64-token rank' lines of text)") from None
    ranks = {}
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError:
            raise ValueError(f"{file}:{i + 1}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


def write_rank_file(ranks, file):
    with open(file, "w") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


class Tokenizer:
    """encode/decode on tiktoken. Built from a checkpoint directory (or a tokenizer file) holding
    tokenizer.model (+ optional tokenizer_config_nanokv.json) or an HF tokenizer.json."""

    def __init__(self, path):
        import tiktoken
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist (expected a directory with "
                                    f"tokenizer.model or tokenizer.json)")
        d = path if path.is_dir() else path.parent
        model_file = path if path.is_file() and path.name != "tokenizer.json" else d / "tokenizer.model"
        json_file = path if path.name == "tokenizer.json" else d / "tokenizer.json"
        cfg_file = d / "tokenizer_config_nanokv.json"
        if model_file.is_file():
            if model_file.read_bytes()[:1] == b"\x0a":  # a protobuf's first field tag: SentencePiece
                raise ValueError(f"{model_file} is a SentencePiece model (Llama 2 / CodeLlama / TinyLlama), which "
                                 f"is not supported: expected a tiktoken rank file (Llama 3.x) or a byte-level BPE "
                                 f"tokenizer.json")
            ranks = read_rank_file(model_file)
            if cfg_file.is_file():
                cfg = json.loads(cfg_file.read_text())
            else:  # a bare rank file: Llama 3's tokenizer.model
                cfg = {"pattern": LLAMA3_PATTERN, "special_tokens": _llama3_specials(len(ranks)),
                       "bos": "<|begin_of_text|>", "eos": ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"],
                       "chat_format": "llama3"}
        elif json_file.is_file():
            ranks, cfg = _hf_tokenizer_json(json_file)
        else:
            raise FileNotFoundError(f"{d} holds no tokenizer: expected tokenizer.model (tiktoken ranks) or tokenizer.json")
        self.special_tokens = dict(cfg.get("special_tokens", {}))
        self.enc = tiktoken.Encoding(name=d.name or "nanokv", pat_str=cfg["pattern"], mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens.get(cfg["bos"]) if cfg.get("bos") else None
        self.stop_ids = {self.special_tokens[e] for e in cfg.get("eos", []) if e in self.special_tokens}
        self.chat_format = cfg.get("chat_format")
        self.n_words = self.enc.n_vocab

    def encode(self, text, bos=False, eos=False, allow_special=False):
        ids = self.enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.stop_ids:
            ids = ids + [min(self.stop_ids)]
        return ids

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(list(ids))

    def chat_prompt(self, prompt):
        """The token ids of a one-turn chat prompt in the checkpoint's instruct template."""
        if self.chat_format not in CHAT_TEMPLATES:
            raise ValueError(f"this tokenizer has no chat template (chat_format={self.chat_format!r}); drop --chat")
        return self.encode(CHAT_TEMPLATES[self.chat_format].format(prompt=prompt), allow_special=True)


def _hf_tokenizer_json(file):
    """Convert an HF byte-level BPE tokenizer.json to tiktoken ranks. tiktoken merges by the rank of
    the merged token; HF byte-level vocabularies assign ids in merge order, so rank = id."""
    try:
        tj = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    m = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(m, dict) or m.get("type") != "BPE" or not isinstance(m.get("vocab"), dict):
        kind = m.get("type") if isinstance(m, dict) else None
        raise ValueError(f"{file}: only byte-level BPE tokenizers are supported, got model type {kind!r}")
    parts = _pre_tokenizers(tj.get("pre_tokenizer")) + _pre_tokenizers(tj.get("decoder"))
    if m.get("byte_fallback") or any(p.get("type") == "Metaspace" for p in parts):
        raise ValueError(f"{file} is a SentencePiece-style BPE (Metaspace / byte fallback: Llama 2, CodeLlama, "
                         f"TinyLlama), which is not supported: expected a byte-level BPE (Llama 3.x, SmolLM2, GPT-2)")
    if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in _pre_tokenizers(tj.get("pre_tokenizer"))):
        raise ValueError(f"{file}: ByteLevel add_prefix_space=true (a space added before the text) is not supported")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    ranks = {}
    for tok, i in m["vocab"].items():
        if tok in added:
            continue
        try:
            ranks[bytes(byte_of[c] for c in tok)] = i
        except KeyError:
            raise ValueError(f"{file}: token {tok!r} is not byte-level BPE") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # tiktoken needs every byte as a token (it would panic on the first text holding one)
        raise ValueError(f"{file}: the byte-level vocabulary lacks {len(missing)} of the 256 single-byte tokens "
                         f"(e.g. byte {missing[0]:#04x}, spelled {bytes_to_unicode()[missing[0]]!r})")
    pattern = GPT2_PATTERN
    for p in _pre_tokenizers(tj.get("pre_tokenizer")):
        if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
            pattern = p["pattern"]["Regex"]
    names = set(added)
    bos = next((n for n in ("<|begin_of_text|>", "<s>") if n in names), None)
    eos = [n for n in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>") if n in names]
    chat = "llama3" if "<|start_header_id|>" in names else "chatml" if "<|im_start|>" in names else None
    return ranks, {"pattern": pattern, "special_tokens": added, "bos": bos, "eos": eos, "chat_format": chat}


def _pre_tokenizers(p):
    """A tokenizer.json pre_tokenizer (or decoder) and those of a Sequence, flattened, in order."""
    if not isinstance(p, dict):
        return []
    subs = p.get("pretokenizers") or p.get("decoders") or []
    return [p] + [q for sub in subs for q in _pre_tokenizers(sub)]
