"""The A2UI catalog the server accepts, and the check of one A2UI message against it.

The checking is a2ui-core's (the A2UI Python SDK): its pydantic models of the v0.9
messages for the envelope, and its PayloadValidator over the v0.9 basic catalog, strict
(no unknown component, no unknown property), for every component. The basic catalog of
a2ui-core has 18 components; car-server's catalog adds six more (Select, Badge, Spacer,
Chart, File, FilePicker), declared below as JSON schemas on a copy of the basic catalog so
that the same validator checks them. Pure: no I/O, no state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from a2ui.core import A2uiError, PayloadValidator, ValidationConfig
from a2ui.core.basic_catalog import BasicCatalog
from a2ui.core.catalog import CatalogApi
from a2ui.core.catalog.components import ComponentApi
from a2ui.core.schema.v0_9.constants import SUPPORTED_PROTOCOL_VERSIONS
from a2ui.core.schema.v0_9.server_to_client import A2uiMessage as _A2uiMessageModel
from pydantic import TypeAdapter, ValidationError

from car_grpc.wire import codec
from car_grpc.wire.errors import INVALID_PARAMS, CarError

VERSION = "v0.9"
MIME_TYPE = "application/json+a2ui"
MESSAGE_KINDS = ("createSurface", "updateComponents", "updateDataModel", "deleteSurface")

#: The reasons a message is refused (the error's `data.kind`).
UNSUPPORTED_CATALOG = "UnsupportedCatalog"
UNSUPPORTED_COMPONENT = "UnsupportedComponent"
INVALID_MESSAGE = "InvalidMessage"
LIMIT_EXCEEDED = "LimitExceeded"


def refusal(kind: str, message: str, **details: codec.JSON) -> CarError:
    """-32602 with `data: {kind, ...details}`: the message was refused whole."""
    return CarError(
        INVALID_PARAMS, f"invalid params: {message}", codec.to_value({"kind": kind, **details})
    )


def _common(name: str, properties: dict[str, Any], required: list[str]) -> ComponentApi:
    """A component schema in the basic catalog's own style: the common component fields,
    then the component's properties, nothing else."""
    return ComponentApi(
        name,
        {
            "type": "object",
            "allOf": [
                {"$ref": "common_types.json#/$defs/ComponentCommon"},
                {
                    "properties": {"component": {"const": name}, **properties},
                    "required": ["component", *required],
                },
            ],
            "unevaluatedProperties": False,
        },
    )


_STRING = {"$ref": "common_types.json#/$defs/DynamicString"}
_NUMBER = {"$ref": "common_types.json#/$defs/DynamicNumber"}
_ACTION = {"$ref": "common_types.json#/$defs/Action"}
_OPTIONS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"label": _STRING, "value": {"type": "string"}},
        "required": ["label", "value"],
        "additionalProperties": False,
    },
}

#: car-server's components beyond the a2ui-core basic catalog.
EXTRA_COMPONENTS = (
    _common(
        "Select",
        {
            "options": _OPTIONS,
            "value": {"$ref": "common_types.json#/$defs/DynamicStringList"},
            "label": _STRING,
        },
        ["options", "value"],
    ),
    _common("Badge", {"text": _STRING, "variant": {"type": "string"}}, ["text"]),
    _common("Spacer", {"size": {"type": "number"}}, []),
    _common(
        "Chart",
        {"kind": {"type": "string"}, "title": _STRING, "data": {"type": "array"}},
        ["data"],
    ),
    _common("File", {"name": _STRING, "url": _STRING, "size": _NUMBER}, ["name"]),
    _common("FilePicker", {"label": _STRING, "accept": {"type": "string"}, "action": _ACTION}, []),
)


@cache
def catalog() -> CatalogApi:
    """The basic v0.9 catalog of a2ui-core with car-server's extra components."""
    basic = BasicCatalog(VERSION)
    return basic.copy_with(components=[*basic.components.values(), *EXTRA_COMPONENTS])


def catalog_id() -> str:
    return catalog().id


def component_names() -> list[str]:
    return list(catalog().components)


#: Strict: a component type or property the catalog does not define is refused. The
#: surface as a whole may be incomplete (components arrive in several messages).
_STRICT_COMPONENTS = ValidationConfig(
    allow_orphan_components=True, allow_dangling_references=True, allow_missing_root=True
)


@cache
def _validator() -> PayloadValidator:
    return PayloadValidator(catalog(), _STRICT_COMPONENTS)


@cache
def _message_adapter() -> TypeAdapter[Any]:
    return TypeAdapter(_A2uiMessageModel)


@dataclass(frozen=True)
class A2uiMessage:
    """One checked A2UI message: its kind, its surface and its body as given."""

    kind: str
    surface_id: str
    body: dict[str, Any]


def is_envelope(value: Any) -> bool:
    """Whether `value` looks like an A2UI message (a version and one message key)."""
    return isinstance(value, dict) and any(k in value for k in MESSAGE_KINDS)


def check_message(envelope: Any) -> A2uiMessage:
    """The message, checked against the catalog; a refusal (CarError) otherwise."""
    if not isinstance(envelope, dict):
        raise refusal(INVALID_MESSAGE, "an A2UI message must be an object")
    kinds = [k for k in MESSAGE_KINDS if k in envelope]
    if len(kinds) != 1:
        raise refusal(
            INVALID_MESSAGE, f"an A2UI message has exactly one of: {', '.join(MESSAGE_KINDS)}"
        )
    kind = kinds[0]
    version = envelope.get("version", VERSION)
    if version not in SUPPORTED_PROTOCOL_VERSIONS:
        raise refusal(INVALID_MESSAGE, f"unsupported A2UI version: {version!r}")
    body = envelope[kind]
    if not isinstance(body, dict):
        raise refusal(INVALID_MESSAGE, f"{kind} must be an object")
    if kind == "createSurface":
        body = {"catalogId": catalog_id(), **body}
        if body["catalogId"] != catalog_id():
            raise refusal(
                UNSUPPORTED_CATALOG,
                f"unsupported catalog: {str(body['catalogId'])[:200]!r}",
                catalogId=str(body["catalogId"])[:200],
            )
    try:
        _message_adapter().validate_python({"version": version, kind: body})
    except ValidationError as e:
        raise refusal(INVALID_MESSAGE, _first_error(e)) from None
    if kind == "updateComponents":
        for component in body["components"]:
            _check_component(component)
    return A2uiMessage(kind, body["surfaceId"], body)


def _check_component(component: Any) -> None:
    if not isinstance(component, dict):
        raise refusal(INVALID_MESSAGE, "a component must be an object")
    name = component.get("component")
    if not isinstance(name, str) or name not in catalog().components:
        shown = json.dumps(name)[:100]
        raise refusal(
            UNSUPPORTED_COMPONENT,
            f"unsupported component: {shown}",
            component=name if isinstance(name, str) else None,
        )
    try:
        _validator().validate_component(component)
    except A2uiError as e:
        raise refusal(INVALID_MESSAGE, str(e)[:500], component=name) from None


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": str(error)}
    where = ".".join(str(p) for p in first["loc"])
    return f"invalid A2UI message: {where}: {first['msg']}"[:500]
