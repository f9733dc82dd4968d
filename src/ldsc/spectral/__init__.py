"""Stage 3: the spectral maths on layer graphs, pure tensor code (no Lightning, no Hydra).

* :mod:`~ldsc.spectral.operator` — layer views (pooling) and the operator ``M = Σ_l w_l U_lᵀ S_l U_l``;
* :mod:`~ldsc.spectral.lobpcg` — the block eigensolver of the default solver and of :class:`ldsc.LDSC`;
* :mod:`~ldsc.spectral.exact` — the exact reference by ``scipy`` ``eigsh``;
* :mod:`~ldsc.spectral.objective` — the paper's loss;
* :mod:`~ldsc.spectral.alignment` — subspace alignment, principal-axis order, signs.
"""

from ldsc.spectral.alignment import fix_signs, subspace_alignment, svd_order
from ldsc.spectral.exact import exact_eigenvectors, exact_operator, top_eigenvectors
from ldsc.spectral.lobpcg import lobpcg_start, lobpcg_step, lobpcg_top, orthonormalize, ritz_from_grams
from ldsc.spectral.objective import paper_objective
from ldsc.spectral.operator import LayerOperator, flatten_channels, layer_pool, pool_operator, unflatten_channels

__all__ = ["LayerOperator", "exact_eigenvectors", "exact_operator", "fix_signs", "flatten_channels", "layer_pool",
           "lobpcg_start", "lobpcg_step", "lobpcg_top", "orthonormalize", "paper_objective", "pool_operator",
           "ritz_from_grams", "subspace_alignment", "svd_order", "top_eigenvectors", "unflatten_channels"]
