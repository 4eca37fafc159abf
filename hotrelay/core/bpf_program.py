"""cgroup-device BPF programs as data: encode, decode, assemble, prepend, interpret.

On cgroup v2 a device policy is a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program: the kernel
hands it ``struct bpf_cgroup_dev_ctx`` (``access_type = access << 16 | type`` at 0,
``major`` at 4, ``minor`` at 8, all u32) and a non-zero return allows the access.
Programs attached together are ANDed, so granting a device means *replacing* each
denying program with one that allows the device and otherwise answers exactly as the
original did. This module builds that replacement without touching the kernel:

* :func:`assemble` compiles an ordered rule list the way runc does (its device-rule
  emulator first reduces the list to a default action plus exceptions, exactly like
  cgroup v1 would, then one block per exception);
* :func:`prepend_grants` puts allow blocks in front of an existing program's
  instructions, which follow unchanged: their jumps are relative and stay inside
  them, and the prefix leaves R1 (the context pointer) untouched, so the original
  runs exactly as before whenever no grant matches;
* :func:`check_replayable` tells whether read-back instructions can be loaded again
  as they are (no helper calls, maps or stores, whose read-back form is not loadable);
* :func:`run` is an interpreter for the instruction subset these programs use, so
  tests can compare verdicts over many devices without root.

Instructions are kept one per 8-byte slot (a 16-byte ``LD_IMM64`` is two slots, the
second with opcode 0), so jump offsets, which count slots, need no translation.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hotrelay.core.device_access import Access, DeviceRule, DeviceType

__all__ = [
    "DEVCG_ACC_MKNOD",
    "DEVCG_ACC_READ",
    "DEVCG_ACC_WRITE",
    "DEVCG_DEV_BLOCK",
    "DEVCG_DEV_CHAR",
    "MAX_INSNS",
    "DevicePolicy",
    "DeviceRequest",
    "Insn",
    "InterpreterError",
    "Prepended",
    "ProgramError",
    "access_mask",
    "assemble",
    "check_replayable",
    "decode",
    "emulate",
    "encode",
    "policy_allows",
    "prepend_code",
    "prepend_grants",
    "rules_allow",
    "run",
    "split_prepended",
    "verdict",
]

# include/uapi/linux/bpf.h
DEVCG_ACC_MKNOD = 1
DEVCG_ACC_READ = 2
DEVCG_ACC_WRITE = 4
DEVCG_DEV_BLOCK = 1
DEVCG_DEV_CHAR = 2

# Instruction classes, sizes, modes, sources, ALU and JMP operations.
BPF_LD, BPF_LDX, BPF_ST, BPF_STX = 0x00, 0x01, 0x02, 0x03
BPF_ALU, BPF_JMP, BPF_JMP32, BPF_ALU64 = 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B, BPF_DW = 0x00, 0x08, 0x10, 0x18
BPF_IMM, BPF_MEM = 0x00, 0x60
BPF_K, BPF_X = 0x00, 0x08
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70,
)  # fmt: skip
BPF_NEG, BPF_MOD, BPF_XOR, BPF_MOV, BPF_ARSH, BPF_END = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE, BPF_JSGT, BPF_JSGE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70,
)  # fmt: skip
BPF_CALL, BPF_EXIT, BPF_JLT, BPF_JLE, BPF_JSLT, BPF_JSLE = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0
LD_IMM64 = BPF_LD | BPF_IMM | BPF_DW

# The kernel's limit for privileged programs (BPF_COMPLEXITY_LIMIT_INSNS).
MAX_INSNS = 1_000_000
_CTX_SIZE = 12
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF

# Our prefix opens with two dead stores to R0 (the original sets R0 before every exit,
# the verifier makes sure of that): a magic number and the prefix length. They make a
# granted program recognisable when read back, after a restart, without any state.
PREFIX_MAGIC = 0x68726C79  # "hrly"
_PREFIX_HEADER = 2

_INSN = struct.Struct("<BBhi")


class ProgramError(ValueError):
    """A rule list or instruction stream hotrelay cannot turn into a program."""


class InterpreterError(ValueError):
    """The interpreter met an instruction outside its subset or a bad access."""


@dataclass(frozen=True, slots=True)
class Insn:
    """One 8-byte instruction slot: ``op``, ``dst``/``src`` registers, ``off``, ``imm``."""

    op: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.op <= 0xFF and 0 <= self.dst <= 0xF and 0 <= self.src <= 0xF):
            raise ProgramError(f"instruction {self!r}: op/register out of range")
        if not (-0x8000 <= self.off <= 0x7FFF and -0x8000_0000 <= self.imm <= 0x7FFF_FFFF):
            raise ProgramError(f"instruction {self!r}: off/imm out of range")

    @property
    def cls(self) -> int:
        return self.op & 0x07

    @property
    def is_jump(self) -> bool:
        """A jump with a target (JA and conditionals; not CALL or EXIT)."""
        return self.cls in (BPF_JMP, BPF_JMP32) and (self.op & 0xF0) not in (BPF_CALL, BPF_EXIT)

    def __str__(self) -> str:
        return f"{self.op:#04x} r{self.dst} r{self.src} {self.off:+d} {self.imm:#x}"


def encode(insns: Iterable[Insn]) -> bytes:
    """The kernel's wire form: ``struct bpf_insn`` little-endian, 8 bytes each."""
    return b"".join(
        _INSN.pack(insn.op, (insn.src << 4) | insn.dst, insn.off, insn.imm) for insn in insns
    )


