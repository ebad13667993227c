"""
Non-negative least squares, batched: min_w ||A w - z||^2 subject to w >= 0 (or to a box lo <= w <= hi).

Its own file because it is a solver, not part of the idea: compaction.py needs one to fit the weights
w = exp(beta) of the kept keys (its step 3, and OMP's refits), torch has none, and a reader of the
compaction can take it as given. It solves thousands of small problems (one per batch row and KV head,
t ~ 400 unknowns) at once, on the normal equations H = A^T A, c = A^T z. The answer is a KKT point
of 0.5 w^T H w - c^T w: the gradient g = H w - c is 0 where w > 0 and >= 0 where w = 0 (in a box:
0 inside, >= 0 at lo, <= 0 at hi).
  1. Accelerated projected gradient (FISTA) on the Jacobi-scaled problem, step 1/L with L the largest
     eigenvalue; the momentum restarts when it points uphill (O'Donoghue & Candes' gradient test).
     This finds (nearly) the support {w > 0}.
  2. Polish (w >= 0 only) in float64 from that support, by block principal pivoting: solve on the
     guessed support F, then move every index on the wrong side (a negative weight in F, a negative
     gradient outside it) to the other side at once, and solve again; right support, exact solution.
     A few solves per problem, each a Cholesky (at most polish_rounds); the answer is never worse
     than step 1's.
"""

import contextlib

import torch


def nnls(A, z, iters=300, polish_rounds=30):
    """A (..., M, t), z (..., M) -> w (..., t) >= 0. Works on the normal equations (see nnls_gram)."""
    A, z = A.float(), z.float()
    return nnls_gram(gram(A), (A.transpose(-1, -2) @ z.unsqueeze(-1)).squeeze(-1),
                     iters=iters, polish_rounds=polish_rounds)


@contextlib.contextmanager
def tf32_matmuls():
    """fp32 matrix products on a GPU's tensor cores as TF32 (10 mantissa bits kept of the inputs; fp32
    sums) inside the block; cuBLAS keeps them off by default, and its fp32 products without them run at
    ~1/8 the speed. Exact for inputs that were bf16 or fp16 (they have at most 10 mantissa bits)."""
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = old


def gram(A, out=None, split=None):
    """A^T A for A (..., M, t) fp32, to fp32 accuracy -> (..., t, t); with out (..., t, t) fp32
    contiguous: out += A^T A, in place, returned. The Gram matrices of the normal equations are the bulk of
    a compaction's arithmetic (t x t x M per head, twice), so on a GPU (split=None: there, for t >= 256)
    they run as TF32 products without losing fp32's accuracy: A = hi + lo, hi = A with its mantissa cut
    to TF32's 10 bits (exact in TF32), lo = A - hi (exact in fp32, < 2^-10 |A|); A^T A = hi^T hi + X + X^T
    + lo^T lo with X = hi^T lo, and lo^T lo (< 2^-20 of the rest) is dropped."""
    A = A.float()
    t = A.shape[-1]
    if out is None:
        out = torch.zeros(*A.shape[:-2], t, t, dtype=torch.float32, device=A.device)
    acc, A3 = out.view(-1, t, t), A.reshape(-1, *A.shape[-2:])  # (batched products want 3 dims)
    if not (A.is_cuda and t >= 256 if split is None else split):
        acc.baddbmm_(A3.transpose(-1, -2), A3)
        return out
    hi = (A3.view(torch.int32) & ~0x1FFF).view(torch.float32)  # the low 13 of 23 mantissa bits cleared
    lo = A3 - hi
    with tf32_matmuls():
        acc.baddbmm_(hi.transpose(-1, -2), hi)
        X = hi.transpose(-1, -2) @ lo
    acc += X
    acc += X.transpose(-1, -2)
    return out


def _matvec(H, x):
    """H (..., t, t) @ x (..., t). Batched small matmuls are slow on CPU; the broadcast form is not."""
    return (H @ x.unsqueeze(-1)).squeeze(-1) if H.is_cuda else (H * x.unsqueeze(-2)).sum(-1)


def _objective(H, c, w):
    """0.5 w^T H w - c^T w (= 0.5 ||A w - z||^2 up to a constant)."""
    return 0.5 * (w * _matvec(H, w)).sum(-1) - (c * w).sum(-1)


