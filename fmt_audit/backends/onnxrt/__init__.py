"""ONNX Runtime: sessions with their provider read back, the instrumented (masked) model."""
