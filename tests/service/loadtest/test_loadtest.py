"""``transfiner bench``: short closed- and open-loop sweeps against a real server on loopback (the
tiny real model in a uvicorn thread), the /metrics difference on real registries, the Poisson
clock's statistics, the drivers' accounting, and the one-line errors for bad input."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.service.support import free_port, metric, running
from transfiner.cli.main import main
from transfiner.model.datasets.shapes import make_shapes
from transfiner.service.loadtest.client import (
    RequestRecord,
    RunResult,
    poisson_arrivals,
    run_closed_loop,
    run_open_loop,
)
from transfiner.service.loadtest.metrics_delta import Histogram, Scrape, breakdown
from transfiner.service.loadtest.report import StepResult
from transfiner.service.metrics import ServiceMetrics
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(180)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SERVER_STAGES = ("request", "queue_wait", "decode", "preprocess", "inference", "postprocess")


@pytest.fixture(scope="module")
def server(checkpoint):
    # A 20 ms batching window: concurrent requests of the sweep can share batches.
    with running(ServiceSettings(model=str(checkpoint), device="cpu", max_batch_size=4, max_delay_ms=20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, 3, seed=0, size=(96, 96))
    return out / "images"


def check_report(out: Path, mode: str, levels: list[float]) -> dict:
    """Every field of report.json present and sane; the plots are PNGs; the tables have rows."""
    report = json.loads((out / "report.json").read_text())
    assert report["command"].startswith("transfiner bench --url http://127.0.0.1:")
    assert report["machine"]["cpus"] >= 1 and report["machine"]["platform"]
    card = report["target"]["models"][0]
    assert card["name"] == "default" and card["batching"]["max_batch_size"] == 4
    assert report["target"]["metrics_urls"] == [report["target"]["url"] + "/metrics"]
    assert report["workload"]["images"] >= 1 and report["workload"]["sizes"] == ["96x96"]

    steps = report["steps"]
    assert [s["mode"] for s in steps] == [mode] * len(levels)
    assert [s["concurrency" if mode == "closed" else "offered_rate"] for s in steps] == levels
    for step in steps:
        assert step["requests"] == step["ok"] >= 1 and step["errors"] == {} and step["dropped"] == 0
        assert step["duration_s"] > 0 and step["throughput_rps"] > 0 and step["images_per_s"] > 0
        lat = step["latency"]
        assert 0 < lat["p50_s"] <= lat["p90_s"] <= lat["p99_s"] <= lat["max_s"] < 60
        assert 0 < lat["mean_s"] <= lat["max_s"]
        assert len(step["latencies_s"]) == step["ok"] and step["error_latencies_s"] == []

        server = step["server"]
        assert server["replicas"] == 1
        # The warm-up and the test request came before the first scrape: exactly the step's requests.
        assert server["segment_requests"] == step["requests"] and server["responses_by_status"] == {"200": step["ok"]}
        assert server["rejections"] == {}
        for stage in SERVER_STAGES:
            timing = server[stage]
            assert timing["count"] >= 1 and timing["mean_s"] > 0 and timing["p50_s"] <= timing["p99_s"]
        assert server["queue_wait"]["count"] == server["decode"]["count"] == step["ok"]
        assert server["batches"] >= 1 and 1 <= server["mean_batch_size"] <= 4
        assert sum(server["batch_size_distribution"].values()) == server["batches"]
        assert server["inference_per_image_s"] > 0
        # The server's own end-to-end time cannot exceed what the client measured.
        assert server["request"]["mean_s"] <= lat["mean_s"] * 1.05 + 0.005

    for name in ("latency_cdf.png", "throughput_p99.png", "batch_sizes.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        with Image.open(out / name) as picture:
            picture.verify()
    markdown = (out / "report.md").read_text()
    label = "| closed c=" if mode == "closed" else "| open "
    assert sum(line.startswith(label) for line in markdown.splitlines()) == 2 * len(levels)  # client + server
    return report


def test_closed_loop_sweep_against_a_live_server(server, images, tmp_path, capsys):
    out = tmp_path / "closed"
    code = main(
        [
            "bench",
            "--url",
            server.url,
            "--concurrency",
            "1",
            "2",
            "--requests",
            "4",
            "--warmup",
            "1",
            "--images",
            str(images),
            "--param",
            "score_threshold=0.3",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = check_report(out, "closed", [1, 2])
    assert report["workload"]["params"] == {"score_threshold": "0.3"}
    assert [s["requests"] for s in report["steps"]] == [4, 4]
    # One request in flight at a time cannot form a batch of two.
    assert report["steps"][0]["server"]["batch_size_distribution"] == {"1": report["steps"][0]["server"]["batches"]}
    assert "closed c=2" in capsys.readouterr().out


def test_the_same_workload_as_open_inference_protocol_requests(server, images, tmp_path, capsys):
    """--protocol v2-http: the images go to /v2/models/default/infer as binary tensor data, and the
    server's figures are those of that route."""
    out = tmp_path / "v2"
    args = ["bench", "--url", server.url, "--concurrency", "2", "--requests", "4", "--warmup", "1"]
    args += ["--images", str(images), "--param", "score_threshold=0.3", "--protocol", "v2-http", "--out", str(out)]
    infer_before = metric(server.url, "transfiner_requests_total", route="/v2/models/{name}/infer", status="200")
    assert main(args) == 0, capsys.readouterr().err
    report = check_report(out, "closed", [2])
    assert report["workload"]["protocol"] == "v2-http" and report["target"]["model"] == "default"
    assert "--protocol v2-http" in report["command"]
    # Warm-up, test request and the step: all of them through the protocol's route.
    infer_after = metric(server.url, "transfiner_requests_total", route="/v2/models/{name}/infer", status="200")
    assert infer_after - infer_before == 1 + 1 + 4


