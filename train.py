"""
Train nanokv's default model: a small Llama that reads Python and can look things up far back.

Everything a checkpoint needs is made here, from nothing but the interpreter that runs it:
1. Data. The Python standard library of this interpreter (sysconfig's "stdlib" path; `--data DIR`
   for another tree of .py files). A fixed 2% of the files, chosen by a hash of their relative path,
   is held out and never trained on (so the same files are held out on every machine).
2. Tokenizer. Byte-level BPE trained here on a few MB of the training files: the split pattern cuts
   text into chunks, then the most frequent adjacent pair of tokens is merged into a new token,
   again and again (Sennrich et al., arXiv 1508.07909; GPT-2's byte-level variant). Stored as a
   tiktoken rank file: a token's rank is the order of its merge, which is how tiktoken applies them.
3. Recall documents. Real code alone teaches little long-range retrieval, which is what sparse
   attention methods must preserve. So part of the sequences are synthetic Python: a table
   of random keys -> random values (words of code) near the top, thousands of tokens of real code,
   then `assert TABLE["path"] == "socket"` lines whose values can only be copied from the table.
4. Training. AdamW, warmup + cosine learning rate, gradient clipping, bf16 autocast on a GPU,
   loss on every token. `--max-minutes` bounds the whole run (data, tokenizer, training, final
   evaluation, saving): the learning-rate schedule follows elapsed time, so a run cut by the clock
   still ends annealed.

Writes to --out: config.json + model.safetensors (bf16), tokenizer.model, tokenizer_config_nanokv.json,
README.md (the model card, with the exact command) and train_log.json.

    python train.py --out checkpoints/nanokv-7m --max-minutes 8        # one H100
    python train.py --out /tmp/tiny --preset tiny --max-minutes 2      # CPU smoke run
"""

import argparse
import collections
import hashlib
import heapq
import json
import math
import os
import queue
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex
import torch
import torch.nn.functional as F

from checkpoint import load_model, save_model
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, write_rank_file

# ----------------------------------------------------------------------------------------------
# Data: the .py files of a directory tree, split into train and held-out by a hash of their path

HELDOUT_PERCENT = 2.0


def stdlib_dir():
    return sysconfig.get_paths()["stdlib"]


