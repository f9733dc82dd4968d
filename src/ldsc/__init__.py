"""ldsc: Layer-Distributed Spectral Clustering of frozen vision networks.

``from ldsc import LDSC`` is the method as an estimator (fit / transform / save / load; see
docs/library.md); ``python -m ldsc.run`` the command line. Importing ``ldsc`` loads neither.
"""

__version__ = "0.1.0"

__all__ = ["LDSC"]


def __getattr__(name: str):
    if name == "LDSC":  # imported on first use: `import ldsc` stays instant
        from ldsc.estimator import LDSC

        return LDSC
    raise AttributeError(f"module 'ldsc' has no attribute {name!r}")