def test_open_loop_with_generated_images(server, tmp_path, capsys):
    out = tmp_path / "open"
    code = main(
        [
            "bench",
            "--url",
            server.url + "/",
            "--rate",
            "8",
            "--requests",
            "6",
            "--warmup",
            "1",
            "--num-images",
            "2",
            "--image-size",
            "96x96",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = check_report(out, "open", [8.0])
    step = report["steps"][0]
    assert step["requests"] + step["dropped"] == 6 and step["arrival_rate"] > 0 and step["concurrency"] is None
    assert report["workload"]["source"] == "make-shapes 96x96, seed 0"
    assert sorted(p.name for p in (out / "workload" / "images").iterdir()) == ["000000.png", "000001.png"]
    # Run again into the same --out with fewer images: the workload is generated afresh.
    code = main(
        [
            "bench",
            "--url",
            server.url,
            "--rate",
            "8",
            "--requests",
            "2",
            "--warmup",
            "0",
            "--num-images",
            "1",
            "--image-size",
            "96x96",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "workload" / "images").iterdir()) == ["000000.png"]


# -- bad input: one error line, exit 2 ------------------------------------------------------------


def test_unreachable_url_is_one_error_line(images, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["bench", "--url", url, "--images", str(images), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach {url}") and err.count("\n") == 1 and "Traceback" not in err


def test_empty_image_folder_is_one_error_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code = main(["bench", "--url", "http://127.0.0.1:9", "--images", str(empty), "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"error: --images {empty} holds no .png, .jpg or .jpeg files\n"


# -- the /metrics difference, on real registries ------------------------------------------------------


def _observe_step(m: ServiceMetrics, batches: list[int], queue: list[float], statuses: list[str]) -> None:
    version = m.for_version("default", "1")
    for size in batches:
        version.batch_size.observe(size)
        version.inference_seconds.observe(0.02 * size)
        version.preprocess_seconds.observe(0.001)
    for seconds in queue:
        version.queue_seconds.observe(seconds)
        version.decode_seconds.observe(0.002)
        version.postprocess_seconds.observe(0.004)
    for status in statuses:
        m.requests.labels(route="/v1/segment", method="POST", status=status).inc()
        m.request_seconds.labels(route="/v1/segment").observe(0.2)
    m.requests.labels(route="/metrics", method="GET", status="200").inc()  # not a segment request
    m.request_seconds.labels(route="/metrics").observe(0.001)


def test_metrics_delta_of_two_real_scrapes():
    m = ServiceMetrics()
    _observe_step(m, batches=[1, 4], queue=[0.5, 0.5], statuses=["200"] * 5)  # before the step
    m.for_version("default", "1").queue_depth.set(7)  # a gauge: left out of the difference
    before = Scrape.parse(m.render().decode())
    _observe_step(m, batches=[2, 4, 4, 5], queue=[0.003, 0.02, 0.03, 0.04], statuses=["200"] * 3 + ["503"])
    m.rejections.labels(reason="queue_full").inc()
    m.for_version("default", "1").queue_depth.set(0)
    after = Scrape.parse(m.render().decode())

    delta = after.minus(before)
    assert not any(name.startswith("transfiner_queue_depth") for name, _ in delta.samples)
    b = breakdown(delta)
    assert b.replicas == 1 and b.segment_requests == 4
    assert b.responses_by_status == {"200": 3, "503": 1} and b.rejections == {"queue_full": 1}
    assert b.batches == 4 and b.mean_batch_size == pytest.approx(15 / 4)
    assert b.batch_size_distribution == {"2": 1, "4": 2, "5-6": 1}
    assert b.inference.count == 4 and b.inference.mean_s == pytest.approx(0.02 * 15 / 4)
    assert b.inference_per_image_s == pytest.approx(0.02)
    assert b.queue_wait.count == 4 and b.queue_wait.mean_s == pytest.approx(0.093 / 4)
    # Observations 0.003 | 0.02 | 0.03, 0.04: the median lies in the (0.01, 0.025] bucket.
    assert 0.01 <= b.queue_wait.p50_s <= 0.025 and 0.025 <= b.queue_wait.p99_s <= 0.05
    assert b.request.count == 4 and b.request.mean_s == pytest.approx(0.2)  # /metrics' own requests excluded
    assert b.decode.mean_s == pytest.approx(0.002) and b.postprocess.mean_s == pytest.approx(0.004)

    # Two replicas behind a load balancer: samples add up.
    other = ServiceMetrics()
    _observe_step(other, batches=[3], queue=[0.01], statuses=["200"])
    both = Scrape.combine([after, Scrape.parse(other.render().decode())]).minus(Scrape.combine([before, Scrape()]))
    b2 = breakdown(both)
    assert b2.replicas == 2 and b2.batches == 5 and b2.batch_size_distribution == {"2": 1, "3": 1, "4": 2, "5-6": 1}

    # A replica that restarted between the scrapes: its counters start again from zero.
    restarted = breakdown(Scrape.parse(other.render().decode()).minus(after))
    assert restarted.batches == 1 and restarted.responses_by_status == {"200": 1}


def test_histogram_quantile_interpolates_inside_buckets():
    histogram = Histogram(count=10, sum=0.3, buckets=[(0.025, 0.0), (0.05, 10.0), (float("inf"), 10.0)])
    assert histogram.mean == pytest.approx(0.03)
    assert histogram.quantile(0.5) == pytest.approx(0.0375)
    assert histogram.quantile(1.0) == pytest.approx(0.05)
    overflow = Histogram(count=2, sum=200, buckets=[(60.0, 0.0), (float("inf"), 2.0)])
    assert overflow.quantile(0.99) == 60.0  # beyond the last finite bound: that bound, as PromQL
    assert Histogram(count=0, sum=0, buckets=[(1.0, 0.0)]).quantile(0.5) is None


# -- the drivers ---------------------------------------------------------------------------------------


def test_poisson_arrivals_statistics():
    arrivals = poisson_arrivals(10.0, count=4000, seed=3)
    gaps = np.diff([0.0, *arrivals])
    assert len(arrivals) == 4000 and np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)  # 3 standard errors
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential: coefficient of variation 1
    assert poisson_arrivals(10.0, count=50, seed=3) == arrivals[:50]
    assert poisson_arrivals(10.0, count=50, seed=4) != arrivals[:50]

    windowed = poisson_arrivals(50.0, duration_s=20.0, seed=1)
    assert max(windowed) < 20.0 and abs(len(windowed) - 1000) < 4 * 1000**0.5
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, count=3)


def test_open_loop_drops_over_the_cap_and_times_from_the_arrival():
    async def slow(index: int) -> int:
        await asyncio.sleep(0.3)
        return 200

    arrivals = [i * 0.01 for i in range(10)]
    run = asyncio.run(run_open_loop(slow, arrivals, max_outstanding=4))
    assert run.dropped == 6 and [r.index for r in run.records] == [0, 1, 2, 3]
    for record in run.records:
        assert record.scheduled_s == pytest.approx(arrivals[record.index], abs=1e-6)
        assert record.latency_s >= 0.3 and record.ok


@pytest.mark.timeout(60)  # a loop that never stops hangs here
def test_closed_loop_keeps_concurrency_in_flight():
    in_flight, peak = 0, 0

    async def send(index: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return 503 if index == 0 else 200

    run = asyncio.run(run_closed_loop(send, 3, requests=12))
    assert peak == 3 and sorted(r.index for r in run.records) == list(range(12))
    assert [r.ok for r in sorted(run.records, key=lambda r: r.index)][:2] == [False, True]
    timed = asyncio.run(run_closed_loop(send, 2, duration_s=0.1))
    # It ran its duration, and no user started a request after it.
    assert timed.duration_s >= 0.1 and len(timed.records) >= 4
    assert all(record.scheduled_s < 0.1 for record in timed.records), [r.scheduled_s for r in timed.records]


def test_step_result_counts_errors_apart_from_latencies():
    run = RunResult(
        records=[
            RequestRecord(0, 0.0, 0.0, 0.5, 200),
            RequestRecord(1, 0.1, 0.1, 0.2, 503),
            RequestRecord(2, 0.2, 0.2, 0.3, None, "ConnectError"),
            RequestRecord(3, 0.3, 0.4, 1.3, 200),  # sent 0.1 s late: latency counts from 0.3
        ],
        duration_s=2.0,
        arrivals=4,
        arrival_window_s=0.3,
    )
    step = StepResult.from_run("open", run, None, offered_rate=10.0)
    assert step.errors == {"503": 1, "ConnectError": 1} and step.ok == 2 and step.requests == 4
    assert step.latencies_s == pytest.approx([0.5, 1.0]) and step.error_latencies_s == pytest.approx([0.1, 0.1])
    assert step.throughput_rps == 2.0 and step.images_per_s == 1.0 and step.latency.max_s == pytest.approx(1.0)
    assert step.arrival_rate == pytest.approx(4 / 0.3) and step.label == "open 10 req/s"


def test_closed_loop_steady_rate_leaves_out_the_ramp_and_the_drain():
    # 2 users against a batcher of 2: a slow first batch (the loop fills, the model warms), then an
    # answer pair every 0.1 s, then a drain where one user has nothing left to send.
    finished = [1.0, 1.0] + [1.0 + 0.1 * k for k in range(1, 11) for _ in range(2)] + [3.0]
    run = RunResult(
        records=[RequestRecord(i, 0.0, 0.0, t, 200) for i, t in enumerate(finished)],
        duration_s=3.0,
        arrivals=len(finished),
        arrival_window_s=0.0,
    )
    step = StepResult.from_run("closed", run, None, concurrency=2)
    assert step.images_per_s == pytest.approx(23 / 3.0)
    # From the 2nd answer (1.0 s) to the 2nd from last (2.0 s): 20 answers in 1 s.
    assert step.steady_images_per_s == pytest.approx(20.0)
    # Answers in batches share their times: the window counts whole batches (2 answers every 1 s).
    pairs = RunResult(
        records=[RequestRecord(i, 0.0, 0.0, float(1 + i // 2), 200) for i in range(12)],
        duration_s=6.0,
        arrivals=12,
        arrival_window_s=0.0,
    )
    assert StepResult.from_run("closed", pairs, None, concurrency=2).steady_images_per_s == pytest.approx(2.0)
    # Too few answers for a window, and no window for an open loop.
    short = RunResult(records=run.records[:4], duration_s=1.1, arrivals=4, arrival_window_s=0.0)
    assert StepResult.from_run("closed", short, None, concurrency=2).steady_images_per_s is None
    assert StepResult.from_run("open", run, None, offered_rate=10.0).steady_images_per_s is None