def is_heldout(relpath, percent=HELDOUT_PERCENT):
    """Held out iff the hash of the relative path (with '/' separators) falls in the first `percent`
    of the hash range: the same files are held out on every machine and every run."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return h % 10000 < percent * 100


def read_source(path, max_file_bytes):
    """A .py file's text, or None for a file that is too large, unreadable, not UTF-8 or blank."""
    try:
        if path.stat().st_size > max_file_bytes:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def load_source_files(root, max_file_bytes=1_000_000):
    """[(relative path, text)] of the .py files under root, sorted by path. Installed packages
    (site-packages, dist-packages) are not the standard library; files that are not UTF-8 (a few
    deliberately broken test inputs) or are huge generated tables are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            text = read_source(path, max_file_bytes)
            if text is not None:
                files.append((path.relative_to(root).as_posix(), text))
    if not files:
        raise ValueError(f"--data {root}: found no readable .py files")
    files.sort()
    return files


def load_data_dirs(dirs, max_mb=None, max_file_bytes=1_000_000):
    """[(relative path, text)] of the .py files under several roots (each path relative to its own
    root, so the held-out rule is the same per tree on every machine), sorted by path. With max_mb,
    a fixed subset: files in the order of a hash of (root name, path) until max_mb MB (by file size,
    before reading, so a huge tree is not read), which samples every package evenly."""
    if not max_mb:
        return sorted(f for root in dirs for f in load_source_files(root, max_file_bytes))
    cands = []
    for root in dirs:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: no such directory")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
            for name in filenames:
                if name.endswith(".py"):
                    path = Path(dirpath) / name
                    rel = path.relative_to(root).as_posix()
                    cands.append((hashlib.sha256(f"{root.name}/{rel}".encode()).digest(), rel, path))
    cands.sort()
    files, size = [], 0
    for _, rel, path in cands:
        if size >= max_mb * 1e6:
            break
        text = read_source(path, max_file_bytes)
        if text is not None:
            files.append((rel, text))
            size += len(text)
    if not files:
        raise ValueError(f"--data {dirs}: found no readable .py files")
    return sorted(files)


def parse_data_dirs(values):
    """--data values -> [dir]: each value may hold several directories joined by ',' or os.pathsep."""
    out = []
    for v in values or []:
        out += [d for part in v.split(",") for d in part.split(os.pathsep) if d]
    return out or [stdlib_dir()]


def split_files(files):
    train = [(p, t) for p, t in files if not is_heldout(p)]
    heldout = [(p, t) for p, t in files if is_heldout(p)]
    if not heldout:  # a tiny --data tree: hold out its last file rather than nothing
        train, heldout = train[:-1], train[-1:]
    return train, heldout


# ----------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE, trained here, applied by tiktoken

# GPT-4's split pattern without the English contractions ('s, 't, ...), which in code would cut
# string literals such as 'spam' apart: letters with one leading non-letter (" self", ".append"),
# digit runs of up to 3, punctuation runs (with the newlines that follow), whitespace.
SPLIT_PATTERN = (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
EOT = "<|endoftext|>"  # separates documents; the only special token


def _merge(word, pair, new_id):
    out, i, n = [], 0, len(word)
    a, b = pair
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(texts, n_ranks, pattern=SPLIT_PATTERN):
    """Learn a byte-level BPE vocabulary of n_ranks tokens (256 bytes + merges) -> {token bytes: rank}.

    The text is first cut into chunks by the split pattern and identical chunks are counted, so the
    work is over distinct chunks (tens of thousands), not over the text. Pair counts are kept up to
    date incrementally: a merge only touches the chunks that contain the pair (found through an
    index pair -> chunks), and a heap with stale entries skipped on pop yields the next best pair.
    Ties go to the smaller (left id, right id), so training is deterministic.
    """
    if n_ranks < 256:
        raise ValueError(f"a byte-level vocabulary needs at least 256 tokens, got {n_ranks}")
    split = regex.compile(pattern)
    chunk_counts = collections.Counter()
    for text in texts:
        chunk_counts.update(split.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    vocab = [bytes([b]) for b in range(256)]
    id_of = {tok: i for i, tok in enumerate(vocab)}
    pair_count = collections.defaultdict(int)
    where = collections.defaultdict(set)  # pair -> indices of words that contained it (may be stale)
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += f
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < n_ranks and heap:
        neg, pair = heapq.heappop(heap)
        if -neg != pair_count.get(pair, 0):
            continue  # stale: the count changed after this entry was pushed
        if -neg < 2:
            break  # nothing left that occurs twice
        merged_bytes = vocab[pair[0]] + vocab[pair[1]]
        # two different merges can spell the same bytes ("a"+"bc", "ab"+"c"); tiktoken needs each
        # token's bytes once, so the second one reuses the first's id
        new_id = id_of.get(merged_bytes)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(merged_bytes)
            id_of[merged_bytes] = new_id
        touched = set()
        for w in where.pop(pair):
            old = words[w]
            new = _merge(old, pair, new_id)
            if len(new) == len(old):
                continue
            f = freqs[w]
            for p in zip(old, old[1:]):
                pair_count[p] -= f
                touched.add(p)
            for p in zip(new, new[1:]):
                pair_count[p] += f
                where[p].add(w)
                touched.add(p)
            words[w] = new
        for p in touched:
            c = pair_count[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pair_count[p]
    return {tok: rank for rank, tok in enumerate(vocab)}


def make_encoding(ranks, pattern=SPLIT_PATTERN):
    import tiktoken
    return tiktoken.Encoding(name="nanokv", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def save_tokenizer(out_dir, ranks, pattern=SPLIT_PATTERN):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rank_file(ranks, out_dir / "tokenizer.model")
    cfg = {"pattern": pattern, "special_tokens": {EOT: len(ranks)}, "bos": None, "eos": [EOT], "chat_format": None}
    (out_dir / "tokenizer_config_nanokv.json").write_text(json.dumps(cfg, indent=2) + "\n")


def tokenize_files(enc, files, eot_id, threads=None):
    """One stream of uint16 token ids: each file's tokens followed by <|endoftext|>."""
    threads = threads or max(1, min(16, os.cpu_count() or 1))
    parts = enc.encode_ordinary_batch([t for _, t in files], num_threads=threads)
    out = np.empty(sum(len(p) + 1 for p in parts), dtype=np.uint16)
    i = 0
    for p in parts:
        out[i:i + len(p)] = p
        out[i + len(p)] = eot_id
        i += len(p) + 1
    return out


