"""Where the model runs: ONNX Runtime (``onnxrt``) for inference, PyTorch (``torch``) for gradients."""
