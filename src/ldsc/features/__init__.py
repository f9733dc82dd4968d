"""Stage 1, images to token vectors: reading images (:mod:`.images`), the frozen backbones behind
one protocol (:mod:`.backbones`) and the feature store on disk (:mod:`.store`). Imports nothing
from the later stages (graphs, spectral, solvers, evaluation, runtime)."""
