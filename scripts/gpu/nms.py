"""NMS laid out three ways on boxes shaped like the model's: which layout is fastest on the card."""

from __future__ import annotations

import time

import torch

from scripts.gpu.timing import sync
from scripts.gpu.workload import Workload


def nms_layouts(boxes, scores, image, group, groups: int, batch: int, per_image: int, step: float) -> dict:
    """``bench_nms``'s three layouts of one NMS problem, as functions that return the kept indices.

    The problem: images of ``per_image`` boxes in a row, ``groups`` groups an image.
    """
    from torchvision.ops import batched_nms, nms

    def one_call():
        return nms(boxes + ((image * groups + group) * step)[:, None].to(boxes), scores, 0.5)

    def per_image_calls():
        kept = []
        for b in range(batch):
            index = torch.arange(b * per_image, (b + 1) * per_image, device=boxes.device)
            moved = boxes[index] + (group[index] * step)[:, None].to(boxes)
            kept.append(index[nms(moved, scores[index], 0.5)])
        return torch.cat(kept)

    def torchvision_batched():
        return batched_nms(boxes, scores, image * groups + group, 0.5)

    return {"one call": one_call, "per image": per_image_calls, "batched_nms": torchvision_batched}


def bench_nms(workload: Workload, device, log, repeats: int = 10) -> list[dict]:
    """NMS laid out three ways for a batch of the largest batch size, on synthetic boxes.

    - Shaped like box inference's (3,000 candidates an image over 80 classes, the pre-NMS bound
      at threshold 0) and the RPN's (about 4,700 proposals an image over 5 levels).
    - ``one call``: every group moved apart by the coordinate trick (one op in an exported graph);
      ``per image``: one call per image, its groups moved apart (what the model does);
      ``batched_nms``: torchvision's, which makes one call per group above 5,000 boxes on CUDA.
    - All three keep the same boxes (checked).
    """
    batch = max(workload.batch_sizes)
    height, width = workload.height, workload.width
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, per_image, groups in (("box inference", 3000, 80), ("RPN", 4700, 5)):
        count = batch * per_image
        centers = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
        sizes = 8 + torch.rand(count, 2, generator=generator) * 300
        boxes = torch.cat((centers - sizes / 2, centers + sizes / 2), 1).clamp(min=0)
        boxes = torch.minimum(boxes, torch.tensor([width, height, width, height], dtype=torch.float32))
        scores = torch.rand(count, generator=generator)
        image = torch.arange(batch).repeat_interleave(per_image)
        group = torch.randint(groups, (count,), generator=generator)
        boxes, scores, image, group = (t.to(device) for t in (boxes, scores, image, group))
        layouts = nms_layouts(boxes, scores, image, group, groups, batch, per_image, float(max(width, height)) + 1)
        reference = None
        for layout, fn in layouts.items():
            kept = fn()
            sync(device)
            kept_set = set(kept.tolist())
            reference = kept_set if reference is None else reference
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync(device)
            ms = (time.perf_counter() - start) / repeats * 1000
            same = kept_set == reference
            rows.append(
                {
                    "case": name,
                    "layout": layout,
                    "batch": batch,
                    "boxes": count,
                    "groups": batch * groups,
                    "ms": ms,
                    "same_as_one_call": same,
                }
            )
            log(f"nms {name}, {layout}: {ms:.1f} ms for {count} boxes ({'same' if same else 'DIFFERENT'})")
    return rows