# ----------------------------------------------------------------------------------------------
# Synthetic long-range recall documents

# Keys of the recall tables: 256 common lowercase words of Python code (each one or two BPE tokens),
# so that a lookup has to find its key among the table's keys by content, like a real dict access.
KEY_WORDS = tuple("""
    abc add addr address all and append are arg args argv array ascii ast async attr attrs base bit
    block buf buffer build bytes call can case charset check child class classes close closed cls
    cmd code codec codecs com con config conn context control copy count create current data
    datetime debug decode def default del dict dir doc domain empty encode encoding end err error
    errors except exec exit expected extra file filename find foo for format frame from func get
    group handle handler has hash header headers help host html http ignore import indent index
    info input instance int invalid items iter its join key keys kwargs kwds last left len length
    level like limit line lineno lines list loader local locale lock log long loop lower main make
    map match max member message method mock mod mode module modules msg name names new node not
    now number obj offset one only open opt option other out output pack package parent parse
    parser pass patch path port pos posix prefix print process property protocol python queue range
    raw read reader remove replace repr res return right root row run script second select self sep
    server set signal size sock socket source spec split src ssl stack start stat state str strict
    string strip struct sub subclass sure sys tag tar task test tests text the thread time timeout
    trace try tuple type types update url use used user utf util val valid value version wait
    warnings which width with write www xml year zip
""".split())
# Values are words of the same list, distinct from the keys and from each other: a value is one or
# two tokens that occur nowhere else in the table, so copying it is the induction a small model
# learns. (Random character strings, one token per character, were never learned in our first run:
# every character recurs across the table, so the copy needs multi-token matching; random digits
# fare no better, since a 4K vocabulary splits a digit run into 1-2 digit tokens.)


@dataclass
class Lookup:
    pos: int        # ids[:pos] is the prompt; it ends with `TABLE["key"] == "`
    key: str
    value: str
    n_tokens: int   # ids[pos:pos + n_tokens] = the value's tokens + the token holding the closing quote
    distance: int   # tokens between the end of the table and pos


def recall_doc(seed, filler, encode, gaps, n_pairs=16, lookups_per_gap=1, lead=0):
    """A recall document as token ids, deterministic given seed and filler:

        <lead filler tokens>
        TABLE = {}
        TABLE["path"] = "socket"          n_pairs random words of KEY_WORDS -> other random words
        ...
        <gaps[0] filler tokens>
        assert TABLE["path"] == "socket"     lookups_per_gap lines, keys from the table
        <gaps[1] filler tokens>
        ...

    filler: 1-D array of token ids of real code, at least lead + sum(gaps) long, used in order;
    encode: str -> list of ids (no special tokens). Returns (ids np.int64, [Lookup]).
    The table and the assert lines are tokenized from text, piece by piece, so that the prompt ends
    exactly where the value begins. Keys are drawn without replacement until all were asked once.
    """
    if lead + sum(gaps) > len(filler):
        raise ValueError(f"recall_doc needs {lead + sum(gaps)} filler tokens, got {len(filler)}")
    rng = np.random.default_rng(seed)
    if n_pairs > len(KEY_WORDS) // 2:
        raise ValueError(f"n_pairs={n_pairs} is too many for {len(KEY_WORDS)} key words")
    words = [KEY_WORDS[i] for i in rng.choice(len(KEY_WORDS), 2 * n_pairs, replace=False)]
    table = dict(zip(words[:n_pairs], words[n_pairs:]))
    keys = list(table)
    order = []

    pieces = [np.asarray(filler[:lead], dtype=np.int64)]
    # Table lines and lookups share their shape, TABLE["key"] = / == "value": the key sits 4 tokens
    # before its value in both, so one attention hop from the lookup's key finds the table's value.
    # (A dict literal puts the key 3 tokens before the value but the lookup's 4: our first run never
    # learned that mapping, although it copied the rest of a value once given its first token.)
    head = ("\n\n" if lead else "") + "TABLE = {}\n" + "".join(f'TABLE["{k}"] = "{v}"\n' for k, v in table.items())
    pieces.append(np.asarray(encode(head), dtype=np.int64))
    n = sum(len(p) for p in pieces)
    table_end = n
    lookups = []
    start = lead
    for g in gaps:
        pieces.append(np.asarray(filler[start:start + g], dtype=np.int64))
        start += g
        n += g
        for j in range(lookups_per_gap):
            if not order:
                order = [keys[i] for i in rng.permutation(len(keys))]
            k = order.pop()
            prompt = encode(("\n" if j == 0 else "") + f'assert TABLE["{k}"] == "')
            answer = encode(f'{table[k]}"\n')
            n_value = len(encode(table[k]))
            pieces += [np.asarray(prompt, dtype=np.int64), np.asarray(answer, dtype=np.int64)]
            n += len(prompt)
            lookups.append(Lookup(pos=n, key=k, value=table[k], n_tokens=min(n_value + 1, len(answer)),
                                  distance=n - table_end))
            n += len(answer)
    return np.concatenate(pieces), lookups


