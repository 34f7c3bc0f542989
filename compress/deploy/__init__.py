"""Deployment: ONNX export and checks, int8 Q/DQ, TensorRT engines, file names, the one interleaved timer and the benchmark backends."""
