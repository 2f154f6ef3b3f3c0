"""Packages of a compiled model for the runtime an app runs it with (`edgeq package`).

- `folder`: what every mode shares: the package folder (written whole or not at all), the file
  list with sizes and roles (`Package`), `PackageError`.
- `decoder`: the input/output layout of a compiled decoder with a KV cache (tokens, mask,
  positions, cache tensors per layer, logits) and renaming it to the names a runtime expects.
- `ort_fusions`: the canonical forms back into ONNX Runtime's fused kernels (RMSNorm,
  attention with its cache as GroupQueryAttention) for a generation loop at batch 1.
- `tokenizer`: tokenizer files for the package (tokenizer.json + tokenizer_config.json) and the
  special token ids they name.
- `genai`: the onnxruntime-genai folder: the decoder under the names the generation loop
  expects, `genai_config.json`, the tokenizer files (`package_genai`).

- `mobile`: a mobile app's package (`package_mobile`, `--platform android|ios`): the .ort model
  checked against the .onnx, the app's facts, the EP-context model of an NPU target, a README with
  the Kotlin/Swift calls.
- `ort_format`: ONNX Runtime's .ort format: conversion at the level a provider needs, the graph
  an .ort holds, the operator config of a reduced build checked against every op.
- `mobile_providers`: the mobile providers as data (NNAPI, QNN, CoreML, XNNPACK, CPU) and which
  nodes each would take.

One module per mode, each using `folder` the same way.
"""