def recall_suite(stream, encode, distances=(256, 1024, 2048, 3072), n_per_distance=16, n_pairs=16, seed=1234):
    """Fixed evaluation lookups: for each distance, n documents of one table, `distance` filler
    tokens taken from `stream` (held-out code) and one lookup. -> [(distance, ids, Lookup)]."""
    out = []
    for d in distances:
        for i in range(n_per_distance):
            doc_seed = seed + 100_003 * d + i
            rng = np.random.default_rng(doc_seed)
            if len(stream) <= d:
                raise ValueError(f"held-out stream of {len(stream)} tokens is too short for distance {d}")
            off = int(rng.integers(0, len(stream) - d))
            ids, (lk,) = recall_doc(doc_seed, stream[off:off + d], encode, gaps=[d], n_pairs=n_pairs)
            out.append((d, ids, lk))
    return out


def max_pairs(length):
    """The largest table for a context (~14 tokens a pair): 32 at 4K, fewer in tiny test contexts."""
    return max(2, min(32, length // 64))


def sample_recall_sequence(rng, stream, encode, length):
    """A training sequence of exactly `length` tokens built around one recall document: a table
    of 4..32 pairs at a random early offset, then filler gaps of log-uniform length (16..3500
    tokens) each followed by 1..6 lookups, so distances span the whole context."""
    n_pairs = int(rng.integers(min(4, max_pairs(length)), max_pairs(length) + 1))
    lead = int(rng.integers(0, 400)) if rng.random() < 0.5 else 0
    budget = max(0, length - lead - 14 * n_pairs - 10)
    gaps = []
    while budget > 0:
        g = min(budget, int(math.exp(rng.uniform(math.log(16), math.log(3500)))))
        gaps.append(g)
        budget -= g + 40
    need = lead + sum(gaps) + length  # extra filler pads the end if the document comes out short
    off = int(rng.integers(0, max(1, len(stream) - need)))
    filler = stream[off:off + need]
    ids, lookups = recall_doc(int(rng.integers(2**63)), filler, encode, gaps, n_pairs=n_pairs,
                              lookups_per_gap=int(rng.integers(1, 7)), lead=lead)
    if len(ids) < length:
        rest = filler[lead + sum(gaps):]
        ids = np.concatenate([ids, np.asarray(rest[:length - len(ids)], dtype=np.int64)])
    return ids[:length]


class Batches:
    """Training batches (B, T + 1) of int64 made on a background thread: a `recall_frac` share of
    the rows are recall sequences, the rest are random windows of the training stream."""

    def __init__(self, stream, encode, batch_size, seq_len, recall_frac, seed, prefetch=4, pin=False):
        self.stream, self.encode, self.pin = stream, encode, pin
        self.B, self.L, self.recall_frac = batch_size, seq_len + 1, recall_frac
        self.rng = np.random.default_rng(seed)
        if len(stream) < 2 * self.L:
            raise ValueError(f"the training stream has {len(stream)} tokens, too few for --seq-len {seq_len}")
        self.q = queue.Queue(maxsize=prefetch)
        threading.Thread(target=self._work, daemon=True).start()

    def make(self):
        n_recall = int(self.rng.binomial(self.B, self.recall_frac))
        rows = [sample_recall_sequence(self.rng, self.stream, self.encode, self.L) for _ in range(n_recall)]
        starts = self.rng.integers(0, len(self.stream) - self.L, self.B - n_recall)
        rows += [self.stream[s:s + self.L].astype(np.int64) for s in starts]
        batch = torch.from_numpy(np.stack(rows))
        return batch.pin_memory() if self.pin else batch  # pinned: the copy to the GPU runs asynchronously

    def _work(self):
        while True:
            self.q.put(self.make())

    def next(self):
        return self.q.get()


# ----------------------------------------------------------------------------------------------
# Evaluation used during training (eval.py has the full harness)

def heldout_windows(stream, seq_len, n):
    """The first n non-overlapping windows of seq_len + 1 tokens of the held-out stream."""
    n = min(n, (len(stream) - 1) // seq_len)
    return [torch.from_numpy(stream[i * seq_len:i * seq_len + seq_len + 1].astype(np.int64)) for i in range(n)]


@torch.no_grad()
def heldout_loss(model, windows, device, autocast):
    """Mean next-token loss over all positions of the windows."""
    total, count = 0.0, 0
    for w in windows:
        w = w.to(device)[None]
        with autocast:
            logits = model(w[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w.shape[1] - 1
    return total / max(count, 1)


@torch.no_grad()
def recall_accuracy(model, suite, device, autocast):
    """Exact-match recall per distance, teacher-forced: a lookup counts as right iff the argmax at
    every value token and at the closing quote is the true token, which is exactly when greedy
    decoding would write the value and close the string. -> {distance: accuracy}."""
    hits = collections.defaultdict(list)
    for d, ids, lk in suite:
        x = torch.from_numpy(ids[:lk.pos + lk.n_tokens]).to(device)[None]
        with autocast:
            logits = model(x[:, :-1])
        pred = logits[0, lk.pos - 1:lk.pos - 1 + lk.n_tokens].argmax(-1)
        hits[d].append(bool((pred == x[0, lk.pos:lk.pos + lk.n_tokens]).all()))
    return {d: sum(h) / len(h) for d, h in sorted(hits.items())}


# ----------------------------------------------------------------------------------------------
# Training

PRESETS = {
    # ~6.6M parameters (untied 4K embeddings + 6 layers), ~13 MB in bf16
    "default": dict(vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768,
                    seq_len=4096, batch_size=32),
    # seconds on a CPU: proves the loop, saving and loading
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                 seq_len=256, batch_size=8),
}


def lr_at(step, progress, args):
    """Cosine from lr to min_lr as progress (of steps or of time, whichever is further) goes 0 -> 1,
    scaled by a linear warmup over the first steps (the product, so a short run still anneals)."""
    cosine = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cosine * min(1.0, (step + 1) / args.warmup)


def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 60}:{s % 60:02d}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (checkpoint, tokenizer, README.md)")
    p.add_argument("--data", nargs="+", default=None,
                   help="directories of .py files, several allowed (also joined by ',' or os.pathsep); "
                        "default: this interpreter's stdlib")
    p.add_argument("--max-data-mb", type=float, default=None,
                   help="cap on the MB of source read from --data (a fixed hash-ordered subset of the files)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "seq_len", "batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="overrides the preset")
    p.add_argument("--rope-theta", type=float, default=100000.0)
    p.add_argument("--max-minutes", type=float, default=8.0, help="wall-clock budget of the whole run, saving included")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--recall-frac", type=float, default=0.5, help="share of sequences that are recall documents")
    p.add_argument("--bpe-sample-mb", type=float, default=4.0, help="MB of training text the BPE vocabulary is learned on")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations (and checkpoints)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--reserve-seconds", type=float, default=None,
                   help="time kept for the final evaluation and save (default: 30 s on a GPU, 10%% of the budget on CPU)")
    p.add_argument("--compile", type=int, default=None, help="torch.compile the training model (default: 1 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.compile is None:
        args.compile = int(args.device.startswith("cuda"))
    if args.reserve_seconds is None:
        args.reserve_seconds = 30.0 if args.device.startswith("cuda") else 0.1 * args.max_minutes * 60
    if not 0 <= args.recall_frac <= 1:
        p.error(f"--recall-frac must be in [0, 1], got {args.recall_frac}")
    if args.n_heads % args.n_kv_heads:
        p.error(f"--n-heads ({args.n_heads}) must be a multiple of --n-kv-heads ({args.n_kv_heads})")
    return args


def log(msg):
    print(msg, flush=True)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.max_minutes * 60
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # -- data and tokenizer
    data_dirs = parse_data_dirs(args.data)
    data_dir = os.pathsep.join(data_dirs)
    files = load_data_dirs(data_dirs, args.max_data_mb)
    train_files, heldout_files = split_files(files)
    n_bytes = sum(len(t.encode()) for _, t in files)
    log(f"data: {len(files)} .py files, {n_bytes / 1e6:.1f} MB under {data_dir}; "
        f"{len(train_files)} train, {len(heldout_files)} held out")
    t0 = time.time()
    sample, size = [], 0
    for i in np.random.default_rng(args.seed).permutation(len(train_files)):  # a fixed sample of whole files
        if size >= args.bpe_sample_mb * 1e6:
            break
        sample.append(train_files[i][1])
        size += len(train_files[i][1])
    ranks = train_bpe(sample, args.vocab_size - 1)
    save_tokenizer(out, ranks)
    enc = make_encoding(ranks)
    eot_id = len(ranks)
    log(f"tokenizer: {len(ranks)} ranks + {EOT}={eot_id}, learned on {size / 1e6:.1f} MB in {time.time() - t0:.1f} s")
    t0 = time.time()
    train_stream = tokenize_files(enc, train_files, eot_id)
    heldout_stream = tokenize_files(enc, heldout_files, eot_id)
    log(f"tokenized: {len(train_stream) / 1e6:.2f}M train tokens, {len(heldout_stream) / 1e6:.3f}M held-out tokens "
        f"({n_bytes / (len(train_stream) + len(heldout_stream)):.2f} bytes/token) in {time.time() - t0:.1f} s")

    # -- model
    margs = ModelArgs(vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, hidden_dim=args.hidden_dim,
                      norm_eps=1e-5, rope_theta=args.rope_theta, max_seq_len=args.seq_len, tie_embeddings=False)
    model = Transformer(margs)
    model.init_weights(args.seed)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters ({json.dumps({k: v for k, v in vars(margs).items() if k != 'rope_scaling'})})")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=on_cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda)
    train_model = model
    if args.compile:
        train_model = torch.compile(model)

    encode = enc.encode_ordinary
    batches = Batches(train_stream, encode, args.batch_size, args.seq_len, args.recall_frac, args.seed, pin=on_cuda)
    windows = heldout_windows(heldout_stream, args.seq_len, 8)
    eval_pairs = min(16, max_pairs(args.seq_len))
    eval_dists = [d for d in (256, 1024, 2048, 3072) if d + 14 * eval_pairs + 40 < args.seq_len] or [args.seq_len // 4]
    suite = recall_suite(heldout_stream, encode, eval_dists, n_per_distance=16, n_pairs=eval_pairs)

    def evaluate(n_windows=None):
        model.eval()
        w = windows if n_windows is None else windows[:n_windows]
        loss = heldout_loss(model, w, device, autocast)
        acc = recall_accuracy(model, suite, device, autocast)
        model.train()
        return loss, acc

    def save():
        save_model(model, out, dtype=torch.bfloat16)

    best = {"loss": float("inf"), "step": 0, "state": None}  # the best weights by held-out loss (4 windows)

    def keep_if_best(loss, step):
        if loss < best["loss"]:
            best.update(loss=loss, step=step, state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            save()
            return True
        return False

    # -- train
    t_train = time.time()
    train_deadline = deadline - args.reserve_seconds
    if train_deadline <= t_train:
        raise SystemExit(f"--max-minutes {args.max_minutes} leaves no time for training after data preparation "
                         f"({t_train - t_start:.0f} s) and the reserve ({args.reserve_seconds:.0f} s)")
    log(f"training: batch {args.batch_size} x {args.seq_len} tokens, recall share {args.recall_frac}, "
        f"{fmt_time(train_deadline - t_train)} left for training")
    history = []
    step, tokens_seen, last_loss = 0, 0, None
    t_log, tok_log = time.time(), 0
    loss_sum, loss_n = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    progress = 0.0
    model.train()
    while progress < 1.0:
        lr = lr_at(step, progress, args)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = batches.next().to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        try:
            with autocast:
                logits = train_model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
        except Exception as e:  # torch.compile is an optimization: fall back to eager if it fails
            if train_model is model or step > 0:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); continuing without it")
            train_model = model
            opt.zero_grad(set_to_none=True)
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        loss_n += 1
        step += 1
        tokens_seen += x.numel()
        tok_log += x.numel()
        now = time.time()
        progress = max(step / args.max_steps, (now - t_train) / (train_deadline - t_train))
        if step % args.log_every == 0 or step == 1 or progress >= 1.0:
            lv = loss_sum.item() / loss_n  # mean over the interval; the only sync with the GPU in it
            loss_sum.zero_()
            loss_n = 0
            last_loss = lv
            now = time.time()
            tps = tok_log / (now - t_log)
            eta = min(train_deadline - now, (args.max_steps - step) * (now - t_train) / step)
            log(f"step {step:5d} | loss {lv:.4f} | lr {lr:.2e} | {tps / 1e3:7.1f}K tok/s "
                f"| {tokens_seen / 1e6:7.1f}M tokens | elapsed {fmt_time(now - t_start)} | ETA {fmt_time(eta)}")
            history.append({"step": step, "loss": lv, "lr": lr, "tokens": tokens_seen, "time": now - t_start})
            t_log, tok_log = now, 0
        if step % args.eval_every == 0 and progress < 1.0:
            hl, acc = evaluate(n_windows=4)
            log(f"eval step {step}: held-out loss {hl:.4f} | recall " +
                " ".join(f"{d}:{a:.2f}" for d, a in acc.items()))
            history[-1].update({"heldout_loss": hl, "recall": acc})
            if keep_if_best(hl, step):
                log(f"  best so far: saved step {step}")
    train_seconds = time.time() - t_train

    # -- final evaluation, checkpoint, model card
    final_train_loss = last_loss  # mean over the last logging interval
    last_hl, _ = evaluate(n_windows=4)
    if not keep_if_best(last_hl, step):
        model.load_state_dict(best["state"])
        log(f"last step {step}: held-out loss {last_hl:.4f} (4 windows) is worse than step {best['step']}'s "
            f"{best['loss']:.4f}: the checkpoint is step {best['step']}")
    best_step = best["step"]
    hl, acc = evaluate()
    log(f"checkpoint step {best_step}: last train loss {final_train_loss:.4f} | held-out loss {hl:.4f} | recall "
        + " ".join(f"{d}:{a:.2f}" for d, a in acc.items()))
    # the saved checkpoint must load and agree with the model in memory
    reloaded = load_model(out, dtype=torch.float32, device=device)
    tok = Tokenizer(out)
    probe = "def add(a, b):\n    return a + b\n"
    if tok.decode(tok.encode(probe)) != probe:
        raise RuntimeError(f"{out}: the saved tokenizer does not round-trip")
    log(f"reloaded {out}: held-out loss on 2 windows {heldout_loss(reloaded, windows[:2], device, autocast):.4f} "
        f"(in memory, before rounding to bf16: {heldout_loss(model.eval(), windows[:2], device, autocast):.4f})")
    summary = {
        "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if argv is None
                   else "python train.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "torch": torch.__version__, "precision": "bf16 autocast" if on_cuda else "fp32",
        "compiled": train_model is not model, "python": sys.version.split()[0], "data_dir": str(data_dir),
        "files": len(files), "train_files": len(train_files), "heldout_files": len(heldout_files),
        "data_mb": round(n_bytes / 1e6, 2), "train_tokens": int(len(train_stream)),
        "heldout_tokens": int(len(heldout_stream)), "vocab_ranks": len(ranks), "params": n_params,
        "steps": step, "checkpoint_step": best_step, "last_step_heldout_loss_4w": last_hl, "tokens_seen": tokens_seen, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1), "final_train_loss": final_train_loss,
        "heldout_loss": hl, "recall": acc, "recall_pairs": eval_pairs, "args": vars(args), "history": history,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_model_card(out, summary, margs)
    log(f"wrote {out}/ (config.json, model.safetensors, tokenizer.model, tokenizer_config_nanokv.json, "
        f"README.md, train_log.json) in {fmt_time(time.time() - t_start)} total")
    return summary


def write_model_card(out, s, margs):
    a = s["args"]
    recall = " | ".join(f"{d} tokens: {acc:.0%}" for d, acc in s["recall"].items())
    size_mb = (Path(out) / "model.safetensors").stat().st_size / 1e6
    text = f"""# nanokv default model

A {s['params'] / 1e6:.1f}M-parameter Llama (GQA, RoPE, SwiGLU) trained from scratch by `train.py` on the
Python source code, mixed with synthetic long-range recall documents, so that the sparse
attention methods of nanokv have retrieval heads to keep or lose. Weights in bf16 ({size_mb:.1f} MB).

| | |
| --- | --- |
| layers / dim / MLP hidden | {margs.n_layers} / {margs.dim} / {margs.hidden_dim} |
| heads | {margs.n_heads} query, {margs.n_kv_heads} KV (GQA), head dim {margs.head_dim} |
| context | {margs.max_seq_len} tokens (trained at this length), RoPE theta {margs.rope_theta:g} |
| vocabulary | {s['vocab_ranks']} byte-level BPE tokens + `<|endoftext|>` (model vocab {margs.vocab_size}) |

## Data
- Python source (Python {s['python']}) from `{s['data_dir']}`{f" (capped at {a['max_data_mb']:g} MB, a fixed hash-ordered subset)" if a.get('max_data_mb') else ""}:
  {s['files']} `.py` files, {s['data_mb']} MB (site-packages below a root excluded). {s['heldout_files']} files ({s['heldout_tokens']:,} tokens) held out by a hash of their
  relative path (`train.is_heldout`, 2%), never trained on; {s['train_tokens']:,} training tokens.
- Tokenizer: BPE learned by `train.train_bpe` on {a['bpe_sample_mb']} MB of training files; `tokenizer.model`
  is a tiktoken rank file, `tokenizer_config_nanokv.json` holds the split pattern and special tokens.
- {a['recall_frac']:.0%} of training sequences are recall documents (`train.recall_doc`): a table
  `TABLE["path"] = "socket"` lines, 4-32 pairs (keys and values: distinct random words of code),
  real code, then `assert TABLE["path"] == "socket"`
  lines at distances up to the whole context.

## Training
{s['steps']:,} steps of {a['batch_size']} x {a['seq_len']} tokens ({s['tokens_seen'] / 1e6:.0f}M tokens seen) in
{s['train_seconds'] / 60:.1f} min ({s['total_seconds'] / 60:.1f} min in all) on {s['device']}, torch {s['torch']};
AdamW (lr {a['lr']:g} -> {a['min_lr']:g}, warmup {a['warmup']} steps, cosine over the time budget, weight decay
{a['weight_decay']}, clip {a['grad_clip']}), {s['precision']}{', torch.compile' if s['compiled'] else ''}, seed {a['seed']}. Date: {s['date']}.

## Results (from this run)
The checkpoint is the weights of step {s['checkpoint_step']:,} of {s['steps']:,}: the one with the lowest held-out loss
among the evaluations every {a['eval_every']} steps and the last step.
- Final training loss (mean of the last {a['log_every']} steps): {s['final_train_loss']:.3f}
- Held-out loss: {s['heldout_loss']:.3f} nats/token (mean over all positions of up to 8 windows of {a['seq_len']} tokens)
- Recall, exact match of the value ({len(s['recall'])} distances x 16 held-out documents, {s['recall_pairs']} pairs each): {recall}

`python eval.py --model {out}` measures these again (loss at several context lengths, recall by
greedy decoding through the KV cache).

## Reproduce
    {s['command']}
"""
    (Path(out) / "README.md").write_text(text)


if __name__ == "__main__":
    main()
