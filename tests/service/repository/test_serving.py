"""Several models from one repository, served by a real server on loopback: each answers as a
server of that model alone, versions swap under load without a failed request, a corrupt version
leaves the serving one alone, and an unloaded model finishes what it admitted."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
import time
import weakref

import httpx
import pytest

from tests.service.repository.support import add_version, write_animal_checkpoint
from tests.service.support import assert_same, metric, running
from tests.support import encode, scene
from transfiner.service.settings import ServiceSettings

PARAMS = {"score_threshold": 0.0, "max_detections": 5}


def instances_bytes(response: httpx.Response) -> bytes:
    """The response's instances exactly as sent (the bytes between the keys around them)."""
    body = response.content
    return body[body.index(b'"instances":') : body.index(b',"timing":')]


def settings_for(root, **overrides) -> ServiceSettings:
    return ServiceSettings(**{"model_repository": str(root), "device": "cpu", "max_batch_size": 2, **overrides})


@pytest.fixture(scope="module")
def animals(tmp_path_factory):
    return write_animal_checkpoint(tmp_path_factory.mktemp("animals") / "animals.pth")


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def index(url: str) -> list[dict]:
    return httpx.get(url + "/v1/repository/index").json()


def test_two_models_answer_as_each_alone_concurrently(tmp_path, checkpoint, animals):
    root = tmp_path / "repository"
    add_version(root, "shapes", 1, checkpoint)
    add_version(root, "animals", 3, animals)
    images = [encode(scene(96, 128, seed=s)) for s in range(4)]
    alone = {}
    for name, weights in (("shapes", checkpoint), ("animals", animals)):
        with running(ServiceSettings(model=str(weights), device="cpu", max_batch_size=1)) as server:
            alone[name] = [
                instances_bytes(httpx.post(server.url + "/v1/segment", content=png, params=PARAMS, timeout=60))
                for png in images
            ]
    assert alone["shapes"] != alone["animals"]

    # One image per forward pass on both sides: a batched convolution may round differently.
    with running(settings_for(root, default_model="shapes", max_batch_size=1)) as server:

        async def ask(client: httpx.AsyncClient, name: str, i: int) -> tuple[str, int, httpx.Response]:
            path = (
                f"/v1/models/{name}/segment"
                if i % 2
                else f"/v1/models/{name}/versions/{'1' if name == 'shapes' else '3'}/segment"
            )
            return name, i, await client.post(path, content=images[i], params=PARAMS)

        async def both() -> list:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(
                    *(ask(client, name, i) for _ in range(3) for name in ("shapes", "animals") for i in range(4))
                )

        for name, i, response in asyncio.run(both()):
            assert response.status_code == 200, response.text
            assert response.json()["model"]["name"] == name
            assert instances_bytes(response) == alone[name][i], (name, i)

        default = httpx.post(server.url + "/v1/segment", content=images[0], params=PARAMS)
        assert default.json()["model"] == {"name": "shapes", "version": "1", "backend": "pytorch", "precision": "fp32"}
        cards = {card["name"]: card for card in httpx.get(server.url + "/v1/models").json()["models"]}
        assert [c["name"] for c in cards["animals"]["classes"]] == ["cat", "dog", "bird"]
        assert cards["shapes"]["default"] and not cards["animals"]["default"]
        assert [(v["version"], v["state"]) for v in cards["animals"]["versions"]] == [("3", "READY")]
        assert httpx.get(server.url + "/v1/models/animals").json()["version"] == "3"
        for path, code in (
            ("/v1/models/zebras/segment", "model_not_found"),
            ("/v1/models/animals/versions/1/segment", "version_not_found"),
        ):
            missing = httpx.post(server.url + path, content=images[0])
            assert missing.status_code == 404 and missing.json()["error"]["code"] == code, missing.text
        assert httpx.get(server.url + "/v1/models/zebras").status_code == 404
        assert sorted((row["name"], row["version"], row["state"]) for row in index(server.url)) == [
            ("animals", "3", "READY"),
            ("shapes", "1", "READY"),
        ]
        assert metric(server.url, "transfiner_batch_size_count", model="animals", version="3") >= 1
        assert metric(server.url, "transfiner_model_state", model="shapes", version="1", state="READY") == 1


async def closed_loop(url: str, path: str, png: bytes, clients: int, stop: asyncio.Event, seen: list) -> None:
    """``clients`` clients, each sending its next request as soon as its last is answered."""

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            response = await client.post(path, content=png, params=PARAMS)
            seen.append((sent, response))

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))


