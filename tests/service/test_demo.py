"""The demo page (service/static/) in a real Chromium, driven by Playwright, against a real server
on loopback with the default model.

The page must load without console errors, segment an uploaded make-shapes image with the
settings chosen on the page (its instance list agrees with the API for the same image and
parameters), draw each mask in its instance's colour over the image's own pixels, in both the
refined and the coarse view, show the API's error words, ask for an API key where one is needed,
and decode COCO RLEs exactly as pycocotools does. Screenshots go to bench-results/demo/.

Chromium is Debian's package (Playwright cannot download browsers here). Without it or the
playwright package the browser tests skip, unless TRANSFINER_REQUIRE_BROWSER=1 (.ci/run sets it,
after installing chromium): then they fail.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from tests.service.support import ThreadServer
from tests.support import REPO
from transfiner.model.datasets.shapes import make_shapes
from transfiner.service.app import create_app
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(120)

REQUIRE_ENV = "TRANSFINER_REQUIRE_BROWSER"
ARTIFACTS = REPO / "bench-results" / "demo"
API_KEY = "demo-key"


def _require_browser() -> str:
    """Chromium's path; skips (or fails, with TRANSFINER_REQUIRE_BROWSER=1) when it or Playwright is missing."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright package is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium")
    if chromium is None:
        problems.append("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    if problems:
        message = "; ".join(problems)
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{message}, and {REQUIRE_ENV} requires the browser tests to run")
        pytest.skip(message)
    return chromium


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser():
    chromium = _require_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        # Root cannot use Chromium's sandbox (containers, CI).
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=chromium, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(browser):
    srv = ThreadServer(ServiceSettings(device="cpu")).start()  # the default model
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    """A make-shapes image (what the default model was trained on, 384x384)."""
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num_images=1, seed=0)
    return out / "images" / "000000.png"


