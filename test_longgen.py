"""Tests of longgen.py: teacher forcing through a method's decode loop, the attention-output
recorder, the error by steps back (by hand), runs in batches against one prompt at a time, and
the summaries over prompts.

On the tiny random model of conftest.py, fp32 on the CPU. The whole --longgen mode runs in
test_eval.py.
"""

import numpy as np
import pytest
import torch

import cudagraph
import longgen
from attention import DenseAttention
from conftest import tiny_model
from kvcache import KVCache
from retro import RetroAttention


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5).cpu()


@pytest.fixture(scope="module")
def seq():
    return torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(1))


def fresh(model, method, T):
    a = model.args
    cache = KVCache(a.n_layers, 1, a.n_kv_heads, T + 8, a.head_dim, torch.float32, "cpu")
    return DenseAttention(cache) if method == "dense" else RetroAttention(cache, 32, 16, window=3, dense_layers=0)


class StaticOutputStep:
    """What a replayed CUDA graph hands back: the same output tensor at every call, overwritten."""

    def __init__(self, model, attn, device):
        self.model, self.attn, self.out = model, attn, None

    def __call__(self, tokens, pos):
        logits = self.model(tokens, pos, self.attn, last_only=True, decode=True)[:, -1]
        if self.out is None:
            self.out = torch.empty_like(logits)
        return self.out.copy_(logits)


@pytest.mark.parametrize("method, window", [("dense", 1), ("retro", 3)])
def test_teacher_forcing_keeps_every_step_of_a_graph_that_reuses_its_output(model, seq, monkeypatch, method, window):
    prompt, forced = seq[:, :80], seq[:, 80:]
    eager = longgen.teacher_forced_logits(model, fresh(model, method, 100), prompt, forced, 0, window)
    monkeypatch.setattr(cudagraph, "GraphDecodeStep", StaticOutputStep)
    graph = longgen.teacher_forced_logits(model, fresh(model, method, 100), prompt, forced, 0, window, cuda_graph=True)
    assert eager.shape == (1, 20, model.args.vocab_size)
    torch.testing.assert_close(graph, eager, atol=0, rtol=0)


def recorded_steps(model, attn, prompt, forced, window=1, cuda_graph=False):
    """Teacher forcing, and each decode step's recorded rows, copied: -> (logits, [(layers, B, m, Hq * D)])."""
    steps = []
    with longgen.AttentionOutputs(model) as rec:
        logits = longgen.teacher_forced_logits(model, attn, prompt, forced, 0, window, cuda_graph,
                                               on_step=lambda pos: steps.append(rec.buffer.clone()))
    return logits, steps


def test_recorder_holds_each_calls_rows(model, seq):
    """Dense through its cache, teacher-forced, gives each layer's plain-forward outputs at every
    decoded position, and so no error at any of them."""
    prompt, forced = seq[:, :80], seq[:, 80:]
    reference = longgen.dense_attention_outputs(model, seq)
    assert reference.shape == (model.args.n_layers, 1, 100, model.args.n_heads * model.args.head_dim)
    _, steps = recorded_steps(model, fresh(model, "dense", 100), prompt, forced)
    assert len(steps) == 19 and steps[0].shape[2] == 1
    torch.testing.assert_close(torch.cat(steps, dim=2), reference[:, :, 80:99], atol=1e-5, rtol=0)
    with longgen.AttentionOutputs(model) as rec:
        errors = longgen.AttentionErrors(rec, reference, 1)
        longgen.teacher_forced_logits(model, fresh(model, "dense", 100), prompt, forced, on_step=errors.take)
    (e,) = errors.means()
    assert e.shape == (model.args.n_layers, 1) and e.max() < 1e-5


class Recorded:
    """Stands in for AttentionOutputs: the rows of the call just made, set by hand."""
    buffer = None


