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
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import generate as gen
import train
from generate import DTYPES, generate, make_attention
from kvcache import KVCache
from model import Tokenizer, Transformer

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

def method_runs(budgets, windows, coverages, ratios):
    """(label, method, generate.py flags) for each setting the sweep measures. Quest is RetroAttention
    with w = 1, which is Quest exactly (test_retro.py) and also counts exposure."""
    runs = [("dense", "dense", [])]
    for b in budgets:
        runs.append((f"quest b={b}", "retro", ["--budget", str(b), "--window", "1"]))
        runs += [(f"retro b={b} w={w}", "retro", ["--budget", str(b), "--window", str(w)]) for w in windows]
    runs += [(f"token_sparse tau={c}", "token_sparse", ["--coverage", str(c), "--min-tokens", "256", "--ts-window", "64"])
             for c in coverages]
    for r in ratios:
        runs.append((f"compact r={r}", "compact", ["--ratio", str(r)]))
        runs.append((f"top-t r={r} (no fit)", "compact", ["--ratio", str(r), "--no-fit"]))
    return runs


def start_method(model, method, mopts, prompt, max_new, dtype, device, use_kernels, separator_ids, keep_last=1):
    """Prefill-ready state for one sequence: -> (attention object, start_pos, decode window).
    For compact the prompt's context is compacted first, all but its last keep_last tokens (the
    question, when the prompt ends with one); feed prompt[:, start_pos:] next."""
    a = model.args
    if method == "compact":
        from compaction import compact_prompt
        fit = {} if not getattr(mopts, "no_fit", False) else {"fit_bias": False, "fit_values": False}
        res = compact_prompt(model, prompt, mopts.ratio, separator_ids=separator_ids, keep_last=keep_last,
                             max_new_tokens=max_new + keep_last + 8, use_kernels=use_kernels,
                             page_size=mopts.page_size, **fit)
        return res.attn, res.start_pos, 1
    cache = KVCache(a.n_layers, prompt.shape[0], a.n_kv_heads, prompt.shape[1] + max_new + 8, a.head_dim, dtype,
                    device, page_size=mopts.page_size)
    window = mopts.window if method == "retro" else 1
    return make_attention(method, cache, mopts, use_kernels), 0, window


@torch.no_grad()
def teacher_forced_agreement(model, attn, prompt, forced, start_pos=0, window=1):
    """Feed `forced` (the dense model's greedy continuation) through the method's decode loop and
    count where the method's own greedy choice agrees: -> top-1 match rate over the steps."""
    logits = model(prompt, torch.arange(start_pos, start_pos + prompt.shape[1]), attn, last_only=True)
    tokens, hits = prompt, 0
    for i in range(forced.shape[1]):
        hits += int(logits[0, -1].argmax() == forced[0, i])
        tokens = torch.cat([tokens, forced[:, i:i + 1]], dim=1)
        n = start_pos + tokens.shape[1]
        w = min(window, tokens.shape[1])
        logits = model(tokens[:, -w:], torch.arange(n - w, n), attn, last_only=True)
    return hits / forced.shape[1]


LOOKUP_TOKENS = 16  # covers `\nassert TABLE["key"] == "` (about 10 tokens)


