"""Rule errors: every problem names a file, a line and what was expected there."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from hotrelay.errors import HotrelayError

if TYPE_CHECKING:
    from hotrelay.core.rules.model import Source

__all__ = ["RuleError", "RuleSetError"]


class RuleError(HotrelayError):
    """One problem in a rule file, printed as ``path:line: message``.

    ``line`` is None for problems with the whole file (unreadable, unsafe permissions),
    which print as ``path: message``.
    """

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(path, line, message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuleError):
            return NotImplemented
        return (self.path, self.line, self.message) == (other.path, other.line, other.message)

    def __hash__(self) -> int:
        return hash((self.path, self.line, self.message))


class RuleSetError(HotrelayError):
    """Every problem found while loading a rule set; loading is all or nothing.

    ``declared`` lists the ``(name, source)`` of every rule that had a valid name, so a
    rule set combining files can report duplicate names across them even for files
    that failed.
    """

    def __init__(
        self, errors: Iterable[RuleError], declared: Iterable[tuple[str, Source]] = ()
    ) -> None:
        self.errors = tuple(errors)
        self.declared = tuple(declared)
        if not self.errors:
            raise ValueError("RuleSetError needs at least one error")
        super().__init__(*self.errors)

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)
