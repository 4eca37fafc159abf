"""cgroup-device programs without a kernel: assembly, prepending, decoding, interpreting.

The central property: for random rule sets and random devices, the program with
grants prepended answers "allowed" exactly when a grant admits the request, and
otherwise returns *exactly* what the original program returns.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from hotrelay.core import bpf_program as bp
from hotrelay.core.bpf_program import DeviceRequest, Insn
from hotrelay.core.device_access import Access, DeviceRule, DeviceType
from hotrelay.testing.sandbox import OCI_DEFAULT_RULES

# Small number ranges so rules and requests collide often; plus u32 edge values, where
# a 64-bit compare against a sign-extended immediate would go wrong.
EDGE_NUMBERS = (0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF)
numbers = st.one_of(st.integers(0, 6), st.sampled_from(EDGE_NUMBERS))
accesses = st.builds(Access, st.booleans(), st.booleans(), st.booleans()).filter(
    lambda a: a.read or a.write or a.mknod
)
rules = st.builds(
    DeviceRule,
    st.sampled_from([DeviceType.BLOCK, DeviceType.CHAR, DeviceType.CHAR, DeviceType.ALL]),
    st.one_of(st.none(), numbers),
    st.one_of(st.none(), numbers),
    accesses,
    st.booleans(),
)
allow_rules = rules.map(lambda r: DeviceRule(r.type, r.major, r.minor, r.access, True))
requests = st.builds(
    DeviceRequest,
    st.sampled_from([DeviceType.BLOCK, DeviceType.CHAR]),
    numbers,
    numbers,
    st.integers(1, 7),
)


R, W, M = bp.DEVCG_ACC_READ, bp.DEVCG_ACC_WRITE, bp.DEVCG_ACC_MKNOD


def req(line: str, access: int) -> DeviceRequest:
    kind, numbers_ = line.split()
    major, minor = numbers_.split(":")
    return DeviceRequest(DeviceType(kind), int(major), int(minor), access)


# -- an independent model of cgroup v1, to check runc-style assembly against -----------


def v1_model(rule_list: list[DeviceRule], request: DeviceRequest) -> bool:
    """cgroup v1's exception bookkeeping written out naively (no wildcard-hole check),
    with runc's match: one exception must cover all the requested access."""
    default_allow = False
    exceptions: dict[tuple[DeviceType, int | None, int | None], set[str]] = {}
    for rule in rule_list:
        if rule.type is DeviceType.ALL:
            default_allow, exceptions = rule.allow, {}
            continue
        key = (rule.type, rule.major, rule.minor)
        bits = set(str(rule.access))
        if rule.allow != default_allow:
            exceptions.setdefault(key, set()).update(bits)
        elif key in exceptions:
            exceptions[key] -= bits
            if not exceptions[key]:
                del exceptions[key]
    wanted = {c for c, bit in (("r", R), ("w", W), ("m", M)) if request.access & bit}
    for (kind, major, minor), bits in exceptions.items():
        if (
            kind is request.kind
            and major in (None, request.major)
            and minor in (None, request.minor)
            and wanted <= bits
        ):
            return not default_allow
    return default_allow


def _assembles(rule_list: list[DeviceRule]) -> bool:
    try:
        bp.emulate(rule_list)
    except bp.ProgramError as exc:
        if "hole" not in str(exc):
            raise
        return False
    return True


# -- encode / decode ---------------------------------------------------------------------

insns = st.builds(
    Insn,
    st.integers(0, 0xFF),
    st.integers(0, 0xF),
    st.integers(0, 0xF),
    st.integers(-0x8000, 0x7FFF),
    st.integers(-0x8000_0000, 0x7FFF_FFFF),
)


@given(st.lists(insns, max_size=50))
def test_decode_inverts_encode(program: list[Insn]) -> None:
    assert bp.decode(bp.encode(program)) == tuple(program)


@given(st.binary(max_size=400).map(lambda b: b[: len(b) - len(b) % 8]))
def test_encode_inverts_decode(raw: bytes) -> None:
    assert bp.encode(bp.decode(raw)) == raw


def test_encoding_is_the_kernel_struct() -> None:
    insn = Insn(0x55, dst=2, src=3, off=-2, imm=-1)
    assert bp.encode([insn]) == struct.pack("<BBhi", 0x55, 0x32, -2, -1)
    with pytest.raises(bp.ProgramError, match="whole number"):
        bp.decode(b"\0" * 9)
    with pytest.raises(bp.ProgramError, match="out of range"):
        Insn(0x100)


# -- assembling the runtime's program ------------------------------------------------------


def test_runc_like_default_program() -> None:
    program = bp.assemble(OCI_DEFAULT_RULES)
    assert bp.check_replayable(program) is None
    assert bp.verdict(program, req("c 1:3", R | W))  # /dev/null
    assert bp.verdict(program, req("c 136:7", R | W))  # a pts
    assert not bp.verdict(program, req("c 1:11", R))  # /dev/kmsg
    assert not bp.verdict(program, req("b 253:0", R))  # zram: no access...
    assert bp.verdict(program, req("b 253:0", M))  # ...but mknod is allowed
    assert not bp.verdict(program, req("b 253:0", R | M))  # one rule must cover all


