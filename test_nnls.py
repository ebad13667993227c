"""Non-negative least squares (nnls.py): w >= 0 at a KKT point, and the boxed variant stays in its box."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from compaction import AUTHORS_W_BOX
import nnls as solver
from nnls import gram, nnls, nnls_gram, tf32_matmuls


@settings(max_examples=25)
@given(M=st.integers(1, 30), t=st.integers(1, 12), kind=st.sampled_from(["exp", "gauss", "exp_low_rank", "repeated"]),
       positive_z=st.booleans(), seed=st.integers(0, 10**6))
def test_nnls_nonnegative_and_kkt(M, t, kind, positive_z, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "exp":  # like ours: exponentiated scores, columns of very different scale
        A = torch.exp(2 * torch.randn(M, t, generator=g))
    elif kind == "gauss":
        A = torch.randn(M, t, generator=g)
    elif kind == "exp_low_rank":  # exp of a rank-2 score matrix: nearly collinear columns, badly conditioned
        A = torch.exp(torch.randn(M, 2, generator=g) @ torch.randn(2, t, generator=g))
    else:  # the same key twice, or a key no query sees (weights underflow to 0): H_PP exactly singular
        A = torch.exp(2 * torch.randn(M, t, generator=g))
        A[:, t // 2:] = A[:, :t - t // 2][:, :t // 2]
        A[:, torch.rand(t, generator=g) < 0.2] = 0
    z = torch.randn(M, generator=g)
    z = 3 * z.abs() if positive_z else z
    w = nnls(A, z)
    assert (w >= 0).all()
    # KKT of min ||A w - z||^2, w >= 0: gradient g = A^T (A w - z) is >= 0 where w = 0, 0 where w > 0
    A64, z64, w64 = A.double(), z.double(), w.double()
    grad = A64.T @ (A64 @ w64 - z64)
    eps = 1e-5 * float((A64.abs().T @ (A64.abs() @ w64 + z64.abs())).max() + 1e-12)
    assert (grad[w64 > 0].abs() <= eps).all(), grad
    assert (grad[w64 == 0] >= -eps).all(), grad


@settings(max_examples=10)
@given(n=st.integers(2, 6), t=st.integers(1, 12), extra=st.integers(2, 20), seed=st.integers(0, 10**6))
def test_a_batch_of_problems_solves_each_as_alone(n, t, extra, seed):
    """The polish rounds go on for the problems not yet at a KKT point only: every problem of a batch
    (each needing its own number of rounds) still ends at its KKT point, the one it reaches alone.
    More queries than keys (full column rank: one solution), and only a few gradient steps, so that
    the polish rounds do the work."""
    g = torch.Generator().manual_seed(seed)
    A = torch.exp(2 * torch.randn(n, t + extra, t, generator=g))
    z = torch.randn(n, t + extra, generator=g).abs() * 3
    together = nnls(A, z, iters=3)
    for i in range(n):
        torch.testing.assert_close(together[i], nnls(A[i], z[i], iters=3), rtol=1e-4, atol=1e-6)
        A64, z64, w = A[i].double(), z[i].double(), together[i].double()
        grad = A64.T @ (A64 @ w - z64)
        eps = 1e-5 * float((A64.abs().T @ (A64.abs() @ w + z64.abs())).max())
        assert (grad[w > 0].abs() <= eps).all() and (grad[w == 0] >= -eps).all(), grad


def kkt_violation(A, z, w):
    """Largest breach of the NNLS optimality conditions, relative to the gradient's scale."""
    A64, z64, w64 = A.double(), z.double(), w.double()
    grad = A64.transpose(-1, -2) @ (A64 @ w64.unsqueeze(-1) - z64.unsqueeze(-1))
    grad = grad.squeeze(-1)
    scale = (A64.abs().transpose(-1, -2) @ (A64.abs() @ w64.unsqueeze(-1) + z64.abs().unsqueeze(-1))).amax((-1, -2))
    return torch.maximum(torch.where(w64 > 0, grad.abs(), 0).amax(-1), (-grad).clamp_min(0).amax(-1)) / scale


@settings(max_examples=10)
@given(t=st.integers(20, 60), seed=st.integers(0, 10**6))
def test_polish_finds_the_support_in_a_few_solves(t, seed):
    """From a poor start (3 gradient steps: many weights on the wrong side of 0) the polish reaches the
    KKT point within 8 solves, where moving one weight per solve would need about as many solves as
    there are misplaced weights; with 0 solves the start is far from it (so the check can fail)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.exp(torch.randn(4, 2 * t, t, generator=g))
    z = torch.randn(4, 2 * t, generator=g).abs() * 3
    assert (kkt_violation(A, z, nnls(A, z, iters=3, polish_rounds=0)) > 1e-3).any()
    assert (kkt_violation(A, z, nnls(A, z, iters=3, polish_rounds=8)) < 1e-5).all()


@settings(max_examples=15)
@given(t=st.integers(1, 40), rounds=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_polish_never_raises_the_objective(t, rounds, seed):
    """Cut short after any number of solves, the polish returns a point no worse than the gradient steps'."""
    g = torch.Generator().manual_seed(seed)
    A = torch.exp(2 * torch.randn(3, t + 5, t, generator=g))
    z = torch.randn(3, t + 5, generator=g)
    H, c = A.transpose(-1, -2) @ A, (A.transpose(-1, -2) @ z.unsqueeze(-1)).squeeze(-1)
    def objective(w):
        return ((A.double() @ w.double().unsqueeze(-1)).squeeze(-1) - z.double()).pow(2).sum(-1)
    w0, w = nnls_gram(H, c, iters=5, polish_rounds=0), nnls_gram(H, c, iters=5, polish_rounds=rounds)
    assert (w >= 0).all()
    assert (objective(w) <= objective(w0) * (1 + 1e-6) + 1e-9).all()


