"""Packages a trained checkpoint as the shipped default model (model/weights/default_model/).

Stores the weights in half precision (loading converts them back to float32), copies the
evaluation reports and an overlay picture, draws the loss curve over every training phase, and
writes a README with each evaluation and the commands that made the model.

    python -m scripts.package_default_model model/weights/default_model \\
        --run runs/default/train --run runs/default/finetune \\
        --eval "fresh seed 21"=runs/default/eval-21 --eval "fresh seed 22"=runs/default/eval-22 \\
        --commands scripts/train_default_model.sh --hardware "an NVIDIA H200" --wall-time-min 6.3

The weights are the last ``--run``'s ``model_final.pth``; earlier runs are the phases it was
fine-tuned from (their iterations count towards the total and their losses are on the curve).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from transfiner.model.training.train import plot_losses
from transfiner.model.weights.checkpoint import FORMAT


def combined_metrics(runs: list[Path], path: Path) -> int:
    """Every run's metrics.jsonl, one after the other, iterations offset -> total iterations."""
    offset = 0
    with path.open("w") as out:
        for run in runs:
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            for record in records:
                out.write(json.dumps({**record, "iter": record["iter"] + offset}) + "\n")
            offset += records[-1]["iter"] if records else 0
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.package_default_model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", help="where the default model goes")
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        type=Path,
        help="training output folder (model_final.pth, metrics.jsonl), in training order",
    )
    parser.add_argument(
        "--eval",
        action="append",
        required=True,
        help="NAME=FOLDER of an evaluation (report.json, report.md, overlays/); the first is copied",
    )
    parser.add_argument("--commands", required=True, help="the script whose commands produced the model")
    parser.add_argument("--hardware", required=True, help='what it was trained on, e.g. "an NVIDIA H200"')
    parser.add_argument("--wall-time-min", type=float, required=True, help="training wall time, minutes")
    parser.add_argument("--notes", type=Path, default=None, help="Markdown appended to the README")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluations = [(name, Path(folder)) for name, folder in (item.split("=", 1) for item in args.eval)]
    checkpoint = torch.load(args.run[-1] / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["format"] == FORMAT
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        iterations = combined_metrics(args.run, metrics)
        plot_losses(metrics, out / "loss_curve.png")
    checkpoint["trained_iters"] = iterations
    checkpoint["model"] = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, out / "model.pth")
    first = evaluations[0][1]
    for name in ("report.json", "report.md"):
        shutil.copy(first / name, out / name)
    overlays = sorted((first / "overlays").glob("*.png"))
    if overlays:
        shutil.copy(overlays[0], out / "overlay_coarse_vs_refined.png")

    config = checkpoint["config"]
    size_mib = (out / "model.pth").stat().st_size / 2**20
    sections = []
    for name, folder in evaluations:
        report = json.loads((folder / "report.json").read_text())
        body = (folder / "report.md").read_text().strip().split("\n", 1)[1].strip()  # without its title
        sections.append(f"## Evaluation: {name} ({report['num_images']} images)\n\n{body}")
    commands = Path(args.commands).read_text().strip()
    notes = args.notes.read_text().strip() + "\n" if args.notes else ""
    readme = f"""# The default model

The model every command and the service use when no weights are given (`--model default`).
A `{config["name"]}` Mask Transfiner (ResNet-18 + GroupNorm, FPN 64, Transfiner d=64) trained
from scratch by our own `transfiner train` on `transfiner make-shapes` data, on {args.hardware}.

* weights: `model.pth` ({size_mib:.1f} MiB, float16 storage; loaded as float32), config inside
* classes: {", ".join(config["class_names"])} (category ids {", ".join(str(i) for i in config["category_ids"])})
* training: {iterations} iterations, {args.wall_time_min:.1f} minutes of wall time on {args.hardware}
* evaluated on data sets generated with seeds that training never saw; `report.json` and
  `report.md` are the first evaluation below

{chr(10).join(section + chr(10) for section in sections)}
![coarse vs refined](overlay_coarse_vs_refined.png)

![loss curve](loss_curve.png)

## The commands that produced it

```bash
{commands}
```

{notes}"""
    (out / "README.md").write_text(readme)
    print(f"wrote {out} ({size_mib:.1f} MiB, {iterations} iterations)")


if __name__ == "__main__":
    main()
