"""The model in-process: every (precision, batch, detections) case, with its stages and peak memory."""

from __future__ import annotations

from scripts.gpu.timing import refiner_flops, time_case
from scripts.gpu.workload import Workload, make_case
from transfiner.model.modeling.rcnn import MaskTransfiner


def bench_in_process(
    workload: Workload, precisions: tuple[str, ...], model: MaskTransfiner, images, device, peak_tflops: dict, log
) -> list[dict]:
    """A row a case: images/s, median stage times, and the refiner's TFLOP/s against the matmul peak."""
    rows = []
    for precision in precisions:
        for batch_size in workload.batch_sizes:
            for detections in workload.detections:
                case = make_case(model, images, device, precision, batch_size, detections)
                row = {"precision": precision, "batch": batch_size, "detections": detections}
                try:
                    result = time_case(model, case, device, workload.seconds_per_case)
                except Exception as error:  # noqa: BLE001 - one failed case must not lose the others
                    row["error"] = f"{type(error).__name__}: {error}"
                    log(f"in-process {row}: {row['error']}")
                    rows.append(row)
                    continue
                flops = refiner_flops(model.cfg, result["refiner_chunks"])
                result["refiner_tflops"] = flops / result["refiner"] / 1e12 if result["refiner"] else None
                result["refiner_share_of_peak"] = (
                    result["refiner_tflops"] / peak_tflops[precision]
                    if result["refiner_tflops"] and peak_tflops.get(precision)
                    else None
                )
                result["images_per_s"] = batch_size / (result["forward_s"] + result["postprocess_s"])
                row.update(result)
                rows.append(row)
                log(
                    f"in-process {precision} batch {batch_size} det {detections}: "
                    f"{row['images_per_s']:.1f} img/s, forward {result['forward_s'] * 1000:.0f} ms, "
                    f"box inference {result['box_inference'] * 1000:.1f} ms, mask head "
                    f"{result['mask_head'] * 1000:.0f} ms, peak {result['peak_gpu_gib'] or 0:.1f} GiB"
                )
    return rows
