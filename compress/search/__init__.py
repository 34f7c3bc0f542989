"""Latency-aware search over per-group pruning ratios: its settings, the latency table, candidates, the procedure and its report."""