@settings(max_examples=10)
@given(M=st.integers(4, 30), t=st.integers(1, 10), seed=st.integers(0, 10**6))
def test_boxed_nnls_stays_in_the_box_and_beats_the_clamped_exact_solution(M, t, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.exp(2 * torch.randn(M, t, generator=g))
    z = 3 * torch.randn(M, generator=g).abs()
    lo, hi = AUTHORS_W_BOX
    H, c = A.T @ A, A.T @ z
    w = nnls_gram(H, c, box=(lo, hi))
    assert (w >= lo * (1 - 1e-6)).all() and (w <= hi * (1 + 1e-6)).all()
    objective = lambda x: float(((A.double() @ x.double() - z.double()) ** 2).sum())  # noqa: E731
    clamped = nnls(A, z).clamp(lo, hi)  # a feasible point: the box optimum can only be better
    assert objective(w) <= objective(clamped) * (1 + 1e-4) + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("iters", [35, 50])
@pytest.mark.parametrize("box", [None, AUTHORS_W_BOX])
def test_fista_graph_replay_takes_the_eager_steps(iters, box, monkeypatch):
    """On a GPU the FISTA steps replay a CUDA graph of FISTA_GRAPH_STEPS steps (1 replay + 10 eager steps,
    or 2 replays): the same number of the same steps as eagerly, so the same weights. Few steps on an
    ill-conditioned problem, far from converged: a step more or less shows."""
    g = torch.Generator().manual_seed(0)
    A = torch.exp(torch.randn(2, 3, 40, 16, generator=g)).cuda()  # (e^(2 x): the boxed fit converged)
    z = 3 * torch.randn(2, 3, 40, generator=g).abs().cuda()
    H, c = A.transpose(-1, -2) @ A, (A.transpose(-1, -2) @ z.unsqueeze(-1)).squeeze(-1)
    monkeypatch.setattr(solver, "FISTA_GRAPH_STEPS", 25)
    graphed = nnls_gram(H, c, iters=iters, polish_rounds=0, box=box)
    fewer = nnls_gram(H, c, iters=iters - 1, polish_rounds=0, box=box)
    monkeypatch.setattr(solver, "FISTA_GRAPH_STEPS", 10**9)  # no replay: every step launched eagerly
    eager = nnls_gram(H, c, iters=iters, polish_rounds=0, box=box)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(fewer, eager, rtol=1e-6, atol=1e-9)  # the comparison can tell one step


@settings(max_examples=15, deadline=None)
@given(M=st.integers(1, 300), t=st.integers(1, 40), spread=st.sampled_from([0.0, 1.0, 3.0]), seed=st.integers(0, 10**6))
def test_gram_split_keeps_fp32_accuracy(M, t, spread, seed):
    """gram's split A = hi + lo (hi exact in TF32) gives A^T A to fp32 accuracy against float64, where hi
    alone (what TF32 products of A would see) is ~1e-3 off; on a CPU the split runs as fp32 products."""
    g = torch.Generator().manual_seed(seed)
    A = torch.exp(spread * torch.randn(2, M, t, generator=g, dtype=torch.float64))
    exact = A.transpose(-1, -2) @ A
    err = lambda G: float((G.double() - exact).norm() / exact.norm())  # noqa: E731
    assert err(gram(A.float(), split=True)) <= 4 * err(gram(A.float(), split=False)) + 1e-6
    assert err(gram(A.float(), split=True)) <= 2e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 products need a CUDA GPU")
def test_gram_and_exact_tf32_on_a_gpu():
    """On a GPU gram runs TF32 products and still matches float64 to fp32 accuracy; a TF32 product of
    bf16 inputs (compaction's scores) equals the fp32 one up to the order of the sums."""
    g = torch.Generator().manual_seed(0)
    A = torch.exp(2 * torch.randn(4, 700, 300, generator=g, dtype=torch.float64))
    exact = A.transpose(-1, -2) @ A
    err = lambda G: float((G.double().cpu() - exact).norm() / exact.norm())  # noqa: E731
    A32 = A.float().cuda()
    assert err(gram(A32)) <= 4 * err(A32.transpose(-1, -2) @ A32) + 1e-6  # (fp32 products, TF32 off by default)
    with tf32_matmuls():  # a plain TF32 product is far worse: the test can tell
        assert err(A32.transpose(-1, -2) @ A32) > 1e-5
    q, k = (torch.randn(4, 512, 64, generator=g).bfloat16().cuda() for _ in range(2))
    ieee = q.float() @ k.float().transpose(-1, -2)
    with tf32_matmuls():
        tf32 = q.float() @ k.float().transpose(-1, -2)
    torch.testing.assert_close(tf32, ieee, rtol=1e-5, atol=1e-5)
