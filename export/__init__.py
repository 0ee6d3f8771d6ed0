"""The decoder as ONNX for the browser (``trimask.export``).

- ``onnx_decoder``: the export wrapper and ``export_decoder(sam, out_path, quantize=...)``
- ``decoder_cache``: ``decoder_file(model_type, checkpoint, cache_dir, quantize=...)``,
  exported once per model identity
- ``verify``: prompts, ONNX feeds, the PyTorch reference and agreement measures
  for the parity tests and the benchmark
"""
