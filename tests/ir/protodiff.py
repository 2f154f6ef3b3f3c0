"""Compare two ONNX protos field by field and report the first difference by its path.

`first_difference(a, b)` walks both messages in field-number order (repeated fields element by
element, nested graphs included) and returns a one-line description such as
``graph.node[12](/conv1/Conv).attribute[0](kernel_shape).ints[1]: 3 != 5``, or None when the
two are equal. Tensor payloads are compared as bytes without being printed.

ONNX's protos are proto2, so a scalar field can be *set to its default* ('' or 0) or *unset*;
the two mean the same to every ONNX consumer and the IR does not record which it was (e.g.
`opset_import.domain` unset vs ''). By default they compare equal; `presence=True` makes
them differ.
"""

from __future__ import annotations

import math

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_BYTES_PREVIEW = 16


def first_difference(a: Message, b: Message, path: str = "", *, presence: bool = False) -> str | None:
    if type(a) is not type(b):
        return f"{path or '<root>'}: message types differ ({type(a).__name__} != {type(b).__name__})"
    fields = {f.number: f for f in a.DESCRIPTOR.fields}
    for number in sorted(fields):
        field = fields[number]
        here = f"{path}.{field.name}" if path else field.name
        if _is_repeated(field):
            diff = _compare_repeated(field, getattr(a, field.name), getattr(b, field.name), here, presence)
        else:
            diff = _compare_single(field, a, b, here, presence)
        if diff is not None:
            return diff
    return None


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _compare_single(field: FieldDescriptor, a: Message, b: Message, here: str, presence: bool) -> str | None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        has_a, has_b = a.HasField(field.name), b.HasField(field.name)
        if has_a != has_b:
            return f"{here}: set in {'first' if has_a else 'second'} only"
        return first_difference(getattr(a, field.name), getattr(b, field.name), here, presence=presence) if has_a else None
    va, vb = getattr(a, field.name), getattr(b, field.name)
    if presence and field.has_presence and a.HasField(field.name) != b.HasField(field.name):
        return f"{here}: set in {'first' if a.HasField(field.name) else 'second'} only ({_show(va)} vs {_show(vb)})"
    if _differ(va, vb):
        return f"{here}: {_show(va)} != {_show(vb)}"
    return None


def _differ(a, b) -> bool:
    """Scalars differ; floats by sign too (-0.0 != 0.0), any NaN equals any NaN."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) != math.isnan(b)
        return a != b or math.copysign(1.0, a) != math.copysign(1.0, b)
    return a != b


def _compare_repeated(field: FieldDescriptor, la, lb, here: str, presence: bool) -> str | None:
    for i, (ea, eb) in enumerate(zip(la, lb)):
        label = f"{here}[{i}]{_label(ea)}"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            diff = first_difference(ea, eb, label, presence=presence)
            if diff is not None:
                return diff
        elif _differ(ea, eb):
            return f"{label}: {_show(ea)} != {_show(eb)}"
    if len(la) != len(lb):
        extra = la[len(lb)] if len(la) > len(lb) else lb[len(la)]
        return f"{here}: {len(la)} != {len(lb)} entries (first extra: {_label(extra) or _show(extra)})"
    return None


def _label(item) -> str:
    if isinstance(item, Message):
        for attr in ("name", "key", "domain"):
            if attr in item.DESCRIPTOR.fields_by_name and getattr(item, attr):
                return f"({getattr(item, attr)})"
    return ""


def _show(value) -> str:
    if isinstance(value, bytes):
        if len(value) > _BYTES_PREVIEW:
            return f"<{len(value)} bytes {value[:_BYTES_PREVIEW].hex()}...>"
        return repr(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
