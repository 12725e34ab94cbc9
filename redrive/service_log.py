"""A service's log under `redrive up`: ``DATA_DIR/logs/<service>.log``, rotated by size into
``<service>.log.1`` … ``.N`` by the stdlib's RotatingFileHandler, fed with the lines each
start of the service writes to its pipe."""

from __future__ import annotations

import collections
import logging
import threading
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import BinaryIO

# Output without a newline is cut into lines this long: a copier must not hold a service's
# output in memory while it waits for a newline.
LONGEST_LINE = 64 * 1024
# The last lines of a start kept in memory, to say why it stopped.
TAIL_LINES = 100


class ServiceLog:
    """One service's log file, rotated by size, shared by the service's successive starts:
    a restarted service appends to it. Each line goes whole into one file."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        # Bytes that are not UTF-8 pass through as surrogates and are written back unchanged.
        self._file = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8",
                                         errors="surrogateescape")

    def follow(self, pipe: BinaryIO, name: str) -> Output:
        """Copy ``pipe`` (one start's stdout and stderr) into the log until it ends."""
        return Output(pipe, self._file, name)

    def close(self) -> None:
        self._file.close()


class Output:
    """One start's output, copied on a thread of its own: a service that writes a lot waits
    for the disk only, never for the supervisor (which sleeps between restarts). ``tail``
    holds its last lines."""

    def __init__(self, pipe: BinaryIO, file: logging.Handler, name: str) -> None:
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._thread = threading.Thread(target=self._copy, args=(pipe, file), name=f"log-{name}", daemon=True)
        self._thread.start()

    def _copy(self, pipe: BinaryIO, file: logging.Handler) -> None:
        with pipe:
            # readline returns what is left at the end even without a newline: a service's last
            # words before it died are written too.
            while line := pipe.readline(LONGEST_LINE):
                text = line.decode("utf-8", "surrogateescape").removesuffix("\n")
                self.tail.append(text)
                # handle() writes under the handler's lock (an earlier start's output may still be
                # copied by another thread) and reports a failed write on stderr without raising.
                file.handle(logging.makeLogRecord({"msg": text}))

    def wait(self, timeout: float) -> bool:
        """Wait until the output ended and is all in the log; False after ``timeout`` (a process
        the service left behind still holds its pipe)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
