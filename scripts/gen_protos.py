"""Regenerate car_grpc/v1 from proto/car/v1: messages, gRPC stubs and mypy-protobuf stubs;
then docs/api-table.md from the new code (scripts/gen_api_table.py) and the snippets and
permissions table of docs/grpc-guide.md (scripts/gen_guide.py); then the Go and
TypeScript code of buf.gen.yaml (clients/go/gen, clients/node/gen) with `buf generate`.

Run with `./dev gen`, which sets up what this needs: the dev extra (grpcio-tools and
mypy-protobuf), the buf CLI and protoc-gen-es (npm, package.json), and Debian's
protoc-gen-go and protoc-gen-go-grpc (scripts/setup_go.sh). `--python-only` skips
`buf generate`. The output is committed; CI regenerates it and fails on any difference.
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


def generate_other_languages() -> int:
    """`buf generate`: every plugin of buf.gen.yaml, into its committed output directory."""
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        print(f"{buf} is missing: run ./dev gen (it installs buf with npm ci)", file=sys.stderr)
        return 1
    return subprocess.run([str(buf), "generate"], cwd=ROOT).returncode


def main() -> int:
    python_only = "--python-only" in sys.argv[1:]
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
    if table.returncode != 0:
        return table.returncode
    # The guide's code snippets and permissions table (scripts/gen_guide.py).
    guide = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_guide.py")])
    if guide.returncode != 0 or python_only:
        return guide.returncode
    return generate_other_languages()


if __name__ == "__main__":
    sys.exit(main())
