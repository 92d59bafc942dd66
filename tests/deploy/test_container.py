"""The images built for real from docker/Dockerfile.cpu and docker/Dockerfile.gpu
(scripts/build_images.py, buildah), and the CPU image run as Docker runs it: its own entrypoint,
user and environment, on a free loopback port.

Marked ``container``: the suite runs these last (tests/conftest.py), so the images CI builds in the
background while the other tests run are ready by then (.ci/run).
"""

from __future__ import annotations

import io
import json
import os

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.deploy.containers import Container, built_image
from tests.service.support import free_port
from transfiner.cli.bench import generate_images
from transfiner.model.inference.predictor import Predictor
from transfiner.model.weights.default import resolve_weights
from transfiner.model.weights.files import file_digest

pytestmark = [pytest.mark.slow, pytest.mark.container]

SCORE_THRESHOLD = 0.3


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    """The CPU image's container, ready, on a free loopback port."""
    image = built_image("cpu")
    port = free_port()
    log = tmp_path_factory.mktemp("container") / "cpu.log"
    # What `docker run -e` would add: loopback only here (tests send no traffic beyond it).
    env = {"TRANSFINER_HOST": "127.0.0.1", "TRANSFINER_PORT": str(port), "TRANSFINER_GRPC_PORT": str(free_port())}
    container = Container(image.tag, log, env)
    try:
        container.wait_ready(f"http://127.0.0.1:{port}", timeout=180)
        yield container, port
    finally:
        container.remove()


@pytest.fixture(scope="module")
def shapes_image(tmp_path_factory) -> bytes:
    """One make-shapes image (PNG), as a user would send."""
    (image,) = generate_images(tmp_path_factory.mktemp("shapes"), 1, "320x240", seed=3)
    return image.data


def test_the_container_answers_as_the_package_does_outside_it(cpu, shapes_image):
    container, port = cpu
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/segment",
        content=shapes_image,
        params={"score_threshold": SCORE_THRESHOLD},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    instances = response.json()["instances"]

    # The shipped default model, outside the container, on the same image and threshold.
    rgb = np.asarray(Image.open(io.BytesIO(shapes_image)).convert("RGB"))
    predictor = Predictor(device="cpu")
    prediction = predictor(rgb, score_threshold=SCORE_THRESHOLD)
    assert len(instances) == len(prediction.scores) > 0, "the default model finds shapes, or this is vacuous"
    # Byte-identical masks: the same COCO RLE strings.
    assert [i["segmentation"] for i in instances] == prediction.rles
    assert [i["category_name"] for i in instances] == [predictor.class_names[c] for c in prediction.classes]
    np.testing.assert_allclose([i["score"] for i in instances], prediction.scores, atol=1e-5)
    x0, y0, x1, y1 = prediction.boxes.T
    np.testing.assert_allclose(
        [i["bbox"] for i in instances], np.stack([x0, y0, x1 - x0, y1 - y0], 1), atol=0.01
    )  # rounded to 0.01 px


def test_the_images_healthcheck_passes_inside_it_and_it_runs_as_its_non_root_user(cpu):
    container, port = cpu
    check = container.healthcheck()
    assert check.returncode == 0, check.stdout + check.stderr
    # The entrypoint's process (a chroot, not a PID namespace: it is visible from here).
    assert os.stat(f"/proc/{Container.listener(port)}").st_uid == 10001
    assert container.config["User"] == "10001:10001"


def test_the_image_serves_the_shipped_default_model(cpu):
    """The image holds the default model this checkout ships: the version it serves is the digest
    of the same weights file."""
    _container, port = cpu
    (card,) = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["models"]
    assert card["name"] == "default" and card["backend"] == "pytorch"
    assert card["version"] == file_digest(resolve_weights("default"))


def test_sigterm_drains_and_the_container_exits_0(cpu):
    container, port = cpu
    assert container.stop(port) == 0, container.log.read_text()[-3000:]
    assert "draining before shutdown" in container.log.read_text()


GPU_IMAGE_PROBE = """
import json, sys
import numpy as np, onnxruntime, torch
from PIL import Image
from transfiner.export.backends import load_backend
from transfiner.model.inference.predictor import Predictor
from transfiner.model.weights.default import resolve_weights
from transfiner.model.weights.files import file_digest

backend = load_backend("/opt/transfiner/models/default-onnx", "onnxruntime", device="cpu")
prediction = Predictor.from_backend(backend)(np.asarray(Image.open(sys.argv[1]).convert("RGB")), score_threshold=0.3)
print(json.dumps({
    "torch_cuda": torch.version.cuda,
    "providers": onnxruntime.get_available_providers(),
    "scores": prediction.scores.tolist(),
    "rles": prediction.rles,
}))
"""


def test_the_gpu_image_builds_with_cuda_torch_and_the_default_model_exported_to_onnx(shapes_image, tmp_path):
    """No GPU here: the image's CUDA builds are checked for what they are, and the ONNX model it
    exported at build time runs on ONNX Runtime's CPU provider, finding what PyTorch finds outside."""
    image = built_image("gpu")
    (tmp_path / "shapes.png").write_bytes(shapes_image)
    tmp_path.chmod(0o755)
    container_id = Container.create(image.tag)
    try:
        probe = Container.run_once(
            container_id, ["python", "-c", GPU_IMAGE_PROBE, "/probe/shapes.png"], volumes={tmp_path: "/probe"}
        )
    finally:
        Container.delete(container_id)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["torch_cuda"] and found["torch_cuda"].startswith("13.")
    assert "CUDAExecutionProvider" in found["providers"]
    rgb = np.asarray(Image.open(io.BytesIO(shapes_image)).convert("RGB"))
    outside = Predictor(device="cpu")(rgb, score_threshold=0.3)
    assert len(found["scores"]) == len(outside.scores) > 0
    np.testing.assert_allclose(found["scores"], outside.scores, atol=1e-3)
