"""The REST service: FastAPI routes over a batching engine, and the same app on Ray Serve.

- ``app``, ``routes``, ``schemas``, ``errors``, ``security``, ``middleware``, ``uploads``: HTTP only.
- ``settings``: every setting, from ``TRANSFINER_*`` environment variables or ``transfiner serve`` flags.
- ``engine``: loading, admission, batching, workers (threads or processes); plain classes, no HTTP.
- ``server``: uvicorn with draining; ``ray_serve``: the Ray Serve engine; ``loadtest``: ``transfiner bench``'s client.
"""
