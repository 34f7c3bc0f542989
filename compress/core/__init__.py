"""The model-manipulation core: model I/O, masks, pruning, training, ONNX, latency.

Nothing here imports ``compress.stages`` or the CLI; stages are thin adapters over this package.
"""
