"""A block eigensolver (LOBPCG, no preconditioner) for the largest eigenpairs of a symmetric
operator given as a function ``(n, m) -> (n, m)``; memory is a few ``(n, m)`` blocks. Used by the
default solver and by :class:`ldsc.LDSC`."""

from __future__ import annotations

import torch
from torch import Tensor

from ldsc.graphs.dataset import Workspace


def _no_reduce(t: Tensor) -> Tensor:
    return t


def orthonormalize(X: Tensor, eps: float = 1e-6, reduce=None) -> Tensor:
    """Orthonormal basis of ``span(X)`` (``(n, m)`` -> ``(n, r)``, ``r ≤ m``) via the eigen-
    decomposition of the ``m×m`` Gram matrix (computed in float64); directions whose squared
    norm falls below ``eps × largest`` are dropped. One pass over ``X``: cheap for tall ``X``.

    ``reduce`` (here and in the LOBPCG functions below): sums a small matrix over the processes
    that hold the other rows of ``X`` (:func:`ldsc.distributed.all_reduce_sum`); default none."""
    G = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
    for rows in _chunks(X.shape[0]):  # (no float64 copy of X: chunks' products summed in float64)
        Xr = X[rows] if X.dtype == torch.float64 else X[rows].double()
        G += Xr.T @ Xr
    G = (reduce or _no_reduce)(G)
    g, Q = torch.linalg.eigh(G)
    keep = g > eps * g.max().clamp_min(1e-300)
    C = (Q[:, keep] / g[keep].sqrt()).to(X.dtype)
    out = X.new_empty(X.shape[0], C.shape[1])
    for rows in _chunks(X.shape[0]):
        torch.matmul(X[rows], C, out=out[rows])
    return out


def _chunks(n: int, size: int = 2**14):
    """Row slices of a tall block: small enough that a chunk's temporaries stay in the CPU's cache
    (2¹⁴ rows × 20 columns: 1.3 MB; the updates of a step ran 3× faster than with 2¹⁸ rows)."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _grams(basis: list[Tensor], images: list[Tensor], reduce=None) -> tuple[Tensor, Tensor]:
    """``G = Vᵀ V`` and ``T = Vᵀ A V`` (float64, symmetrised) for ``V = [basis...]`` and
    ``A V = [images...]``, accumulated a chunk of rows at a time: each chunk of ``V`` and of ``A V``
    is gathered into one reused ``(rows, p)`` buffer, then two products (float32, summed in float64)."""
    p = sum(b.shape[1] for b in basis)
    dev, dt = basis[0].device, basis[0].dtype
    G = torch.zeros(p, p, dtype=torch.float64, device=dev)
    T = torch.zeros(p, p, dtype=torch.float64, device=dev)
    size = 2**14
    Vb = torch.empty(min(size, basis[0].shape[0]), p, dtype=dt, device=dev)
    Ab = torch.empty_like(Vb)
    for rows in _chunks(basis[0].shape[0], size):
        k = rows.stop - rows.start
        V, AV = Vb[:k], Ab[:k]
        torch.cat([b[rows] for b in basis], 1, out=V)
        torch.cat([a[rows] for a in images], 1, out=AV)
        G += (V.T @ V).double()
        T += (V.T @ AV).double()
    if reduce is not None:
        G, T = reduce(G), reduce(T)
    return (G + G.T) / 2, (T + T.T) / 2


def _col_norms(Y: Tensor, reduce=None) -> Tensor:
    """``‖Y[:, j]‖`` of a tall ``(n, m)`` block, as the diagonal of ``YᵀY`` (BLAS, float64 sums):
    several times faster than a strided column reduction."""
    sq = torch.zeros(Y.shape[1], dtype=torch.float64, device=Y.device)
    for rows in _chunks(Y.shape[0]):
        sq += (Y[rows].T @ Y[rows]).diagonal().double()
    return (reduce or _no_reduce)(sq).sqrt().to(Y.dtype)


def ritz_from_grams(G: Tensor, T: Tensor, m: int, eps: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Rayleigh–Ritz from the Gram matrices of a (not necessarily orthonormal) basis: the ``m``
    largest Ritz values and coefficients ``C`` with ``Cᵀ G C = I``."""
    g, Q = torch.linalg.eigh(G)
    keep = g > eps * g.max().clamp_min(1e-300)
    Wn = Q[:, keep] / g[keep].sqrt()
    theta, E = torch.linalg.eigh(Wn.T @ T @ Wn)
    top = torch.argsort(theta, descending=True)[:m]
    return theta[top], Wn @ E[:, top]


