"""HTTP routes: segment (POST /v1/segment), models (GET /v1/models), health and metrics."""
