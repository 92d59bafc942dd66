"""Container health check: exit 0 when the service on this container answers /health/ready with 200.

The image's HEALTHCHECK and docker-compose.yml run it with the image's Python, so the image needs
no curl or wget. Readiness, not liveness: a replica that is loading, warming up or draining is
reported unhealthy, which is what an orchestrator should see.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("TRANSFINER_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as error:  # HTTPError (the 503s) is a URLError
    print(f"not ready: {error}", file=sys.stderr)
    sys.exit(1)
