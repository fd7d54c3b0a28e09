"""docs/api-table.md is exactly what scripts/gen_api_table.py makes of the proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from car_grpc.wire import api

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gen_api_table.py"


def _render() -> str:
    spec = importlib.util.spec_from_file_location("gen_api_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render()
    assert isinstance(text, str)
    return text


def test_committed_table_matches_the_proto() -> None:
    committed = (SCRIPT.parents[1] / "docs" / "api-table.md").read_text()
    assert committed == _render(), "docs/api-table.md is stale: run ./dev gen and commit"


def test_table_names_every_method_and_typed_rpc() -> None:
    text = _render()
    for method in [*api.CLIENT_REQUESTS, *api.SERVER_REQUESTS, *api.SERVER_NOTIFICATIONS]:
        assert f"| `{method}` |" in text, method
    for rpc in api.TYPED_RPCS:
        assert f"`{rpc.service.name}.{rpc.name}`" in text, rpc.name
