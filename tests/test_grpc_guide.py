"""docs/grpc-guide.md says what the code does: its code blocks are regions of the programs
and helpers the tests run, its permissions table is the declared access rules
(scripts/gen_guide.py), and it names every service and the programs the tests run."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from car_grpc.v1 import session_pb2

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "grpc-guide.md"


def gen_guide() -> ModuleType:
    path = ROOT / "scripts" / "gen_guide.py"
    spec = importlib.util.spec_from_file_location("gen_guide", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_guide", module)
    spec.loader.exec_module(module)
    return module


def test_the_guides_code_and_permissions_are_the_code_and_rules() -> None:
    text = GUIDE.read_text()
    assert gen_guide().render(text) == text, "run ./dev gen: the guide differs from the code"
    snippets = re.findall(r"<!-- snippet: ([^#\s]+)#([\w-]+) -->", text)
    languages = {Path(path).suffix for path, _ in snippets}
    assert languages == {".go", ".ts", ".py"}
    assert len(snippets) >= 20
    assert "<!-- permissions -->\n| RPC |" in text


def test_the_guide_names_every_service_and_no_retired_setup() -> None:
    text = GUIDE.read_text()
    services: set[str] = set()
    pending = [session_pb2.DESCRIPTOR]
    while pending:
        file = pending.pop()
        if file.package == "car.v1":
            services |= set(file.services_by_name)
            pending.extend(file.dependencies)
    section = text[text.index("## 3.") : text.index("**call metadata**")]
    assert all(f"`{name}`" in section for name in services), sorted(services)
    assert "npm install" not in text and "proto-loader" not in text


def test_every_program_the_guide_shows_is_run_by_a_test() -> None:
    text = GUIDE.read_text()
    tests = "".join(
        (ROOT / "tests" / f"test_polyglot_{language}.py").read_text()
        for language in ("node", "go", "python")
    )
    node = set(re.findall(r"clients/node/([\w-]+\.ts)", text)) | set(
        re.findall(r"\]\(\.\./clients/node/([\w-]+\.ts)\)", text)
    )
    go = set(re.findall(r"clients/go/cmd/([\w-]+)/main\.go", text))
    # car.py is the programs' helper, not a program.
    python = set(re.findall(r"clients/python/([\w-]+\.py)", text)) - {"car.py"}
    assert node and go and python
    for program in node:
        assert f'"{program}"' in tests, f"no test runs clients/node/{program}"
    for program in go:
        assert f'"{program}"' in tests, f"no test runs clients/go/cmd/{program}"
    for program in python:
        assert f'"{program}"' in tests, f"no test runs clients/python/{program}"
