"""PyTorch through onnx2torch: the bridge, write-back, op coverage.

Importing this package imports no torch: ``ops`` answers without it."""
