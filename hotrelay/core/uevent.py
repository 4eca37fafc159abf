"""Uevents and their two wire formats, bytes in and bytes out, with no I/O.

The kernel broadcasts ``ACTION@DEVPATH\\0KEY=VALUE\\0...`` on netlink group 1.
udevd re-broadcasts processed events on group 2 in libudev's format: a 40-byte
``monitor_netlink_header`` followed by ``KEY=VALUE\\0`` properties. The header carries
MurmurHash2 hashes of SUBSYSTEM and DEVTYPE and a 64-bit bloom filter of the tags so
that libudev listeners can filter in the kernel with a socket BPF program; we must
compute them exactly as libudev does or those listeners drop our injected events.

``parse`` and ``serialize`` are inverse: ``parse(serialize(e)) == e``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "LIBUDEV_HEADER_SIZE",
    "LIBUDEV_MAGIC",
    "LIBUDEV_PREFIX",
    "MAX_MESSAGE_SIZE",
    "Uevent",
    "UeventParseError",
    "Wire",
    "murmurhash2",
    "parse",
    "parse_kernel",
    "parse_libudev",
    "serialize",
    "tag_bloom",
]

LIBUDEV_PREFIX = b"libudev\0"
LIBUDEV_MAGIC = 0xFEEDCAFE
# prefix[8], then magic (big-endian), header_size, properties_off, properties_len (host
# order), subsystem hash, devtype hash, bloom hi, bloom lo (big-endian, for socket filters).
_LIBUDEV_HEADER = struct.Struct("=8s4sIII4s4s4s4s")
LIBUDEV_HEADER_SIZE = _LIBUDEV_HEADER.size
# The kernel caps one uevent at 2048 bytes and udevd sends at most a few KiB; anything
# near this is not a uevent and is refused before we spend time on it.
MAX_MESSAGE_SIZE = 64 * 1024

_REQUIRED = ("ACTION", "DEVPATH", "SUBSYSTEM")
_MASK32 = 0xFFFFFFFF


class UeventParseError(ValueError):
    """A message that is not a well-formed uevent; says what is wrong and where."""


class Wire(enum.Enum):
    """The wire format an event came from (and is serialized back to)."""

    KERNEL = "kernel"
    UDEV = "udev"


def _freeze(properties: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(properties))


@dataclass(frozen=True)
class Uevent:
    """One device event. ``properties`` holds every KEY=VALUE, in wire order.

    The named fields are derived from ``properties`` and validated against them, so a
    Uevent can only be built consistent; use :meth:`from_properties` to build one.
    """

    action: str
    devpath: str
    subsystem: str
    properties: Mapping[str, str] = field(hash=False, repr=False)
    wire: Wire = Wire.KERNEL
    devtype: str | None = None
    devname: str | None = None
    major: int | None = None
    minor: int | None = None
    seqnum: int | None = None

    def __post_init__(self) -> None:
        props = self.properties
        if not isinstance(props, MappingProxyType):
            object.__setattr__(self, "properties", props := _freeze(props))
        expected = _derive(props)
        actual = (
            self.action,
            self.devpath,
            self.subsystem,
            self.devtype,
            self.devname,
            self.major,
            self.minor,
            self.seqnum,
        )
        if actual != expected:
            raise ValueError(f"Uevent fields {actual!r} disagree with its properties {expected!r}")

    @classmethod
    def from_properties(
        cls, properties: Mapping[str, str] | Iterable[tuple[str, str]], wire: Wire = Wire.KERNEL
    ) -> Uevent:
        """Build a Uevent from its properties; raises UeventParseError if they are invalid."""
        return cls._from_frozen_properties(_freeze(dict(properties)), wire)

    @classmethod
    def _from_frozen_properties(cls, props: Mapping[str, str], wire: Wire) -> Uevent:
        action, devpath, subsystem, devtype, devname, major, minor, seqnum = _derive(props)
        # The fields are derived here, so __post_init__'s consistency check would only
        # derive them again. This runs once per netlink message: filling __dict__ in one
        # call is ~4x cheaper than ten frozen-dataclass attribute stores. (Not slots=True
        # for the same reason; the instance stays immutable to callers.)
        uevent = object.__new__(cls)
        uevent.__dict__.update(
            action=action,
            devpath=devpath,
            subsystem=subsystem,
            properties=props,
            wire=wire,
            devtype=devtype,
            devname=devname,
            major=major,
            minor=minor,
            seqnum=seqnum,
        )
        return uevent

    @property
    def devnum(self) -> tuple[int, int] | None:
        if self.major is None or self.minor is None:
            return None
        return (self.major, self.minor)

    @property
    def node(self) -> str | None:
        """The device node's absolute path (the kernel sends DEVNAME relative to /dev)."""
        if self.devname is None:
            return None
        return self.devname if self.devname.startswith("/") else "/dev/" + self.devname

    @property
    def sysname(self) -> str:
        return self.devpath.rsplit("/", 1)[-1]

    @property
    def tags(self) -> frozenset[str]:
        """udev tags (TAGS=:a:b:); empty for kernel events."""
        return frozenset(t for t in self.properties.get("TAGS", "").split(":") if t)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.properties.get(key, default)

    def replace(self, *, wire: Wire | None = None, **changes: str | None) -> Uevent:
        """A copy with properties changed (None removes a key), optionally on another wire."""
        props = dict(self.properties)
        for key, value in changes.items():
            if value is None:
                props.pop(key, None)
            else:
                props[key] = value
        return Uevent.from_properties(props, self.wire if wire is None else wire)


