"""Which ONNX operators does an exported graph use, and does TensorRT's support matrix cover them?

``python -m scripts.check_tensorrt_operators MODEL.onnx [--write-operator-list]`` prints the check;
with ``--write-operator-list`` it also updates ``export/data/graph_operators.json``. Seconds.
"""

from __future__ import annotations

import argparse
import json

from transfiner.export.tensorrt import GRAPH_OPERATORS, check_onnx, write_operator_list


def main(argv: list[str] | None = None) -> int:
    """The operators of MODEL.onnx against TensorRT's support matrix; exit status 1 where one is missing."""
    parser = argparse.ArgumentParser(prog="python -m scripts.check_tensorrt_operators", description=main.__doc__)
    parser.add_argument("onnx_file")
    parser.add_argument("--write-operator-list", action="store_true", help=f"update {GRAPH_OPERATORS.name}")
    args = parser.parse_args(argv)
    report = check_onnx(args.onnx_file)
    print(
        json.dumps(
            {
                "tensorrt": report.tensorrt_version,
                "ok": report.ok,
                "problems": report.problems,
                "topk_bounds": report.topk_bounds,
                "type_notes": report.type_notes,
                "operators": report.operators,
            },
            indent=1,
        )
    )
    if args.write_operator_list:
        write_operator_list(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
