"""bench_gpu.md: the report's Markdown, a section a part that ran."""

from __future__ import annotations

from scripts.results import markdown_table


def markdown(report: dict) -> str:
    """The whole report: title, then each part's section, then the errors."""
    lines = [
        f"# GPU benchmark: {report['config']} at {report['image'][0]}x{report['image'][1]}, {report['device_name']}",
        "",
        f"{report['date']}, torch {report['torch']}; score threshold 0, every detection refined. "
        f"Measured matmul peak: bf16 {_tflops(report['matmul_tflops'].get('bf16'))}, "
        f"fp32 {_tflops(report['matmul_tflops'].get('fp32'))}.",
    ]
    for section in (in_process, worker, http, profile, nms, refiner_variants, attention):
        part = section(report)
        if part:
            lines += ["", *part]
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"* {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def in_process(report: dict) -> list[str]:
    rows = []
    for r in report["in_process"]:
        if "error" in r:
            rows.append([r["precision"], r["batch"], r["detections"], f"error: {r['error'][:80]}"])
            continue
        ms = {
            k: r[k] * 1000
            for k in (
                "forward_s",
                "backbone",
                "rpn",
                "box_head",
                "box_inference",
                "mask_head",
                "refiner",
                "postprocess_s",
            )
        }
        share = f" ({100 * r['refiner_share_of_peak']:.0f}%)" if r.get("refiner_share_of_peak") else ""
        rows.append(
            [
                r["precision"],
                r["batch"],
                r["detections"],
                f"{r['images_per_s']:.1f}",
                f"{ms['forward_s']:.0f}",
                f"{ms['backbone']:.0f}",
                f"{ms['rpn']:.0f}",
                f"{ms['box_head']:.0f}",
                f"{ms['box_inference']:.1f}",
                f"{ms['mask_head']:.0f}",
                f"{ms['refiner']:.0f}",
                f"{r['refiner_tokens'] / max(r['detections_found'], 1):.0f}",
                f"{r['refiner_tflops']:.0f}{share}" if r.get("refiner_tflops") else "-",
                f"{ms['postprocess_s']:.1f}",
                _number(r.get("peak_gpu_gib"), ".1f"),
            ]
        )
    return [
        "## In-process (per batch, median)",
        "",
        *markdown_table(
            [
                "precision",
                "batch",
                "det/img",
                "img/s",
                "forward ms",
                "backbone",
                "RPN",
                "box head",
                "box inference",
                "mask head",
                "refiner",
                "refined tokens/box",
                "refiner TFLOP/s (% of peak)",
                "post-process ms",
                "peak GiB",
            ],
            rows,
            align="l" + "r" * 14,
        ),
    ]


def worker(report: dict) -> list[str]:
    if not report.get("worker"):
        return []
    rows = [
        [
            w["detections"],
            w.get("worker", "thread"),
            w.get("mask_steps", "-"),
            "yes" if w["busy_thread"] else "no",
            f"{w['switch_interval_ms']:g}",
            f"{w['images_per_s']:.1f}",
            f"{w['batch_ms']:.0f}",
            _number(w.get("preprocess_ms"), ".0f"),
            share_of_in_process(report, w["precision"], w["batch"], w["detections"], w["images_per_s"]),
        ]
        for w in report["worker"]
    ]
    return [
        "## The service's worker without HTTP (batch of the HTTP case)",
        "",
        *markdown_table(
            [
                "det/img",
                "model worker",
                "mask steps a batch",
                "busy Python thread",
                "GIL switch interval ms",
                "img/s",
                "ms a batch",
                "of which pre-processing",
                "vs in-process",
            ],
            rows,
            align="rlrlrrrrr",
        ),
    ]


def http(report: dict) -> list[str]:
    if not report.get("http"):
        return []
    batch = report["http_batch_size"]
    rows = []
    for h in report["http"]:
        if "error" in h:
            rows.append([h["detections"], h.get("concurrency", ""), "", f"error: {h['error'][:100]}"])
            continue
        steady = h.get("steady_images_per_s")
        rows.append(
            [
                h["detections"],
                h["concurrency"],
                f"{h.get('switch_interval_ms', 5):g}",
                h.get("worker", "thread"),
                h["precision"],
                f"{h['ok']}/{h['requests']}",
                f"{h['images_per_s']:.1f}",
                f"{h['p50_ms']:.0f}",
                f"{h['p99_ms']:.0f}",
                share_of_in_process(report, h["precision"], batch, h["detections"], h["images_per_s"]),
                f"{steady:.1f}" if steady else "-",
                share_of_in_process(report, h["precision"], batch, h["detections"], steady) if steady else "-",
                _mean_ms(h, "decode"),
                _mean_ms(h, "preprocess"),
                _server_cpu(h),
                _number(h.get("worker_cpu_ms_per_image"), ".1f") if h.get("worker") != "thread" else "-",
            ]
        )
    return [
        f"## HTTP (`transfiner serve --max-batch-size {batch}`, `transfiner bench`, "
        f"{report['image'][1]}x{report['image'][0]} PNGs)",
        "",
        *markdown_table(
            [
                "det/img",
                "clients",
                "GIL switch interval ms",
                "model worker",
                "precision",
                "ok",
                "img/s",
                "p50 ms",
                "p99 ms",
                f"vs in-process batch {batch}",
                "steady img/s",
                "steady vs in-process",
                "decode ms (mean)",
                "pre-processing ms a batch (mean)",
                "server process CPU ms/img (cores), page faults/img",
                "worker processes CPU ms/img",
            ],
            rows,
            align="rrrllrrrrrrrrrrr",
        ),
        "",
        "(steady: answers per second while the closed loop was full, leaving out its filling "
        "and draining; `transfiner bench`'s steady img/s. Decode: an upload's time on its decode "
        "thread; pre-processing: a batch's, on the worker's device, from the server's metrics. "
        "Server process CPU: HTTP, decoding and post-processing, and with a worker thread the "
        "model's host side too, per answered image (warm-up included), and in cores while the loop "
        "ran. One Python interpreter holds the GIL for most of it, so its ms per image bound the "
        "rate.)",
    ]