def decode(data: bytes) -> tuple[Insn, ...]:
    """Inverse of :func:`encode`."""
    if len(data) % _INSN.size:
        raise ProgramError(f"{len(data)} bytes is not a whole number of instructions")
    return tuple(
        Insn(op, regs & 0xF, regs >> 4, off, imm) for op, regs, off, imm in _INSN.iter_unpack(data)
    )


# -- building blocks ------------------------------------------------------------------


def _ldx_w(dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_LDX | BPF_MEM | BPF_W, dst, src, off)


def _alu32_imm(operation: int, dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU | BPF_K | operation, dst, 0, 0, imm)


def _mov32_reg(dst: int, src: int) -> Insn:
    return Insn(BPF_ALU | BPF_X | BPF_MOV, dst, src)


def _mov64_imm(dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_K | BPF_MOV, dst, 0, 0, imm)


def _jne_imm(dst: int, value: int, off: int) -> Insn:
    # The context fields are u32, zero-extended into 64-bit registers, while a 64-bit
    # compare sign-extends imm: values above 2**31 need the 32-bit compare.
    if value > 0x7FFF_FFFF:
        return Insn(BPF_JMP32 | BPF_K | BPF_JNE, dst, 0, off, value - (1 << 32))
    return Insn(BPF_JMP | BPF_K | BPF_JNE, dst, 0, off, value)


def _jne_reg(dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_JMP | BPF_X | BPF_JNE, dst, src, off)


_EXIT = Insn(BPF_JMP | BPF_EXIT)


def access_mask(access: Access) -> int:
    """DEVCG_ACC_* bits for an access set."""
    return (
        (DEVCG_ACC_READ if access.read else 0)
        | (DEVCG_ACC_WRITE if access.write else 0)
        | (DEVCG_ACC_MKNOD if access.mknod else 0)
    )


_TYPE_CODE = {DeviceType.BLOCK: DEVCG_DEV_BLOCK, DeviceType.CHAR: DEVCG_DEV_CHAR}


def _check_number(rule: DeviceRule) -> None:
    for value in (rule.major, rule.minor):
        if value is not None and not 0 <= value <= _U32:
            raise ProgramError(f"device rule {rule.render()!r}: {value} is not a u32")


