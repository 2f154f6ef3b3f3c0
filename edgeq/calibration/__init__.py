"""Calibration: run the float model in ONNX Runtime over calibration data and stream statistics.

- `sources`: calibration data (npz files, token windows, readers) checked against the model.
- `float_model`: the float model in ONNX Runtime, weights held once, any tensor as an output.
- `collection`: `calibrate()` and its `CollectionOptions`: per-tensor statistics over the data.
- `statistics`: `TensorStats`, `CalibrationResult` and its .npz format, the per-tensor accumulator.
- `histogram`: the streaming power-of-two-grid histogram.
- `ranges`: quantization ranges from statistics (minmax, percentile, entropy, mse).
- `layer_inputs`: input Hessians of linear layers for weight rounding (GPTQ, AWQ).
"""