def profile(report: dict) -> list[str]:
    result = report.get("profile")
    if not result:
        return []
    rows = [
        [
            f"`{row['op']}`",
            row["calls"],
            f"{row['self_ms']:.1f}",
            f"{100 * row['share']:.1f}%" if row["share"] is not None else "-",
        ]
        for row in result["top"]
    ]
    return [
        f"## Where one forward pass spends its time ({result['precision']}, batch {result['batch']}, "
        f"{result['detections']} detections, torch.profiler)",
        "",
        f"Wall {result['wall_ms']:.0f} ms (profiled); operators busy on the device for "
        f"{result['device_busy_ms']:.0f} ms; {result['kernel_launches']} kernel launches, "
        f"{result['aten_calls']} aten calls.",
        "",
        *markdown_table(["operator", "calls", "self ms", "share of busy time"], rows, align="lrrr"),
    ]


def nms(report: dict) -> list[str]:
    if not report.get("nms"):
        return []
    rows = [
        [
            n["case"],
            n["layout"],
            n["batch"],
            n["boxes"],
            n["groups"],
            f"{n['ms']:.1f}",
            "yes" if n["same_as_one_call"] else "NO",
        ]
        for n in report["nms"]
    ]
    return [
        "## NMS layouts (synthetic boxes shaped like the model's)",
        "",
        *markdown_table(
            ["case", "layout", "batch", "boxes", "groups", "ms", "keeps the same boxes"], rows, align="llrrrrl"
        ),
    ]


def refiner_variants(report: dict) -> list[str]:
    if not report.get("refiner_variants"):
        return []
    rows = [
        [v["variant"], f"failed: {v['error'][:90]}", "", "", ""]
        if "error" in v
        else [
            v["variant"],
            f"{v['forward_s'] * 1000:.0f}",
            f"{v['mask_head_s'] * 1000:.0f}",
            f"{v['refiner_s'] * 1000:.0f}",
            f"{v['max_mask_prob_change']:.1e}",
        ]
        for v in report["refiner_variants"]
    ]
    return [
        "## The refiner's encoder, run different ways (the largest in-process case)",
        "",
        *markdown_table(
            ["variant", "forward ms", "mask head ms", "refiner ms", "largest mask probability change"],
            rows,
            align="lrrrr",
        ),
    ]


def attention(report: dict) -> list[str]:
    if not report.get("attention"):
        return []
    rows = [
        [a["variant"], f"unsupported: {a['error'][:90]}", "", ""]
        if "error" in a
        else [a["variant"], f"{a['ms']:.2f}", f"{a['tflops']:.0f}", f"{a['max_abs_error']:.4f}"]
        for a in report["attention"]
    ]
    return [
        "## Key-masked attention, 64 boxes x 4 heads x 2788 tokens x 64, bf16",
        "",
        *markdown_table(["variant", "ms", "TFLOP/s", "max abs error vs fp32"], rows, align="lrrr"),
    ]


def share_of_in_process(report: dict, precision: str, batch: int, detections: int, images_per_s: float) -> str:
    """``images_per_s`` as a share of the in-process figure of the same case, or "-"."""
    same = next(
        (
            r
            for r in report["in_process"]
            if r.get("precision") == precision
            and r.get("batch") == batch
            and r.get("detections") == detections
            and "error" not in r
        ),
        None,
    )
    return f"{100 * images_per_s / same['images_per_s']:.0f}%" if same else "-"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mean_ms(row: dict, metric: str) -> str:
    """The mean of one of the server's time histograms in an HTTP row, in ms."""
    values = row.get("server", {}).get(metric) or {}
    return "-" if values.get("mean_s") is None else f"{1000 * values['mean_s']:.1f}"


def _server_cpu(row: dict) -> str:
    if row.get("server_cpu_ms_per_image") is None:
        return "-"
    faults = row.get("server_page_faults_per_image")
    return f"{row['server_cpu_ms_per_image']:.1f} ({row['server_cpu_cores']:.2f})" + (
        "" if faults is None else f", {faults:.0f} faults"
    )


def _tflops(value: float | None) -> str:
    return f"{value:.0f} TFLOP/s" if value else "not measured"
