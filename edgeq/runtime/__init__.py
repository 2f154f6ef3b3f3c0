"""Running models where a target runs them: executions as data (`execution`, re-exported by
edgeq.targets.base), finding and registering providers (`providers`), the session factory
(`sessions`), the execution a compiled model recorded (`model_execution`), verification against
the float model (`verification`), synthetic inputs (`feeds`), the placement check per provider
(`placement`, with ONNX Runtime's optimized graph in `fusion` and OpenVINO's runtime model in
`openvino_direct`) and latency/throughput measurement (`benchmark`)."""