_Derived = tuple[str, str, str, str | None, str | None, int | None, int | None, int | None]


def _int_property(props: Mapping[str, str], key: str) -> int | None:
    value = props.get(key)
    if value is None:
        return None
    # int() accepts "+1", " 1" and "1_000"; the kernel writes plain decimal digits only.
    if not value.isascii() or not value.isdigit():
        raise UeventParseError(f"{key}={value!r} is not a decimal number")
    try:
        return int(value)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        raise UeventParseError(f"{key}: a number of {len(value)} digits") from None


def _derive(props: Mapping[str, str]) -> _Derived:
    for key in _REQUIRED:
        if not props.get(key):
            raise UeventParseError(f"missing {key}")
    devpath = props["DEVPATH"]
    if not devpath.startswith("/"):
        raise UeventParseError(f"DEVPATH={devpath!r} is not an absolute path")
    major = _int_property(props, "MAJOR")
    minor = _int_property(props, "MINOR")
    if (major is None) != (minor is None):
        raise UeventParseError("MAJOR and MINOR must come together")
    return (
        props["ACTION"],
        devpath,
        props["SUBSYSTEM"],
        props.get("DEVTYPE"),
        props.get("DEVNAME"),
        major,
        minor,
        _int_property(props, "SEQNUM"),
    )


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UeventParseError(f"{what}: not UTF-8 at byte {exc.start}") from None


def _parse_properties(text: str, what: str) -> dict[str, str]:
    fields = text.split("\0")
    # Every field is NUL-terminated, so a well-formed buffer ends with one empty field;
    # tolerate a missing final NUL, as libudev does.
    if fields and fields[-1] == "":
        fields.pop()
    props: dict[str, str] = {}
    for field_ in fields:
        key, sep, value = field_.partition("=")
        if not sep or not key:
            raise UeventParseError(f"{what}: malformed field {field_[:64]!r} (expected KEY=VALUE)")
        if key in props:
            raise UeventParseError(f"{what}: duplicate key {key!r}")
        props[key] = value
    return props


