"""Stage 5, eigenvectors to segmentations and scores: per-image and data-set k-means, instance
masks, what/where probes (:mod:`.segment`), the paper's figures (:mod:`.segment_viz`) and the
COCO-Stuff label maps (:mod:`.cocostuff`). ``python -m ldsc.evaluate`` drives them."""