def test_attention_errors_by_hand():
    # one layer, two rows (the second's rows are the first's times 2: the same relative errors, and
    # its own reference), prompt of 2 tokens, two decode steps of w = 2 rows (positions 1-2, then 2-3)
    ref = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 1.0]]])
    ref = torch.stack([ref, 2 * ref], dim=1)                                   # (1, 2, 4, 2)
    steps = [torch.tensor([[[0.0, 2.0], [3.0, 4.0]]]) * 1.1,                  # rows at 1 (s=1), 2 (s=0): error 0.1 each
             torch.tensor([[[3.0, 4.0], [0.0, 0.5]]])]                         # rows at 2 (s=1): 0; 3 (s=0): 0.5
    pos = [torch.tensor([1, 2]), torch.tensor([2, 3])]

    def errors(steps, pos, window):
        rec = Recorded()
        e = longgen.AttentionErrors(rec, ref, window)
        for rows, p in zip(steps, pos):
            rec.buffer = torch.stack([rows, 2 * rows], dim=1)                 # (1, 2, m, 2)
            e.take(p)
        return e.means()
    for e in errors(steps, pos, 2):
        assert e.shape == (1, 2)
        assert e[0, 0] == pytest.approx((0.1 + 0.5) / 2) and e[0, 1] == pytest.approx((0.1 + 0.0) / 2)
    # a first step of one row (a prompt shorter than the window) counts at s = 0 only
    for e in errors([torch.tensor([[[0.0, 1.8]]])] + steps, [torch.tensor([1])] + pos, 2):
        assert e[0, 0] == pytest.approx((0.1 + 0.1 + 0.5) / 3) and e[0, 1] == pytest.approx((0.1 + 0.0) / 2)
    # no row was ever 2 steps back: NaN, not 0
    assert np.isnan(errors(steps, pos, 3)[0][0, 2])
    # a row scored against another row's reference is wrong
    rec = Recorded()
    e = longgen.AttentionErrors(rec, ref, 2)
    rec.buffer = torch.stack([2 * steps[0], steps[0]], dim=1)
    e.take(pos[0])
    assert e.means()[0][0, 0] == pytest.approx(1.2) and e.means()[1][0, 0] == pytest.approx(0.45)


def test_groups_are_consecutive_prompts_of_one_length_up_to_batch():
    prompts = [torch.zeros(1, n) for n in (5, 5, 5, 4, 4, 5)]
    assert longgen.groups(prompts, 2) == [[0, 1], [2], [3, 4], [5]]
    assert longgen.groups(prompts, 1) == [[i] for i in range(6)]


# ----------------------------------------------------------------------------------------------
# Batched runs measure what one prompt at a time measures

BATCH_RUNS = [("dense", []), ("retro", ["--budget", "32", "--window", "1", "--dense-layers", "1"]),
              ("retro", ["--budget", "32", "--window", "4", "--dense-layers", "1"]),
              ("token_sparse", ["--keep", "0.25", "--min-tokens", "16", "--ts-window", "16"]),
              ("compact", ["--ratio", "4"])]


def starter(model, method, flags):
    """eval.py's fresh method state for a batch of prompts (chunked prefill of 32 tokens)."""
    import eval as evaluation
    mopts = evaluation.method_options(method, flags)
    o = evaluation.Options(device="cpu", dtype="fp32", prefill_chunk=32)
    return lambda x, n, keep_last=1: evaluation.start_method(model, method, mopts, x, n, o, [10, 10], keep_last)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 300, (1, 100), generator=g) for _ in range(3)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return longgen.dense_reference(model, prompts, 8, starter(model, "dense", []), 300)


