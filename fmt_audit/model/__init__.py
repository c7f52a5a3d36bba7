"""The model as received: loading and validating an ONNX file, graph queries, the summary, safe outputs."""