class Page:
    """One browser page on the demo, recording console errors."""

    def __init__(self, browser, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 860}, accept_downloads=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url + "/")

    def wait_ready(self, view: str = "refined") -> None:
        self.page.wait_for_selector(f'#result[data-state="ready"][data-view="{view}"]', timeout=30_000)

    def upload(self, path: Path, view: str = "refined") -> None:
        self.page.set_input_files("#file", str(path))
        self.wait_ready(view)

    def canvas(self) -> np.ndarray:
        """The canvas' RGB pixels, read losslessly as PNG."""
        url = self.page.evaluate("document.querySelector('#overlay').toDataURL('image/png')")
        data = base64.b64decode(url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def rows(self) -> list[dict]:
        return self.page.evaluate("""() => [...document.querySelectorAll('#instances tbody tr')].map(row => ({
            colour: row.dataset.colour, cells: [...row.cells].map(cell => cell.textContent),
            active: row.classList.contains('active')}))""")

    def screenshot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def demo(browser, server):
    page = Page(browser, server.url)
    page.page.wait_for_selector('#classes input[name="class"]')
    yield page
    page.close()


def segment(server, image_path: Path, **params) -> dict:
    response = httpx.post(
        server.url + "/v1/segment",
        params=params,
        content=image_path.read_bytes(),
        timeout=60,
        headers={"Content-Type": "application/octet-stream"},
    )
    response.raise_for_status()
    return response.json()


def row_cells(instances: list[dict]) -> list[list[str]]:
    """What the page's instance list shows for these instances."""
    return [
        [str(i + 1), inst["category_name"], f"{inst['score']:.3f}", str(round(inst["area"]))]
        for i, inst in enumerate(instances)
    ]


def check_drawing(
    canvas: np.ndarray, image: np.ndarray, instances: list[dict], colours: list[str], alpha: float
) -> None:
    """Inside exactly one mask a pixel is the image blended with that instance's colour; outside
    every mask it is the image's own. Box outlines and labels (and a margin) are left out."""
    height, width = image.shape[:2]
    masks = (
        np.stack([mask_util.decode(inst["segmentation"]).astype(bool) for inst in instances])
        if instances
        else np.zeros((0, height, width), bool)
    )
    drawn = np.zeros((height, width), bool)  # where boxes and labels may be
    for x, y, w, h in (inst["bbox"] for inst in instances):
        # 2 px lines (at 384 px) plus a margin; a 16 px high label above the box, or inside at the top.
        x0, y0, x1, y1 = int(x) - 3, int(y) - 3, int(np.ceil(x + w)) + 3, int(np.ceil(y + h)) + 3
        outline = np.zeros_like(drawn)
        outline[max(y0, 0) : y1, max(x0, 0) : x1] = True
        outline[y0 + 6 : y1 - 6, x0 + 6 : x1 - 6] = False  # the box's inside
        outline[max(y0 - 16, 0) : y0 + 22, max(x0, 0) : x0 + 110] = True  # the label
        drawn |= outline
    outside = ~masks.any(axis=0) & ~drawn
    assert outside.sum() > 1000
    assert np.abs(canvas[outside].astype(int) - image[outside]).max() <= 1
    for i, colour in enumerate(colours):
        only = masks[i] & (masks.sum(axis=0) == 1) & ~drawn
        assert only.sum() >= 5, f"instance {i} has too few unobstructed mask pixels to check"
        rgb = np.array([int(colour[k : k + 2], 16) for k in (1, 3, 5)])
        expected = image[only] + (rgb - image[only].astype(float)) * alpha
        assert np.abs(canvas[only] - expected).max() <= 1, f"instance {i} is not drawn in {colour}"


# ---------------------------------------------------------------- tests


def test_upload_draws_every_instance_in_its_colour_and_toggles_to_coarse(demo, server, image_path):
    image = np.asarray(Image.open(image_path).convert("RGB"))
    alpha = demo.page.evaluate("import('./static/overlay.js').then(m => m.MASK_ALPHA)")
    demo.upload(image_path)
    refined = segment(server, image_path, refine="true")
    assert len(refined["instances"]) >= 3, "the default model should find the shapes"
    rows = demo.rows()
    assert [row["cells"] for row in rows] == row_cells(refined["instances"])
    refined_canvas = demo.canvas()
    check_drawing(refined_canvas, image, refined["instances"], [row["colour"] for row in rows], alpha)
    timing = demo.page.locator("#timing dd").all_inner_texts()
    assert len(timing) == 4 and all(text.endswith(" ms") for text in timing)
    demo.screenshot("refined")

    # The coarse view, chosen with the keyboard: the same detections, the Mask R-CNN masks.
    demo.page.focus('input[name="view"][value="refined"]')
    demo.page.keyboard.press("ArrowDown")
    demo.wait_ready("coarse")
    coarse = segment(server, image_path, refine="false")
    rows = demo.rows()
    assert [row["cells"][:3] for row in rows] == [cells[:3] for cells in row_cells(refined["instances"])]
    assert [row["cells"] for row in rows] == row_cells(coarse["instances"])
    coarse_canvas = demo.canvas()
    check_drawing(coarse_canvas, image, coarse["instances"], [row["colour"] for row in rows], alpha)
    assert (coarse_canvas != refined_canvas).any(axis=2).sum() > 50
    demo.screenshot("coarse")
    assert demo.errors == []


def test_settings_on_the_page_are_the_api_parameters(demo, server, image_path):
    demo.upload(image_path)
    page = demo.page
    # Keyboard only: lower the score threshold, raise the mask threshold, fewer detections, one class less.
    page.focus("#score-threshold")
    for _ in range(4):
        page.keyboard.press("ArrowLeft")
    page.focus("#mask-threshold")
    page.keyboard.press("ArrowRight")
    page.fill("#max-detections", "3")
    page.press("#max-detections", "Tab")
    page.focus('#classes input[value="2"]')
    page.keyboard.press("Space")
    demo.wait_ready()
    assert page.input_value("#score-threshold") == "0.3" and page.input_value("#mask-threshold") == "0.55"
    expected = segment(
        server,
        image_path,
        score_threshold=0.3,
        mask_threshold=0.55,
        max_detections=3,
        classes="1,3,4,5,6,7",
    )["instances"]
    assert [row["cells"] for row in demo.rows()] == row_cells(expected)
    assert all(inst["category_id"] != 2 for inst in expected) and len(expected) <= 3
    assert demo.errors == []


def test_hover_highlights_the_mask_and_its_row(demo, server, image_path):
    demo.upload(image_path)
    instances = segment(server, image_path)["instances"]
    before = demo.canvas()
    # Hover a pixel of the first instance's mask, well inside its box, that no later (topmost)
    # instance owns, as far from the mask's edge as possible: thin parts (rings, letters) are
    # a pixel wide, and the mouse lands within a pixel of where it is aimed.
    masks = mask_util.decode([i["segmentation"] for i in instances]).astype(bool).transpose(2, 0, 1)
    mask = masks[0] & ~masks[1:].any(axis=0)
    x, y, w, h = instances[0]["bbox"]
    mask[: int(y + 0.3 * h)] = False
    core = mask
    while True:
        inner = core.copy()
        inner[1:] &= core[:-1]
        inner[:-1] &= core[1:]
        inner[:, 1:] &= core[:, :-1]
        inner[:, :-1] &= core[:, 1:]
        if not inner.any():
            break
        core = inner
    ys, xs = np.nonzero(core)
    px, py = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
    box = demo.page.locator("#overlay").bounding_box()
    scale = box["width"] / mask.shape[1]
    demo.page.mouse.move(box["x"] + (px + 0.5) * scale, box["y"] + (py + 0.5) * scale)
    demo.page.wait_for_selector("#instances tbody tr.active")
    assert [row["active"] for row in demo.rows()] == [i == 0 for i in range(len(instances))]
    assert (demo.canvas()[mask] != before[mask]).any()
    demo.screenshot("hover")
    # Leaving the canvas and focusing a row (keyboard) highlights that row instead.
    demo.page.mouse.move(0, 0)
    demo.page.focus("#instances tbody tr:nth-child(2)")
    assert [row["active"] for row in demo.rows()] == [i == 1 for i in range(len(instances))]


def test_drop_and_paste_an_image(demo, server, image_path):
    expected = row_cells(segment(server, image_path)["instances"])
    data = base64.b64encode(image_path.read_bytes()).decode()
    for event in ("drop", "paste"):
        with demo.page.expect_request(lambda request: request.url.split("?")[0].endswith("/segment")):
            demo.page.evaluate(
                """([event, data]) => {
                    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                    const transfer = new DataTransfer();
                    transfer.items.add(new File([bytes], `${event}.png`, {type: "image/png"}));
                    const init = {bubbles: true, cancelable: true};
                    document.body.dispatchEvent(event === "drop"
                        ? new DragEvent("drop", {...init, dataTransfer: transfer})
                        : new ClipboardEvent("paste", {...init, clipboardData: transfer}));
                }""",
                [event, data],
            )
        demo.wait_ready()
        assert [row["cells"] for row in demo.rows()] == expected
        assert demo.page.evaluate("document.querySelector('#overlay').width") == 384
    assert demo.errors == []


def test_downloads_are_the_coco_json_and_the_overlay(demo, server, image_path):
    demo.upload(image_path)
    with demo.page.expect_download() as download:
        demo.page.click("#download-json")
    assert json.loads(Path(download.value.path()).read_text()) == segment(server, image_path)["instances"]
    assert download.value.suggested_filename == "000000.refined.json"
    with demo.page.expect_download() as download:
        demo.page.click("#download-png")
    png = np.asarray(Image.open(download.value.path()).convert("RGB"))
    assert png.shape == (384, 384, 3)
    assert np.array_equal(png, demo.canvas())


def test_a_bad_file_shows_the_api_error(demo, server):
    data = b"these bytes are not an image"
    response = httpx.post(
        server.url + "/v1/segment", content=data, headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 415
    error = response.json()["error"]
    demo.page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": data}])
    demo.page.wait_for_selector('#result[data-state="error"]')
    assert demo.page.inner_text("#error-message") == error["message"]
    assert demo.page.inner_text("#error-code") == error["code"]
    assert demo.page.is_visible("#error")
    demo.screenshot("error")


def _rle_cases(server, image_path) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:300, :500]
    cases = [
        np.zeros((7, 5), np.uint8),
        np.ones((7, 5), np.uint8),
        np.pad(np.ones((1, 1), np.uint8), ((3, 2), (1, 4))),
        (rng.random((40, 60)) > 0.5).astype(np.uint8),  # short runs
        ((yy - 150) ** 2 + (xx - 250) ** 2 < 140**2).astype(np.uint8),  # long runs, big deltas
        np.pad(np.ones((1, 1), np.uint8), ((0, 1999), (0, 1999))),  # a run of ~4 M zeros: a 5-character varint
    ]
    cases += [mask_util.decode(inst["segmentation"]) for inst in segment(server, image_path)["instances"][:3]]
    return cases


def test_browser_rle_decoder_equals_pycocotools(demo, server, image_path):
    cases = _rle_cases(server, image_path)
    rles = [mask_util.encode(np.asfortranarray(mask)) for mask in cases]
    payload = [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]
    decoded = demo.page.evaluate(
        "async rles => { const m = await import('./static/rle.js');"
        " return rles.map(rle => Array.from(m.maskIndices(rle))); }",
        payload,
    )
    for mask, indices in zip(cases, decoded):
        assert sorted(indices) == np.flatnonzero(mask.ravel()).tolist()  # (visited column by column)
    # Corrupt strings fail loudly instead of drawing garbage.
    message = demo.page.evaluate(
        "async () => { const m = await import('./static/rle.js');"
        " try { m.maskIndices({size: [7, 5], counts: 'n'}); return null; } catch (e) { return e.message; } }"
    )
    assert message and "truncated" in message


def test_the_page_asks_for_the_api_key_and_sends_it(browser, image_path, checkpoint):
    settings = ServiceSettings(model=str(checkpoint), device="cpu", api_key=API_KEY)
    srv = ThreadServer(settings).start()
    demo = Page(browser, srv.url)
    try:
        demo.page.wait_for_selector("#api-key", state="visible")
        assert demo.page.inner_text("#error-code") == "unauthorized"
        assert demo.page.evaluate("document.activeElement.id") == "api-key"
        demo.page.fill("#api-key", API_KEY)
        demo.page.keyboard.press("Tab")
        demo.page.wait_for_selector('#classes input[name="class"]')
        demo.upload(image_path)
        expected = httpx.post(
            srv.url + "/v1/segment", content=image_path.read_bytes(), headers={"X-API-Key": API_KEY}
        ).json()["instances"]
        assert [row["cells"] for row in demo.rows()] == row_cells(expected)
        assert demo.page.is_hidden("#error")
    finally:
        demo.close()
        srv.stop()


def test_the_model_picker_switches_model_and_classes(browser, image_path, checkpoint, tmp_path):
    from tests.service.repository.support import ANIMALS, add_version, write_animal_checkpoint

    root = tmp_path / "repository"
    add_version(root, "shapes", 1, checkpoint)
    add_version(root, "animals", 4, write_animal_checkpoint(tmp_path / "animals.pth"))
    srv = ThreadServer(ServiceSettings(model_repository=str(root), device="cpu", default_model="shapes")).start()
    demo = Page(browser, srv.url)
    try:
        page = demo.page
        page.wait_for_selector('#classes input[name="class"]')
        assert page.is_visible("#model") and page.input_value("#model") == "shapes"
        assert [text.strip() for text in page.locator("#classes label").all_inner_texts()] == ["circle", "square"]
        page.select_option("#model", "animals")
        page.wait_for_function("document.querySelector('#model-info').textContent.startsWith('animals 4')")
        assert [text.strip() for text in page.locator("#classes label").all_inner_texts()] == list(ANIMALS)
        page.set_input_files("#file", str(image_path))
        demo.wait_ready()
        params = {"score_threshold": "0.5", "mask_threshold": "0.5", "max_detections": "100", "refine": "true"}
        expected = httpx.post(
            srv.url + "/v1/models/animals/segment", params=params, content=image_path.read_bytes(), timeout=60
        ).json()["instances"]
        assert [row["cells"] for row in demo.rows()] == row_cells(expected)
        assert demo.errors == []
    finally:
        demo.close()
        srv.stop()


# ---------------------------------------------------------------- without a browser


def _get(settings: ServiceSettings, *paths: str) -> list[httpx.Response]:
    """GETs from a new app in process, without its lifespan: the model never loads, only routing runs."""

    async def get() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            return [await client.get(path) for path in paths]

    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, get()).result()


def test_demo_setting_and_static_files(monkeypatch):
    root, demo, module, *missing = _get(
        ServiceSettings(),
        "/",
        "/demo",
        "/static/app.js",
        "/static/nope.js",
        "/static/..%2Fsettings.py",
        "/static/demo.py",
    )
    for page in (root, demo):
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
    assert module.status_code == 200 and module.headers["content-type"].startswith("text/javascript")
    assert [response.status_code for response in missing] == [404, 404, 404]

    monkeypatch.setenv("TRANSFINER_DEMO", "false")
    for response in _get(ServiceSettings(), "/", "/demo", "/static/app.js"):
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
