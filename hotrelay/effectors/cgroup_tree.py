"""Walking a container's cgroup tree, with a bound for the periodic heal pass.

A container owns the cgroups below its own and may make as many as it likes. A grant
or a revoke walks the whole tree once (it must reach every cgroup the container's
processes may be in); the heal pass, which runs every few seconds for every
container, looks at no more than ``HEAL_TREE_LIMIT`` cgroups of each tree, parents
first, so that 2,000 empty child cgroups cost it no more than 64 do.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path

__all__ = ["HEAL_TREE_LIMIT", "heal_tree", "walk_tree"]

HEAL_TREE_LIMIT = 64

log = logging.getLogger("hotrelay.effectors.cgroups")
_warned: set[Path] = set()


def walk_tree(top: Path, *, limit: int | None = None) -> tuple[list[Path], bool]:
    """(the cgroup and the cgroups below it, breadth first; whether ``limit`` cut it).

    A directory removed while we walk is skipped; ``top`` missing gives ``[]``.
    """
    if not top.is_dir():
        return [], False
    found = [top]
    queue = deque([top])
    while queue:
        parent = queue.popleft()
        try:
            with os.scandir(parent) as entries:
                children = sorted(
                    Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)
                )
        except (FileNotFoundError, NotADirectoryError):
            continue
        for child in children:
            if limit is not None and len(found) >= limit:
                return found, True
            found.append(child)
            queue.append(child)
    return found, False


def heal_tree(top: Path) -> list[Path]:
    """The part of a container's tree the heal pass checks (said once when it is cut)."""
    tree, cut = walk_tree(top, limit=HEAL_TREE_LIMIT)
    if cut and top not in _warned:
        _warned.add(top)
        log.warning(
            "cgroup %s has more than %d cgroups in its tree; the heal pass checks the "
            "first %d (parents first)",
            top,
            HEAL_TREE_LIMIT,
            HEAL_TREE_LIMIT,
        )
    elif not cut:
        _warned.discard(top)
    return tree