def lobpcg_start(apply, X: Tensor, reduce=None) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh–Ritz of ``apply`` on ``span(X)``: ``(theta (m,), X, AX)`` with ``X`` rotated (in
    place) onto orthonormal Ritz vectors by decreasing Ritz value."""
    m = X.shape[1]
    AX = apply(X)
    G, T = _grams([X], [AX], reduce)
    theta, C = ritz_from_grams(G, T, m)
    C = C.to(X.dtype)
    for rows in _chunks(X.shape[0]):
        X[rows] = X[rows] @ C
        AX[rows] = AX[rows] @ C
    return theta, X, AX


def lobpcg_step(apply, X: Tensor, AX: Tensor, theta: Tensor, P: Tensor | None = None,
                AP: Tensor | None = None, use_directions: bool | None = None, reduce=None,
                work: Workspace | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LOBPCG iteration (no preconditioner) for the largest eigenpairs of a symmetric operator.

    Applies ``apply`` once, to the residuals ``R = AX − Xθ``, then does Rayleigh–Ritz on
    ``span[X, R, P]`` (``P``: the previous step's direction). ``X``, ``AX``, ``P`` and ``AP`` are
    updated in place a chunk of rows at a time, so the memory is the six ``(n, m)`` blocks
    ``X, AX, R, AR, P, AP`` and nothing more (no concatenated basis).

    Args:
        apply: ``(n, m) -> (n, m)``; X, AX: current Ritz vectors and their images; theta: their
            Ritz values ``(m,)``; P, AP: previous directions (``None`` on the first step).
        use_directions: whether ``P``/``AP`` hold directions (default: when given); ``False``
            with buffers given makes them the destination of the first step's directions.
        work: blocks kept from step to step for ``R`` and ``A R`` (the latter when ``apply``
            takes ``out=``, as :class:`~ldsc.spectral.operator.LayerOperator` does): no new
            ``(n, m)`` blocks to fault in on every step.

    Returns:
        ``(theta, X, P, AP, residual)`` where ``residual`` ``(m,)`` holds ``‖A x − θ x‖`` of the
        vectors *before* the step (``AX`` is updated in place).
    """
    m = X.shape[1]
    eps = 1e-5 if X.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
    R = torch.addcmul(AX, X, theta.to(X.dtype), value=-1, out=None if work is None else work.get("R", X))
    rn = _col_norms(R, reduce)
    # what is left of R along X is rounding: remove it (X is orthonormal), then normalise
    XR = torch.zeros(m, m, dtype=torch.float64, device=X.device)
    for rows in _chunks(X.shape[0]):
        XR += (X[rows].T @ R[rows]).double()
    XR = (reduce or _no_reduce)(XR).to(X.dtype)
    for rows in _chunks(X.shape[0]):
        R[rows] -= X[rows] @ XR
    R /= _col_norms(R, reduce).clamp_min(1e-30)
    AR = apply(R, out=work.get("AR", AX)) if work is not None and getattr(apply, "accepts_out", False) else apply(R)
    if use_directions is None:
        use_directions = P is not None
    basis, images = [X, R], [AX, AR]
    if use_directions:
        basis.append(P)
        images.append(AP)
    G, T = _grams(basis, images, reduce)
    theta, C = ritz_from_grams(G, T, m, eps=eps)
    C = C.to(X.dtype)
    Cx, Cr = C[:m], C[m:2 * m]
    Cp = C[2 * m:] if use_directions else None
    if P is None:
        P, AP = torch.empty_like(X), torch.empty_like(AX)
    for rows in _chunks(X.shape[0]):
        for Y, Ry, Py in ((X, R, P), (AX, AR, AP)):
            step = Ry[rows] @ Cr
            if Cp is not None:
                step.addmm_(Py[rows], Cp)
            Y[rows] = torch.addmm(step, Y[rows], Cx)
            Py[rows] = step
    del R, AR
    scale = _col_norms(P, reduce).clamp_min(1e-30)
    P /= scale
    AP /= scale
    return theta, X, P, AP, rn


