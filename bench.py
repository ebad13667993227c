"""
Speed of every method against PyTorch SDPA and against the memory-bandwidth limit (needs a GPU).

    python bench.py                        # everything, Llama-3-8B attention shapes, writes results/bench.json
    python bench.py --sections decode --contexts 32768 131072 --batches 1

Decoding is memory bound: a step's time is set by the bytes it reads. So next to each latency we
print the bytes the step really reads (selected K/V pages, page metadata, output-cache rows), the
GB/s that makes, and its ratio to the device's copy bandwidth, measured in the same run
(`dst.copy_(src)`, counting bytes read + written, as a memcpy benchmark does).

Sections:
  decode      one layer's attention step at 8K/32K/128K: SDPA dense, our flash-decoding kernel,
              Quest (page scoring + top-k + paged decode, and each part alone), Retro (W rows from
              one pass), and a compacted cache (ratio 10 / 50: biased paged decode over N / ratio keys).
              Three copies of every input are used in turn, so no call reads the last one's bytes from L2.
  prefill     Token Sparse prefill vs SDPA causal and our flash prefill at 32K/128K
  compaction  compacting a 32K context of a Llama-3-8B-shaped layer stack, ratios 10 and 50, and the
              NNLS solve's share (--compaction-shape smollm2-135m --compaction-contexts 4096
              --compaction-batch 16 --compaction-ratios 8 4: a RULER cell's batch on SmolLM2)
  e2e         a decode loop on a Llama-3.1-8B-shaped model with random weights (bf16; --e2e-contexts prompt
              lengths): tok/s eager and from a CUDA graph, and where a graph step's time goes (matrix
              products / attention / page selection / other) against its bytes-per-token bound
Timings: triton.testing.do_bench (warm-up excluded, L2 flushed between runs), milliseconds.
"""

