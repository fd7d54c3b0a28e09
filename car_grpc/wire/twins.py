"""Typed twins: the fields of the typed API that mirror a field of the JSON wire, marked
`(json_twin) = "<field>"` in the protos (options.proto): an enum beside a string or
google.protobuf.Value of a closed set (ChatEvent.kind_enum), a number beside a Value
(HandshakeRequest.protocol_version_number), or a string that names what an overloaded
`session_id` means in its message (chat_id, session_label).

The JSON wire keeps only the named field, so it does not change: the codec never writes
nor reads a twin. The core keeps the two in step where messages cross its gRPC edge:

- `fill_in` on everything it receives (session frames, typed requests, tool-host and voice
  streams): a typed client may set only the twin (ChatEvent.kind_enum = DONE), and the
  named field, which the handlers read, is filled from it; then the twin is derived.
- `fill_out` on everything it sends: the twin is derived from the named field, so typed
  clients see enums. A twin set without its field (AuthenticateResponse.role_enum for a
  daemon session, whose `role` stays absent on the wire) is left as it is.

Deriving: an enum twin takes the value whose JSON string (codec.enum_names) is the named
field's string, UNSPECIFIED for any other string (the sets stay open on the wire); a
number twin takes the named Value's number when it is an integer in range; a string twin
takes the named string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from car_grpc.v1 import options_pb2
from car_grpc.wire.codec import enum_names

_VALUE = struct_pb2.Value.DESCRIPTOR.full_name
_UINT32_MAX = 2**32 - 1

M = TypeVar("M", bound=Message)

_S, _E, _V = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_MESSAGE
#: (twin type, named type): enum of a string or Value, number of a Value, string of a string.
_PAIRS = {(_E, _S), (_E, _V), (FieldDescriptor.TYPE_UINT32, _V), (_S, _S)}


def twin_of(fd: FieldDescriptor) -> str:
    """The name of the field that `fd` mirrors, or "" when `fd` is no twin."""
    return str(fd.GetOptions().Extensions[options_pb2.json_twin])


@dataclass(frozen=True)
class _Pair:
    named: FieldDescriptor
    twin: FieldDescriptor

    def fill(self, msg: Message) -> None:
        """The named field from the twin, when only the twin is set."""
        named, twin = self.named.name, self.twin.name
        if self.twin.type == FieldDescriptor.TYPE_STRING:
            if getattr(msg, twin) and not getattr(msg, named):
                setattr(msg, named, getattr(msg, twin))
        elif self.twin.type == FieldDescriptor.TYPE_ENUM:
            number = getattr(msg, twin)
            if number == 0:
                return
            text = enum_names(self.twin.enum_type)[0].get(number)
            if text is None:
                return
            if self.named.type == FieldDescriptor.TYPE_STRING:
                if not getattr(msg, named):
                    setattr(msg, named, text)
            elif not msg.HasField(named):
                getattr(msg, named).string_value = text
        elif msg.HasField(twin) and not msg.HasField(named):
            getattr(msg, named).number_value = getattr(msg, twin)

    def derive(self, msg: Message) -> None:
        """The twin from the named field, when that is set."""
        named, twin = self.named.name, self.twin.name
        if self.named.type == FieldDescriptor.TYPE_STRING:
            text = getattr(msg, named)
            if not text:
                return
            if self.twin.type == FieldDescriptor.TYPE_STRING:
                setattr(msg, twin, text)
            else:
                setattr(msg, twin, enum_names(self.twin.enum_type)[1].get(text, 0))
            return
        if not msg.HasField(named):
            return
        value: struct_pb2.Value = getattr(msg, named)
        kind = value.WhichOneof("kind")
        if self.twin.type == FieldDescriptor.TYPE_ENUM:
            text = value.string_value if kind == "string_value" else ""
            setattr(msg, twin, enum_names(self.twin.enum_type)[1].get(text, 0))
            return
        n = value.number_value if kind == "number_value" else -1.0
        if n.is_integer() and 0 <= n <= _UINT32_MAX:
            setattr(msg, twin, int(n))
        else:
            msg.ClearField(twin)


@dataclass(frozen=True)
class _Plan:
    pairs: tuple[_Pair, ...]
    #: Message fields outside any oneof that can hold twins, with is_repeated.
    children: tuple[tuple[str, bool], ...]
    #: Per oneof: its members that can hold twins.
    oneofs: tuple[tuple[str, frozenset[str]], ...]


def _pairs(desc: Descriptor) -> tuple[_Pair, ...]:
    pairs = []
    for fd in desc.fields:
        name = twin_of(fd)
        if name:
            named = desc.fields_by_name[name]
            kinds = (fd.type, named.type)
            if kinds not in _PAIRS:
                raise TypeError(f"{fd.full_name}: no twin of a {named.full_name} of its type")
            pairs.append(_Pair(named, fd))
    return tuple(pairs)


def _has_twins(desc: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    if desc.full_name in seen or desc.full_name == _VALUE:
        return False
    if _pairs(desc):
        return True
    seen = seen | {desc.full_name}
    return any(
        fd.message_type is not None and _has_twins(fd.message_type, seen) for fd in desc.fields
    )


@cache
def _plan(desc: Descriptor) -> _Plan:
    children: list[tuple[str, bool]] = []
    oneofs: dict[str, set[str]] = {}
    for fd in desc.fields:
        if fd.message_type is None or not _has_twins(fd.message_type):
            continue
        if fd.containing_oneof is not None:
            oneofs.setdefault(fd.containing_oneof.name, set()).add(fd.name)
        else:
            children.append((fd.name, fd.is_repeated))
    return _Plan(_pairs(desc), tuple(children), tuple((k, frozenset(v)) for k, v in oneofs.items()))


# Each message type's walk is compiled once, per direction, into a list of steps: its
# pairs (the common kinds specialized, no descriptor looked at per message), then the
# children and oneof members that can hold twins, each with the walk of its own type.
# Walks compile on first use, through a _Walk, so that recursive types compile.

Step = Callable[[Message], None]


class _Walk:
    """A message type's compiled walk, built on first use; callers keep the _Walk."""

    __slots__ = ("_build", "run")

    def __init__(self, build: Callable[[], Step]) -> None:
        self._build = build
        self.run: Step = self._first

    def _first(self, msg: Message) -> None:
        if self.run == self._first:
            self.run = self._build()
        self.run(msg)