def lobpcg_top(
    apply,
    X: Tensor,
    iters: int,
    tol: float = 0.0,
    reduce=None,
) -> tuple[Tensor, Tensor, int]:
    """Largest eigenpairs of a symmetric operator by LOBPCG (:func:`lobpcg_step`), warm-started.

    Args:
        apply: ``(n, m) -> (n, m)`` symmetric operator.
        X: ``(n, m)`` starting block (need not be orthonormal; not modified).
        iters: maximum iterations.
        tol: stop when every residual ``‖A x − θ x‖`` is below ``tol · max|θ|`` (0: run ``iters``).

    Returns:
        ``(theta (m,), X (n, m) orthonormal Ritz vectors, iterations run)``.
    """
    theta, X, AX = lobpcg_start(apply, orthonormalize(X, reduce=reduce), reduce)
    P = AP = None
    it = 0
    work = Workspace()
    while it < iters:
        R = AX - X * theta.to(X.dtype)
        if tol > 0 and bool((_col_norms(R, reduce) <= tol * theta.abs().max()).all()):
            break
        del R
        theta, X, P, AP, _ = lobpcg_step(apply, X, AX, theta, P, AP, reduce=reduce, work=work)
        it += 1
    return theta, X, it


def random_start(seed: int, rows: slice, m: int, dtype: torch.dtype = torch.float32, chunk: int = 1 << 14) -> Tensor:
    """Rows ``rows`` of a Gaussian ``(n, m)`` starting block, drawn in fixed chunks of ``chunk`` rows
    (chunk ``c`` from a generator seeded by ``(seed, c)``): any process's share of the rows is the
    same as in a one-process run."""
    out = torch.empty(rows.stop - rows.start, m, dtype=dtype)
    for c in range(rows.start // chunk, -(-rows.stop // chunk)):
        lo, hi = max(rows.start, c * chunk), min(rows.stop, (c + 1) * chunk)
        g = torch.Generator().manual_seed((int(seed) + 1_000_003 * c) % 2**63)
        block = torch.randn(chunk, m, generator=g, dtype=dtype)
        out[lo - rows.start:hi - rows.start] = block[lo - c * chunk:hi - c * chunk]
    return out


def converged(residual: Tensor, theta: Tensor, K: int, tol: float) -> bool:
    """Whether the ``K`` leading residuals ``‖Ax − θx‖`` are at most ``tol · max|θ|``."""
    return bool((residual[:K] <= tol * theta.abs().max()).all())


def lobpcg_iterate(apply, X: Tensor, AX: Tensor, P: Tensor, AP: Tensor, theta: Tensor, residual: Tensor, K: int,
                   tol: float, iters: int, use_directions: bool, reduce=None, stop=None) -> tuple[int, bool]:
    """Up to ``iters`` :func:`lobpcg_step` iterations, in place on the buffers (``theta`` and
    ``residual`` too), stopping early once :func:`converged` or when ``stop()`` says so: the
    loop of both the CLI's default solver and :meth:`ldsc.LDSC.fit`.

    Returns ``(iterations run, use_directions)`` (``P``/``AP`` hold directions after the first)."""
    done = 0
    work = Workspace()
    for _ in range(int(iters)):
        if converged(residual, theta, K, tol) or (stop is not None and stop()):
            break
        new_theta, _, _, _, rn = lobpcg_step(apply, X, AX, theta, P, AP, use_directions=use_directions, reduce=reduce,
                                             work=work)
        use_directions = True
        theta.copy_(new_theta)
        residual.copy_(rn.double())
        done += 1
    return done, use_directions
