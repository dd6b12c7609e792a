"""torch to ONNX, checked and simplified; INT8 quantisation of the ONNX model."""