_WALKS: dict[tuple[Any, bool], _Walk] = {}


def _walker(desc: Any, incoming: bool) -> _Walk:
    walk = _WALKS.get((desc, incoming))
    if walk is None:
        walk = _WALKS[desc, incoming] = _Walk(lambda: _compile(desc, incoming))
    return walk


def _compile(desc: Any, incoming: bool) -> Step:
    plan = _plan(desc)
    steps: list[Step] = []
    for pair in plan.pairs:
        steps += _pair_steps(pair, incoming)
    for name, repeated in plan.children:
        steps.append(
            _child_step(name, repeated, _walker(desc.fields_by_name[name].message_type, incoming))
        )
    for oneof, members in plan.oneofs:
        walks = {m: _walker(desc.fields_by_name[m].message_type, incoming) for m in members}
        steps.append(_oneof_step(oneof, walks))

    def walk(msg: Message) -> None:
        for step in steps:
            step(msg)

    return walk


def _child_step(name: str, repeated: bool, walk: _Walk) -> Step:
    if repeated:

        def each(msg: Message) -> None:
            for child in getattr(msg, name):
                walk.run(child)

        return each

    def one(msg: Message) -> None:
        if msg.HasField(name):
            walk.run(getattr(msg, name))

    return one


def _oneof_step(oneof: str, walks: dict[str, _Walk]) -> Step:
    def member(msg: Message) -> None:
        name = msg.WhichOneof(oneof)
        if name in walks:
            walks[name].run(getattr(msg, name))

    return member


def _pair_steps(pair: _Pair, incoming: bool) -> list[Step]:
    """fill (incoming only), then derive: as _Pair's, the two common kinds specialized."""
    named, twin = pair.named.name, pair.twin.name
    both_strings = pair.named.type == pair.twin.type == FieldDescriptor.TYPE_STRING
    if both_strings:

        def fill_string(msg: Message) -> None:
            if getattr(msg, twin) and not getattr(msg, named):
                setattr(msg, named, getattr(msg, twin))

        def derive_string(msg: Message) -> None:
            if text := getattr(msg, named):
                setattr(msg, twin, text)

        return [fill_string, derive_string] if incoming else [derive_string]
    if (
        pair.twin.type == FieldDescriptor.TYPE_ENUM
        and pair.named.type == FieldDescriptor.TYPE_STRING
    ):
        to_name, to_number = enum_names(pair.twin.enum_type)

        def fill_enum(msg: Message) -> None:
            number = getattr(msg, twin)
            if number and (text := to_name.get(number)) is not None and not getattr(msg, named):
                setattr(msg, named, text)

        def derive_enum(msg: Message) -> None:
            if text := getattr(msg, named):
                setattr(msg, twin, to_number.get(text, 0))

        return [fill_enum, derive_enum] if incoming else [derive_enum]
    return [pair.fill, pair.derive] if incoming else [pair.derive]


def fill_in(msg: M) -> M:
    """A message the core received, its named fields filled from twins, twins derived."""
    _walker(msg.DESCRIPTOR, True).run(msg)
    return msg


def fill_out(msg: M) -> M:
    """A message the core sends, its twins derived from their named fields."""
    _walker(msg.DESCRIPTOR, False).run(msg)
    return msg