def parse_kernel(data: bytes) -> Uevent:
    """Parse the kernel's ``ACTION@DEVPATH\\0KEY=VALUE\\0...`` format."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise UeventParseError(f"kernel uevent: {len(data)} bytes is over {MAX_MESSAGE_SIZE}")
    # One decode for header and properties: this runs once per message in a storm.
    header, nul, body = _decode(data, "kernel uevent").partition("\0")
    if not nul:
        raise UeventParseError("kernel uevent: header is not NUL-terminated (truncated?)")
    action, at, devpath = header.partition("@")
    if not at or not action or not devpath.startswith("/"):
        raise UeventParseError(
            f"kernel uevent: bad header {header[:64]!r} (expected ACTION@/DEVPATH)"
        )
    props = _parse_properties(body, "kernel uevent")
    uevent = Uevent._from_frozen_properties(MappingProxyType(props), Wire.KERNEL)
    if uevent.action != action or uevent.devpath != devpath:
        raise UeventParseError(
            f"kernel uevent: header {header[:64]!r} disagrees with "
            f"ACTION={uevent.action!r} DEVPATH={uevent.devpath!r}"
        )
    return uevent


def parse_libudev(data: bytes) -> Uevent:
    """Parse libudev's monitor format (what udevd sends on group 2)."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise UeventParseError(f"libudev message: {len(data)} bytes is over {MAX_MESSAGE_SIZE}")
    if len(data) < LIBUDEV_HEADER_SIZE:
        raise UeventParseError(
            f"libudev message: {len(data)} bytes is shorter than "
            f"its {LIBUDEV_HEADER_SIZE}-byte header"
        )
    prefix, magic, header_size, off, length, *_hashes = _LIBUDEV_HEADER.unpack_from(data)
    if prefix != LIBUDEV_PREFIX:
        raise UeventParseError(f"libudev message: bad prefix {prefix!r}")
    if int.from_bytes(magic, "big") != LIBUDEV_MAGIC:
        raise UeventParseError(f"libudev message: bad magic 0x{int.from_bytes(magic, 'big'):08x}")
    if header_size < LIBUDEV_HEADER_SIZE or off < header_size:
        raise UeventParseError(
            f"libudev message: header size {header_size} / properties offset {off} "
            f"inside the {LIBUDEV_HEADER_SIZE}-byte header"
        )
    if off + length > len(data):
        raise UeventParseError(
            f"libudev message: properties at {off}+{length} run past the {len(data)}-byte buffer"
        )
    props = _parse_properties(
        _decode(data[off : off + length], "libudev message"), "libudev message"
    )
    return Uevent._from_frozen_properties(MappingProxyType(props), Wire.UDEV)


def parse(data: bytes) -> Uevent:
    """Parse either wire format, telling them apart by libudev's prefix."""
    if data.startswith(LIBUDEV_PREFIX):
        return parse_libudev(data)
    return parse_kernel(data)


def murmurhash2(data: bytes, seed: int = 0) -> int:
    """Austin Appleby's 32-bit MurmurHash2, as libudev uses for its filter hashes.

    libudev reads the 4-byte blocks with a native load; hotrelay targets little-endian
    hosts (x86_64, aarch64), so blocks are read little-endian.
    """
    m = 0x5BD1E995
    length = len(data)
    h = (seed ^ length) & _MASK32
    blocks = length // 4
    for (k,) in struct.iter_unpack("<I", data[: blocks * 4]):
        k = (k * m) & _MASK32
        k ^= k >> 24
        k = (k * m) & _MASK32
        h = ((h * m) & _MASK32) ^ k
    tail = data[blocks * 4 :]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & _MASK32
    h ^= h >> 13
    h = (h * m) & _MASK32
    h ^= h >> 15
    return h


def tag_bloom(tags: Iterable[str]) -> int:
    """libudev's 64-bit tag bloom filter: four bits per tag from one MurmurHash2."""
    bits = 0
    for tag in tags:
        h = murmurhash2(tag.encode())
        bits |= 1 << (h & 63)
        bits |= 1 << ((h >> 6) & 63)
        bits |= 1 << ((h >> 12) & 63)
        bits |= 1 << ((h >> 18) & 63)
    return bits


def _properties_blob(uevent: Uevent) -> bytes:
    return b"".join(f"{k}={v}\0".encode() for k, v in uevent.properties.items())


def serialize(uevent: Uevent, wire: Wire | None = None) -> bytes:
    """Serialize to ``wire`` (default: the wire the event came from)."""
    wire = uevent.wire if wire is None else wire
    blob = _properties_blob(uevent)
    if wire is Wire.KERNEL:
        return f"{uevent.action}@{uevent.devpath}\0".encode() + blob
    bloom = tag_bloom(uevent.tags)
    header = _LIBUDEV_HEADER.pack(
        LIBUDEV_PREFIX,
        LIBUDEV_MAGIC.to_bytes(4, "big"),
        LIBUDEV_HEADER_SIZE,
        LIBUDEV_HEADER_SIZE,
        len(blob),
        murmurhash2(uevent.subsystem.encode()).to_bytes(4, "big"),
        (murmurhash2(uevent.devtype.encode()) if uevent.devtype else 0).to_bytes(4, "big"),
        (bloom >> 32).to_bytes(4, "big"),
        (bloom & _MASK32).to_bytes(4, "big"),
    )
    return header + blob
