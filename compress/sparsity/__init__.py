"""Weight sparsity on the one mask system: masks, N:M (2:4) patterns, SparseGPT, pruning at initialisation and dynamic sparse training."""