def _match_block(rule: DeviceRule, action: int, next_block: int, scratch: int) -> list[Insn]:
    """``if device matches rule and access within rule.access: return action``.

    Expects R2 = type, R3 = access, R4 = major, R5 = minor; clobbers R0 and ``scratch``.
    ``next_block`` is where a mismatch jumps, counted from this block's first slot.
    """
    _check_number(rule)
    checks: list[tuple[str, int, int]] = []  # (kind, register, value)
    if rule.type is not DeviceType.ALL:
        checks.append(("imm", 2, _TYPE_CODE[rule.type]))
    mask = access_mask(rule.access)
    if mask != DEVCG_ACC_READ | DEVCG_ACC_WRITE | DEVCG_ACC_MKNOD:
        checks.append(("access", 3, mask))
    if rule.major is not None:
        checks.append(("imm", 4, rule.major))
    if rule.minor is not None:
        checks.append(("imm", 5, rule.minor))
    block: list[Insn] = []
    # Sizes are known up front: an access check is three slots, anything else one.
    size = sum(3 if kind == "access" else 1 for kind, _, _ in checks) + 2
    for kind, register, value in checks:
        if kind == "access":
            # (requested & allowed) == requested, i.e. requested is a subset.
            block += [_mov32_reg(scratch, 3), _alu32_imm(BPF_AND, scratch, value)]
            block.append(_jne_reg(scratch, 3, next_block - len(block) - 1))
        else:
            block.append(_jne_imm(register, value, next_block - len(block) - 1))
    block += [_mov64_imm(0, action), _EXIT]
    assert len(block) == size
    return block


def _load_context() -> list[Insn]:
    """R2 = type, R3 = access, R4 = major, R5 = minor; R1 (ctx) is left as it is."""
    return [
        _ldx_w(2, 1, 0),
        _alu32_imm(BPF_AND, 2, 0xFFFF),
        _ldx_w(3, 1, 0),
        _alu32_imm(BPF_RSH, 3, 16),
        _ldx_w(4, 1, 4),
        _ldx_w(5, 1, 8),
    ]


def _chain(rules: Sequence[DeviceRule], action: int, scratch: int) -> list[Insn]:
    """One block per rule; each mismatch falls to the next block, the last one past the end."""
    out: list[Insn] = []
    for rule in rules:
        size = len(_match_block(rule, action, 0, scratch))
        out += _match_block(rule, action, size, scratch)
    return out


# -- the runtime's policy: runc's emulation of cgroup v1 ------------------------------


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """A rule list reduced the way cgroup v1 (and runc's emulator) reduces it.

    ``exceptions`` all have the opposite action of the default, one per distinct
    (type, major, minor), with their access merged; order does not matter.
    """

    default_allow: bool
    exceptions: tuple[DeviceRule, ...]


def _sort_key(rule: DeviceRule) -> tuple[int, int, str]:
    return (
        -1 if rule.major is None else rule.major,
        -1 if rule.minor is None else rule.minor,
        rule.type.value,
    )


def _access_minus(have: Access, drop: Access) -> Access | None:
    bits = (
        have.read and not drop.read,
        have.write and not drop.write,
        have.mknod and not drop.mknod,
    )
    return Access(*bits) if any(bits) else None


def emulate(rules: Iterable[DeviceRule]) -> DevicePolicy:
    """Fold an ordered rule list into a default and exceptions, as runc does.

    A type ``a`` rule resets everything: deny means deny-by-default with no exceptions,
    allow means allow-by-default. A rule of the default's opposite action adds (merges)
    an exception; a rule of the default's own action removes access from the exception
    with exactly the same pattern. Removing access that a broader wildcard exception
    still grants is refused, as runc refuses it (cgroup v1 would silently ignore it).
    Without any ``a`` rule the default is deny, as runc's emulator starts out.
    """
    default_allow = False
    exceptions: dict[tuple[DeviceType, int | None, int | None], Access] = {}
    for rule in rules:
        if rule.type is DeviceType.ALL:
            default_allow = rule.allow
            exceptions = {}
            continue
        _check_number(rule)
        key = (rule.type, rule.major, rule.minor)
        if rule.allow != default_allow:
            old = exceptions.get(key)
            exceptions[key] = rule.access if old is None else old | rule.access
            continue
        for broader in (
            (rule.type, None, rule.minor),
            (rule.type, rule.major, None),
            (rule.type, None, None),
        ):
            if broader == key:
                continue
            held = exceptions.get(broader)
            if held is not None and _overlaps(held, rule.access):
                raise ProgramError(
                    f"device rule {rule.render()!r} ({'allow' if rule.allow else 'deny'}) "
                    f"would punch a hole in the wildcard exception "
                    f"{DeviceRule(broader[0], broader[1], broader[2], held).render()!r}"
                )
        old = exceptions.get(key)
        if old is not None:
            left = _access_minus(old, rule.access)
            if left is None:
                del exceptions[key]
            else:
                exceptions[key] = left
    ordered = sorted(
        (DeviceRule(kind, major, minor, access, not default_allow)
         for (kind, major, minor), access in exceptions.items()),
        key=_sort_key,
    )  # fmt: skip
    return DevicePolicy(default_allow, tuple(ordered))


