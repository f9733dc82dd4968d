"""Pooling, the paper's objective, the exact reference operator and subspace alignment (docs/method.md, Exact reference and The paper's objective).

Pure tensor code: nothing here knows about Lightning or Hydra.

Conventions: pseudo-eigenvectors of a batch are ``Z`` of shape ``(B, K, H, W)`` on the base grid;
"flattened" they are ``(B·H·W, K)`` rows ordered ``(b, y, x)``, the same order graph nodes use.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.distributed import all_gather_rows, shard, shard_bounds
from ldsc.graphs.knn import LayerGraph


def flatten_channels(Z: Tensor) -> Tensor:
    """``(B, K, H, W)`` -> ``(B·H·W, K)`` ordered ``(b, y, x)``."""
    B, K, H, W = Z.shape
    return Z.permute(0, 2, 3, 1).reshape(B * H * W, K)


def unflatten_channels(X: Tensor, n_images: int, H: int, W: int) -> Tensor:
    """``(B·H·W, K)`` -> ``(B, K, H, W)``; inverse of :func:`flatten_channels`."""
    return X.reshape(n_images, H, W, -1).permute(0, 3, 1, 2).contiguous()


def layer_pool(Z: Tensor, grid: tuple[int, int]) -> Tensor:
    """The layer view ``g_l(Z)``: adaptive average pooling of ``(B, K, H, W)`` to ``grid``,
    flattened to ``(B·h·w, K)``."""
    pooled = Z if tuple(Z.shape[-2:]) == tuple(grid) else F.adaptive_avg_pool2d(Z, grid)
    return flatten_channels(pooled)


def paper_objective(
    Z: Tensor,
    graphs: Sequence[LayerGraph],
    eig_weight: float = 1.0,
    orth_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The paper's loss for one batch.

    ``loss = eig_weight · mean_{l,c} w_l |F̂_cᵀ P_l F̂_c − 1| + orth_weight · mean_l w_l mean_{c≠c'} (F̂ᵀF̂)²_{cc'}``
    with ``F̂`` the column-normalised layer view of ``Z`` (``(B, K, H, W)``).

    Returns the scalar loss and a dict of detached diagnostics: ``eig`` (the weighted eigenvalue
    term), ``orth`` (the weighted orthogonality term), ``residual`` (mean ``|λ − 1|``, unweighted)
    and ``eigenvalues`` (``(K,)``, mean over layers).
    """
    K = Z.shape[1]
    eig_terms, orth_terms, lams = [], [], []
    off = ~torch.eye(K, dtype=torch.bool, device=Z.device)
    for g in graphs:
        Fl = F.normalize(layer_pool(Z, g.grid), dim=0)  # (N, K), unit columns
        PF = torch.sparse.mm(g.P, Fl)
        lam = (Fl * PF).sum(0)  # (K,)  Rayleigh quotients F̂ᵀ P F̂
        gram = Fl.T @ Fl
        eig_terms.append(g.weight * (lam - 1).abs())
        orth_terms.append(g.weight * gram[off].pow(2).mean() if K > 1 else Z.new_zeros(()))
        lams.append(lam)
    eig = torch.stack(eig_terms).mean()
    orth = torch.stack(orth_terms).mean()
    loss = eig_weight * eig + orth_weight * orth
    lam = torch.stack(lams).detach()
    stats = {"eig": eig.detach(), "orth": orth.detach(), "residual": (lam - 1).abs().mean(),
             "eigenvalues": lam.mean(0)}
    return loss, stats