def test_a_new_version_takes_over_under_load_without_a_failed_request(tmp_path, checkpoint):
    root = tmp_path / "repository"
    add_version(root, "m", 1, checkpoint)
    png = encode(scene(96, 128, seed=1))
    with running(settings_for(root, repository_poll_s=0.1)) as server:
        old = server.runtime.models.models["m"].versions["1"]
        old_model = weakref.ref(old.model.backends[0].model)
        old_answer = httpx.post(server.url + "/v1/models/m/segment", content=png, params=PARAMS).json()["instances"]
        seen: list = []

        async def scenario() -> float:
            stop = asyncio.Event()
            load = asyncio.create_task(closed_loop(server.url, "/v1/models/m/segment", png, 8, stop, seen))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(add_version, root, "m", 2, None, 7)
            while [row["version"] for row in await asyncio.to_thread(index, server.url)] != ["2"]:
                await asyncio.sleep(0.05)
            swapped = time.monotonic()  # version 1 has unloaded
            await asyncio.sleep(1.0)
            stop.set()
            await load
            return swapped

        swapped = asyncio.run(scenario())
        new_answer = httpx.post(server.url + "/v1/models/m/segment", content=png, params=PARAMS).json()["instances"]
        assert [i["segmentation"] for i in new_answer] != [i["segmentation"] for i in old_answer]
        versions = []
        for sent, response in seen:
            assert response.status_code == 200, response.text
            version = response.json()["model"]["version"]
            # Named after what computed it (batch-mates may move a score's last digits).
            assert_same(response.json()["instances"], {"1": old_answer, "2": new_answer}[version], 1e-4)
            versions.append(version)
            if sent > swapped:
                assert version == "2"
        assert versions.count("1") > 0 and versions.count("2") > 0
        assert [card["version"] for card in httpx.get(server.url + "/v1/models").json()["models"]] == ["2"]
        del old
        gc.collect()
        assert old_model() is None, "the old version's model is still held"
        assert metric(server.url, "transfiner_batch_size_count", model="m", version="1") == 0  # its series went


def test_a_corrupt_new_version_leaves_the_serving_one_alone(tmp_path, checkpoint):
    root = tmp_path / "repository"
    add_version(root, "m", 1, checkpoint)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint at all")
    png = encode(scene(96, 128, seed=2))
    with running(settings_for(root, repository_poll_s=0.1)) as server:
        seen: list = []

        async def scenario() -> None:
            stop = asyncio.Event()
            load = asyncio.create_task(closed_loop(server.url, "/v1/models/m/segment", png, 4, stop, seen))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(add_version, root, "m", 2, broken)
            while not any(row.get("version") == "2" and row["state"] == "UNAVAILABLE" for row in index(server.url)):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            stop.set()
            await load

        asyncio.run(scenario())
        assert seen and all(r.status_code == 200 and r.json()["model"]["version"] == "1" for _, r in seen)
        rows = {row["version"]: row for row in index(server.url)}
        assert rows["1"]["state"] == "READY"
        assert rows["2"]["state"] == "UNAVAILABLE" and "CheckpointError" in rows["2"]["reason"], rows["2"]
        assert metric(server.url, "transfiner_model_load_failures_total", model="m") == 1
        assert httpx.get(server.url + "/health/ready").status_code == 200
        # Not tried again while its files stay as they are.
        time.sleep(0.5)
        assert metric(server.url, "transfiner_model_load_failures_total", model="m") == 1
        # A fixed version 2 (new files) loads and takes over.
        shutil.rmtree(root / "m" / "2")
        add_version(root, "m", 2, None, 3)
        wait_for(lambda: [row["version"] for row in index(server.url)] == ["2"], what="version 2 to take over")
        assert httpx.post(server.url + "/v1/models/m/segment", content=png).json()["model"]["version"] == "2"


