"""Files the gateway reads again when they change: the auth file and the JWKS file.

A Kubernetes Secret or ConfigMap volume replaces a file by swapping a symlink, an editor by
renaming over it: what changes is the mtime, the size or the inode, and the gateway notices
within `CHECK_INTERVAL` of any of them, on calls, with no thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

CHECK_INTERVAL = 1.0
"""Seconds between looks at a file's mtime, size and inode."""

Signature = tuple[int, int, int, int]


def signature(path: Path) -> Signature:
    """What changes when `path` is rewritten or replaced; OSError if it cannot be looked at."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev


class WatchedFile(Generic[T]):
    """What `load` makes of a file, read again when the file changes.

    `load` raises OSError (with a message naming the file and what is wrong) for a file it
    cannot use: at construction that is the caller's error; later, a change that does not
    load (a typo, a file caught half-written) leaves what was read before in force, with one
    warning per version of the file.
    """

    def __init__(
        self,
        path: Path,
        load: Callable[[Path], T],
        *,
        what: str,
        describe: Callable[[T], str],
        interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`what` names the contents in warnings ("principals"); `describe` says what a
        version holds, for the log line of a change."""
        self.path = path
        self._load = load
        self._what = what
        self._describe = describe
        self._interval = interval
        self._clock = clock
        try:
            self._seen: Signature | None = signature(path)
        except OSError:
            self._seen = None  # load() says why
        self.value = load(path)
        self._next_look = clock() + interval

    def current(self) -> T:
        """The contents, looking at the file first if `interval` has passed."""
        now = self._clock()
        if now >= self._next_look:
            self._next_look = now + self._interval
            self._look()
        return self.value

    def _look(self) -> None:
        try:
            seen: Signature | None = signature(self.path)
        except OSError as e:
            seen = None
            if self._seen is not None:
                log.warning(
                    "cannot read %s (%s); the %s read before stay in force",
                    self.path,
                    e.strerror or e,
                    self._what,
                )
        if seen is None or seen == self._seen:
            self._seen = seen
            return
        self._seen = seen
        try:
            self.value = self._load(self.path)
        except OSError as e:
            log.warning("%s; the %s read before stay in force", e, self._what)
            return
        log.info("%s (the file changed)", self._describe(self.value))
