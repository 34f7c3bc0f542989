"""Structured (channel) pruning: criteria, the guarded pruner on Torch-Pruning's dependency graph, attention heads, Early-Bird tickets, and the one adapter to Torch-Pruning internals."""
