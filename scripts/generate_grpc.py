"""Regenerates the Python modules of the Open Inference Protocol's gRPC service
(``service/grpc/inference_pb2.py``, ``.pyi`` and ``inference_pb2_grpc.py``) from
``service/grpc/inference.proto`` with grpcio-tools' protoc.

    python -m scripts.generate_grpc            # or: make grpc

Two changes to protoc's output, so that the modules work inside the package:

- the service module imports the messages as ``transfiner.service.grpc.inference_pb2`` (protoc
  writes a top-level ``import inference_pb2``);
- the messages go into a descriptor pool of their own (``inference_pb2.POOL``), not protobuf's
  default pool: Triton's client registers the same ``inference.*`` names from its own proto
  there, and a second registration of a name fails, so a process that holds both (a test, a
  client embedding the server) could not import the second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "service" / "grpc"
PROTO = "inference.proto"
OUTPUTS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")
PACKAGE = "transfiner.service.grpc"

_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = "POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile("
_TOP_LEVEL_IMPORT = "import inference_pb2 as inference__pb2"
_PACKAGE_IMPORT = f"from {PACKAGE} import inference_pb2 as inference__pb2"


def _replace_once(text: str, old: str, new: str, name: str) -> str:
    # protoc's output changing shape must fail here, not yield modules that import wrongly.
    if text.count(old) != 1:
        raise RuntimeError(f"{name}: expected {old!r} once in protoc's output")
    return text.replace(old, new)


def generate(out: Path, proto_folder: Path = FOLDER) -> list[Path]:
    """Writes the three modules for ``proto_folder/inference.proto`` into ``out``."""
    from grpc_tools import protoc  # grpcio-tools: a test and development dependency only

    with tempfile.TemporaryDirectory() as raw:
        args = [
            "protoc",
            f"-I{proto_folder}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            str(proto_folder / PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_folder / PROTO}")
        texts = {name: (Path(raw) / name).read_text() for name in OUTPUTS}
    texts["inference_pb2.py"] = _replace_once(texts["inference_pb2.py"], _DEFAULT_POOL, _OWN_POOL, "inference_pb2.py")
    texts["inference_pb2_grpc.py"] = _replace_once(
        texts["inference_pb2_grpc.py"], _TOP_LEVEL_IMPORT, _PACKAGE_IMPORT, "inference_pb2_grpc.py"
    )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FOLDER, help="where to write them (default: beside the proto)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