def nnls_gram(H, c, iters=300, polish_rounds=30, box=None):
    """NNLS given H = A^T A (..., t, t) and c = A^T z (..., t); batched over the leading dims.
    box (lo, hi), 0 <= lo < hi: every weight bounded to [lo, hi] instead of [0, inf) (the compaction
    authors use [e^-3, e^3]); then step 1 alone, projected onto the box (step 2 knows only w >= 0)."""
    H, c = H.float(), c.float()
    # Jacobi scaling w = u / sqrt(H_jj): the columns of A (keys) differ in scale by orders of
    # magnitude; with a unit diagonal one step size suits every coordinate, and u >= 0 iff w >= 0.
    # A zero column (a padding slot) has no say in the fit: its weight stays 0.
    diag = H.diagonal(dim1=-2, dim2=-1)
    d = torch.where(diag > 0, diag.clamp_min(1e-30).rsqrt(), 0.0)
    # bounds on u = w / d, per coordinate; a zero column stays at 0 whatever the box
    lo, hi = (0.0, float("inf")) if box is None else box
    u_lo = torch.where(d > 0, lo / torch.where(d > 0, d, 1.0), 0.0)
    u_hi = torch.where(d > 0, hi / torch.where(d > 0, d, 1.0), 0.0)
    w = _projected_gradient(H * d.unsqueeze(-1) * d.unsqueeze(-2), c * d, iters, u_lo, u_hi) * d
    return _block_pivoting(H, c, w, polish_rounds) if polish_rounds and box is None else w


def _projected_gradient(H, c, iters, lo, hi):
    """FISTA on 0.5 u^T H u - c^T u over lo <= u <= hi (elementwise bounds, (..., t))."""
    t = H.shape[-1]
    # start from the best uniform weight w = a * 1 (the right total mass), or 0 when 1^T H 1 ~ 0
    ones_H_ones = H.sum((-1, -2))
    usable = ones_H_ones > 1e-6 * H.diagonal(dim1=-2, dim2=-1).sum(-1)
    a = torch.where(usable, c.sum(-1) / torch.where(usable, ones_H_ones, 1.0), 0.0).clamp_min(0)
    w = torch.minimum(torch.maximum(a.unsqueeze(-1).expand_as(c), lo), hi)
    # power iteration for the Lipschitz constant of the gradient (inflated by 10%: it approaches from
    # below), from a fixed pseudo-random start (a constant start vector can lie in H's null space)
    x = torch.randn(t, generator=torch.Generator().manual_seed(0)).to(c.device).expand_as(c)
    for _ in range(30):
        x = _matvec(H, x)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    trace = H.diagonal(dim1=-2, dim2=-1).sum(-1)
    L = torch.maximum((x * _matvec(H, x)).sum(-1) * 1.1, 1e-6 * trace).clamp_min(1e-30).unsqueeze(-1)
    return _fista(H, c, L, lo, hi, w, iters)


FISTA_GRAPH_STEPS = 25  # steps per captured CUDA graph (a step is ~15 kernels)


def _fista(H, c, L, lo, hi, w, iters):
    """iters FISTA steps from w with step 1/L. A step is ~15 small kernels whose arithmetic takes
    microseconds; launched one by one from Python they cost ~0.4 ms a step (110 ms of 300 steps per
    layer of a compaction on an H200, most of its time). On a GPU the steps therefore replay a CUDA
    graph of FISTA_GRAPH_STEPS steps: the same kernels on the same buffers, updated in place."""
    shape, t = w.shape, w.shape[-1]
    H, c, L, lo, hi = H.reshape(-1, t, t), c.reshape(-1, t), L.reshape(-1, 1), lo.reshape(-1, t), hi.reshape(-1, t)
    w0 = w.reshape(-1, t)
    w, y, theta = w0.clone(), w0.clone(), torch.ones_like(L)

    def steps(n):
        for _ in range(n):
            grad = (torch.baddbmm(c.unsqueeze(-1), H, y.unsqueeze(-1), beta=-1).squeeze(-1) if H.is_cuda
                    else _matvec(H, y) - c)  # H y - c
            w_new = torch.minimum(torch.maximum(y - grad / L, lo), hi)
            theta_new = (1 + torch.sqrt(1 + 4 * theta * theta)) / 2
            restart = ((y - w_new) * (w_new - w)).sum(-1, keepdim=True) > 0
            y.copy_(torch.where(restart, w_new, w_new + (theta - 1) / theta_new * (w_new - w)))
            theta.copy_(torch.where(restart, torch.ones_like(theta), theta_new))
            w.copy_(w_new)

    replays = iters // FISTA_GRAPH_STEPS if H.is_cuda else 0
    if replays:
        with torch.cuda.device(H.device):
            side = torch.cuda.Stream()  # capture wants the kernels' first run done (cuBLAS handles, workspaces)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                steps(1)
            torch.cuda.current_stream().wait_stream(side)
            w.copy_(w0), y.copy_(w0), theta.fill_(1.0)  # undo that step
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                steps(FISTA_GRAPH_STEPS)
            for _ in range(replays):
                graph.replay()
    steps(iters - replays * FISTA_GRAPH_STEPS)
    return w.view(shape)