def _overlaps(a: Access, b: Access) -> bool:
    return (a.read and b.read) or (a.write and b.write) or (a.mknod and b.mknod)


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """One access the kernel asks a device program about."""

    kind: DeviceType
    major: int
    minor: int
    access: int  # DEVCG_ACC_* bits

    def __post_init__(self) -> None:
        if self.kind is DeviceType.ALL:
            raise ValueError("a request is for a block or a char device, not 'a'")
        if not (0 <= self.major <= _U32 and 0 <= self.minor <= _U32):
            raise ValueError(f"device {self.major}:{self.minor} out of u32 range")
        if not 0 <= self.access <= 0xFFFF:
            raise ValueError(f"access bits {self.access:#x} out of range")

    def context(self) -> bytes:
        """``struct bpf_cgroup_dev_ctx`` for this request."""
        return struct.pack(
            "<III", (self.access << 16) | _TYPE_CODE[self.kind], self.major, self.minor
        )

    def __str__(self) -> str:
        return f"{self.kind.value} {self.major}:{self.minor} access={self.access:#x}"


def _rule_admits(rule: DeviceRule, request: DeviceRequest) -> bool:
    mask = access_mask(rule.access)
    return (
        rule.matches(request.kind, request.major, request.minor)
        and (request.access & mask) == request.access
    )


def policy_allows(policy: DevicePolicy, request: DeviceRequest) -> bool:
    """The verdict of a reduced policy: an exception that admits the request flips the default."""
    if any(_rule_admits(rule, request) for rule in policy.exceptions):
        return not policy.default_allow
    return policy.default_allow


def rules_allow(rules: Iterable[DeviceRule], request: DeviceRequest) -> bool:
    """What a runtime's ordered rule list decides for one request (runc semantics)."""
    return policy_allows(emulate(rules), request)


def assemble(rules: Iterable[DeviceRule]) -> tuple[Insn, ...]:
    """Compile an ordered rule list into a cgroup-device program the way runc does.

    Load the context into R2-R5, one block per exception returning the opposite of
    the default, then return the default. Like runc, the access check uses R1 as its
    scratch register: the context pointer is not needed once loaded.
    """
    policy = emulate(rules)
    default = 1 if policy.default_allow else 0
    return (
        *_load_context(),
        *_chain(policy.exceptions, 1 - default, scratch=1),
        _mov64_imm(0, default),
        _EXIT,
    )


# -- granting: a prefix of allow blocks in front of the original ------------------------


def prepend_grants(original: Sequence[Insn], grants: Sequence[DeviceRule]) -> tuple[Insn, ...]:
    """A program that allows ``grants`` and otherwise returns exactly what ``original`` does.

    The prefix reads the context into scratch registers R2-R9 (R1 stays the context
    pointer: the verifier guarantees the original reads nothing else before writing
    it, so what the prefix leaves there is never seen) and ends by jumping to the
    original's first instruction; every prefix jump stays inside the prefix or lands
    exactly there. The original follows unchanged, so its relative jumps keep their
    meaning.

    Each grant is tested without branches (XOR the fields against the grant's values,
    OR the differences, one ``if == 0: allow``), so the verifier walks the prefix in
    linear time: 100 grants load in well under a millisecond, where runc-style blocks
    of one jump per field cost several times as much.
    """
    if not original:
        raise ProgramError("cannot prepend to an empty program")
    if not grants:
        return tuple(original)
    prefix = decode(_prefix_code(grants, len(original)))
    return (*prefix, *original)


