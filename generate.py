"""
Generate text with a Llama checkpoint, decoding with one of the attention methods:

    python generate.py --method dense|quest|retro|token_sparse|compact [--prompt TEXT] ...

Prefill runs the prompt through the model (in chunks of --prefill-chunk tokens, with a progress
line); decoding then feeds one token per step (RetroAttention feeds the last w tokens: the new one
and the w-1 it revises). The attention object chosen by --method owns the KV cache; model.py never
sees the method's name.
At the end we print prefill time, decode speed, peak memory and KV bytes read per decoded token.
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton on the CPU runs in its interpreter (slow), set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cudagraph  # noqa: E402
import kvcache  # noqa: E402
import tp  # noqa: E402
from attention import DenseAttention  # noqa: E402
from checkpoint import load_model  # noqa: E402
from compaction import AUTHORS_W_BOX, compact_prompt, repeat_separator  # noqa: E402
from kvcache import KVCache, QuestAttention  # noqa: E402
from retro import RetroAttention  # noqa: E402
from token_sparse import TokenSparseAttention  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

DEFAULT_CHECKPOINT = Path(__file__).parent / "models" / "nanokv-code-4k"
METHODS = ["dense", "quest", "retro", "token_sparse", "compact"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_PROMPT = Path(__file__).parent / "kvcache.py"  # real code the default model never saw (it learnt the standard library)
BIAS_BOX_DEFAULT = "none"


# ----------------------------------------------------------------------------------------------
# The loop

def sample(logits, temperature, top_k, generator=None, n_vocab=None):
    """logits (B, V) fp32 -> next token ids (B,). temperature 0 is greedy. n_vocab: ids at or above
    it (padding rows of a model whose embedding is larger than its tokenizer) are never chosen."""
    if n_vocab is not None and n_vocab < logits.shape[-1]:
        logits = logits.clone()
        logits[:, n_vocab:] = float("-inf")
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, attn, prompt, max_new_tokens, temperature=0.0, top_k=None, window=None,
             stop_ids=(), on_token=None, generator=None, start_pos=0, n_vocab=None, cuda_graph=False,
             prefill_chunk=None, on_prefill=None):
    """prompt (B, T) long on the model's device -> (new tokens (B, n), timings dict).
    window: rows fed per decode step (default attn.prefill_rows + 1: 1, or RetroAttention's w).
    start_pos: position of prompt[0] (> 0 when the cache already holds a prefix, as after compaction).
    cuda_graph: replay the decode step from a CUDA graph (cudagraph.py; ValueError naming why not).
    on_token(ids (B,)) sees each new token except a stop token (which ends the output, B == 1).
    prefill_chunk: feed the prompt in pieces of about this many tokens, calling on_prefill(tokens done,
    T, seconds) after each."""
    device = prompt.device
    window = window or attn.prefill_rows + 1
    step = cudagraph.GraphDecodeStep(model, attn, device) if cuda_graph else None
    B, T = prompt.shape
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # On a CPU, torch's OpenMP threads hand each op out and wait for one another: that pays for large
    # matmuls on idle cores, but on a busy machine each wait is a trip through the scheduler (2 cores at
    # load 8: a 3,032-token prefill of the default model 3.7-9.7 s on two threads, 2.0-2.5 s on one; a
    # (2, 256) x (256, 768) linear 8 ms on two, 57 us on one). A batch-1 decode step is all tiny ops,
    # so it always runs on one thread; the prefill does too when the other cores are busy.
    threads = torch.get_num_threads()
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1)
    if device.type == "cpu" and busy:
        torch.set_num_threads(1)
    sync()
    t0 = time.perf_counter()
    n_chunks = max(1, T // (prefill_chunk or T))
    bounds = [round(i * T / n_chunks) for i in range(n_chunks + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        logits = model(prompt[:, lo:hi], torch.arange(start_pos + lo, start_pos + hi), attn, last_only=True)
        if on_prefill is not None:
            sync()
            on_prefill(hi, T, time.perf_counter() - t0)
    tokens = prompt
    nxt = sample(logits[:, -1], temperature, top_k, generator, n_vocab)
    sync()
    t_prefill = time.perf_counter() - t0
    out = [nxt]
    if device.type == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    while not (stop_ids and B == 1 and int(nxt[0]) in stop_ids):
        if on_token is not None:
            on_token(nxt)
        if len(out) == max_new_tokens:
            break
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        n = start_pos + tokens.shape[1]  # positions [start_pos, n) exist; the newest is n - 1
        w = min(window, tokens.shape[1])
        pos = torch.arange(n - w, n, device=device)  # the step's positions stay on the device
        if step is not None and w == window:  # (a short prompt's first steps feed fewer rows: eager)
            logits = step(tokens[:, -w:], pos)
        else:
            logits = model(tokens[:, -w:], pos, attn, last_only=True, decode=True)[:, -1]
        nxt = sample(logits, temperature, top_k, generator, n_vocab)
        out.append(nxt)
        if len(out) == 2:  # the first step alone (with cuda_graph: its eager run and the capture)
            sync()
            t_first = time.perf_counter() - t0
    sync()
    t_decode = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return torch.stack(out, dim=1), {"prefill_s": t_prefill, "decode_s": t_decode, "decode_steps": len(out) - 1,
                                     "first_step_s": t_first if len(out) > 1 else 0.0}


# ----------------------------------------------------------------------------------------------
# Building the attention object for a method

def make_attention(method, cache, opts, use_kernels):
    """The attention object for --method (see each method's file for what the options mean)."""
    if method == "dense":
        return DenseAttention(cache, use_kernels=use_kernels)
    if method == "quest":
        return QuestAttention(cache, opts.budget, opts.page_size, opts.dense_layers, use_kernels=use_kernels,
                              page_choice=getattr(opts, "page_choice", "kv_head"))
    if method == "retro":
        if getattr(opts, "page_choice", "kv_head") != "kv_head":
            raise ValueError("--page-choice query_head is for --method quest (RetroAttention tracks pages per KV head)")
        return RetroAttention(cache, opts.budget, opts.page_size, opts.window, opts.dense_layers,
                              use_kernels=use_kernels)
    if method == "token_sparse":
        decoder = make_attention(opts.decode, cache, opts, use_kernels)
        return TokenSparseAttention(cache, decoder, opts.coverage, opts.min_tokens, opts.ts_window,
                                    opts.sparse_layers, opts.keep, use_kernels=use_kernels,
                                    coverage_rule=getattr(opts, "coverage_rule", "authors"))
    raise ValueError(f"unknown method {method!r}")


def bias_box(name):
    """--bias-box -> compaction.compact_cache's w_box."""
    return AUTHORS_W_BOX if name == "authors" else None


def check_budget(opts, parser):
    try:
        kvcache.check_budget(opts.budget, opts.page_size)
    except ValueError as e:
        parser.error(str(e))


def check_options(opts, parser):
    """The flags' values that need no checkpoint, each refused in one line naming it."""
    if opts.method not in METHODS:
        parser.error(f"--method {opts.method!r} is not a method; choose one of: {', '.join(METHODS)}")
    for flag, value, ok, expected in [
            ("--max-new-tokens", opts.max_new_tokens, opts.max_new_tokens >= 1, ">= 1"),
            ("--temperature", opts.temperature, opts.temperature >= 0, ">= 0 (0 = greedy)"),
            ("--top-k", opts.top_k, opts.top_k >= 0, ">= 0 (0 = all tokens)"),
            ("--prefill-chunk", opts.prefill_chunk, opts.prefill_chunk >= 0, ">= 0 (0 = the whole prompt at once)"),
            ("--dense-layers", opts.dense_layers, opts.dense_layers >= 0, ">= 0"),
            ("--window", opts.window, opts.window >= 1, ">= 1"),
            ("--ratio", opts.ratio, opts.ratio >= 1, ">= 1"),
            ("--max-seq-len", opts.max_seq_len, opts.max_seq_len is None or opts.max_seq_len >= 2, ">= 2")]:
        if not ok:
            parser.error(f"{flag} {value}: expected {expected}")
    check_budget(opts, parser)
    if opts.page_meta != "auto" and not keeps_page_bounds(opts):
        parser.error(f"--page-meta {opts.page_meta}: only quest, retro and token_sparse with --decode quest|retro "
                     f"keep page bounds (got --method {opts.method})")


def keeps_page_bounds(opts):
    """Whether the method decodes page-sparsely, reading the cache's page bounds."""
    return opts.method in ("quest", "retro") or (opts.method == "token_sparse" and opts.decode != "dense")


# ----------------------------------------------------------------------------------------------
# CLI

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage block is what --help is for)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default (flags off by default, or with no default, show none)."""

    def _get_help_string(self, action):
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        return action.help if hidden or "default" in action.help else action.help + " (default: %(default)s)"


def build_parser():
    p = Parser(prog="generate.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"Hugging Face Llama checkpoint directory (default: {DEFAULT_CHECKPOINT.name} if present)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", type=str, default=None, help="prompt text")
    g.add_argument("--prompt-file", type=Path, default=None, help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's instruct chat template")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (what the exactness tests use)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache size (default: prompt + new tokens)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="attention implementation: Triton kernels or PyTorch ops (auto: triton on cuda)")
    p.add_argument("--method", default="dense", help=f"attention method, one of: {', '.join(METHODS)}")
    p.add_argument("--prefill-chunk", type=int, default=1024,
                   help="feed a long prompt in chunks of about this many tokens (0 = at once; token_sparse "
                        "and compact always prefill at once)")
    p.add_argument("--quiet", action="store_true", help="do not stream the text or progress, print only the statistics")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the decode step in a CUDA graph and replay it (every method; on a GPU with the "
                        "Triton kernels)")
    q = p.add_argument_group("page-sparse decoding (quest, retro)")
    q.add_argument("--budget", type=int, default=512,
                   help="KV tokens read per KV head per decode step in each sparse layer, a multiple of "
                        "--page-size (default 512); with --page-choice query_head, per query head")
    q.add_argument("--page-choice", choices=["kv_head", "query_head"], default="kv_head",
                   help="quest: one page list per KV head, the group's bounds summed (default, ours: a page "
                        "is read once per group), or one per query head (Quest's own GQA code: up to G x the reads)")
    q.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    q.add_argument("--dense-layers", type=int, default=2, help="first layers kept dense (Quest's default: 2)")
    q.add_argument("--page-meta", choices=list(kvcache.PAGE_META_DTYPES), default="auto",
                   help="how the per-page key min/max that Quest scores pages by are stored: auto = in the cache's "
                        "dtype; int8 = as int8 with one fp32 scale per page and KV head, rounded outward so the "
                        "score stays an upper bound (at head dim 128 in bf16: 260 bytes per page and KV head "
                        "instead of 512, the bytes every decode step's scoring reads)")
    r = p.add_argument_group("RetroAttention (retro)")
    r.add_argument("--window", type=int, default=2,
                   help="w: rows per decode step, the new token and the w-1 past tokens whose outputs it revises "
                        "(w = 1 is Quest; 2 as in the paper's main experiments)")
    t = p.add_argument_group("Token Sparse Attention (token_sparse): a PREFILL method; --decode picks the decoding")
    t.add_argument("--decode", choices=["dense", "quest", "retro"], default="dense",
                   help="how to decode after a token-sparse prefill")
    t.add_argument("--coverage", type=float, default=0.005, help="tau: attention mass a head may drop (0 = dense)")
    t.add_argument("--min-tokens", type=int, default=1024, help="never keep fewer tokens per head")
    t.add_argument("--ts-window", type=int, default=128, help="last queries that score the tokens (always kept)")
    t.add_argument("--coverage-rule", choices=["authors", "per_head"], default="authors",
                   help="authors: heads averaged then normalized, n + 1 dropped (the authors' code; default); "
                        "per_head: each head normalized first, n dropped")
    t.add_argument("--sparse-layers", default="half",
                   help="'half' (second half: 16-31 of 32; default), 'all', 'a-b' or 'a,b,c' (the authors' "
                        "profiled list for Llama-3.1-8B is 15-30)")
    t.add_argument("--keep", type=float, default=None, help="fixed budget: keep this fraction of tokens per head")
    c = p.add_argument_group("KV compaction by attention matching (compact)")
    c.add_argument("--ratio", type=float, default=10.0, help="compaction ratio: keep prompt_tokens / ratio keys per head")
    c.add_argument("--bias-box", choices=["authors", "none"], default=BIAS_BOX_DEFAULT,
                   help="bounds on a kept key's weight exp(beta): authors = [e^-3, e^3] (the authors' code), "
                        f"none = exact NNLS, w >= 0 (default {BIAS_BOX_DEFAULT})")
    return p


def main(argv=None):
    parser = build_parser()
    opts = parser.parse_args(argv)
    check_options(opts, parser)
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    if opts.checkpoint is None and not (DEFAULT_CHECKPOINT / "config.json").is_file():
        parser.error(f"--checkpoint is required (no default model at {DEFAULT_CHECKPOINT})")
    ckpt = opts.checkpoint or DEFAULT_CHECKPOINT
    if not ckpt.is_dir():
        parser.error(f"--checkpoint {ckpt}: no such directory")
    dtype = DTYPES[opts.dtype or ("bf16" if opts.device == "cuda" else "fp32")]
    use_kernels = opts.kernels == "triton" or (opts.kernels == "auto" and opts.device == "cuda")
    if use_kernels and opts.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--kernels triton on --device cpu needs TRITON_INTERPRET=1 (set by itself without a GPU)")
    torch.manual_seed(opts.seed)

    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: the heads split over the processes (tp.py)
    rank = tp.init(opts.device)[0] if world > 1 else 0
    try:
        model = (tp.from_pretrained(ckpt, rank, world, dtype=dtype, device=opts.device) if world > 1
                 else load_model(ckpt, dtype=dtype, device=opts.device))
        if opts.cuda_graph:  # one-launch norms, RoPE, SwiGLU: they pay off under a graph (eagerly Python costs more)
            cudagraph.fuse_kernels(model)
        tokenizer = Tokenizer(ckpt)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot load checkpoint {ckpt}: {e}")
    args = model.args
    if tokenizer.n_words > args.vocab_size:
        raise SystemExit(f"error: {ckpt}: the tokenizer has ids up to {tokenizer.n_words - 1}, but config.json's "
                         f"vocab_size is {args.vocab_size} (expected a tokenizer of at most {args.vocab_size} ids)")
    paged = keeps_page_bounds(opts)
    if paged and opts.dense_layers >= args.n_layers:
        parser.error(f"--dense-layers {opts.dense_layers}: the model has {args.n_layers} layers, so every layer "
                     f"would be dense (expected < {args.n_layers}; or use --method dense)")

    default = opts.prompt is None and opts.prompt_file is None
    if opts.prompt_file is not None and not opts.prompt_file.is_file():
        parser.error(f"--prompt-file {opts.prompt_file}: no such file")
    if default and not opts.quiet:
        print(f"[prompt] {DEFAULT_PROMPT.name}, code the default model never trained on (pass --prompt or "
              f"--prompt-file for your own)", file=sys.stderr)
    path = opts.prompt_file or DEFAULT_PROMPT
    text = opts.prompt if opts.prompt is not None else path.read_text(errors="replace")
    try:
        ids = tokenizer.chat_prompt(text) if opts.chat else tokenizer.encode(text, bos=True)
    except ValueError as e:
        parser.error(str(e))
    context = min(opts.max_seq_len or args.max_seq_len, args.max_seq_len)
    if default:  # the default prompt is cut to leave room for the new tokens
        ids = ids[:max(1, context - opts.max_new_tokens)]
    if default and opts.method == "compact":
        fits = (context - len(repeat_separator(tokenizer))) // 2 + 1  # compaction feeds the prompt twice
        if len(ids) > fits:
            if not opts.quiet:
                print(f"[compact] the default prompt is cut from {len(ids)} to {fits} tokens: the repeat-prefill "
                      f"pass feeds it twice, with a separator, in the model's {context} positions", file=sys.stderr)
            ids = ids[:fits]
    if not ids:
        parser.error("the prompt is empty")
    need = len(ids) + opts.max_new_tokens
    max_seq_len = opts.max_seq_len or need  # the KV cache's size
    if len(ids) >= args.max_seq_len:
        parser.error(f"the prompt has {len(ids)} tokens, more than the model's context of {args.max_seq_len}")
    if need > context:
        parser.error(f"prompt ({len(ids)} tokens) + --max-new-tokens ({opts.max_new_tokens}) = {need} exceeds "
                     f"the context ({context} tokens)")

    prompt = torch.tensor([ids], device=opts.device)
    start_pos = 0
    if opts.method == "compact":
        # prefill + compaction happen in one repeat-prefill pass; decoding continues after the context
        t0 = time.perf_counter()

        def on_layer(i):
            print(f"[compact] layer {i + 1}/{args.n_layers} compacted ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr)
        try:
            res = compact_prompt(model, prompt, opts.ratio, separator_ids=repeat_separator(tokenizer),
                                 bos_id=tokenizer.bos_id, w_box=bias_box(opts.bias_box),
                                 max_new_tokens=opts.max_new_tokens, use_kernels=use_kernels,
                                 page_size=opts.page_size, on_layer=None if opts.quiet else on_layer)
        except ValueError as e:
            parser.error(str(e))
        attn, cache, start_pos = res.attn, res.attn.cache, res.start_pos
        prompt = prompt[:, start_pos:]
        keys = res.stats["keys_per_head"]
        print(f"[compact] {start_pos} prompt tokens -> {keys} keys per KV head ({start_pos / keys:.1f}x; --ratio "
              f"{opts.ratio:g}) in {res.stats['compaction_s']:.2f} s: KV {res.stats['kv_mib_before']:.2f} -> "
              f"{res.stats['kv_mib_after']:.2f} MiB; the last {prompt.shape[1]} prompt token(s) are prefilled next",
              file=sys.stderr)
    else:
        cache = KVCache(args.n_layers, 1, args.n_kv_heads, max_seq_len, args.head_dim, dtype, opts.device,
                        page_size=opts.page_size, page_meta=paged, page_meta_dtype=opts.page_meta)
        try:
            attn = make_attention(opts.method, cache, opts, use_kernels)
        except ValueError as e:
            parser.error(str(e))
    if opts.cuda_graph and (why := cudagraph.unsupported(attn, torch.device(opts.device))):
        parser.error(f"--cuda-graph: {why}")

    new_ids, shown = [], [0]

    def on_token(t):
        new_ids.append(int(t[0]))
        # print only complete UTF-8 characters: a multi-byte character may span two tokens
        text = tokenizer.decode_bytes(new_ids).decode("utf-8", errors="ignore")
        print(text[shown[0]:], end="", flush=True)
        shown[0] = len(text)

    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # token_sparse selects tokens over the whole prompt (and compact's prompt is its last token): one pass
    chunk = None if opts.method in ("token_sparse", "compact") else opts.prefill_chunk or None
    progress = not opts.quiet and chunk is not None and prompt.shape[1] > chunk
    if not opts.quiet:
        print(f"[{opts.method}] prompt: {len(ids)} tokens, generating {opts.max_new_tokens}",
              end="\n" if progress else "\n\n", file=sys.stderr)

    def on_prefill(done, total, seconds):
        end = "\n\n" if done == total else "\n" if not sys.stderr.isatty() else ""
        print(f"\r[prefill] {done}/{total} tokens ({done / seconds:.0f} tok/s)", end=end, file=sys.stderr, flush=True)

    gen = torch.Generator(device=opts.device).manual_seed(opts.seed)
    _, t = generate(model, attn, prompt, opts.max_new_tokens, opts.temperature, opts.top_k,
                    stop_ids=tokenizer.stop_ids if opts.chat else (), generator=gen,
                    on_token=None if opts.quiet else on_token,
                    start_pos=start_pos, n_vocab=tokenizer.n_words, cuda_graph=opts.cuda_graph,
                    prefill_chunk=chunk, on_prefill=on_prefill if progress else None)
    print()
    report(opts, prompt.shape[1], t, attn, cache)
    if world > 1:
        print(f"# tensor parallel: {world} processes; KV figures above are rank 0's ({args.n_kv_heads} KV heads)",
              file=sys.stderr)


def report(opts, n_prompt, t, attn, cache):
    cuda = opts.device == "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peak = torch.cuda.max_memory_allocated() if cuda else rss
    lines = [f"method {opts.method}  device {opts.device}  kernels {'triton' if attn.use_kernels else 'torch'}",
             f"prefill: {n_prompt} tokens in {t['prefill_s']:.3f} s ({n_prompt / t['prefill_s']:.1f} tok/s)",
             f"decode: {t['decode_steps']} steps in {t['decode_s']:.3f} s ({t['decode_steps'] / max(t['decode_s'], 1e-9):.1f} tok/s)",
             f"peak memory: {peak / 2**20:.1f} MiB ({'GPU allocated' if cuda else 'process RSS'}); "
             f"KV cache {cache.nbytes() / 2**20:.1f} MiB"]
    s = attn.stats
    if s.get("decode_steps"):
        lines.append(f"KV bytes read per decoded token: {s['kv_bytes_read'] / s['decode_steps'] / 2**20:.3f} MiB")
    lines += [f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}"
              for key, value in s.items() if key not in ("kv_bytes_read", "decode_steps")]
    print("\n".join("# " + line for line in lines), file=sys.stderr)


if __name__ == "__main__":
    main()