def spd_solve(A, b):
    """A x = b for symmetric positive definite A (..., t, t), by Cholesky: batched LU of such blocks
    (t ~ 400) fails inside MKL on 2 CPU threads ("Parameter 6 was incorrect on entry to DLASWP",
    torch 2.13). A block that is not positive definite in floating point falls back to LU alone."""
    chol, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b, chol)
    for i in (info != 0).nonzero().tolist():
        x[tuple(i)] = torch.linalg.solve(A[tuple(i)], b[tuple(i)])
    return x


def _block_pivoting(H, c, w, rounds):
    """Step 2 (see the module docstring), per problem until its support is right or `rounds` Cholesky
    solves are spent. Block principal pivoting (Portugal, Judice & Vicente 1994; Kim & Park 2011):
    a guess F of the support gives x with H_FF x_F = c_F and x = 0 elsewhere; x is the answer iff
    x_F >= 0 and the gradient g = H x - c is >= 0 off F. Each index that breaks this changes side, all
    at once while that lowers their count (or within 3 tries of the lowest count), else only the largest
    one (Murty's rule, which cannot cycle). From FISTA's support this takes 2-7 solves on a compaction's
    fits, where dropping one weight per solve (Lawson-Hanson's inner loop) took 40-100.
    Returns, per problem, the feasible point of lowest objective among w and every round's x clamped
    at 0: never worse than FISTA's w, and the solution itself once the support is right."""
    shape, t = w.shape, w.shape[-1]
    H64, c64, w64 = H.reshape(-1, t, t).double(), c.reshape(-1, t).double(), w.reshape(-1, t).double()
    n = w64.shape[0]
    eye = torch.eye(t, dtype=torch.float64, device=H.device)
    slots = torch.arange(t, device=H.device)
    jitter = 1e-12 * H64.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[..., None, None]
    tol = 1e-10 * (H64.abs().amax((-1, -2)) * w64.abs().amax(-1) + c64.abs().amax(-1)).unsqueeze(-1)
    F = w64 > 0
    best_f = _objective(H64, c64, w64)
    fewest = torch.full((n,), t + 1, device=H.device)  # the lowest count of wrong-side indices so far
    tries = torch.full((n,), 3, device=H.device)  # full exchanges left without lowering it
    todo = torch.arange(n, device=H.device)  # the problems still pivoting
    for _ in range(rounds):
        Hs, cs, Fs = H64[todo], c64[todo], F[todo]
        # F's block of H, identity elsewhere: the solve leaves x = 0 off F. Cholesky (see spd_solve for
        # why not LU); a block singular even with the jitter stops its problem at its best point so far
        Hp = torch.where(Fs.unsqueeze(-1) & Fs.unsqueeze(-2), Hs, eye) + jitter[todo] * eye
        chol, info = torch.linalg.cholesky_ex(Hp)
        solved = info == 0
        chol = torch.where(solved[..., None, None], chol, eye)
        x = torch.where(Fs, torch.cholesky_solve(torch.where(Fs, cs, 0.0).unsqueeze(-1), chol).squeeze(-1), 0.0)
        cand = x.clamp_min(0)
        f = _objective(Hs, cs, cand)
        better = solved & torch.isfinite(f) & (f < best_f[todo])
        w64[todo[better]], best_f[todo[better]] = cand[better], f[better]
        wrong = (Fs & (x < 0)) | (~Fs & (_matvec(Hs, x) - cs < -tol[todo]))
        count = wrong.sum(-1)
        lower = count < fewest[todo]
        fewest[todo] = torch.minimum(count, fewest[todo])
        tries[todo] = torch.where(lower, 3, tries[todo] - 1)
        largest = slots == torch.where(wrong, slots, -1).amax(-1, keepdim=True)
        move = torch.where((tries[todo] >= 0).unsqueeze(-1), wrong, wrong & largest)
        F[todo] = Fs ^ move
        todo = todo[solved & (count > 0)]
        if todo.numel() == 0:
            break
    return w64.float().view(shape)
