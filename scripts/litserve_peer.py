"""A plain LitServe server around our ``Predictor``, as LitServe's documentation shows it: a
``LitAPI`` with ``setup`` / ``decode_request`` / ``predict`` / ``encode_response``, LitServe's own
batching (``max_batch_size``, ``batch_timeout``) and one worker per device. It is the LitServe peer
of ``scripts.bench_peers``, which installs LitServe in a virtual environment of its own and runs
this module there; LitServe is not a dependency of this project.

Requests are multipart uploads (field ``image``, thresholds as form fields), the form LitServe
reads without custom code; the answer is ``{"instances": [COCO result records]}``.

    python -m scripts.litserve_peer --port 8002 [--model default] [--max-batch-size 4]
"""

from __future__ import annotations

import argparse
import io

import litserve as ls
import numpy as np
from PIL import Image, ImageOps

from transfiner.model.inference.predictor import Predictor


class TransfinerLitAPI(ls.LitAPI):
    def __init__(self, model: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model

    def setup(self, device: str) -> None:
        weights = None if self.model == "default" else self.model
        self.predictor = Predictor(weights=weights, device=device)

    def decode_request(self, request) -> tuple[np.ndarray, float]:
        upload = request["image"]
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(upload.file.read()))).convert("RGB")
        return np.asarray(image), float(request.get("score_threshold", 0.5))

    def predict(self, batch: list[tuple[np.ndarray, float]]) -> list[list[dict]]:
        # One forward pass for the batch (the Predictor splits it by padded canvas), at the lowest
        # threshold asked for; each request then keeps its own detections.
        threshold = min(t for _, t in batch)
        predictions = self.predictor.predict([image for image, _ in batch], score_threshold=threshold)
        category_ids = self.predictor.cfg.category_ids
        return [
            [r for r in p.coco_records(None, category_ids) if r["score"] > t] for p, (_, t) in zip(predictions, batch)
        ]

    def encode_response(self, output: list[dict]) -> dict:
        return {"instances": output}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.litserve_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds a batch waits to fill")
    args = parser.parse_args()
    api = TransfinerLitAPI(
        args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, api_path="/v1/segment"
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=300)
    server.run(host=args.host, port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
