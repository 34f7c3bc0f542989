"""Latency-aware search over per-group pruning ratios: the latency table, candidates, the procedure and its report."""
