"""/v1 against the Open Inference Protocol over REST (binary data) and over gRPC, side by side.

One ``transfiner serve`` subprocess (HTTP and gRPC on free loopback ports) is driven by a closed
loop of ``--concurrency`` clients (``service.loadtest``, the clients of ``transfiner bench
--protocol``) with the same image, once per protocol and round; the protocols take turns within
each round, so a machine's drift falls on all three. Before timing, one request per protocol
checks that the three answers carry the same RLE strings, classes and boxes. The report gives
throughput and p50/p99 (the median round of each) and their ratios to /v1 (goals: throughput at
least 0.95 of /v1, p99 at most 1.1 times /v1's).

    python -m scripts.bench_protocols --model default --requests 160 --rounds 3 --out bench-results/protocols
    python -m scripts.bench_protocols --model tiny.pth --requests 16 --rounds 1 --out /tmp/protocols
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
from pathlib import Path

from scripts.bench_service import summarise, synthetic_png
from scripts.bench_tracing import median_round
from scripts.results import markdown_table, write_report
from transfiner.service.grpc import inference_pb2 as pb
from transfiner.service.loadtest.client import PROTOCOLS, WorkloadImage, run_closed_loop
from transfiner.service.loadtest.servers import SERVE_COMMAND, free_port, stop_process_group, wait_for_server
from transfiner.service.oip import rest
from transfiner.service.oip.tensors import from_raw

ORDER = ("v1", "v2-http", "v2-grpc")


def client_for(
    protocol: str, url: str, grpc_target: str, args: argparse.Namespace, image: WorkloadImage, concurrency: int
):
    options = {"grpc_target": grpc_target} if protocol == "v2-grpc" else {}
    # Query strings and gRPC parameters are text; the REST protocol's JSON takes the number.
    threshold = args.score_threshold
    params = {"score_threshold": threshold if protocol == "v2-http" else str(threshold)}
    model = args.model_name
    return PROTOCOLS[protocol](
        url, [image], model=model, params=params, timeout_s=600, max_connections=concurrency, **options
    )


def answer_rles(protocol: str, body: bytes, headers) -> tuple[list[str], list[int]]:
    """The RLE strings and classes of one answer, whatever its protocol."""
    if protocol == "v1":
        instances = json.loads(body)["instances"]
        return [json.dumps(i["segmentation"], separators=(",", ":")) for i in instances], [
            i["category_id"] for i in instances
        ]
    if protocol == "v2-http":
        length = headers.get(rest.HEADER_LENGTH)
        response = rest.parse_response(body, None if length is None else int(length))
        outputs = {t.name: t for t in response.outputs}
    else:
        answer = pb.ModelInferResponse.FromString(body)
        outputs = {
            o.name: from_raw(o.name, o.datatype, tuple(o.shape), raw)
            for o, raw in zip(answer.outputs, answer.raw_output_contents)
        }
    return [r.decode() for r in outputs["masks_rle"].data], [int(c) for c in outputs["classes"].data]


async def same_answers(url: str, grpc_target: str, args: argparse.Namespace, image: WorkloadImage) -> dict[str, int]:
    """One request per protocol: their RLE strings and classes must be identical."""
    seen = {}
    for protocol in ORDER:
        async with client_for(protocol, url, grpc_target, args, image, 1) as client:
            response = await client.request(0)
            if not response.is_success:
                raise SystemExit(f"{protocol}: status {response.status_code}: {response.text[:300]}")
            seen[protocol] = answer_rles(protocol, response.content, response.headers)
    if len({json.dumps(v) for v in seen.values()}) != 1:
        raise SystemExit(f"the protocols answered differently: {seen}")
    return {protocol: len(rles) for protocol, (rles, _) in seen.items()}


async def drive(protocol: str, url: str, grpc_target: str, args: argparse.Namespace, image: WorkloadImage) -> dict:
    async with client_for(protocol, url, grpc_target, args, image, args.concurrency) as client:
        await run_closed_loop(client.send, args.concurrency, requests=2 * args.concurrency)  # warm-up
        return summarise(await run_closed_loop(client.send, args.concurrency, requests=args.requests))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_protocols", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' or a checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--requests", type=int, default=160, help="measured requests per protocol and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--out", default="bench-results/protocols")
    args = parser.parse_args()
    args.model_name = "default"  # what `transfiner serve --model X` names its model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = synthetic_png(args.height, args.width)
    image = WorkloadImage("bench.png", png, "image/png", args.width, args.height)
    port, grpc_port = free_port(), free_port()
    url, grpc_target = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    command = [*SERVE_COMMAND, "--model", args.model, "--device", args.device, "--port", str(port)]
    command += ["--grpc-port", str(grpc_port), "--max-queue-size", str(max(64, 4 * args.concurrency))]
    command += ["--log-level", "warning"]
    env = dict(os.environ)
    if args.torch_threads:
        env["TRANSFINER_TORCH_THREADS"] = str(args.torch_threads)
    log = out / "server.log"
    with open(log, "w") as server_log:
        server = subprocess.Popen(command, env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    runs: dict[str, list[dict]] = {protocol: [] for protocol in ORDER}
    try:
        wait_for_server(server, url, log, timeout=600)
        instances = asyncio.run(same_answers(url, grpc_target, args, image))
        print(f"same RLE strings and classes over {', '.join(ORDER)} ({instances['v1']} instances)", flush=True)
        for round_index in range(args.rounds):
            for protocol in ORDER:
                print(f"round {round_index + 1}/{args.rounds}: {protocol} ...", flush=True)
                runs[protocol].append(asyncio.run(drive(protocol, url, grpc_target, args, image)))
    finally:
        stop_process_group(server)

    chosen = {protocol: median_round(rounds) for protocol, rounds in runs.items()}
    base = chosen["v1"]
    ratios = {
        protocol: {
            "throughput": r["throughput"] / base["throughput"],
            "p99": r["p99_ms"] / base["p99_ms"],
        }
        for protocol, r in chosen.items()
    }
    lines = markdown_table(
        ["protocol", "requests", "images/s", "p50 ms", "p99 ms", "throughput / v1", "p99 / v1"],
        (
            [
                protocol,
                r["requests"],
                f"{r['throughput']:.2f}",
                f"{r['p50_ms']:.0f}",
                f"{r['p99_ms']:.0f}",
                f"{ratios[protocol]['throughput']:.3f}",
                f"{ratios[protocol]['p99']:.3f}",
            ]
            for protocol, r in chosen.items()
        ),
        align="lrrrrrr",
    )
    per_round = {
        protocol: [r["throughput"] / v1["throughput"] for r, v1 in zip(runs[protocol], runs["v1"])]
        for protocol in ORDER[1:]
    }
    summary = "Throughput / v1 per round: " + "; ".join(
        f"{protocol} {', '.join(f'{x:.3f}' for x in values)}" for protocol, values in per_round.items()
    )
    summary += ". Goals: throughput >= 0.95 of v1, p99 <= 1.1 x v1."
    print("\n".join(lines))
    print(summary)
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    report = {
        "settings": vars(args),
        "machine": machine,
        "instances": instances,
        "runs": runs,
        "median_round": chosen,
        "ratios": ratios,
        "per_round": per_round,
    }
    markdown = "# Protocols\n\n" + "\n".join(lines) + f"\n\n{summary}\n\nSettings: `{vars(args)}`\n"
    paths = write_report(out, "bench_protocols", report, markdown)
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
