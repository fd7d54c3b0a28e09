"""Regenerate car_grpc/v1 from proto/car/v1: messages, gRPC stubs and mypy-protobuf stubs;
then docs/api-table.md from the new code (scripts/gen_api_table.py).

Run with `python scripts/gen_protos.py` (the dev extra provides grpcio-tools and
mypy-protobuf). The output is committed; CI regenerates it and fails on any difference.
protoc names modules after the proto package (`car.v1`), so imports are rewritten to the
Python package that carries them (`car_grpc.v1`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "car_grpc" / "v1"
INIT = '"""Generated from proto/car/v1 by scripts/gen_protos.py. Do not edit."""\n'

_IMPORT_FIXES = [
    (re.compile(r"^from car\.v1 import", re.M), "from car_grpc.v1 import"),
    (re.compile(r"^import car\.v1\.(\w+)", re.M), r"import car_grpc.v1.\1"),
    (re.compile(r"\bcar\.v1\.(\w+_pb2)\b"), r"car_grpc.v1.\1"),
]


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    plugins = Path(sys.executable).parent  # protoc-gen-mypy lives beside the interpreter
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        generated = Path(tmp) / "car" / "v1"
        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir(parents=True)
        for src in sorted(generated.iterdir()):
            text = src.read_text()
            for pattern, replacement in _IMPORT_FIXES:
                text = pattern.sub(replacement, text)
            (OUT / src.name).write_text(text)
    (OUT / "__init__.py").write_text(INIT)
    (OUT / "py.typed").write_text("")
    # A fresh interpreter, so that the table is made from the code just written.
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_api_table.py")])
    return table.returncode


if __name__ == "__main__":
    sys.exit(main())
