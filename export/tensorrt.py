"""The TensorRT path: what our ONNX graph asks of TensorRT, and how to build an engine.

- TensorRT cannot be installed on our machines (its libraries are only on NVIDIA's index), so no
  engine is built or timed here.
- What we can check, and do in the tests, is the graph: every operator it uses must be in the
  ONNX-TensorRT parser's support matrix (``data/tensorrt_onnx_operators.json``, transcribed with the
  TensorRT version it describes), with the input types that matrix lists, and every TopK must have k
  below TensorRT's limit.
- ``data/graph_operators.json`` is the checked-in list of operators the graph uses; a change to the
  model that adds an operator shows up there (and in review) before it reaches a user's trtexec.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from transfiner.model.config import InputConfig
from transfiner.model.inference.preprocess import padded_shape

DATA_DIR = Path(__file__).resolve().parent / "data"
SUPPORT_MATRIX = DATA_DIR / "tensorrt_onnx_operators.json"
GRAPH_OPERATORS = DATA_DIR / "graph_operators.json"

# ONNX TensorProto element types -> the names the support matrix uses.
_TYPE_NAMES = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    6: "INT32",
    7: "INT64",
    9: "BOOL",
    10: "FP16",
    11: "DOUBLE",
    16: "BF16",
}


@dataclass
class TensorRTReport:
    tensorrt_version: str
    operators: dict[str, int]  # op type -> node count
    problems: list[str]  # unsupported operators or TopK bounds: empty when the parser should accept the graph
    topk_bounds: list[int]  # the largest k each TopK can take
    type_notes: list[str]  # inputs of a type outside the matrix's "Supported Types" column

    @property
    def ok(self) -> bool:
        return not self.problems


def support_matrix() -> dict:
    return json.loads(SUPPORT_MATRIX.read_text())


def graph_operators(model) -> Counter:
    """op type -> how many nodes of it, for an ``onnx.ModelProto`` (main graph and subgraphs)."""
    counts: Counter = Counter()

    def visit(graph) -> None:
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
            for attribute in node.attribute:
                if attribute.g is not None and attribute.g.node:
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(model.graph)
    return counts


def _producers(graph) -> dict[str, object]:
    return {output: node for node in graph.node for output in node.output}


def _constant_value(name: str, graph, producers) -> list[float] | None:
    """The value of a tensor that is an initializer or a Constant node, else None."""
    from onnx import numpy_helper

    for initializer in graph.initializer:
        if initializer.name == name:
            return numpy_helper.to_array(initializer).reshape(-1).tolist()
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attribute in node.attribute:
            if attribute.name == "value":
                return numpy_helper.to_array(attribute.t).reshape(-1).tolist()
    return None


def _upper_bound(name: str, graph, producers, depth: int = 0) -> float | None:
    """The largest value ``name`` can hold, when the graph bounds it by a constant: a constant,
    or a Min/Clip against one, seen through shape-preserving casts and reshapes."""
    value = _constant_value(name, graph, producers)
    if value is not None:
        return max(value)
    node = producers.get(name)
    if node is None or depth > 8:
        return None
    if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Concat"):
        bounds = [
            _upper_bound(i, graph, producers, depth + 1) for i in node.input[: 1 if node.op_type != "Concat" else None]
        ]
        return None if any(b is None for b in bounds) else max(bounds)
    if node.op_type == "Min":
        bounds = [b for b in (_upper_bound(i, graph, producers, depth + 1) for i in node.input) if b is not None]
        return min(bounds) if bounds else None
    if node.op_type == "Clip" and len(node.input) > 2 and node.input[2]:
        return _upper_bound(node.input[2], graph, producers, depth + 1)
    return None


def check_onnx(path: str | os.PathLike) -> TensorRTReport:
    """Checks ``path`` against the support matrix: operators, input types, TopK's k."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    matrix = support_matrix()
    supported = matrix["operators"]
    widened = matrix.get("importer_types", {})
    graph = model.graph
    producers = _producers(graph)
    types = {
        v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)
    }
    types.update({t.name: t.data_type for t in graph.initializer})
    operators = graph_operators(model)
    problems = []
    for op in sorted(operators):
        entry = supported.get(op)
        if entry is None or not entry["supported"]:
            problems.append(f"{op}: not supported by TensorRT {matrix['tensorrt_version']}'s ONNX parser")
    topk_bounds, type_notes = [], []
    for node in graph.node:
        entry = supported.get(node.op_type)
        if entry and entry["types"] and node.input:
            allowed = set(entry["types"]) | set(widened.get(node.op_type, {}).get("types", []))
            dtype = _TYPE_NAMES.get(types.get(node.input[0], 0))
            if dtype is not None and dtype not in allowed:
                type_notes.append(f"{node.op_type} ({dtype} input; TensorRT lists {', '.join(sorted(allowed))})")
        if node.op_type == "TopK":
            bound = _upper_bound(node.input[1], graph, producers)
            if bound is None:
                problems.append(f"TopK node {node.name}: k has no constant bound")
            else:
                topk_bounds.append(int(bound))
                if bound >= matrix["topk_max_k"]:
                    problems.append(
                        f"TopK node {node.name}: k can reach {int(bound)}, TensorRT needs < {matrix['topk_max_k']}"
                    )
    notes = [f"{note} x{count}" for note, count in sorted(Counter(type_notes).items())]
    return TensorRTReport(matrix["tensorrt_version"], dict(sorted(operators.items())), problems, topk_bounds, notes)


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def build_instructions(
    onnx_file: str | os.PathLike, input_cfg: InputConfig, installed: bool = False, max_batch: int = 8
) -> str:
    """How to build an engine from ``onnx_file`` where TensorRT is installed, with an optimization
    profile from the model's own input sizes: optimal at a landscape canvas of its test size,
    largest at a square canvas of its longest side, up to ``max_batch`` images (the service's
    default batch on a GPU)."""
    onnx_file = Path(onnx_file)
    engine = onnx_file.with_suffix(".plan")
    opt_h, opt_w = padded_shape(input_cfg.min_size_test, input_cfg.max_size_test, input_cfg)
    side = padded_shape(input_cfg.max_size_test, input_cfg.max_size_test, input_cfg)[0]
    shapes = (
        f"--minShapes=images:1x3x32x32,image_sizes:1x2 "
        f"--optShapes=images:{max_batch}x3x{opt_h}x{opt_w},image_sizes:{max_batch}x2 "
        f"--maxShapes=images:{max_batch}x3x{side}x{side},image_sizes:{max_batch}x2"
    )
    first = (
        "TensorRT is installed; build the engine with trtexec or its Python builder"
        if installed
        else "TensorRT is not installed here, so no engine was built"
    )
    return f"""{first}. The ONNX file is ready for it:
  {onnx_file}
Its operators were checked against TensorRT {support_matrix()["tensorrt_version"]}'s ONNX support matrix
(export/data/tensorrt_onnx_operators.json). Build the engine on the machine that will run it
(engines are specific to the GPU and TensorRT version), with TensorRT >= 10.0:

  trtexec --onnx={onnx_file} --saveEngine={engine} \\
    {shapes}

or with the Python builder: tensorrt.Builder -> create_network(0) -> tensorrt.OnnxParser(network,
logger).parse_from_file("{onnx_file}") -> an optimization profile with the same min/opt/max shapes
for "images" and "image_sizes" -> builder.build_serialized_network(network, config), written to
{engine.name}. Add --fp16 (trtexec) or BuilderFlag.FP16 for half precision, and compare the
engine's outputs with `transfiner predict --backend onnxruntime` on your own images first.
The graph has data-dependent shapes (NonZero, NonMaxSuppression), which TensorRT 10 supports."""


def write_operator_list(report: TensorRTReport) -> None:
    GRAPH_OPERATORS.write_text(
        json.dumps(
            {
                "note": "ONNX operators of the exported graph; see export/data/README.md",
                "operators": sorted(report.operators),
            },
            indent=1,
        )
        + "\n"
    )
