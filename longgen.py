"""
Long generation against dense, the regime RetroAttention (arXiv 2508.09001) is about: a sparse
decode step reads a budget of the KV cache, and its error passes to the next layers and, through
the keys and values of the tokens it generates, to every later step. How far does each method stay with dense, and does
RetroAttention's revision of past rows make the difference the paper claims?

Why a file of its own: this is one measurement with its own pieces, used by `eval.py --longgen` and
by the `--sweep` and `--real` agreement columns: teacher forcing through a method's decode loop, a
recorder of each layer's attention output, the error of a row by the steps since it was first
computed, and intervals over prompts. eval.py keeps the running (data, methods, saving).

Per prompt, dense decodes its greedy continuation y_1..y_N first. Then each method is fed y one
decode step at a time (teacher forcing: every method sees the same tokens, so the measures compare
like with like):
    top-1 agreement  mean_t [argmax p_method(. | y_<t) == argmax p_dense(. | y_<t)]
    KL               mean_t KL(p_dense || p_method), nats
    first divergence the first t where the method's own greedy generation leaves y (N if never)
and the attention output error of layer l at position i, computed s steps after i was new:
    e_l(i, s) = ||o_l(i, s) - o_dense_l(i)|| / ||o_dense_l(i)||
(for the positions i a decode step computed: the prompt's rows, prefilled, are not scored).
RetroAttention feeds w rows per step, the new token (s = 0) and the w - 1 before it, revised with
the pages the new query chose (retro.py): if revision helps, e(s) falls with s. Intervals are
95% percentile bootstrap over prompts; Retro minus Quest is paired by prompt (ruler.py).

Prompts of one length run together, up to `batch` rows at a time (as ruler.answer): each row
attends only to its own cache, so it measures what it would alone. Each step's rows are scored as
the step is taken (sums of e by layer, row and s), so the memory does not grow with the steps.
On a GPU the decode steps replay a CUDA graph (cudagraph.py): the recorder copies each layer's
output into one buffer, a copy the graph records and replays, since a replay runs no Python hook.
"""

import numpy as np
import torch
import torch.nn.functional as F

import cudagraph
import ruler
from generate import generate


# ----------------------------------------------------------------------------------------------
# Teacher forcing through a method's decode loop

def decode_step(model, attn, window, device, cuda_graph=False):
    """-> step(tokens (B, m), pos (m,)) -> the last row's next-token logits (B, V) fp32, a tensor of
    its own. cuda_graph: a step of `window` rows replays one captured graph (a shorter one, at the
    start of a prompt shorter than the window, runs eagerly, as in generate.generate)."""
    graph = cudagraph.GraphDecodeStep(model, attn, device) if cuda_graph else None

    def step(tokens, pos):
        if graph is not None and tokens.shape[1] == window:
            return graph(tokens, pos).clone()  # the graph's output is overwritten by the next replay
        return model(tokens, pos, attn, last_only=True, decode=True)[:, -1]
    return step


@torch.no_grad()
def teacher_forced_logits(model, attn, prompt, forced, start_pos=0, window=1, cuda_graph=False, on_step=None):
    """Prefill `prompt` (B, T) at positions start_pos.. through the method, then feed `forced` (B, N)
    one decode step at a time (the last `window` rows per step, as generate does): -> (B, N, V) fp32,
    [b, i] the logits that predict forced[b, i] from everything before it in row b. on_step(pos):
    called after each decode step with the positions (m,) of the rows it fed (AttentionErrors.take)."""
    logits = [model(prompt, torch.arange(start_pos, start_pos + prompt.shape[1]), attn, last_only=True)[:, -1]]
    step = decode_step(model, attn, window, prompt.device, cuda_graph)
    tokens = prompt
    for i in range(forced.shape[1] - 1):
        tokens = torch.cat([tokens, forced[:, i:i + 1]], dim=1)
        n = start_pos + tokens.shape[1]
        w = min(window, tokens.shape[1])
        pos = torch.arange(n - w, n, device=prompt.device)
        logits.append(step(tokens[:, -w:], pos))
        if on_step:
            on_step(pos)
    return torch.stack(logits, dim=1).float()


def teacher_forced_agreement(model, attn, prompt, forced, start_pos=0, window=1, cuda_graph=False):
    """Feed `forced` (B, N) (the dense model's greedy continuation) through the method's decode loop
    and count where the method's own greedy choice agrees: -> top-1 match rate over rows and steps."""
    logits = teacher_forced_logits(model, attn, prompt, forced, start_pos, window, cuda_graph)
    return (logits.argmax(-1) == forced).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Attention outputs, and their error by steps back