def pool_operator(base: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """``U``: the average-pooling operator from ``base`` to ``grid`` as sparse COO ``(h·w, H·W)``,
    rows scaled to unit norm so that ``U Uᵀ = I`` when ``grid`` divides ``base``.

    Windows follow :func:`torch.nn.functional.adaptive_avg_pool2d`
    (``[floor(i·H/h), ceil((i+1)·H/h))``), so ``U`` agrees with :func:`layer_pool` up to scale.
    """
    H, W = base
    h, w = grid

    def windows(n_out: int, n_in: int) -> list[range]:
        return [range((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]

    rows, cols, vals = [], [], []
    for i, ys in enumerate(windows(h, H)):
        for j, xs in enumerate(windows(w, W)):
            area = len(ys) * len(xs)
            for y in ys:
                for x in xs:
                    rows.append(i * w + j)
                    cols.append(y * W + x)
                    vals.append(area**-0.5)
    idx = torch.tensor([rows, cols], dtype=torch.long)
    return torch.sparse_coo_tensor(idx, torch.tensor(vals), (h * w, H * W), check_invariants=False).coalesce()


def _scipy(t: Tensor):
    import scipy.sparse as sp

    t = t.coalesce().cpu()
    i, j = t.indices().numpy()
    return sp.csr_matrix((t.values().double().numpy(), (i, j)), shape=tuple(t.shape))


def _symmetric_normalized(W: Tensor):
    """``S = D^{-1/2} W D^{-1/2}`` in float64 scipy CSR (degrees recomputed in float64, so ``S`` is
    symmetric to rounding: ``eigsh`` assumes it)."""
    import scipy.sparse as sp

    Ws = _scipy(W)
    d = np.asarray(Ws.sum(1)).ravel()
    dinv = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-300)), 0.0)
    D = sp.diags(dinv)
    return (D @ Ws @ D).tocsr()


def exact_operator(
    graphs: Sequence[LayerGraph],
    base: tuple[int, int],
    image_index: Sequence[int] | Tensor | None = None,
    n_images: int | None = None,
    scale: float = 1.0,
):
    """The exact reference ``M = Σ_l w_l U_lᵀ S_l U_l`` (docs/method.md, Exact reference) as a scipy CSR matrix.

    Args:
        graphs: layer graphs of one batch (nodes ``(b, y, x)`` of that batch's images).
        base: base grid ``(H, W)``.
        image_index: global index of each of the batch's images (default ``0..B-1``), so graphs
            of several batches can be summed into one data-set operator.
        n_images: total images of the operator (default ``max(image_index) + 1``).
        scale: multiplies the result (e.g. ``1/len(graphs)`` to average).

    Returns:
        ``(n_images·H·W, n_images·H·W)`` symmetric ``scipy.sparse.csr_matrix``.
    """
    import scipy.sparse as sp

    H, W = base
    hw = H * W
    M = None
    for g in graphs:
        B = g.n_images
        idx = np.arange(B) if image_index is None else np.asarray(torch.as_tensor(image_index).cpu())
        n = int(n_images if n_images is not None else idx.max() + 1)
        U = _scipy(pool_operator(base, g.grid))  # (hw_l, HW)
        # block-diagonal pooling, mapped to the global image slots
        Ub = sp.kron(sp.eye(B, format="csr"), U, format="csr")  # (B·hw_l, B·HW)
        cols = (idx[:, None] * hw + np.arange(hw)[None, :]).ravel()
        sel = sp.csr_matrix((np.ones(B * hw), (np.arange(B * hw), cols)), shape=(B * hw, n * hw))
        Ug = (Ub @ sel).tocsr()  # (N_l, n·HW)
        S = g.sym_scipy() if hasattr(g, "sym_scipy") else _symmetric_normalized(g.W)
        term = (Ug.T @ S @ Ug) * (g.weight * scale)
        M = term if M is None else M + term
    return M.tocsr()


