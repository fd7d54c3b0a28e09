"""Keep docs/grpc-guide.md true: its code is the code the tests run, and its table of who
may call each RPC is the access rules declared in the protos.

- A fenced block right after `<!-- snippet: PATH#NAME -->` is the region NAME of PATH: the
  lines between `// guide:NAME` (or `# guide:NAME`) and the next `guide:end` marker,
  dedented. The programs and helpers those regions come from run in the test suite.
- The lines between `<!-- permissions -->` and `<!-- /permissions -->` are the table of
  every RPC and who may call it (scripts/gen_api_table.py reads the same rules).

`./dev gen` rewrites both (scripts/gen_protos.py runs this); tests/test_grpc_guide.py fails
when the committed guide differs (`--check` only compares).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_api_table import _methods, _rows, _rpc, _rpc_method, _who

from car_grpc.wire import api

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "grpc-guide.md"

_SNIPPET = re.compile(r"^<!-- snippet: (?P<path>[^#\s]+)#(?P<name>[\w-]+) -->\n```\w*\n", re.M)
_MARKER = re.compile(r"^\s*(?://|#) guide:(?P<name>[\w-]+)\s*$")
_PERMISSIONS = re.compile(r"(<!-- permissions -->\n)(.*?)(<!-- /permissions -->)", re.S)


def region(path: str, name: str) -> str:
    """The lines of region `name` of the file `path` (relative to the repository)."""
    lines = (ROOT / path).read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if _marker_name(line) == name]
    if len(starts) != 1:
        raise ValueError(f"{path}: {len(starts)} markers 'guide:{name}' (want 1)")
    body: list[str] = []
    for line in lines[starts[0] + 1 :]:
        if _marker_name(line) == "end":
            return textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        body.append(line)
    raise ValueError(f"{path}: region 'guide:{name}' has no 'guide:end'")


def _marker_name(line: str) -> str:
    match = _MARKER.match(line)
    return match["name"] if match else ""


def permissions() -> str:
    """Every RPC of car.v1 and who may call it: a role not listed gets PERMISSION_DENIED."""
    rows = [
        [
            "`SessionService.Connect` (bidi stream)",
            "the session stream",
            "anyone; then per frame: session.auth first",
        ]
    ]
    for method in _methods():
        if method.containing_service is None or method.full_name == "car.v1.SessionService.Connect":
            continue
        json_method = _rpc_method(method)
        access = api.CLIENT_REQUESTS[json_method].access if json_method else api.rpc_access(method)
        rows.append(
            [_rpc(method), f"`{json_method}`" if json_method else "gRPC only", _who(access)]
        )
    return _rows(["RPC", "JSON-RPC method", "who may call"], rows)


def render(text: str) -> str:
    """The guide with every snippet and the permissions table as they should be."""
    out: list[str] = []
    pos = 0
    for match in _SNIPPET.finditer(text):
        end = text.index("```", match.end())
        out.append(text[pos : match.end()])
        out.append(region(match["path"], match["name"]))
        pos = end
    out.append(text[pos:])
    rendered = "".join(out)
    return _PERMISSIONS.sub(lambda m: m[1] + permissions() + m[3], rendered)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args()
    text = GUIDE.read_text()
    wanted = render(text)
    if wanted == text:
        return 0
    if args.check:
        print(f"{GUIDE} differs from the code it shows: run ./dev gen", file=sys.stderr)
        return 1
    GUIDE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