class AttentionOutputs:
    """Records what every layer's attention hands to its output projection, through a forward
    pre-hook on o_proj (model.py is not changed): `with AttentionOutputs(model) as rec:`; after
    each model call rec.buffer holds its rows, (layers, B, m, Hq * D) in the model's dtype, until
    the next call overwrites them. The hook copies into one buffer instead of keeping the tensor:
    a replayed CUDA graph runs no Python, but it replays the copy it recorded."""

    def __init__(self, model):
        self.model, self.buffer = model, None

    def __enter__(self):
        def hook(i):
            def copy(module, args):
                x = args[0].detach()  # (B, m, Hq * D)
                if i == 0 and (self.buffer is None or self.buffer.shape[1:] != x.shape):
                    self.buffer = x.new_empty((len(self.model.layers), *x.shape))  # a call of another shape
                self.buffer[i].copy_(x)
            return copy
        self.handles = [layer.self_attn.o_proj.register_forward_pre_hook(hook(i))
                        for i, layer in enumerate(self.model.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def dense_attention_outputs(model, seq):
    """Each layer's attention output rows of one plain causal forward of seq (B, T): (layers, B, T,
    Hq * D) in the model's dtype (the scoring widens them to fp32)."""
    with AttentionOutputs(model) as rec:
        model(seq, last_only=True)  # (the logits of every position would be (B, T, V) fp32, unused)
    return rec.buffer


class AttentionErrors:
    """Relative L2 error of each layer's attention output against dense's at the same position,
    ||o - o_dense|| / ||o_dense||, by steps back, summed as a teacher-forced decode takes its steps
    (on_step=errors.take): only the sums are kept. A step fed the m rows ending at the new token's
    position: the new token, s = 0, and the m - 1 before it, revised s = 1 .. m - 1 steps after their
    first computation. The prefill's rows are not scored (take is not called for them).
    rec: the AttentionOutputs recording the decode; reference: (layers, B, T, Hq * D) dense's
    outputs of each row's prompt + continuation."""

    def __init__(self, rec, reference, window):
        L, B = reference.shape[:2]
        self.rec, self.reference = rec, reference
        self.sums = torch.zeros(L, B, window, dtype=torch.float64, device=reference.device)
        self.counts = torch.zeros(window, dtype=torch.float64)  # the same for every row: rows step together

    def take(self, pos):
        """Score the step just taken, whose rows sit at positions pos (m,)."""
        rows = self.rec.buffer.float()                                        # (L, B, m, Hq * D)
        ref = self.reference[:, :, pos].float()
        e = (rows - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)   # (L, B, m); row j: s = m-1-j
        m = e.shape[-1]
        self.sums[..., :m] += e.flip(-1).double()                             # column s: s steps back
        self.counts[:m] += 1

    def means(self):
        """-> per row, (layers, window) mean errors (NaN where no row was that many steps back)."""
        with np.errstate(invalid="ignore"):
            return list((self.sums.cpu() / self.counts).transpose(0, 1).numpy())


# ----------------------------------------------------------------------------------------------
# One run over the prompts, up to `batch` rows at a time

def groups(prompts, batch):
    """Consecutive prompts of one length, up to `batch` at a time: -> lists of indices, in order.
    The rows of one batch share their positions, so they must have one length."""
    out = []
    for i, p in enumerate(prompts):
        if out and len(out[-1]) < batch and prompts[out[-1][0]].shape[1] == p.shape[1]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def dense_reference(model, prompts, n_new, start, n_vocab, cuda_graph=False, batch=1):
    """Dense's greedy continuation of each prompt (1, P), its teacher-forced logits along it, and its
    attention outputs (one plain forward of prompt + continuation), `batch` prompts at a time:
    -> (tokens [(1, N)], logits [(N, V)], outputs [(layers, P + N, Hq * D)]), one entry per prompt."""
    tokens, logits, outputs = [], [], []
    for idx in groups(prompts, batch):
        x = torch.cat([prompts[i] for i in idx])
        attn, s0, win = start(x, n_new)
        toks, _ = generate(model, attn, x[:, s0:], n_new, window=win, start_pos=s0, n_vocab=n_vocab,
                           cuda_graph=cuda_graph)
        attn, s0, win = start(x, n_new)
        logits += teacher_forced_logits(model, attn, x[:, s0:], toks, s0, win, cuda_graph)[..., :n_vocab].unbind()
        tokens += toks.split(1)
        outputs += dense_attention_outputs(model, torch.cat([x, toks], dim=1)).unbind(1)
    return tokens, logits, outputs


@torch.no_grad()
def measure(model, prompts, reference, start, n_vocab, cuda_graph=False, batch=1):
    """One run over every prompt against reference = dense_reference(...), `batch` prompts at a
    time: -> per prompt, the teacher-forced top-1 agreement and mean KL(dense || method) along
    dense's continuation (each step's match / KL kept for the position curve), the first step where
    the run's own greedy generation leaves dense's, and each layer's attention output error by
    steps back."""
    out = {"top1": [], "kl": [], "first_divergence": [], "match_steps": [], "kl_steps": [], "attn_error": []}
    ref_tokens, ref_logits, ref_outputs = reference
    for idx in groups(prompts, batch):
        x, toks = torch.cat([prompts[i] for i in idx]), torch.cat([ref_tokens[i] for i in idx])
        n = toks.shape[1]
        attn, s0, win = start(x, n)
        with AttentionOutputs(model) as rec:
            errors = AttentionErrors(rec, torch.stack([ref_outputs[i] for i in idx], dim=1), win)
            logits = teacher_forced_logits(model, attn, x[:, s0:], toks, s0, win, cuda_graph,
                                           on_step=errors.take)[..., :n_vocab]
        out["attn_error"] += errors.means()
        del rec, errors
        attn, s0, win = start(x, n)
        new, _ = generate(model, attn, x[:, s0:], n, window=win, start_pos=s0, n_vocab=n_vocab, cuda_graph=cuda_graph)
        for row, i in enumerate(idx):  # one row at a time: its (N, V) in float64 is the big piece
            dl = ref_logits[i]
            log_p, log_q = F.log_softmax(dl.double(), -1), F.log_softmax(logits[row].double(), -1)
            match = (logits[row].argmax(-1) == dl.argmax(-1)).double()
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            diff = (new[row] != toks[row]).nonzero()
            out["top1"].append(match.mean().item())
            out["kl"].append(kl.mean().item())
            out["first_divergence"].append(int(diff[0]) if len(diff) else n)
            out["match_steps"].append(match.tolist())
            out["kl_steps"].append(kl.tolist())
    return out


# ----------------------------------------------------------------------------------------------
# Summaries: intervals over prompts, curves, Retro minus Quest

def interval(values):
    mean, lo, hi = ruler.bootstrap(values)
    return {"mean": mean, "lo": lo, "hi": hi}


def position_bins(values, n_bins=8):
    """(prompts, N) per-step values -> the mean of each of n_bins equal stretches of the N steps."""
    v = np.asarray(values, dtype=np.float64)
    edges = np.linspace(0, v.shape[1], n_bins + 1).round().astype(int)
    return [float(v[:, a:b].mean()) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def attn_error_summary(per_prompt, first_layer):
    """Per-prompt (layers, w) errors -> by steps back, the mean over the layers from first_layer on
    (the sparse ones: quest and retro keep the first --dense-layers dense) with a bootstrap interval
    over prompts, and the per-layer means."""
    e = np.stack(per_prompt)  # (prompts, layers, w)
    sparse = np.nanmean(e[:, first_layer:], axis=1) if first_layer < e.shape[1] else np.nanmean(e, axis=1)
    return {"layers_from": first_layer,
            "by_steps_back": [interval(sparse[:, s]) for s in range(e.shape[2])],
            "by_layer": np.nanmean(e, axis=0).tolist()}


def summarize(m, first_layer):
    """measure()'s per-prompt values -> a result row's intervals, curves and per-prompt values."""
    row = {k: interval(m[k]) for k in ("top1", "kl", "first_divergence")}
    row["per_prompt"] = {k: m[k] for k in ("top1", "kl", "first_divergence")}
    row["top1_by_position"] = position_bins(m["match_steps"])
    row["kl_by_position"] = position_bins(m["kl_steps"])
    row["attn_error"] = attn_error_summary(m["attn_error"], first_layer)
    return row


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


def table(result):
    """Markdown: agreement, attention error by steps back, Retro minus Quest."""
    def fmt(x, k, sign=""):
        f = ".1f" if k == "first_divergence" else ".3f"
        return f"{x['mean']:{sign}{f}} [{x['lo']:{sign}{f}}, {x['hi']:{sign}{f}}]"
    keys = ("top1", "kl", "first_divergence")
    lines = [f"\nLong generation: {result['prompts']} prompts x {result['new_tokens']} greedy tokens after "
             f"{result['prompt_tokens']}-token prompts; mean over prompts [95% bootstrap interval]\n",
             "| method | budget | top-1 agreement | KL(dense, method) | first divergence |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['run']} | {r['budget']} | " + (" | ".join(fmt(r[k], k) for k in keys) if "top1" in r
                                                           else f"skipped: {r.get('skipped', '')} | |") + " |")
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
        lines += [f"| {d['run']} | {d['budget']} | " + " | ".join(fmt(d[k], k, "+") for k in keys) + " |"
                  for d in result["retro_minus_quest"]]
    return "\n".join(lines)


def plot(result, out_png, plt):
    """Top-1 agreement with dense along the generation, and for Retro the attention output error
    by steps back (does revising a row shrink its error?). plt: matplotlib.pyplot."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in [r for r in result["rows"] if "top1_by_position" in r]:
        n = len(r["top1_by_position"])
        a.plot([(i + 0.5) * result["new_tokens"] / n for i in range(n)], r["top1_by_position"], marker="o",
               label=f"{r['run']} {r['budget']}")
        if r["method"] == "retro":
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
    plt.close(fig)
