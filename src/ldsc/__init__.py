"""ldsc: Layer-Distributed Spectral Clustering of frozen vision networks."""

__version__ = "0.1.0"