@torch.no_grad()
def sweep(model, tokenizer, stream, runs, contexts, n_windows, suite, gen_prompt_len, gen_new, dtype, device,
          use_kernels, log=print):
    """Loss, recall and long-generation agreement with dense for every run. -> list of result rows."""
    from compaction import REPEAT_PROMPT
    sep = tokenizer.encode(REPEAT_PROMPT)
    prompt = torch.from_numpy(stream[:gen_prompt_len].astype(np.int64)).to(device)[None]
    dense_attn, _, _ = start_method(model, "dense", gen.build_parser().parse_args([]), prompt, gen_new, dtype,
                                    device, use_kernels, sep)
    dense_tokens, _ = generate(model, dense_attn, prompt, gen_new, n_vocab=tokenizer.n_words)
    rows = []
    for label, method, flags in runs:
        t0 = time.time()
        p = gen.build_parser()
        p.add_argument("--no-fit", action="store_true")
        mopts = p.parse_args(flags + ["--method", method])
        def start(x, n, keep_last=1):
            return start_method(model, method, mopts, x, n, dtype, device, use_kernels, sep, keep_last)
        row = {"run": label, "method": method, "flags": flags}
        # held-out loss: prefill the first half of each window through the method, decode-score the second
        for c in contexts:
            total, count = 0.0, 0
            for i in range(min(n_windows, (len(stream) - 1) // c)):
                w = torch.from_numpy(stream[i * c:(i + 1) * c + 1].astype(np.int64)).to(device)[None]
                half = c // 2
                attn, s0, win = start(w[:, :half], c - half)
                x = w[:, s0:half]
                logits = [model(x, torch.arange(s0, half), attn, last_only=True)[0, -1:]]
                for t in range(half, c - 1):  # one decode step per token, as generation would
                    lo = max(s0, t + 1 - win)
                    logits.append(model(w[:, lo:t + 1], torch.arange(lo, t + 1), attn, last_only=True)[0, -1:])
                total += F.cross_entropy(torch.cat(logits).float(), w[0, half:c], reduction="sum").item()
                count += c - half
            row[f"loss@{c}"] = total / count
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
        attn, s0, win = start(prompt, gen_new)
        toks, _ = generate(model, attn, prompt[:, s0:], gen_new, window=win, start_pos=s0, n_vocab=tokenizer.n_words)
        diff = (toks[0] != dense_tokens[0]).nonzero()
        row["first_divergence"] = int(diff[0]) if len(diff) else gen_new
        row["exposure"] = attn.stats.get("exposure")
        attn, s0, win = start(prompt, gen_new)
        row["match_rate"] = teacher_forced_agreement(model, attn, prompt[:, s0:], dense_tokens, s0, win)
        row["seconds"] = time.time() - t0
        rows.append(row)
        log(f"  {label:28s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items() if k not in ("run", "method", "flags")))
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
# CLI

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(__file__).parent / "models" / "nanokv-code-4k",
                   help="checkpoint directory written by train.py")
    p.add_argument("--data", default=None, help="directory of .py files (default: this interpreter's stdlib)")
    p.add_argument("--method", default="dense", help="sdpa (plain causal attention, no cache) or one of generate.py's methods (default: dense)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--distances", type=int, nargs="+", default=[256, 1024, 2048, 3072])
    p.add_argument("--n-windows", type=int, default=None, help="windows per context (default 2; --full: 32)")
    p.add_argument("--n-recall", type=int, default=None, help="lookups per distance (default 4; --full: 32)")
    p.add_argument("--full", action="store_true", help="more windows and lookups (minutes on a GPU)")
    p.add_argument("--score-chunk", type=int, default=0,
                   help="tokens fed per call after the prefill when scoring the loss (0: all at once, 1: decode)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the recall documents (train.py uses 1234)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    s = p.add_argument_group("--sweep: every method side by side (loss, recall, long generation vs dense)")
    s.add_argument("--sweep", action="store_true", help="compare dense, quest, retro, token_sparse, compact, top-t")
    s.add_argument("--budgets", type=int, nargs="*", default=[256, 512])
    s.add_argument("--windows", type=int, nargs="*", default=[4, 8, 16], help="retro w values")
    s.add_argument("--coverages", type=float, nargs="*", default=[0.001, 0.005, 0.02])
    s.add_argument("--ratios", type=float, nargs="*", default=[5, 10, 20, 50])
    s.add_argument("--gen-prompt", type=int, default=2048, help="long generation: prompt tokens (held-out code)")
    s.add_argument("--gen-new", type=int, default=None, help="long generation: new tokens (default 256; --full 1024)")
    p.epilog = ("Any other flag is a method option of generate.py (--budget, --page-size, --window, --coverage, ...), "
                "read by generate.py's own parser with its defaults.")
    return p


def main(argv=None):
    parser = build_parser()
    opts, rest = parser.parse_known_args(argv)
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
        parser.error(f"--model {opts.model}: no checkpoint there (expected config.json; train one with train.py)")
    n_windows = opts.n_windows or (32 if opts.full else 2)
    n_recall = opts.n_recall or (32 if opts.full else 4)
    dtype = DTYPES[opts.dtype or ("bf16" if opts.device == "cuda" else "fp32")]
    use_kernels = opts.kernels == "triton" or (opts.kernels == "auto" and opts.device == "cuda")

    model = Transformer.from_pretrained(opts.model, dtype=dtype, device=opts.device)
    tokenizer = Tokenizer(opts.model)
    a = model.args
    if opts.sweep:
        return run_sweep(opts, model, tokenizer, dtype, use_kernels)
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


def run_sweep(opts, model, tokenizer, dtype, use_kernels):
    t0 = time.time()
    stream, files = heldout_stream(tokenizer, opts.data)
    contexts = opts.contexts if opts.full else [1024]
    n_windows = opts.n_windows or (4 if opts.full else 1)
    n_recall = opts.n_recall or (16 if opts.full else 2)
    gen_new = opts.gen_new or (1024 if opts.full else 256)
    n_pairs = min(16, train.max_pairs(model.args.max_seq_len))
    suite = train.recall_suite(stream, tokenizer.enc.encode_ordinary, opts.distances, n_recall, n_pairs, seed=opts.seed)
    runs = method_runs(opts.budgets, opts.windows, opts.coverages, opts.ratios)
    print(f"sweep: {len(runs)} runs, held-out {len(stream):,} tokens, contexts {contexts} x {n_windows} windows, "
          f"{len(suite)} lookups, long generation {opts.gen_prompt} + {gen_new} tokens", file=sys.stderr)
    rows = sweep(model, tokenizer, stream, runs, contexts, n_windows, suite, opts.gen_prompt, gen_new, dtype,
                 opts.device, use_kernels, log=lambda m: print(m, file=sys.stderr, flush=True))
    cols = [k for k in rows[0] if k not in ("method", "flags", "seconds")]
    print(f"\n{opts.model.name}  {opts.device}  {time.strftime('%Y-%m-%d')}  ({time.time() - t0:.0f} s)  "
          f"long generation: {opts.gen_prompt}-token prompt + {gen_new} greedy tokens")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    result = {"model": str(opts.model), "device": opts.device, "date": time.strftime("%Y-%m-%d"),
              "contexts": contexts, "windows_per_context": n_windows, "lookups_per_distance": n_recall,
              "gen_prompt": opts.gen_prompt, "gen_new": gen_new, "rows": rows}
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=1) + "\n")
        if plot_sweep(rows, opts.out.with_suffix(".png")):
            print(f"plot: {opts.out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
