"""Fixed-width binary framing shared by every protocol message.

All integers are big-endian; byte strings and lists carry an explicit length prefix; vectors are
little-endian machine words (stated by the message that carries them). A :class:`Reader` raises
:class:`MessageFormatError` for every way bytes can be wrong (short, long, bad UTF-8, bad
enum), so decoders never leak a builtin exception.
"""

from __future__ import annotations

import struct

from secfed.errors import MessageFormatError

__all__ = ["Writer", "Reader", "MAX_ID_BYTES", "MAX_ITEMS"]

MAX_ID_BYTES = 255  # an enterprise id is short, printable text (one length byte)
MAX_ITEMS = 1 << 20  # no list in a round is longer than this; bounds allocation on bad input


class Writer:
    """Appends framed fields to a byte buffer."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(struct.pack(">B", value))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(struct.pack(">H", value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(struct.pack(">I", value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(struct.pack(">Q", value))
        return self

    def f64(self, value: float) -> Writer:
        self._parts.append(struct.pack(">d", value))
        return self

    def fixed(self, value: bytes, length: int) -> Writer:
        if len(value) != length:
            raise MessageFormatError(f"field must be {length} bytes (got {len(value)})")
        self._parts.append(bytes(value))
        return self

    def blob(self, value: bytes) -> Writer:
        self.u32(len(value))
        self._parts.append(bytes(value))
        return self

    def text(self, value: str) -> Writer:
        raw = value.encode("utf-8")
        if not 1 <= len(raw) <= MAX_ID_BYTES:
            raise MessageFormatError(f"id must be 1..{MAX_ID_BYTES} UTF-8 bytes (got {len(raw)})")
        self.u8(len(raw))
        self._parts.append(raw)
        return self

    def texts(self, values: tuple[str, ...]) -> Writer:
        self.u32(len(values))
        for v in values:
            self.text(v)
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads framed fields; every failure is a :class:`MessageFormatError`."""

    def __init__(self, data: bytes, what: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MessageFormatError(f"{what}: payload must be bytes (got {type(data).__name__})")
        self._data = memoryview(bytes(data))
        self._pos = 0
        self._what = what

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._data):
            raise MessageFormatError(
                f"{self._what}: truncated at byte {self._pos} (needs {n} more, "
                f"{len(self._data) - self._pos} left)"
            )
        view = self._data[self._pos : self._pos + n]
        self._pos += n
        return view

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self._take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def f64(self) -> float:
        return float(struct.unpack(">d", self._take(8))[0])

    def fixed(self, length: int) -> bytes:
        return bytes(self._take(length))

    def blob(self) -> bytes:
        return bytes(self._take(self.u32()))

    def blob_view(self) -> memoryview:
        return self._take(self.u32())

    def text(self) -> str:
        n = self.u8()
        if n == 0:
            raise MessageFormatError(f"{self._what}: empty id at byte {self._pos}")
        raw = bytes(self._take(n))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageFormatError(f"{self._what}: id is not valid UTF-8") from exc

    def count(self) -> int:
        n = self.u32()
        if n > MAX_ITEMS or n > len(self._data) - self._pos:
            raise MessageFormatError(
                f"{self._what}: list length {n} exceeds the bytes left ({len(self._data) - self._pos})"
            )
        return n

    def texts(self) -> tuple[str, ...]:
        return tuple(self.text() for _ in range(self.count()))

    def at_end(self) -> bool:
        """True when every byte has been read (for optional trailing fields)."""
        return self._pos == len(self._data)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MessageFormatError(
                f"{self._what}: {len(self._data) - self._pos} trailing bytes after the message"
            )
