"""The Open Inference Protocol's binary tensor data extension: the framing, no HTTP.

A body is a JSON object, then the binary data of each tensor whose ``parameters`` say
``binary_data_size``, in the order of the tensors, back to back; the JSON's length travels
beside the body (:data:`HEADER_LENGTH`).  Tensors are little-endian and row-major; a
``BYTES`` element is a 4-byte little-endian length followed by that many bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

from blipserve.errors import InvalidRequest

#: the header giving the JSON's length when binary tensors follow it
HEADER_LENGTH: Final = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


def parse_header_length(value: str | None, body_size: int) -> int | None:
    """The JSON's length from the header's text; None when the body is JSON only."""
    if value is None:
        return None
    if not value.strip().isdigit():
        raise InvalidRequest(f"{HEADER_LENGTH} must be a number of bytes, got {value!r}")
    length = int(value)
    if not 0 < length <= body_size:
        raise InvalidRequest(
            f"{HEADER_LENGTH} is {length} but the body has {body_size} bytes: the JSON "
            "must be at least 1 byte and at most all of them"
        )
    return length


def split_body(body: bytes, header_length: int | None) -> tuple[bytes, BinaryTensors]:
    """The JSON and the binary data after it."""
    if header_length is None:
        return body, BinaryTensors(b"", framed=False)
    return body[:header_length], BinaryTensors(body[header_length:], framed=True)


class BinaryTensors:
    """The binary data after the JSON, taken by the tensors that declare theirs, in order."""

    def __init__(self, data: bytes, *, framed: bool) -> None:
        self.data = memoryview(data)
        self.framed = framed
        self.taken = 0

    def take(self, name: str, size: int) -> memoryview:
        """The next ``size`` bytes, input ``name``'s."""
        if not self.framed:
            raise InvalidRequest(
                f"input {name!r} has binary_data_size but the request has no {HEADER_LENGTH} "
                "(the length of the JSON before the binary data)"
            )
        left = len(self.data) - self.taken
        if size > left:
            raise InvalidRequest(
                f"input {name!r}: binary_data_size is {size} but only {left} bytes of binary "
                "data are left after the JSON and the inputs before it"
            )
        chunk = self.data[self.taken : self.taken + size]
        self.taken += size
        return chunk

    def check_all_taken(self) -> None:
        if self.taken != len(self.data):
            raise InvalidRequest(
                f"the body has {len(self.data)} bytes of binary data after the JSON but the "
                f"inputs' binary_data_size add up to {self.taken}"
            )


def encode_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """``BYTES`` elements in binary: each a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def encode_tensor(datatype: str, values: Sequence[Any]) -> bytes:
    """``FP32`` values or ``BYTES`` text (UTF-8) in binary."""
    if datatype == "FP32":
        return struct.pack(f"<{len(values)}f", *values)
    return encode_bytes_tensor([str(value).encode() for value in values])


def decode_bytes_tensor(
    data: bytes | memoryview, name: str = "tensor", most: int | None = None
) -> list[bytes]:
    """The elements of a binary ``BYTES`` tensor; :class:`InvalidRequest` naming input
    ``name`` and the element where the framing breaks.  Past ``most`` elements it stops
    (one more than a shape allows is enough to refuse it; a body of empty elements would
    otherwise become millions of them)."""
    view = memoryview(data)
    elements: list[bytes] = []
    at = 0
    while at < len(view) and (most is None or len(elements) <= most):
        if len(view) - at < _LENGTH.size:
            raise InvalidRequest(
                f"input {name!r}: binary data ends inside the length of element {len(elements)} "
                f"({len(view) - at} of 4 bytes)"
            )
        (size,) = _LENGTH.unpack_from(view, at)
        at += _LENGTH.size
        if size > len(view) - at:
            raise InvalidRequest(
                f"input {name!r}: element {len(elements)} says it has {size} bytes but only "
                f"{len(view) - at} are left in its binary data"
            )
        elements.append(bytes(view[at : at + size]))
        at += size
    return elements