def exact_eigenvectors(
    graphs: Sequence[LayerGraph],
    base: tuple[int, int],
    K: int,
    image_index: Sequence[int] | Tensor | None = None,
    n_images: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The exact reference (docs/method.md, Exact reference): the ``K`` largest eigenpairs of :func:`exact_operator`.

    Returns ``(values (K,), Z (n_images, K, H, W))``, float64, by decreasing eigenvalue; ``Z`` has
    orthonormal columns over all pixels of all images.
    """
    H, W = base
    M = exact_operator(graphs, base, image_index=image_index, n_images=n_images)
    vals, vecs = top_eigenvectors(M, K, seed=seed)
    n = M.shape[0] // (H * W)
    return torch.from_numpy(vals.copy()), unflatten_channels(torch.from_numpy(vecs.copy()), n, H, W)


def top_eigenvectors(M, K: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``K`` largest eigenpairs of a symmetric sparse matrix, by ``scipy.sparse.linalg.eigsh``.

    Returns ``(values (K,), vectors (n, K))`` sorted by decreasing eigenvalue.
    """
    from scipy.sparse.linalg import eigsh

    n = M.shape[0]
    if K >= n:
        raise ValueError(f"K={K} must be smaller than the operator size {n}")
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals, vecs = eigsh(M, k=K, which="LA", v0=v0)
    order = np.argsort(-vals)
    return vals[order], vecs[:, order]


def subspace_alignment(Z: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> float:
    """Mean ``cos²`` of the principal angles between ``span(Z)`` and ``span(ref)``.

    Both are ``(n, K)`` (or ``(B, K, H, W)``, flattened with :func:`flatten_channels`). The mean is
    over the ``K_ref`` reference directions, so 1.0 means ``span(Z)`` contains the reference.
    """
    Z, ref = (torch.as_tensor(a, dtype=torch.float64) for a in (Z, ref))
    if Z.dim() == 4:
        Z = flatten_channels(Z)
    if ref.dim() == 4:
        ref = flatten_channels(ref)
    if Z.shape[0] != ref.shape[0]:
        raise ValueError(f"Z has {Z.shape[0]} rows but the reference has {ref.shape[0]}")
    Qz = torch.linalg.qr(Z).Q
    Qr = torch.linalg.qr(ref).Q
    return float((Qr.T @ Qz).pow(2).sum() / ref.shape[1])


def svd_order(Z: Tensor, keep_order: bool = False) -> tuple[Tensor, Tensor]:
    """Rotate pseudo-eigenvectors onto their principal axes.

    ``Z`` (``(B, K, H, W)``, all images) is flattened over pixels to ``X = U Σ Vᵀ``; returns
    ``(X V`` reshaped to ``(B, K, H, W)``, ``Σ (K,))``, so channel 0 carries the largest singular
    value. With ``keep_order`` (solvers whose output is already orthonormal and ordered by
    eigenvalue, where every singular value is 1 and the SVD's axes would be arbitrary) ``Z`` keeps
    its channels and ``Σ`` is their norms. Either way signs are fixed by :func:`fix_signs`.
    """
    B, K, H, W = Z.shape
    X = flatten_channels(Z.detach().double())
    if keep_order:
        E, s = X, X.norm(dim=0)
    else:
        _, s, Vh = torch.linalg.svd(X, full_matrices=False)
        E = X @ Vh.T
    return unflatten_channels(fix_signs(E).float(), B, H, W), s.float()


def fix_signs(E: Tensor) -> Tensor:
    """Flip the columns of ``E`` ``(n, K)`` so that each one's entry of largest magnitude is
    positive: stable figures and reproducible files (the mean, the obvious choice, is ~0 for
    every eigenvector orthogonal to the constant one, so rounding would decide it)."""
    peak = E.gather(0, E.abs().argmax(0, keepdim=True))[0]
    return E * torch.where(peak < 0, -1.0, 1.0).to(E)


# ---------------------------------------------------------------------------------------------
# The reference operator in torch, and a block eigensolver on it (used by the fast solver)
# ---------------------------------------------------------------------------------------------


class LayerOperator:
    """``M = Σ_l w_l U_lᵀ S_l U_l`` of one batch's graphs (docs/method.md, Exact reference), applied as sparse products.

    The torch twin of :func:`exact_operator` (same matrix; never formed): ``S_l`` are kept as CSR,
    and ``U_l`` is a reshape-and-mean when ``h_l, w_l`` divide ``H, W`` (then
    ``U_lᵀ S_l U_l z = upsample(S_l · avgpool(z))``), the sparse :func:`pool_operator` otherwise.

    Args:
        graphs: layer graphs of one batch of ``B`` images (nodes ``(b, y, x)``).
        base: base grid ``(H, W)``.
        dtype: dtype of ``S_l`` and of the vectors it is applied to.

    Calling it maps ``X`` ``(B·H·W, m)`` (rows ``(b, y, x)``) to ``M X`` of the same shape.
    ``shift`` is ``Σ_l w_l``, a bound on ``|λ(M)|``: ``M + shift·I`` is positive semi-definite.

    Sharded graphs (a run on several processes: each :class:`~ldsc.graphs.knn.DatasetGraph` holds the
    rows of its ``image_range`` only) make a sharded operator: ``X`` and ``M X`` are this process's
    images' rows; each layer's pooled rows are all-gathered (``N_l × m`` dense floats) before
    the product with the local rows of ``S_l``.
    """

    def __init__(self, graphs: Sequence[LayerGraph], base: tuple[int, int], dtype: torch.dtype = torch.float32):
        if not graphs:
            raise ValueError("LayerOperator needs at least one graph")
        self.base = (int(base[0]), int(base[1]))
        self.n_images = graphs[0].n_images
        first, last = getattr(graphs[0], "image_range", None) or (0, self.n_images)
        #: the images whose rows this operator maps (all of them unless sharded)
        self.image_range = (int(first), int(last))
        self.local_images = self.image_range[1] - self.image_range[0]
        self.sharded = self.local_images != self.n_images
        bounds = shard_bounds(self.n_images) if self.sharded else [0, self.n_images]
        if self.sharded and shard(self.n_images) != self.image_range:
            raise ValueError(f"graph rows {self.image_range} are not this process's shard of {self.n_images} images")
        self.terms = []
        for g in graphs:
            if g.n_images != self.n_images:
                raise ValueError(f"graph {g.name} has {g.n_images} images, expected {self.n_images}")
            h, w = g.grid
            blocks = [(s, S if S.dtype == dtype else S.to(dtype)) for s, S in g.sym_blocks()]
            U = None
            if self.base[0] % h or self.base[1] % w:
                with warnings.catch_warnings():  # "sparse CSR support is in beta"
                    warnings.simplefilter("ignore", UserWarning)
                    U = pool_operator(self.base, g.grid).to(device=blocks[0][1].device, dtype=dtype).to_sparse_csr()
            counts = [(b - a) * h * w for a, b in zip(bounds[:-1], bounds[1:])]
            self.terms.append((g, blocks, (h, w), float(g.weight), U, counts))
        self.shift = float(sum(t[3] for t in self.terms))
        self.size = self.local_images * self.base[0] * self.base[1]

    def pool(self, X: Tensor, grid: tuple[int, int], U: Tensor | None) -> Tensor:
        """``U_l X``: ``(B·H·W, m)`` -> ``(B·h·w, m)``, up to the factor ``√area`` that
        :meth:`add_unpooled` divides back out for divisible grids."""
        (H, W), (h, w), B, m = self.base, grid, self.local_images, X.shape[1]
        if U is None:
            fy, fx = H // h, W // w
            if fy == fx == 1:
                return X
            X6 = X.reshape(B, h, fy, w, fx, m)
            out = X6[:, :, 0, :, 0].clone()
            for i in range(fy):  # a sum of strided slices: much faster than .mean((2, 4))
                for j in range(fx):
                    if i or j:
                        out += X6[:, :, i, :, j]
            return out.div_(fy * fx).reshape(B * h * w, m)
        Xi = X.reshape(B, H * W, m).permute(1, 0, 2).reshape(H * W, B * m)
        return (U @ Xi).reshape(h * w, B, m).permute(1, 0, 2).reshape(B * h * w, m)

    def add_unpooled(self, out: Tensor, Y: Tensor, grid: tuple[int, int], U: Tensor | None, weight: float) -> None:
        """``out += weight · U_lᵀ Y`` (``Y`` ``(B·h·w, m)``, ``out`` ``(B·H·W, m)``; see :meth:`pool`):
        for divisible grids a broadcast add of each layer value onto its pixels (no upsampled copy)."""
        (H, W), (h, w), B, m = self.base, grid, self.local_images, Y.shape[1]
        if U is None:
            out.view(B, h, H // h, w, W // w, m).add_(Y.view(B, h, 1, w, 1, m), alpha=weight)
            return
        Yi = Y.reshape(B, h * w, m).permute(1, 0, 2).reshape(h * w, B * m)
        up = (U.transpose(0, 1) @ Yi).reshape(H * W, B, m).permute(1, 0, 2).reshape(B * H * W, m)
        out.add_(up, alpha=weight)

    def __call__(self, X: Tensor) -> Tensor:
        out = torch.zeros_like(X)
        for g, blocks, grid, weight, U, counts in self.terms:
            pooled = self.pool(X, grid, U)
            if self.sharded:  # every layer node's row, for the products with this shard's rows of S_l
                pooled = all_gather_rows(pooled, counts)
            self.add_unpooled(out, g.apply(pooled, blocks), grid, U, weight)
        return out


def _no_reduce(t: Tensor) -> Tensor:
    return t


def orthonormalize(X: Tensor, eps: float = 1e-6, reduce=None) -> Tensor:
    """Orthonormal basis of ``span(X)`` (``(n, m)`` -> ``(n, r)``, ``r ≤ m``) via the eigen-
    decomposition of the ``m×m`` Gram matrix (computed in float64); directions whose squared
    norm falls below ``eps × largest`` are dropped. One pass over ``X``: cheap for tall ``X``.

    ``reduce`` (here and in the LOBPCG functions below): sums a small matrix over the processes
    that hold the other rows of ``X`` (:func:`ldsc.distributed.all_reduce_sum`); default none."""
    G = (reduce or _no_reduce)(X.T.double() @ X.double())
    g, Q = torch.linalg.eigh(G)
    keep = g > eps * g.max().clamp_min(1e-300)
    C = (Q[:, keep] / g[keep].sqrt()).to(X.dtype)
    return X @ C


def _chunks(n: int, size: int = 2**18):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _grams(basis: list[Tensor], images: list[Tensor], reduce=None) -> tuple[Tensor, Tensor]:
    """``G = Vᵀ V`` and ``T = Vᵀ A V`` (float64, symmetrised) for ``V = [basis...]`` and
    ``A V = [images...]``, accumulated a chunk of rows at a time (one ``(rows, p)`` copy of ``V``
    per chunk; the images are multiplied in place)."""
    p = sum(b.shape[1] for b in basis)
    G = torch.zeros(p, p, dtype=torch.float64, device=basis[0].device)
    T = torch.zeros(p, p, dtype=torch.float64, device=basis[0].device)
    for rows in _chunks(basis[0].shape[0]):  # products in the data's dtype, summed in float64
        Vt = torch.cat([b[rows] for b in basis], 1).T
        G += (Vt @ Vt.T).double()
        c = 0
        for a in images:
            T[:, c:c + a.shape[1]] += (Vt @ a[rows]).double()
            c += a.shape[1]
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
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
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

    Returns:
        ``(theta, X, P, AP, residual)`` where ``residual`` ``(m,)`` holds ``‖A x − θ x‖`` of the
        vectors *before* the step (``AX`` is updated in place).
    """
    m = X.shape[1]
    eps = 1e-5 if X.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
    R = AX - X * theta.to(X.dtype)
    rn = _col_norms(R, reduce)
    # what is left of R along X is rounding: remove it (X is orthonormal), then normalise
    XR = torch.zeros(m, m, dtype=torch.float64, device=X.device)
    for rows in _chunks(X.shape[0]):
        XR += (X[rows].T @ R[rows]).double()
    XR = (reduce or _no_reduce)(XR).to(X.dtype)
    for rows in _chunks(X.shape[0]):
        R[rows] -= X[rows] @ XR
    R /= _col_norms(R, reduce).clamp_min(1e-30)
    AR = apply(R)
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
                step += Py[rows] @ Cp
            Y[rows] = Y[rows] @ Cx + step
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
    while it < iters:
        R = AX - X * theta.to(X.dtype)
        if tol > 0 and bool((_col_norms(R, reduce) <= tol * theta.abs().max()).all()):
            break
        del R
        theta, X, P, AP, _ = lobpcg_step(apply, X, AX, theta, P, AP, reduce=reduce)
        it += 1
    return theta, X, it
