"""The graph-builder protocol: what a graph type (``conf/graph/*.yaml``) provides to the rest of
the pipeline, beside the :class:`~ldsc.features.backbones.base.Backbone` protocol of stage 1.

Two builders implement it: :class:`~ldsc.graphs.knn.KnnGraphBuilder` (kNN cosine graphs: ``qk``,
``vv``, ``kk``, ``qq``) and :class:`~ldsc.graphs.attention.AttentionGraphBuilder` (``attn``).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from ldsc.features.backbones.base import LayerFeatures


@runtime_checkable
class GraphBuilder(Protocol):
    """A graph type.

    Attributes:
        kinds: the vector kinds (``q``, ``k``, ``v``) the feature store must hold for it.
        timings: seconds per stage of the last :meth:`dataset_graphs` (may be empty).
        layer_timings: per graph of the last :meth:`dataset_graphs` (may be empty).
        rebuild: build the whole-data-set graphs again rather than reuse stored ones.
    """

    kinds: list[str]
    timings: dict
    layer_timings: list
    rebuild: bool

    def __call__(self, features: list[LayerFeatures], base_size: int) -> list:
        """The graphs of one batch's features (nodes: the batch's tokens)."""

    def dataset_graphs(self, store, base_size: int, progress: bool = True, device=None) -> list:
        """The graphs of every image of a feature store (nodes: all tokens of a layer)."""

    def memory_estimate(self, n_images: int, layers: Sequence[dict], draws: int, base_size: int,
                        shards: int = 1) -> dict | None:
        """Bytes the whole-data-set graphs and solver need at their peak, by part (``peak``,
        ``graphs``, ``solver``, ``build``), or ``None`` when the builder cannot say."""

    def search_method(self, n_tokens: int, device=None) -> str:
        """The neighbour search used for a layer of ``n_tokens`` tokens (``exact``: brute force or none)."""

    def describe(self) -> str:
        """The settings that decide which edges exist, for messages (``graph.k_intra=25, ...``)."""

    def stored_parts(self, graphs: list) -> list:
        """The parts of :meth:`dataset_graphs`' result worth keeping in the graph store
        (:class:`~ldsc.graphs.dataset.DatasetGraph` s: what a resume would otherwise search again);
        ``[]`` when nothing is kept."""

    def from_stored(self, parts: list, store, base_size: int) -> list:
        """The whole-data-set graphs again from the stored ``parts`` (and the feature ``store``)."""
