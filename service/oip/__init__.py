"""The Open Inference Protocol ("KServe v2"), transport-free: its tensors, its errors, and inference,
metadata and readiness over the service's own runtime.

- ``tensors``: the protocol's request and response as dataclasses, and the raw (binary) tensor layout.
- ``errors``: ``OipError``, a refusal with its HTTP status and gRPC code.
- ``inference``: ``infer`` (admission, then the model's segment flow, as ``/v1``), metadata, readiness.
- ``rest``: the HTTP/REST JSON body and the binary tensor data extension, both ways.
"""