def test_emulation_refuses_to_punch_holes_in_wildcards() -> None:
    with pytest.raises(bp.ProgramError, match="hole"):
        bp.emulate([DeviceRule.parse("a", allow=False), DeviceRule.parse("c 1:* rw"),
                    DeviceRule.parse("c 1:3 r", allow=False)])  # fmt: skip


def test_a_rule_resets_and_later_rules_win() -> None:
    rule_list = [DeviceRule.parse("c 1:3 rwm"), DeviceRule.parse("a")]
    assert bp.emulate(rule_list) == bp.DevicePolicy(True, ())
    blacklist = [DeviceRule.parse("a"), DeviceRule.parse("c 1:3 w", allow=False)]
    program = bp.assemble(blacklist)
    assert bp.verdict(program, req("c 1:3", R))
    assert not bp.verdict(program, req("c 1:3", W))
    # runc's blocks match when the request is a subset of the rule's access, in both
    # modes; v1 itself denies on any overlap in allow-all mode. We rebuild what runc
    # would have attached, so we keep its answer.
    assert bp.verdict(program, req("c 1:3", R | W))
    assert bp.verdict(program, req("b 8:0", R | W | M))


@settings(max_examples=300)
@given(st.lists(rules, max_size=8), st.lists(requests, min_size=1, max_size=20))
@example([DeviceRule.parse("a", allow=False), DeviceRule.parse("b 2147483648:* r")],
         [DeviceRequest(DeviceType.BLOCK, 0x8000_0000, 4, R)])  # fmt: skip
def test_assembled_program_follows_the_rule_list(
    rule_list: list[DeviceRule], sample: list[DeviceRequest]
) -> None:
    assume(_assembles(rule_list))  # runc refuses the others too (a hole in a wildcard)
    program = bp.assemble(rule_list)
    assert bp.check_replayable(program) is None
    for request in sample:
        expected = v1_model(rule_list, request)
        assert bp.rules_allow(rule_list, request) == expected, request
        assert bp.verdict(program, request) == expected, request


# -- prepending grants ---------------------------------------------------------------------

# Originals that are not runc's shape: narrow loads, the context copied to another
# register, JMP32, JA, a non-boolean return value, constant programs.
HAND_MADE = {
    "allow-all": (Insn(0xB7, 0, imm=1), Insn(0x95)),
    "deny-all": (Insn(0xB7, 0, imm=0), Insn(0x95)),
    "returns-major": (Insn(0x61, 0, 1, 4), Insn(0x95)),
    "narrow-and-ja": (
        Insn(0xBF, 7, 1),  # r7 = r1
        Insn(0x69, 2, 7, 0),  # r2 = *(u16 *)(r7 + 0): the type
        Insn(0x71, 3, 7, 2),  # r3 = *(u8 *)(r7 + 2): the access bits
        Insn(0x56, 2, 0, 3, 1),  # if w2 != 1 (block) goto deny (JMP32)
        Insn(0x45, 3, 0, 2, bp.DEVCG_ACC_WRITE),  # if r3 & WRITE goto deny
        Insn(0xB7, 0, imm=1),
        Insn(0x05, off=1),  # goto out
        Insn(0xB7, 0, imm=0),  # deny:
        Insn(0x95),  # out:
    ),
    "ld-imm64": (
        Insn(0x18, 6, imm=5),
        Insn(0x00, imm=0),  # r6 = 5 (16-byte load)
        Insn(0x61, 5, 1, 8),
        Insn(0x5D, 5, 6, 2),  # if r5 != r6 goto deny
        Insn(0xB7, 0, imm=1),
        Insn(0x95),
        Insn(0xB7, 0, imm=0),
        Insn(0x95),
    ),
}
originals = st.one_of(
    st.lists(rules, max_size=6).map(
        lambda rs: bp.assemble(rs) if _assembles(rs) else HAND_MADE["deny-all"]
    ),
    st.sampled_from([HAND_MADE[name] for name in sorted(HAND_MADE)]),
)


def _admitted(grants: list[DeviceRule], request: DeviceRequest) -> bool:
    mask = request.access
    return any(
        g.matches(request.kind, request.major, request.minor)
        and mask & bp.access_mask(g.access) == mask
        for g in grants
    )


@settings(max_examples=300)
@given(originals, st.lists(allow_rules, max_size=6), st.lists(requests, min_size=1, max_size=20))
def test_prepended_program_is_granted_or_original(
    original: tuple[Insn, ...], grants: list[DeviceRule], sample: list[DeviceRequest]
) -> None:
    program = bp.prepend_grants(original, grants)
    assert bp.check_replayable(program) is None
    for request in sample:
        got = bp.run(program, request.context())
        if _admitted(grants, request):
            assert got == 1, request
        else:
            assert got == bp.run(original, request.context()), request


