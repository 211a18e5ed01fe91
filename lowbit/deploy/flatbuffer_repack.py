"""Repack a FlatBuffers file so that identical sub-objects are stored once.

FlatBuffers lets any table, vector or string be referenced from several places, but converters
write each one where it is used: in an ONNX Runtime .ort file every node argument carries its own
copy of the same type-and-shape tables, every node its own copy of the same attribute tables and
execution-provider string. `repack` copies a buffer object by object (children first, as the
FlatBuffers builder needs) and writes each distinct object once; the reader sees the same values.

The schema is plain data: for each table type, its fields by slot index:
    ("scalar", size)         a scalar of `size` bytes, copied bit for bit
    ("string",)              a string
    ("table", T)             a table of type T
    ("tables", T)            a vector of tables of type T
    ("strings",)             a vector of strings
    ("scalars", size)        a vector of scalars (or structs of 4-byte fields) of `size` bytes
    ("union", tag_slot, {tag: T})  a union whose type tag is the scalar in `tag_slot`
A field the schema does not list makes `repack` give up (it returns None), so a file with parts
it does not know is never rewritten.
"""

from __future__ import annotations

from typing import Any

import flatbuffers
from flatbuffers import number_types as N
from flatbuffers.table import Table

Schema = dict[str, dict[int, tuple]]
_UNSIGNED = {1: N.Uint8Flags, 2: N.Uint16Flags, 4: N.Uint32Flags, 8: N.Uint64Flags}


class _Unknown(Exception):
    pass


def repack(data: bytes, schema: Schema, root: str, file_identifier: bytes | None = None) -> bytes | None:
    """`data` rewritten with each distinct sub-object stored once, or None when the file holds a
    field `schema` does not describe."""
    data = bytes(data)
    buffer = bytearray(data)  # what FlatBuffers' Table reader takes
    reader = Table(buffer, 0)
    builder = flatbuffers.Builder(len(data))
    memo: dict[Any, int] = {}  # content key -> offset of the one copy written

    def string(pos: int) -> int:
        value = bytes(reader.String(pos))
        key = ("s", value)
        if key not in memo:
            memo[key] = builder.CreateString(value)
        return memo[key]

    def vector_of(items: list[int], key: Any) -> int:
        if key not in memo:
            builder.StartVector(4, len(items), 4)
            for item in reversed(items):
                builder.PrependUOffsetTRelative(item)
            memo[key] = builder.EndVector()
        return memo[key]

    def table(pos: int, type_name: str) -> int:
        tab = Table(buffer, pos)
        fields = schema[type_name]
        vtable = pos - int.from_bytes(data[pos:pos + 4], "little", signed=True)
        slots = (int.from_bytes(data[vtable:vtable + 2], "little") - 4) // 2  # vtable: size, table size, slots
        values: list[tuple] = []
        for slot in range(slots):
            offset = tab.Offset(4 + 2 * slot)
            if not offset:
                continue
            if slot not in fields:
                raise _Unknown(f"{type_name} slot {slot}")
            kind = fields[slot]
            field = pos + offset
            if kind[0] == "scalar":
                values.append((slot, "scalar", kind[1], data[field:field + kind[1]]))
            elif kind[0] == "string":
                values.append((slot, "offset", string(field)))
            elif kind[0] == "table":
                values.append((slot, "offset", table(tab.Indirect(field), kind[1])))
            elif kind[0] == "union":
                tag_offset = tab.Offset(4 + 2 * kind[1])
                tag = data[pos + tag_offset] if tag_offset else 0
                if tag not in kind[2]:
                    raise _Unknown(f"{type_name} union tag {tag}")
                values.append((slot, "offset", table(tab.Indirect(field), kind[2][tag])))
            else:
                start, count = tab.Vector(field - pos), tab.VectorLen(field - pos)
                if kind[0] == "tables":
                    items = [table(tab.Indirect(start + 4 * i), kind[1]) for i in range(count)]
                    values.append((slot, "offset", vector_of(items, ("t", tuple(items)))))
                elif kind[0] == "strings":
                    items = [string(start + 4 * i) for i in range(count)]
                    values.append((slot, "offset", vector_of(items, ("t", tuple(items)))))
                elif kind[0] == "scalars":
                    raw = data[start:start + count * kind[1]]
                    key = ("v", kind[1], raw)
                    if key not in memo:  # copied as bytes (also vectors of structs)
                        builder.StartVector(kind[1], count, kind[1] if kind[1] in (1, 2, 4, 8) else 4)
                        builder.head -= len(raw)
                        builder.Bytes[builder.head:builder.head + len(raw)] = raw
                        memo[key] = builder.EndVector()
                    values.append((slot, "offset", memo[key]))
                else:
                    raise _Unknown(f"{type_name} slot {slot} kind {kind[0]}")
        key = (type_name, tuple(values))
        if key in memo:
            return memo[key]
        builder.StartObject(slots)
        # larger scalars first keeps the table compact (the builder pads each to its own size)
        for value in sorted(values, key=lambda v: -(v[2] if v[1] == "scalar" else 4)):
            if value[1] == "scalar":
                flags = _UNSIGNED[value[2]]
                builder.Prepend(flags, int.from_bytes(value[3], "little"))
            else:
                builder.PrependUOffsetTRelative(value[2])
            builder.Slot(value[0])
        memo[key] = builder.EndObject()
        return memo[key]

    try:
        root_table = table(int.from_bytes(data[:4], "little"), root)
    except _Unknown:
        return None
    builder.Finish(root_table, file_identifier=file_identifier)
    return bytes(builder.Output())
