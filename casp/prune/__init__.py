"""Pruning (the seed paper arXiv 2507.20613 and its baselines): scores and masks
(:mod:`masks`), SparseGPT (:mod:`sparsegpt`), the stored sparse linear (:mod:`sparse_linear`),
per-linear ratio profiles (:mod:`profile`), the engine pass (:mod:`layer_pass`) and the TPE
search over per-block ratios (:mod:`search`)."""