@given(originals, st.lists(allow_rules, min_size=1, max_size=6))
def test_prefix_keeps_r1_and_the_original_intact(
    original: tuple[Insn, ...], grants: list[DeviceRule]
) -> None:
    program = bp.prepend_grants(original, grants)
    start = len(program) - len(original)
    assert program[start:] == original
    for pos, insn in enumerate(program[:start]):
        # Nothing in the prefix writes R1...
        assert not (insn.cls in (0x04, 0x07, 0x01) and insn.dst == 1), (pos, insn)
        # ...and every jump stays in it or lands on the original's first instruction.
        if insn.is_jump:
            assert 0 <= pos + 1 + insn.off <= start, (pos, insn)
    split = bp.split_prepended(program)
    assert split is not None
    assert split.original == original
    assert sorted(g.render() for g in split.grants) == sorted(g.render() for g in grants)


def test_split_ignores_foreign_programs() -> None:
    assert bp.split_prepended(bp.assemble(OCI_DEFAULT_RULES)) is None
    assert bp.split_prepended(HAND_MADE["deny-all"]) is None
    assert bp.prepend_grants(HAND_MADE["deny-all"], []) == HAND_MADE["deny-all"]
    with pytest.raises(bp.ProgramError, match="deny"):
        bp.prepend_grants(HAND_MADE["deny-all"], [DeviceRule.parse("c 1:3 r", allow=False)])


def test_grant_on_top_of_runc_program() -> None:
    original = bp.assemble(OCI_DEFAULT_RULES)
    zram = DeviceRule.parse("b 253:0 rw")
    program = bp.prepend_grants(original, [zram])
    assert bp.verdict(program, req("b 253:0", R | W))
    assert not bp.verdict(program, req("b 253:0", R | W | M))  # m: only via "b *:* m"
    assert bp.verdict(program, req("b 253:0", M))
    assert not bp.verdict(program, req("b 253:1", R))
    assert not bp.verdict(program, req("c 1:11", R))
    assert bp.verdict(program, req("c 1:3", R | W))


# -- replayability -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("program", "reason"),
    [
        ((), "empty"),
        ((Insn(0x85, imm=1), Insn(0x95)), "calls"),
        ((Insn(0x18, 1, 1, imm=3), Insn(0), Insn(0x95)), "map"),
        ((Insn(0x18, 1, 0, imm=3),), "truncated"),
        ((Insn(0x63, 10, 1, -4), Insn(0x95)), "store"),
        ((Insn(0x05, off=5), Insn(0x95)), "outside"),
        ((Insn(0xB7, 0, imm=1),), "fall off"),
        ((Insn(0xB7, 11, imm=1), Insn(0x95)), "beyond r10"),
    ],
)
def test_check_replayable_refuses(program: tuple[Insn, ...], reason: str) -> None:
    found = bp.check_replayable(program)
    assert found is not None
    assert reason in found


# -- the interpreter -----------------------------------------------------------------------


def _eval(*program: Insn) -> int:
    return bp.run(program, req("c 1:3", R).context())


def test_interpreter_alu_semantics() -> None:
    mov64, mov32, exit_ = 0xB7, 0xB4, Insn(0x95)
    # 64-bit immediates are sign-extended; 32-bit results are zero-extended.
    assert _eval(Insn(mov64, 0, imm=-1), exit_) == 2**64 - 1
    assert _eval(Insn(mov32, 0, imm=-1), exit_) == 2**32 - 1
    assert _eval(Insn(mov64, 0, imm=-1), Insn(0x04, 0, imm=1), exit_) == 0  # w0 += 1
    assert _eval(Insn(mov64, 0, imm=7), Insn(0x37, 0, imm=0), exit_) == 0  # r0 /= 0
    assert _eval(Insn(mov64, 0, imm=7), Insn(0x97, 0, imm=0), exit_) == 7  # r0 %= 0
    assert _eval(Insn(mov64, 0, imm=-8), Insn(0xC7, 0, imm=1), exit_) == 2**64 - 4  # arsh
    assert _eval(Insn(0x18, 0, imm=1), Insn(0, imm=2), exit_) == (2 << 32) | 1
    # Signed and 32-bit compares: -1 < 0 signed, > 0 unsigned.
    assert _eval(Insn(mov64, 2, imm=-1), Insn(0xC5, 2, 0, 2, 0),
                 Insn(mov64, 0, imm=0), exit_, Insn(mov64, 0, imm=1), exit_) == 1  # fmt: skip
    assert _eval(Insn(mov64, 2, imm=-1), Insn(0xA5, 2, 0, 2, 0),
                 Insn(mov64, 0, imm=0), exit_, Insn(mov64, 0, imm=1), exit_) == 0  # fmt: skip


def test_interpreter_refuses_what_the_verifier_would() -> None:
    with pytest.raises(bp.InterpreterError, match="uninitialised r0"):
        _eval(Insn(0x95))
    with pytest.raises(bp.InterpreterError, match="outside the context"):
        _eval(Insn(0x61, 0, 1, 12), Insn(0x95))
    with pytest.raises(bp.InterpreterError, match="calls"):
        _eval(Insn(0x85, imm=1), Insn(0x95))
    with pytest.raises(bp.InterpreterError, match="no exit"):
        bp.run((Insn(0x05, off=-1),), req("c 1:3", R).context(), max_steps=100)