def prepend_code(original: bytes, grants: Sequence[DeviceRule]) -> bytes:
    """:func:`prepend_grants` on encoded programs: what the effector loads, built fast
    (each grant's encoded test is cached, only the jumps are packed per call)."""
    if not original or len(original) % _INSN.size:
        raise ProgramError(f"original of {len(original)} bytes is not whole instructions")
    if not grants:
        return original
    return _prefix_code(grants, len(original) // _INSN.size) + original


def _prefix_code(grants: Sequence[DeviceRule], original_len: int) -> bytes:
    for grant in grants:
        if not grant.allow:
            raise ProgramError(f"grant {grant.render()!r} is a deny rule")
        _check_number(grant)
    body = _grant_prefix_code(grants)
    prefix_len = _PREFIX_HEADER + len(body) // _INSN.size
    if prefix_len + original_len > MAX_INSNS:
        raise ProgramError(
            f"program of {prefix_len + original_len} instructions exceeds {MAX_INSNS}"
        )
    return encode([_mov64_imm(0, PREFIX_MAGIC), _mov64_imm(0, prefix_len)]) + body


# Registers of the prefix: R2-R5 the context fields (as runc loads them), R8 the 64-bit
# key major << 32 | minor, R9 a group's type/access mismatch, R6/R7 temporaries.
_ALL_ACCESS = DEVCG_ACC_READ | DEVCG_ACC_WRITE | DEVCG_ACC_MKNOD
_JEQ_K = BPF_JMP | BPF_K | BPF_JEQ


def _alu64_reg(operation: int, dst: int, src: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_X | operation, dst, src)


def _s32(value: int) -> int:
    """A u32 as the signed imm field holds it (32-bit ALU ops use the low 32 bits)."""
    return value - (1 << 32) if value > 0x7FFF_FFFF else value


@functools.lru_cache(maxsize=256)
def _group_preamble(kind: DeviceType, mask: int) -> bytes:
    """R9 = (type differs) | (requested access outside mask); zero means both fit."""
    code: list[Insn] = []
    if kind is not DeviceType.ALL:
        code += [_mov32_reg(9, 2), _alu32_imm(BPF_XOR, 9, _TYPE_CODE[kind])]
    if mask != _ALL_ACCESS:
        target = 7 if code else 9
        code += [_mov32_reg(target, 3), _alu32_imm(BPF_AND, target, ~mask & 0xFFFF)]
        if target == 7:
            code.append(_alu64_reg(BPF_OR, 9, 7))
    return encode(code or [_mov64_imm(9, 0)])


@functools.lru_cache(maxsize=4096)
def _grant_test(grant: DeviceRule) -> tuple[bytes, int]:
    """A grant's test up to its jump: the code, and the register that is zero on a match."""
    if grant.major is not None and grant.minor is not None:
        code = [
            Insn(LD_IMM64, 6, 0, 0, _s32(grant.minor)),
            Insn(0, 0, 0, 0, _s32(grant.major)),
            _alu64_reg(BPF_XOR, 6, 8),
            _alu64_reg(BPF_OR, 6, 9),
        ]
    elif grant.major is not None or grant.minor is not None:
        register, value = (4, grant.major) if grant.major is not None else (5, grant.minor)
        assert value is not None
        code = [
            _mov32_reg(6, register),
            _alu32_imm(BPF_XOR, 6, _s32(value)),
            _alu64_reg(BPF_OR, 6, 9),
        ]
    else:
        return b"", 9
    return encode(code), 6


_PREFIX_START = encode(
    [
        *_load_context(),
        Insn(BPF_ALU64 | BPF_X | BPF_MOV, 8, 4),
        Insn(BPF_ALU64 | BPF_K | BPF_LSH, 8, 0, 0, 32),
        _alu64_reg(BPF_OR, 8, 5),
    ]
)
_PREFIX_END = encode([Insn(BPF_JMP | BPF_JA, off=2), _mov64_imm(0, 1), _EXIT])


def _grant_prefix_code(grants: Sequence[DeviceRule]) -> bytes:
    """Loads and R8, then per (type, access) group its preamble and one test per grant
    (``if zero goto allow``), then ``goto original`` and the shared ``return 1``."""
    groups: dict[tuple[DeviceType, int], list[DeviceRule]] = {}
    for grant in grants:
        groups.setdefault((grant.type, access_mask(grant.access)), []).append(grant)
    # (code, register to test or None for a preamble); the jumps are packed below.
    pieces: list[tuple[bytes, int | None]] = []
    for (kind, mask), members in groups.items():
        pieces.append((_group_preamble(kind, mask), None))
        pieces += [_grant_test(grant) for grant in members]
    size = _INSN.size
    pos = len(_PREFIX_START) // size
    allow_at = pos + sum(len(code) // size + (reg is not None) for code, reg in pieces) + 1
    out = [_PREFIX_START]
    for code, reg in pieces:
        out.append(code)
        pos += len(code) // size
        if reg is not None:
            out.append(_INSN.pack(_JEQ_K, reg, allow_at - pos - 1, 0))
            pos += 1
    out.append(_PREFIX_END)
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class Prepended:
    """A program :func:`prepend_grants` made: the grants it holds (grouped by type and
    access, so not necessarily in the order given) and the original."""

    grants: tuple[DeviceRule, ...]
    original: tuple[Insn, ...]


def split_prepended(program: Sequence[Insn]) -> Prepended | None:
    """Recognise a program built by :func:`prepend_grants`; None for anything else.

    The grants are read from the prefix, and the prefix is then rebuilt from them and
    compared: only an exact match counts, so nothing else is ever taken for ours.
    """
    if len(program) < _PREFIX_HEADER or program[0] != _mov64_imm(0, PREFIX_MAGIC):
        return None
    second = program[1]
    if second != _mov64_imm(0, second.imm):  # every field, not just op and dst
        return None
    prefix_len = second.imm
    if not _PREFIX_HEADER < prefix_len < len(program):
        return None
    body = tuple(program[_PREFIX_HEADER:prefix_len])
    grants = _read_grants(body)
    if grants is None or _grant_prefix_code(grants) != encode(body):
        return None
    return Prepended(grants, tuple(program[prefix_len:]))


def _read_grants(body: Sequence[Insn]) -> tuple[DeviceRule, ...] | None:
    """The grants a prefix body tests, in order; None if it is not shaped like one."""
    codes = {code: kind for kind, code in _TYPE_CODE.items()}
    pos = len(_load_context()) + 3
    kind, mask = DeviceType.ALL, _ALL_ACCESS
    grants: list[DeviceRule] = []
    end = len(body) - 3
    while pos < end:
        insn = body[pos]
        if insn.dst == 9 and insn.op != BPF_JMP | BPF_K | BPF_JEQ:
            # A group preamble: the next grants share its type and access.
            kind, mask = DeviceType.ALL, _ALL_ACCESS
            start = pos
            while pos < end and body[pos].dst in (7, 9) and body[pos].cls != BPF_JMP:
                step = body[pos]
                if step.op == BPF_ALU | BPF_K | BPF_XOR and step.imm in codes:
                    kind = codes[step.imm]
                elif step.op == BPF_ALU | BPF_K | BPF_AND:
                    mask = ~step.imm & _ALL_ACCESS
                pos += 1
            if pos == start:  # a jump on r9 that is not ours: without this, no progress
                return None
            continue
        access = Access(
            bool(mask & DEVCG_ACC_READ), bool(mask & DEVCG_ACC_WRITE), bool(mask & DEVCG_ACC_MKNOD)
        )
        if insn.op == LD_IMM64 and pos + 1 < end:
            minor, major = insn.imm & _U32, body[pos + 1].imm & _U32
            grants.append(DeviceRule(kind, major, minor, access))
            pos += 5
        elif insn == _mov32_reg(6, 4) and pos + 1 < end:
            grants.append(DeviceRule(kind, body[pos + 1].imm & _U32, None, access))
            pos += 4
        elif insn == _mov32_reg(6, 5) and pos + 1 < end:
            grants.append(DeviceRule(kind, None, body[pos + 1].imm & _U32, access))
            pos += 4
        elif insn.op == BPF_JMP | BPF_K | BPF_JEQ and insn.dst == 9:
            grants.append(DeviceRule(kind, None, None, access))
            pos += 1
        else:
            return None
    return tuple(grants)


# -- what can be loaded again as read back -----------------------------------------------

_ALU_OPS = frozenset(
    {BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD,
     BPF_XOR, BPF_MOV, BPF_ARSH, BPF_END}
)  # fmt: skip
_COND_JUMPS = frozenset(
    {BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE, BPF_JSGT, BPF_JSGE, BPF_JLT, BPF_JLE,
     BPF_JSLT, BPF_JSLE}
)  # fmt: skip


def check_replayable(program: Sequence[Insn]) -> str | None:
    """Why read-back instructions cannot be loaded again unchanged; None if they can.

    The kernel's read-back ("xlated") form of a helper call holds a resolved address,
    not the helper id, and map references become ids: such programs must be rebuilt
    from the runtime's rules instead. Stores and atomics are refused too, since no
    device program needs them and the interpreter does not model a stack.
    """
    if not program:
        return "the program is empty"
    if len(program) > MAX_INSNS:
        return f"{len(program)} instructions exceed {MAX_INSNS}"
    pos = 0
    while pos < len(program):
        insn = program[pos]
        where = f"instruction {pos} ({insn})"
        if insn.dst > 10 or insn.src > 10:  # before LD_IMM64's early continue, too
            return f"{where} names a register beyond r10"
        if insn.op == LD_IMM64:
            if insn.src != 0:
                return f"{where} references a map or other kernel object"
            if pos + 1 >= len(program) or program[pos + 1].op != 0:
                return f"{where} is a truncated 16-byte load"
            pos += 2
            continue
        cls = insn.cls
        if cls in (BPF_ALU, BPF_ALU64):
            if insn.op & 0xF0 not in _ALU_OPS:
                return f"{where} is not a known ALU operation"
        elif cls == BPF_LDX:
            if insn.op & 0xE0 != BPF_MEM:
                return f"{where} is not a plain memory load"
        elif cls in (BPF_JMP, BPF_JMP32):
            operation = insn.op & 0xF0
            if operation == BPF_CALL:
                return f"{where} calls a helper or subprogram"
            if operation == BPF_EXIT:
                pass
            elif operation == BPF_JA or operation in _COND_JUMPS:
                target = pos + 1 + (insn.imm if cls == BPF_JMP32 and operation == BPF_JA
                                    else insn.off)  # fmt: skip
                if not 0 <= target < len(program):
                    return f"{where} jumps outside the program (to {target})"
            else:
                return f"{where} is not a known jump"
        else:
            return f"{where} is a store, atomic or legacy packet load"
        pos += 1
    last = program[-1]
    if not (last.op == BPF_JMP | BPF_EXIT or (last.cls == BPF_JMP and last.op & 0xF0 == BPF_JA)):
        return "control can fall off the end of the program"
    return None


# -- the interpreter ------------------------------------------------------------------

# R1 holds the context as a fake address; loads subtract it and read the 12-byte ctx.
_CTX_BASE = 0x7F00_0000_0000


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _alu(operation: int, dst: int, src: int, bits: int, insn: Insn) -> int:
    mask = (1 << bits) - 1
    dst &= mask
    src &= mask
    if operation == BPF_ADD:
        return (dst + src) & mask
    if operation == BPF_SUB:
        return (dst - src) & mask
    if operation == BPF_MUL:
        return (dst * src) & mask
    if operation == BPF_DIV:
        if insn.off == 1:  # signed division (cpu v4)
            return 0 if src == 0 else int(_signed(dst, bits) / _signed(src, bits)) & mask
        return 0 if src == 0 else dst // src
    if operation == BPF_MOD:
        if src == 0:
            return dst
        if insn.off == 1:
            a, b = _signed(dst, bits), _signed(src, bits)
            return (a - b * int(a / b)) & mask
        return dst % src
    if operation == BPF_OR:
        return dst | src
    if operation == BPF_AND:
        return dst & src
    if operation == BPF_XOR:
        return dst ^ src
    if operation == BPF_LSH:
        return (dst << (src & (bits - 1))) & mask
    if operation == BPF_RSH:
        return dst >> (src & (bits - 1))
    if operation == BPF_ARSH:
        return (_signed(dst, bits) >> (src & (bits - 1))) & mask
    if operation == BPF_NEG:
        return (-dst) & mask
    if operation == BPF_MOV:
        if insn.op & BPF_X and insn.off in (8, 16, 32):  # movsx (cpu v4)
            return _signed(src, insn.off) & mask
        return src
    raise InterpreterError(f"unsupported ALU instruction {insn}")


def _compare(operation: int, a: int, b: int, bits: int) -> bool:
    mask = (1 << bits) - 1
    a &= mask
    b &= mask
    sa, sb = _signed(a, bits), _signed(b, bits)
    table = {
        BPF_JEQ: a == b,
        BPF_JNE: a != b,
        BPF_JGT: a > b,
        BPF_JGE: a >= b,
        BPF_JLT: a < b,
        BPF_JLE: a <= b,
        BPF_JSET: bool(a & b),
        BPF_JSGT: sa > sb,
        BPF_JSGE: sa >= sb,
        BPF_JSLT: sa < sb,
        BPF_JSLE: sa <= sb,
    }
    if operation not in table:
        raise InterpreterError(f"unsupported jump operation {operation:#x}")
    return table[operation]


def run(program: Sequence[Insn], context: bytes, *, max_steps: int = 1_000_000) -> int:
    """Run a cgroup-device program on a 12-byte context and return R0 (u64).

    Covers ALU/ALU64 with immediate and register operands, JA, conditional JMP/JMP32,
    LDX of B/H/W/DW from the context, LD_IMM64 constants and EXIT. Anything else (or
    reading an uninitialised register, or outside the context) raises InterpreterError,
    which is also what the verifier would refuse.
    """
    if len(context) != _CTX_SIZE:
        raise InterpreterError(f"context must be {_CTX_SIZE} bytes, not {len(context)}")
    regs: list[int | None] = [None] * 11
    regs[1] = _CTX_BASE
    pc = 0
    for _ in range(max_steps):
        if not 0 <= pc < len(program):
            raise InterpreterError(f"fell off the program at {pc}")
        insn = program[pc]
        cls = insn.cls
        operation = insn.op & 0xF0
        if insn.dst > 10 or insn.src > 10:
            raise InterpreterError(f"instruction {pc}: register beyond r10 in {insn}")

        def reg(number: int, *, at: int = pc) -> int:
            value = regs[number]
            if value is None:
                raise InterpreterError(f"instruction {at} reads uninitialised r{number}")
            return value

        if insn.op == LD_IMM64:
            if insn.src != 0 or pc + 1 >= len(program):
                raise InterpreterError(f"instruction {pc}: unsupported 16-byte load {insn}")
            regs[insn.dst] = (insn.imm & _U32) | ((program[pc + 1].imm & _U32) << 32)
            pc += 2
            continue
        if cls in (BPF_ALU, BPF_ALU64):
            bits = 64 if cls == BPF_ALU64 else 32
            if operation == BPF_END:
                raise InterpreterError(f"instruction {pc}: byte swap not supported")
            if operation == BPF_MOV:
                dst_value = 0
            elif operation == BPF_NEG:
                dst_value = reg(insn.dst)
            else:
                dst_value = reg(insn.dst)
            if insn.op & BPF_X:
                src_value = reg(insn.src)
            else:
                src_value = insn.imm & (_U64 if bits == 64 else _U32)
            regs[insn.dst] = _alu(operation, dst_value, src_value, bits, insn)
            pc += 1
            continue
        if cls == BPF_LDX:
            if insn.op & 0xE0 != BPF_MEM:
                raise InterpreterError(f"instruction {pc}: unsupported load {insn}")
            size = {BPF_W: 4, BPF_H: 2, BPF_B: 1, BPF_DW: 8}[insn.op & 0x18]
            address = reg(insn.src) + insn.off - _CTX_BASE
            if not 0 <= address <= _CTX_SIZE - size:
                raise InterpreterError(f"instruction {pc}: load outside the context")
            regs[insn.dst] = int.from_bytes(context[address : address + size], "little")
            pc += 1
            continue
        if cls in (BPF_JMP, BPF_JMP32):
            if operation == BPF_EXIT:
                return reg(0)
            if operation == BPF_CALL:
                raise InterpreterError(f"instruction {pc}: calls are not supported")
            if operation == BPF_JA:
                pc += 1 + (insn.imm if cls == BPF_JMP32 else insn.off)
                continue
            bits = 64 if cls == BPF_JMP else 32
            b = reg(insn.src) if insn.op & BPF_X else insn.imm & _U64
            taken = _compare(operation, reg(insn.dst), b, bits)
            pc += 1 + (insn.off if taken else 0)
            continue
        raise InterpreterError(f"instruction {pc}: unsupported {insn}")
    raise InterpreterError(f"no exit within {max_steps} steps")


def verdict(program: Sequence[Insn], request: DeviceRequest) -> bool:
    """Does the program allow this request? (any non-zero return allows)."""
    return run(program, request.context()) != 0