def test_dense_reference_in_batches_is_the_one_at_a_time_reference(model, prompts, reference):
    batched = longgen.dense_reference(model, prompts, 8, starter(model, "dense", []), 300, batch=2)
    for (toks, logits, outputs), (toks1, logits1, outputs1) in zip(zip(*batched), zip(*reference)):
        assert toks.shape == (1, 8) and torch.equal(toks, toks1)
        torch.testing.assert_close(logits, logits1, atol=1e-5, rtol=0)
        torch.testing.assert_close(outputs, outputs1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, flags", BATCH_RUNS)
def test_measure_in_batches_gives_each_prompt_its_one_at_a_time_values(model, prompts, reference, method, flags):
    """Rows of a batch do not see each other: a batch of 2 (then a partial one of 1) measures each
    prompt as it is measured alone."""
    start = starter(model, method, flags)
    alone = longgen.measure(model, prompts, reference, start, 300)
    batched = longgen.measure(model, prompts, reference, start, 300, batch=2)
    assert batched["first_divergence"] == alone["first_divergence"]
    assert batched["top1"] == alone["top1"] and batched["match_steps"] == alone["match_steps"]
    np.testing.assert_allclose(batched["kl_steps"], alone["kl_steps"], atol=1e-10, rtol=1e-4)
    np.testing.assert_allclose(np.stack(batched["attn_error"]), np.stack(alone["attn_error"]), atol=1e-5, rtol=0)
    if method != "dense":  # the comparison means something: the prompts differ, and the method is lossy
        assert len(set(alone["kl"])) == 3 and np.nanmean(alone["attn_error"]) > 1e-3


def test_position_bins_are_means_of_equal_stretches():
    v = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
    assert longgen.position_bins(v, n_bins=4) == [(0 + 1 + 8 + 9) / 4, (2 + 3 + 10 + 11) / 4, (4 + 5 + 12 + 13) / 4,
                                                  (6 + 7 + 14 + 15) / 4]


def test_retro_minus_quest_pairs_by_prompt_at_the_same_budget():
    def row(run, budget, top1):
        return {"run": run, "budget": budget, "per_prompt": {"top1": top1, "kl": [0.0] * 3, "first_divergence": [5] * 3}}
    rows = [row("quest", "1/8", [0.5, 0.6, 0.7]), row("retro w=2", "1/8", [0.6, 0.7, 0.8]),
            row("quest", "1/4", [0.9, 0.9, 0.9]), row("retro w=2", "1/4", [0.8, 0.9, 1.0])]
    d8, d4 = longgen.retro_minus_quest(rows)
    assert (d8["run"], d8["budget"], d4["budget"]) == ("retro w=2", "1/8", "1/4")
    assert d8["top1"]["mean"] == pytest.approx(0.1) and d8["top1"]["lo"] == pytest.approx(0.1)  # the same +0.1 each
    assert d4["top1"]["mean"] == pytest.approx(0.0) and d4["top1"]["lo"] < 0 < d4["top1"]["hi"]
    assert d8["first_divergence"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("method, window", [("dense", 1), ("retro", 3)])
def test_cuda_graph_teacher_forcing_and_recorder_give_the_eager_results(method, window):
    """On the default model (fp32, Triton kernels), two rows: replayed steps give eager's logits, and
    the recorder, whose hook runs only while the step is captured, still sees every step's rows."""
    from generate import DEFAULT_CHECKPOINT
    from checkpoint import load_model
    m = load_model(DEFAULT_CHECKPOINT, device="cuda")
    a = m.args
    seq = torch.randint(0, a.vocab_size, (2, 400), generator=torch.Generator().manual_seed(2)).cuda()
    out = []
    for graph in (False, True):
        cache = KVCache(a.n_layers, 2, a.n_kv_heads, 408, a.head_dim, torch.float32, "cuda")
        attn = (DenseAttention(cache, use_kernels=True) if method == "dense" else
                RetroAttention(cache, 64, 16, window=window, use_kernels=True))
        logits, steps = recorded_steps(m, attn, seq[:, :300], seq[:, 300:], window, cuda_graph=graph)
        out.append((logits, torch.stack(steps)))
    assert out[1][1].shape == (99, a.n_layers, 2, window, a.n_heads * a.head_dim)
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-5, rtol=0)
