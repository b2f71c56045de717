"""Deployable students: ONNX export, dynamic int8, accuracy checks and CPU speed (docs/deployment.md).

Public functions (import from the submodules; this package imports nothing heavy):

- :func:`pretrain.deploy.onnx_export.export_onnx` — a Hugging Face folder to ``OUT/model.onnx``
- :func:`pretrain.deploy.quantize.quantize_int8` — fp32 ONNX to dynamic-int8 ONNX
- :func:`pretrain.deploy.verify.check_outputs` / :func:`~pretrain.deploy.verify.check_int8` — verdicts
- :func:`pretrain.deploy.speed.benchmark` — latency / throughput records
- :func:`pretrain.deploy.cli.deploy` — all of it into one folder, atomically
"""
