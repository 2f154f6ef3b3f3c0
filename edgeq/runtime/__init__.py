"""Running models in ONNX Runtime: the session factory (`sessions`), verification against the
float model (`verification`), synthetic inputs (`feeds`) and the check that quantized ops
became integer kernels (`fusion`)."""
