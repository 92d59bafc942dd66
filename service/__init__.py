"""Async inference service for Mask Transfiner: FastAPI, dynamic batching, COCO RLE, Prometheus.

Layout: ``settings`` (env ``TRANSFINER_*``), ``app`` (``create_app``), ``routes`` (HTTP only),
``runtime`` (lifecycle: loading, readiness, draining), ``admission`` (in-flight places, per-client
limits, deadlines), ``segmenting`` (one request: decode, queue, wait, post-process), ``batcher``
and ``worker`` (all plain classes, no HTTP), ``backends`` (one model backend per worker: eager PyTorch, TorchScript or ONNX Runtime,
and the version the service reports), ``pipeline`` (shared pre/post-processing), ``imaging``
(hardened decoding), ``polygons``, ``metrics``, ``cli`` (``transfiner serve``), ``ray_serve`` (the
same app on Ray Serve: ``transfiner serve --engine ray``; needs the ``ray`` extra).
"""

__version__ = "0.1.0"
