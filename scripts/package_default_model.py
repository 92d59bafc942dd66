"""Packages a trained checkpoint as the shipped default model (model/default_model/).

Stores the weights in half precision (loading converts them back to float32), copies the
evaluation report and an overlay picture, and writes a README with the commands that made it.

    .venv/bin/python scripts/package_default_model.py RUN_DIR EVAL_DIR model/default_model \\
        --commands scripts/train_default_model.sh --wall-time-min 78
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from model.checkpoint import FORMAT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="training output folder (model_final.pth, metrics.jsonl, loss_curve.png)")
    parser.add_argument("eval", help="evaluation folder (report.json, report.md, overlays/)")
    parser.add_argument("out", help="where the default model goes")
    parser.add_argument("--commands", required=True, help="the script whose commands produced the model")
    parser.add_argument("--wall-time-min", type=float, required=True, help="training wall time, minutes")
    args = parser.parse_args()

    run, evaluation, out = Path(args.run), Path(args.eval), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["format"] == FORMAT
    checkpoint["model"] = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, out / "model.pth")
    for name in ("report.json", "report.md"):
        shutil.copy(evaluation / name, out / name)
    shutil.copy(run / "loss_curve.png", out / "loss_curve.png")
    overlays = sorted((evaluation / "overlays").glob("*.png"))
    if overlays:
        shutil.copy(overlays[0], out / "overlay_coarse_vs_refined.png")

    config = checkpoint["config"]
    report = json.loads((evaluation / "report.json").read_text())
    commands = Path(args.commands).read_text().strip()
    size_mib = (out / "model.pth").stat().st_size / 2**20
    readme = f"""# The default model

The model every command and the service use when no weights are given (`--model default`).
A `{config["name"]}` Mask Transfiner (ResNet-18 + GroupNorm, FPN 64, Transfiner d=64) trained
from scratch by our own `transfiner train` on `transfiner make-shapes` data, on a 2-core CPU.

* weights: `model.pth` ({size_mib:.1f} MiB, float16 storage; loaded as float32), config inside
* classes: {", ".join(config["class_names"])} (category ids {", ".join(str(i) for i in config["category_ids"])})
* training wall time: {args.wall_time_min:.0f} minutes on 2 CPU cores ({checkpoint.get("trained_iters", "?")} iterations)
* evaluation on a separately generated validation set (another seed): `report.json`, `report.md`

## Evaluation (validation set, {report["num_images"]} images)

{(evaluation / "report.md").read_text().strip()}

![coarse vs refined](overlay_coarse_vs_refined.png)

![loss curve](loss_curve.png)

## The commands that produced it

```bash
{commands}
```
"""
    (out / "README.md").write_text(readme)
    print(f"wrote {out} ({size_mib:.1f} MiB)")


if __name__ == "__main__":
    main()