def test_unload_while_busy_finishes_what_it_admitted(tmp_path, checkpoint, animals):
    root = tmp_path / "repository"
    add_version(root, "m", 1, checkpoint)
    add_version(root, "animals", 1, animals)
    png = encode(scene(96, 128, seed=3))
    with running(settings_for(root, max_batch_size=1)) as server:

        async def scenario() -> tuple[list[httpx.Response], httpx.Response, int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                busy = [asyncio.create_task(client.post("/v1/models/m/segment", content=png)) for _ in range(6)]
                admission = server.runtime.models.models["m"].versions["1"].admitted
                while admission.inflight < 2:
                    await asyncio.sleep(0.001)
                admitted = admission.inflight
                unloaded = await client.post("/v1/repository/models/m/unload")
                return await asyncio.gather(*busy), unloaded, admitted

        answers, unloaded, admitted = asyncio.run(scenario())
        statuses = [r.status_code for r in answers]
        assert statuses.count(200) >= admitted and set(statuses) <= {200, 404}, statuses
        assert unloaded.status_code == 200
        assert unloaded.json() == [{"name": "m", "state": "UNAVAILABLE", "reason": "unloaded"}]
        later = httpx.post(server.url + "/v1/models/m/segment", content=png)
        assert later.status_code == 404 and later.json()["error"]["code"] in ("model_unavailable", "model_not_found")
        assert httpx.post(server.url + "/v1/models/animals/segment", content=png).status_code == 200
        assert httpx.get(server.url + "/health/ready").status_code == 200  # unloaded on purpose

        loaded = httpx.post(server.url + "/v1/repository/models/m/load", timeout=60)
        assert loaded.status_code == 200 and loaded.json() == [{"name": "m", "version": "1", "state": "READY"}]
        assert httpx.post(server.url + "/v1/models/m/segment", content=png).status_code == 200
        assert httpx.post(server.url + "/v1/repository/models/nothing/load").status_code == 404


def test_bad_models_are_reported_and_the_others_serve(tmp_path, checkpoint, animals):
    root = tmp_path / "repository"
    add_version(root, "good", 1, checkpoint)
    add_version(root, "typo", 1, checkpoint)
    (root / "typo" / "config.yaml").write_text("max_batch_sise: 4\n")
    add_version(root, "empty", 1, checkpoint)
    (root / "empty" / "1" / "model.pth").unlink()
    add_version(root, "zoo", 1, animals)
    add_version(root, "zoo", 2, animals)
    (root / "zoo" / "config.yaml").write_text("version_policy: {specific: [1, 2]}\nmax_batch_size: 3\n")
    with running(settings_for(root, max_loaded_models=2)) as server:
        rows = {(row["name"], row.get("version")): row for row in index(server.url)}
        assert rows[("good", "1")]["state"] == "READY"
        assert "max_batch_sise" in rows[("typo", None)]["reason"]
        assert (
            rows[("empty", "1")]["state"] == "UNAVAILABLE" and "one checkpoint file" in rows[("empty", "1")]["reason"]
        )
        assert rows[("zoo", "1")]["state"] == rows[("zoo", "2")]["state"] == "READY"
        assert httpx.get(server.url + "/health/ready").status_code == 200
        for version in ("1", "2"):
            answer = httpx.post(server.url + f"/v1/models/zoo/versions/{version}/segment", content=encode(scene()))
            assert answer.status_code == 200 and answer.json()["model"]["version"] == version
        assert httpx.get(server.url + "/v1/models/zoo").json()["batching"]["max_batch_size"] == 3
        # Two models are loaded: a third is refused by the budget, with a clear error.
        add_version(root, "third", 1, checkpoint)
        refused = httpx.post(server.url + "/v1/repository/models/third/load")
        assert refused.status_code == 400 and "max_loaded_models is 2" in refused.json()["error"]["message"]
        no_default = httpx.post(server.url + "/v1/segment", content=encode(scene()))
        assert no_default.status_code == 404 and no_default.json()["error"]["code"] == "no_default_model"


def test_bench_loads_one_model_and_counts_only_its_work(tmp_path, checkpoint, animals, capsys):
    from transfiner.cli.main import main

    root = tmp_path / "repository"
    add_version(root, "shapes", 1, checkpoint)
    add_version(root, "animals", 2, animals)
    with running(settings_for(root, default_model="shapes")) as server:
        stop = threading.Event()

        def other_traffic() -> None:  # the default model, busy all along
            while not stop.is_set():
                httpx.post(server.url + "/v1/segment", content=encode(scene()), timeout=60)

        background = threading.Thread(target=other_traffic)
        background.start()
        try:
            out = tmp_path / "bench"
            argv = ["bench", "--url", server.url, "--model", "animals", "--concurrency", "2", "--requests", "6"]
            code = main([*argv, "--warmup", "1", "--num-images", "2", "--image-size", "96x96", "--out", str(out)])
        finally:
            stop.set()
            background.join()
        assert code == 0, capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())
        assert report["target"]["model"] == "animals"
        step = report["steps"][0]["server"]
        assert step["segment_requests"] == 6 and step["responses_by_status"] == {"200": 6}
        assert round(step["mean_batch_size"] * step["batches"]) == 6  # the images animals computed, no others
        assert main(["bench", "--url", server.url, "--model", "zebras", "--out", str(tmp_path / "none")]) == 2
        assert "serves no model 'zebras' (models: animals, shapes)" in capsys.readouterr().err


def test_a_model_removed_from_disk_unloads_and_the_weights_budget_refuses_what_does_not_fit(tmp_path, checkpoint):
    root = tmp_path / "repository"
    add_version(root, "kept", 1, checkpoint)
    add_version(root, "removed", 1, checkpoint)
    budget = int(1.5 * checkpoint.stat().st_size)  # room for one copy of the weights, not two
    with running(settings_for(root, repository_poll_s=0.1, max_model_host_bytes=budget)) as server:
        rows = {row["name"]: row for row in index(server.url)}
        loaded = [name for name, row in rows.items() if row["state"] == "READY"]
        refused = [name for name, row in rows.items() if row["state"] == "UNAVAILABLE"]
        assert len(loaded) == len(refused) == 1
        assert "max_model_host_bytes" in rows[refused[0]]["reason"] and str(budget) in rows[refused[0]]["reason"]
        shutil.rmtree(root / loaded[0])
        wait_for(lambda: all(row["name"] != loaded[0] for row in index(server.url)), what="the removal to unload")
        gone = httpx.post(server.url + f"/v1/models/{loaded[0]}/segment", content=encode(scene()))
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        # Its weights are freed: the refused model fits now, once its files change (a new version).
        add_version(root, refused[0], 2, checkpoint)
        wait_for(
            lambda: any(r["name"] == refused[0] and r["state"] == "READY" for r in index(server.url)),
            what="the refused model to load",
        )
