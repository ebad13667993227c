"""Tests of longgen.py: teacher forcing through a method's decode loop, the attention-output
recorder, the error by steps back (by hand), and the summaries over prompts.

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
    assert eager.shape == (20, model.args.vocab_size)
    torch.testing.assert_close(graph, eager, atol=0, rtol=0)


def test_recorder_keeps_a_copy_of_each_call(model, seq):
    """Dense through its cache, teacher-forced, gives each layer's plain-forward outputs at every
    position: the recorder's steps are the calls' rows, not one buffer seen many times."""
    prompt, forced = seq[:, :80], seq[:, 80:]
    reference = longgen.dense_attention_outputs(model, seq)
    assert reference.shape == (model.args.n_layers, 100, model.args.n_heads * model.args.head_dim)
    with longgen.AttentionOutputs(model) as rec:
        longgen.teacher_forced_logits(model, fresh(model, "dense", 100), prompt, forced, on_step=rec.take)
    assert len(rec.steps) == 20 and rec.steps[0].shape[1] == 80 and rec.steps[1].shape[1] == 1
    torch.testing.assert_close(rec.steps[0], reference[:, :80], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(rec.steps[1:], dim=1), reference[:, 80:99], atol=1e-5, rtol=0)
    assert np.nanmax(longgen.attention_errors(rec.steps, reference, 80, 1)) < 1e-5


def test_attention_errors_by_hand():
    # one layer, prompt of 2 tokens, two decode steps of w = 2 rows (positions 1-2, then 2-3)
    ref = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 1.0]]])
    steps = [torch.zeros(1, 2, 2),                                 # the prefill: not scored
             torch.tensor([[[0.0, 2.0], [3.0, 4.0]]]) * 1.1,       # rows at 1 (s=1), 2 (s=0): error 0.1 each
             torch.tensor([[[3.0, 4.0], [0.0, 0.5]]])]             # rows at 2 (s=1): 0; 3 (s=0): 0.5
    e = longgen.attention_errors(steps, ref, prompt_len=2, window=2)
    assert e.shape == (1, 2)
    assert e[0, 0] == pytest.approx((0.1 + 0.5) / 2) and e[0, 1] == pytest.approx((0.1 + 0.0) / 2)
    # a first step of one row (a prompt shorter than the window) counts at s = 0 only
    e = longgen.attention_errors([steps[0], torch.tensor([[[0.0, 1.8]]])] + steps[1:], ref, prompt_len=1, window=2)
    assert e[0, 0] == pytest.approx((0.1 + 0.1 + 0.5) / 3) and e[0, 1] == pytest.approx((0.1 + 0.0) / 2)
    # no row was ever 2 steps back: NaN, not 0
    assert np.isnan(longgen.attention_errors(steps, ref, prompt_len=2, window=3)[0, 2])


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
    """On the default model (fp32, Triton kernels): replayed steps give eager's logits, and the
    recorder, whose hook runs only while the step is captured, still sees every step's rows."""
    from generate import DEFAULT_CHECKPOINT
    from checkpoint import load_model
    m = load_model(DEFAULT_CHECKPOINT, device="cuda")
    a = m.args
    seq = torch.randint(0, a.vocab_size, (1, 400), generator=torch.Generator().manual_seed(2)).cuda()
    out = []
    for graph in (False, True):
        cache = KVCache(a.n_layers, 1, a.n_kv_heads, 408, a.head_dim, torch.float32, "cuda")
        attn = (DenseAttention(cache, use_kernels=True) if method == "dense" else
                RetroAttention(cache, 64, 16, window=window, use_kernels=True))
        with longgen.AttentionOutputs(m) as rec:
            logits = longgen.teacher_forced_logits(m, attn, seq[:, :300], seq[:, 300:], 0, window, cuda_graph=graph,
                                                   on_step=rec.take)
        out.append((logits, torch.stack(rec.steps[1:])))
    assert out[1][1].shape == (99, a.n_layers, window, a.n_heads * a.head_dim)
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-5, rtol=0)
