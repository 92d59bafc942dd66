"""Async inference service for Mask Transfiner: FastAPI, dynamic batching, COCO RLE, Prometheus.

Layout: ``settings`` (env ``TRANSFINER_*``), ``app`` (``create_app``), ``routes`` (HTTP only),
``runtime`` (lifecycle, admission, the segment flow), ``batcher`` and ``worker`` (plain classes,
no HTTP), ``backends`` (the runtime interface; PyTorch now), ``pipeline`` (shared pre/post-
processing), ``imaging`` (hardened decoding), ``polygons``, ``metrics``, ``cli`` (``transfiner serve``).
"""

__version__ = "0.1.0"