import argparse
import itertools
import json
import os
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported, as conftest.py (main() then stops: no GPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

import cudagraph  # noqa: E402
import kernels  # noqa: E402
import tp  # noqa: E402
import token_sparse as ts  # noqa: E402
from attention import DenseAttention  # noqa: E402
import compaction  # noqa: E402
from compaction import compact_cache  # noqa: E402
from generate import generate  # noqa: E402
from kernels import select_pages  # noqa: E402
from kvcache import KVCache, QuestAttention, quest_pages  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from nnls import nnls_gram  # noqa: E402
from retro import RetroAttention, retro_decode, window_merge  # noqa: E402

HQ, HKV, D = 32, 8, 128  # Llama-3-8B attention


def ms(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=25, rep=rep)


def ms_graph(fn, rep=100):
    """The same call replayed from a CUDA graph: GPU time without Python's launch overhead, which at
    batch 1 is larger than the kernels themselves. None if the call cannot be captured."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep)
    except Exception:
        return None


def copy_bandwidth(device="cuda"):
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.empty(2**30, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src)) / 1e3
    return 2 * src.numel() * 2 / t


def sdpa_decode(q, k, v):
    # q (B, Hq, D); k, v (B, Hkv, N, D). enable_gqa lets SDPA share KV heads without copying them.
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)


def table(rows, cols):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        out.append("| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in cells) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------

def rotating(fn, n):
    """A call that runs fn(0), fn(1), ..., fn(n - 1), fn(0), ... in turn. Each i reads its own copy of
    the inputs, so a CUDA-graph replay of many calls does not find the previous call's bytes in L2
    (50 MB on an H100, more than a batch-1 sparse step reads)."""
    it = itertools.cycle(range(n))
    return lambda: fn(next(it))


def bench_decode(contexts, batches, budgets, copy_bw, retro_windows=(2, 8), ratios=(10, 50), S=16, copies=3):
    rows = []
    for B in batches:
        for N in contexts:
            g = torch.Generator(device="cuda").manual_seed(0)
            P = N // S
            # `copies` independent caches (K, V, page bounds, queries), see rotating()
            ks = [torch.randn(B, HKV, N, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            vs = [torch.randn_like(k) for k in ks]
            qs = [torch.randn(B, HQ, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            kmins = [k.view(B, HKV, P, S, D).amin(3) for k in ks]
            kmaxs = [k.view(B, HKV, P, S, D).amax(3) for k in ks]
            esz = 2
            dense_bytes = 2 * B * HKV * N * D * esz

            def add(method, budget, fn, nbytes):
                fn = rotating(fn, copies)
                t, tg = ms(fn), ms_graph(fn)
                gbps = nbytes / (t / 1e3) / 1e9
                row = dict(batch=B, context=N, method=method, budget=budget, ms=t, bytes_MB=nbytes / 1e6,
                           GBps=gbps, frac_copy_bw=gbps * 1e9 / copy_bw, ms_graph=tg)
                if tg is not None:
                    row["frac_copy_bw_graph"] = nbytes / (tg / 1e3) / copy_bw
                rows.append(row)
                return t

            first = len(rows)  # this (batch, context)'s rows start here; the first is SDPA's
            t_sdpa = add("sdpa dense", N, lambda i: sdpa_decode(qs[i], ks[i], vs[i]), dense_bytes)
            add("ours dense (flash_decode)", N, lambda i: kernels.flash_decode(qs[i], ks[i], vs[i], N), dense_bytes)
            meta_bytes = 2 * B * HKV * P * D * esz
            for budget in budgets:
                K = budget // S
                sel_bytes = 2 * B * HKV * budget * D * esz

                def quest_step(i):
                    s = kernels.page_scores(qs[i], kmins[i], kmaxs[i], P)
                    return kernels.paged_decode(qs[i], ks[i], vs[i], select_pages(s, P * S, S, K), N, S)
                add("quest", budget, quest_step, sel_bytes + meta_bytes)
                idx = [select_pages(kernels.page_scores(qs[i], kmins[i], kmaxs[i], P), P * S, S, K) for i in range(copies)]
                add("quest: page_scores only", budget, lambda i: kernels.page_scores(qs[i], kmins[i], kmaxs[i], P),
                    meta_bytes)
                scores = [kernels.page_scores(qs[i], kmins[i], kmaxs[i], P) for i in range(copies)]
                add("quest: select_pages only", budget, lambda i: select_pages(scores[i], P * S, S, K), B * HKV * P * 4)
                add("quest: paged_decode only", budget, lambda i: kernels.paged_decode(qs[i], ks[i], vs[i], idx[i], N, S),
                    sel_bytes)
                for w in retro_windows:
                    qw = [torch.randn(B, HQ, w, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
                    A = [torch.randint(N - 64, N, (B, HKV, P), generator=g, device="cuda", dtype=torch.int32)
                         for _ in range(copies)]

                    o_cache = [torch.randn(B, HQ, w - 1, D, generator=g, device="cuda") for _ in range(copies)]
                    lse_cache = [torch.randn(B, HQ, w - 1, generator=g, device="cuda") for _ in range(copies)]

                    def retro_step(i):  # as RetroAttention.decode: + the output cache's merge and shift
                        s = kernels.page_scores(qw[i][:, :, -1], kmins[i], kmaxs[i], P)
                        pages = select_pages(s, P * S, S, K)  # A = t is set in the kernel, after A is read
                        if w == 1:
                            return retro_decode(qw[i], ks[i], vs[i], pages, A[i], N, S, update_last_loaded=True)
                        parts = retro_decode(qw[i], ks[i], vs[i], pages, A[i], N, S, update_last_loaded=True,
                                             partials=True)
                        return window_merge(*parts, o_cache[i], lse_cache[i], torch.bfloat16)
                    # output cache rows read + written in fp32 and A read/written come on top of Quest's bytes
                    aux = 2 * (w - 1) * B * HQ * (D + 1) * 4 + 2 * B * HKV * K * 4
                    add(f"retro w={w}", budget, retro_step, sel_bytes + meta_bytes + aux)
            for r in ratios:
                n_c = N // r
                bias = torch.zeros(B, HKV, N, device="cuda")
                all_pages = torch.arange(-(-n_c // S), dtype=torch.int32, device="cuda").expand(B, HKV, -1).contiguous()
                add(f"compacted ratio {r}", n_c,
                    lambda i: kernels.paged_decode(qs[i], ks[i], vs[i], all_pages, n_c, S, bias=bias),
                    2 * B * HKV * n_c * D * esz + B * HKV * n_c * 4)
            t_sdpa_graph = rows[first]["ms_graph"]
            for r in rows[first:]:
                r["speedup_vs_sdpa"] = t_sdpa / r["ms"]
                if r["ms_graph"] and t_sdpa_graph:
                    r["speedup_vs_sdpa_graph"] = t_sdpa_graph / r["ms_graph"]
            ks = vs = kmins = kmaxs = qs = None  # free this configuration's copies
            torch.cuda.empty_cache()
    return rows


def bench_prefill(lengths, keeps=(0.5, 0.25, 0.125), coverage=0.005):
    rows = []
    for L in lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, HQ, L, D, generator=g, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, L, D, generator=g, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        t_sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), rep=20)
        t_ours = ms(lambda: kernels.flash_prefill(q, k, v, causal=True), rep=20)
        rows.append(dict(L=L, mode="dense", kept=1.0, sdpa_ms=t_sdpa, flash_prefill_ms=t_ours, select_ms=0.0,
                         attend_ms=t_ours, total_ms=t_ours, speedup_vs_sdpa=t_sdpa / t_ours))
        for mode, keep, cov in [(f"keep {kp}", kp, 0.0) for kp in keeps] + [(f"coverage {coverage} (random q/k)", None, coverage)]:
            def select():
                return ts.select_tokens(q, k, cov, 1024, 128, keep, use_kernels=True)
            idx, n_keep = select()
            t_sel = ms(select, rep=20)
            t_var = ms(lambda: ts.sparse_attention(q, k, v, idx, n_keep), rep=20)
            t_gat = ms(lambda: ts.sparse_attention_gathered(q, k, v, idx, n_keep), rep=20)
            rows.append(dict(L=L, mode=mode, kept=float(n_keep.float().mean()) / L, sdpa_ms=t_sdpa,
                             flash_prefill_ms=t_ours, select_ms=t_sel, attend_ms=min(t_var, t_gat),
                             varlen_ms=t_var, gather_ms=t_gat, total_ms=t_sel + min(t_var, t_gat),
                             speedup_vs_sdpa=t_sdpa / (t_sel + min(t_var, t_gat))))
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _layer_tensors(B, Hq, Hkv, T, M, D, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    basis = torch.randn(Hkv, 16, D, generator=g, device=device)
    k = torch.randn(B, Hkv, T, 16, generator=g, device=device) @ basis + torch.randn(B, Hkv, T, D, generator=g, device=device)
    k[:, :, 0] += 3.0  # an attention sink
    v = torch.randn(B, Hkv, T, D, generator=g, device=device)
    q = torch.randn(B, Hq, M, 16, generator=g, device=device) @ basis.repeat_interleave(Hq // Hkv, 0) \
        + torch.randn(B, Hq, M, D, generator=g, device=device)
    return k.to(dtype) * 0.5, v.to(dtype), q.to(dtype) * 0.5


COMPACTION_SHAPES = {  # layers, query heads, KV heads, head dim of the compacted layer stack
    "llama3-8b": dict(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128),
    "smollm2-135m": dict(n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64),
}


def bench_compaction(ctx_len=32768, ref_queries=4096, ratios=(10, 50), n_layers=32, n_heads=32, n_kv_heads=8,
                     head_dim=128, dtype=torch.bfloat16, device="cuda", batch=1, seed=0, **compact_kwargs):
    """Compaction of every layer's cache (key selection, NNLS biases, value fit) from K, V and
    reference queries already there; not the repeat-prefill forward that produces them. K, V, Q are
    random with a low-rank structure and an attention sink, so attention is neither flat nor one-hot.
    -> one dict per ratio: seconds for all layers and per layer, peak extra memory, KV MiB before
    and after, and the mean output / mass errors on the reference queries."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for ratio in ratios:
        budget = max(1, round(ctx_len / ratio))
        # warm-up on one layer (cuBLAS / cuSOLVER handles, allocator)
        k, v, q = _layer_tensors(batch, n_heads, n_kv_heads, ctx_len, ref_queries, head_dim, dtype, dev, seed)
        compact_cache(k, v, q, budget, **compact_kwargs)
        del k, v, q
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        seconds, out_err, mass_err = 0.0, 0.0, 0.0
        nnls_seconds = [0.0]

        def timed_nnls(*args, **kw):  # the NNLS solve's share (compaction.compact_cache calls it once)
            sync()
            t = time.perf_counter()
            out = nnls_gram(*args, **kw)
            sync()
            nnls_seconds[0] += time.perf_counter() - t
            return out
        compaction.nnls_gram = timed_nnls
        try:
            for layer in range(n_layers):
                k, v, q = _layer_tensors(batch, n_heads, n_kv_heads, ctx_len, ref_queries, head_dim, dtype, dev,
                                         seed + layer)
                sync()
                t0 = time.perf_counter()
                c = compact_cache(k, v, q, budget, **compact_kwargs)
                sync()
                seconds += time.perf_counter() - t0
                out_err += float(c.out_err.mean()) / n_layers
                mass_err += float(c.mass_err.mean()) / n_layers
                del k, v, q, c
        finally:
            compaction.nnls_gram = nnls_gram
        elem = torch.empty((), dtype=dtype).element_size()
        kv_before = 2 * n_layers * batch * n_kv_heads * ctx_len * head_dim * elem
        kv_after = n_layers * batch * n_kv_heads * budget * (2 * head_dim * elem + 4)  # + fp32 bias
        rows.append({"ctx_len": ctx_len, "batch": batch, "ratio": ratio, "keys_per_head": budget, "seconds": seconds,
                     "s_per_layer": seconds / n_layers, "nnls_s_per_layer": nnls_seconds[0] / n_layers,
                     "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else None,
                     "kv_mib_before": kv_before / 2**20, "kv_mib_after": kv_after / 2**20,
                     "out_err": out_err, "mass_err": mass_err})
    return rows


def matmul_weights(model):
    """The weight of every matrix product of a decode step, as the fused model runs them (cudagraph.fuse_kernels:
    q, k, v one product, gate and up one product)."""
    ws = [model.lm_head.weight]
    for layer in model.layers:
        ws += [layer.self_attn.qkv_weight, layer.self_attn.o_proj.weight, layer.mlp.gate_up_weight,
               layer.mlp.down_proj.weight]
    return ws


def step_split(model, attn, window, budget, copy_bw, stats):
    """Where the time of a decode step replayed from a CUDA graph goes, on the cache generate() filled: the
    whole step, the matrix products alone (batch 1), the attention object's decode over all layers (cache
    append and page selection included) and the page selection alone, each replayed from its own graph;
    other = step - products - attention. Beside them the step's bytes (weights + what the attention read,
    from its stats) over the copy bandwidth, the step's lower bound. For Quest also one sparse layer's
    step (page scores + selection + paged decode) against its own bound. -> dict (ms, us, ratios)."""
    cache, dev = attn.cache, "cuda"
    L, B, Hkv, _, D = cache.k.shape
    Hq, n = model.args.n_heads, cache.length(0)
    tok = torch.zeros(B, window, dtype=torch.long, device=dev)
    pos = torch.arange(n + 1 - window, n + 1, device=dev)  # a step appending position n (rewritten by each replay)
    q = torch.randn(B, window, Hq, D, device=dev, dtype=cache.k.dtype)
    k = torch.randn(B, window, Hkv, D, device=dev, dtype=cache.k.dtype)
    ws = matmul_weights(model)
    xs = [torch.randn(1, 1, w.shape[1], device=dev, dtype=w.dtype) for w in ws]
    seq_len = torch.tensor([n + 1], dtype=torch.int32, device=dev)
    graph_ms = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50)  # noqa: E731 (raises if not capturable)
    n_dense = L if isinstance(attn, DenseAttention) else (attn.n_dense if isinstance(attn, QuestAttention)
                                                          else attn.dense_layers)
    t = dict(step_ms=graph_ms(lambda: model(tok, pos, attn, last_only=True, decode=True)),
             linear_ms=graph_ms(lambda: [cudagraph.linear(x, w) for x, w in zip(xs, ws)]),
             attention_ms=graph_ms(lambda: [attn.decode(i, q, k, k, pos) for i in range(L)]), selection_ms=0.0)
    if n_dense < L:
        t["selection_ms"] = graph_ms(lambda: [quest_pages(q[:, -1], cache, i, budget, seq_len, True)
                                              for i in range(n_dense, L)])
    t["other_ms"] = t["step_ms"] - t["linear_ms"] - t["attention_ms"]
    t["attention_ms"] -= t["selection_ms"]  # (attention proper: what is left of the decode calls)
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    nbytes += (stats["kv_bytes_read"] + stats.get("retro_aux_bytes", 0)) / stats["decode_steps"]
    t["bound_ms"] = nbytes / copy_bw * 1e3
    t["step_over_bound"] = t["step_ms"] / t["bound_ms"]
    if isinstance(attn, QuestAttention) and n_dense < L:
        S, esz, i = cache.page_size, cache.k.element_size(), L - 1
        t["quest_step_us"] = 1e3 * graph_ms(lambda: kernels.paged_decode(
            q[:, -1], cache.k[i], cache.v[i], quest_pages(q[:, -1], cache, i, budget, seq_len, True), seq_len, S)[0])
        # its three kernels one at a time, on the same inputs
        kmin, kmax, scale = cache.page_bounds(i)
        P = cache.num_pages_max
        scores = kernels.page_scores(q[:, -1], kmin, kmax, P, seq_len, S, scale)
        pages = kernels.select_pages(scores, seq_len, S, budget // S)
        t["scores_us"] = 1e3 * graph_ms(lambda: kernels.page_scores(q[:, -1], kmin, kmax, P, seq_len, S, scale))
        t["select_us"] = 1e3 * graph_ms(lambda: kernels.select_pages(scores, seq_len, S, budget // S))
        t["paged_decode_us"] = 1e3 * graph_ms(lambda: kernels.paged_decode(q[:, -1], cache.k[i], cache.v[i], pages,
                                                                           seq_len, S)[0])
        # the bounds of the pages in use and the K/V of the chosen ones, each read once
        t["quest_bound_us"] = (cache.bound_bytes() * -(-(n + 1) // S) + 2 * B * Hkv * D * esz * budget) / copy_bw * 1e6
        t["quest_step_over_bound"] = t["quest_step_us"] / t["quest_bound_us"]
    return t


E2E_METHODS = ("dense", "quest", "quest-int8", "retro")


def bench_e2e(prompt_len=32768, new_tokens=256, budget=4096, retro_windows=(2, 8), copy_bw=None, methods=E2E_METHODS):
    """tokens/s of generate.generate on a Llama-3.1-8B-shaped model with random weights: every method
    eagerly, then with the decode step replayed from a CUDA graph (--cuda-graph; the
    decode time includes the first step's capture). A short warm-up run compiles the kernels first.
    After each graph run, step_split says where a step's time goes (needs copy_bw, bytes/s)."""
    args = ModelArgs(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                     hidden_dim=14336, rope_theta=500000.0, max_seq_len=prompt_len + new_tokens + 64,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = Transformer(args).eval()
        torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)  # (under torchrun every rank draws the same full model, then keeps its heads)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    if torch.distributed.is_initialized():
        args = tp.shard(model, torch.distributed.get_rank(), torch.distributed.get_world_size()).args
    cudagraph.fuse_kernels(model)  # as generate.py --cuda-graph does
    prompt = torch.randint(0, args.vocab_size, (1, prompt_len), device="cuda")
    rows, tokens = [], {}  # tokens: (method, mode) -> greedy tokens
    def method(name, w):
        cache = KVCache(args.n_layers, 1, args.n_kv_heads, args.max_seq_len, args.head_dim, torch.bfloat16, "cuda",
                        page_meta=name != "dense", page_meta_dtype="int8" if name == "quest-int8" else "auto")
        if name == "dense":
            return DenseAttention(cache, use_kernels=True)
        if name.startswith("quest"):
            return QuestAttention(cache, budget, 16, use_kernels=True)
        return RetroAttention(cache, budget, 16, window=w, use_kernels=True, track_exposure=False)

    # quest-int8: the page bounds as int8 + a scale per page (generate.py --page-meta int8), half the bytes
    runs = [(m, 1) for m in methods if m != "retro"] + [("retro", w) for w in retro_windows if "retro" in methods]
    for graph, (name, w) in itertools.product([False, True], runs):
        attn = method(name, w)  # warm-up: Triton compiles this configuration's kernels (not timed)
        generate(model, attn, prompt[:, :2 * budget], 4, window=w, cuda_graph=graph)
        attn = method(name, w)
        torch.cuda.reset_peak_memory_stats()
        out, t = generate(model, attn, prompt, new_tokens, window=w, cuda_graph=graph)
        rows.append(dict(method=name if name != "retro" else f"retro w={w}", budget=budget if name != "dense" else prompt_len,
                         prefill_s=t["prefill_s"], tok_per_s=t["decode_steps"] / t["decode_s"],
                         # without the first step (with --cuda-graph: the capture), as gpt-fast times after its warm-up
                         tok_per_s_after_first=(t["decode_steps"] - 1) / max(t["decode_s"] - t["first_step_s"], 1e-9),
                         first_step_s=t["first_step_s"],
                         peak_GiB=torch.cuda.max_memory_allocated() / 2**30, mode="CUDA graph" if graph else "eager"))
        tokens[rows[-1]["method"], rows[-1]["mode"]] = out[0].tolist()
        if graph and copy_bw:
            try:
                with torch.no_grad():
                    rows[-1].update(step_split(model, attn, w, budget, copy_bw, attn.stats))
            except Exception as e:  # the tok/s figures stand without the split
                traceback.print_exc()
                rows[-1]["split_error"] = f"{type(e).__name__}: {e}"
        del attn
        torch.cuda.empty_cache()
    for r in rows:  # a replay computes what the eager loop computes (split plans differ: bf16 rounding may)
        eager = tokens[r["method"], "eager"]
        r["same_tokens_as_eager"] = sum(x == y for x, y in zip(tokens[r["method"], r["mode"]], eager)) / len(eager)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["decode", "prefill", "compaction", "e2e"],
                   choices=["decode", "prefill", "compaction", "e2e"])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--e2e-contexts", type=int, nargs="+", default=[32768], help="prompt lengths of the e2e section")
    p.add_argument("--e2e-new-tokens", type=int, default=256, help="tokens decoded per e2e run")
    p.add_argument("--e2e-methods", nargs="+", choices=E2E_METHODS, default=list(E2E_METHODS),
                   help="methods of the e2e section (retro: w=2 and w=8; default all)")
    p.add_argument("--compaction-shape", choices=sorted(COMPACTION_SHAPES), default="llama3-8b",
                   help="the layer stack of the compaction section (default llama3-8b)")
    p.add_argument("--compaction-contexts", type=int, nargs="+", default=[32768],
                   help="context lengths of the compaction section (keys per KV head before compaction)")
    p.add_argument("--compaction-batch", type=int, default=1, help="sequences compacted together")
    p.add_argument("--compaction-ratios", type=float, nargs="+", default=[10, 50])
    p.add_argument("--no-pdl", action="store_true",
                   help="launch each kernel after the one before has finished (kernels.PDL off; for a before/after)")
    p.add_argument("--out", type=Path, default=Path("results/bench.json"))
    a = p.parse_args()
    kernels.PDL = not a.no_pdl
    if a.e2e_new_tokens < 1 or min(a.e2e_contexts) < 1:
        raise SystemExit("bench.py: --e2e-contexts and --e2e-new-tokens must be >= 1")
    if min(a.compaction_contexts) < 1 or a.compaction_batch < 1 or min(a.compaction_ratios) < 1:
        raise SystemExit("bench.py: --compaction-contexts and --compaction-batch must be >= 1, --compaction-ratios >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("bench.py measures GPU kernels: no CUDA GPU is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: e2e with the heads split (tp.py)
    if world > 1 and a.sections != ["e2e"]:
        raise SystemExit(f"under torchrun bench.py runs --sections e2e only, got --sections {' '.join(a.sections)}")
    if world > 1 and tp.init("cuda")[0]:
        a.out = Path(os.devnull)  # rank 0 writes the results
    info = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                triton=triton.__version__, gpus=world, pdl=kernels.pdl(torch.device("cuda"))["PDL"])
    bw = copy_bandwidth()
    info["copy_bandwidth_GBps"] = bw / 1e9
    print(f"# {info['device']}  {info['date']}  torch {info['torch']}  triton {info['triton']}  "
          f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)\n")
    results = {"info": info}
    sections = {
        "decode": ("Decode attention step (one layer, Hq=32, Hkv=8, D=128, bf16)",
                   lambda: bench_decode(a.contexts, a.batches, a.budgets, bw),
                   ["batch", "context", "method", "budget", "ms", "bytes_MB", "frac_copy_bw", "speedup_vs_sdpa",
                    "ms_graph", "frac_copy_bw_graph", "speedup_vs_sdpa_graph"]),
        "prefill": ("Token Sparse prefill attention (one layer, batch 1)",
                    lambda: bench_prefill(a.prefill_lengths),
                    ["L", "mode", "kept", "sdpa_ms", "flash_prefill_ms", "select_ms", "attend_ms", "total_ms",
                     "speedup_vs_sdpa"]),
        "compaction": (f"KV compaction time ({a.compaction_shape}: {COMPACTION_SHAPES[a.compaction_shape]}; reference "
                       f"queries = min(context, 4096) per query head, bf16; random K, V, Q)",
                       lambda: [r for n in a.compaction_contexts for r in bench_compaction(
                           n, min(n, 4096), a.compaction_ratios, batch=a.compaction_batch,
                           **COMPACTION_SHAPES[a.compaction_shape])],
                       ["ctx_len", "batch", "ratio", "keys_per_head", "seconds", "s_per_layer", "nnls_s_per_layer",
                        "peak_extra_mib", "kv_mib_before", "kv_mib_after", "out_err", "mass_err"]),
        "e2e": (f"End-to-end decode, Llama-3.1-8B-shaped random model (bf16, {a.e2e_new_tokens} new tokens, batch 1)",
                lambda: [dict(prompt_len=n, new_tokens=a.e2e_new_tokens, **r) for n in a.e2e_contexts
                         for r in bench_e2e(prompt_len=n, new_tokens=a.e2e_new_tokens, copy_bw=bw,
                                            methods=a.e2e_methods)],
                ["prompt_len", "method", "mode", "tok_per_s", "tok_per_s_after_first", "first_step_s", "step_ms",
                 "linear_ms", "attention_ms", "selection_ms", "other_ms", "bound_ms", "step_over_bound", "quest_step_us",
                 "scores_us", "select_us", "paged_decode_us", "quest_bound_us", "quest_step_over_bound", "prefill_s", "peak_GiB", "same_tokens_as_eager"]),
    }
    for name in a.sections:
        title, run, cols = sections[name]
        try:
            results[name] = run()
        except Exception as e:  # one broken section must not cost the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"## {title}: FAILED ({type(e).__name__}: {e})\n", flush=True)
            continue
        print(f"## {title}\n\n{table(results[name], cols)}\n", flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1))  # after each section: a later crash keeps these
        torch.cuda.empty_cache()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
