"""`redrive up`'s service logs: what a service writes reaches DATA_DIR/logs/<service>.log, rotated
at REDRIVE_LOG_MAX_MB into at most REDRIVE_LOG_BACKUPS older files, and nothing it wrote before
it exited is lost, across restarts. Real child processes (`python -c`) stand in for services."""

from __future__ import annotations

import os
import re
import sys
import time

from redrive.supervisor import Stack
from shared.settings import Settings

# 2,000 lines of 109 bytes (200 KB, far more than a pipe holds) in a burst, on stdout and stderr.
TALKER = """
import sys
for i in range(2000):
    (sys.stdout if i % 2 else sys.stderr).write(f"line {i:06d} {'x' * 90}\\n")
"""

# Its last line has no newline. The first time it dies at once (no flush at exit, no cleanup);
# the next, it runs until stopped.
DIES_ONCE = """
import os, sys, time
sys.stdout.write(f"started {os.getpid()}\\nerror: last words of {os.getpid()}")
sys.stdout.flush()
if not os.path.exists(sys.argv[1]):
    open(sys.argv[1], "w").close()
    os._exit(1)
time.sleep(60)
"""


def test_a_service_log_rotates_at_its_cap_and_keeps_only_the_configured_backups(tmp_path):
    stack = Stack(Settings(data_dir=tmp_path, log_max_mb=0.01, log_backups=2))  # 10,485 bytes a file
    try:
        child = stack.start_child("talker", [sys.executable, "-c", TALKER], dict(os.environ))
        child.proc.wait(timeout=20)  # never stuck on a full pipe: the supervisor copies it meanwhile
    finally:
        stack.stop()
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["talker.log", "talker.log.1", "talker.log.2"]
    files = [logs / "talker.log.2", logs / "talker.log.1", logs / "talker.log"]  # oldest first
    assert all(10_000 < f.stat().st_size <= 0.01 * 2**20 for f in files[:2]), [f.stat().st_size for f in files]
    kept = [line for f in files for line in f.read_text().splitlines()]
    numbers = [int(re.fullmatch(r"line (\d{6}) x{90}", line).group(1)) for line in kept]  # whole lines only
    assert numbers == list(range(2000 - len(numbers), 2000)), "the newest lines, each once, in order"


def test_a_restarted_service_appends_to_its_log_and_its_last_words_are_kept(tmp_path):
    stack = Stack(Settings(data_dir=tmp_path))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "svc.log").write_text("from an earlier `up`\n")
    try:
        child = stack.start_child("svc", [sys.executable, "-c", DIES_ONCE, str(tmp_path / "died")], dict(os.environ))
        first = child.proc.pid
        deadline = time.monotonic() + 20
        stack.watch(lambda: child.restarts == 1 or time.monotonic() > deadline)
        second = child.proc.pid
        while f"started {second}" not in child.output.tail and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stack.stop()  # SIGTERM: the second start's last words come out as it dies
    assert child.restarts == 1 and second != first
    assert child.last_error() == f"last words of {second}"  # what `up` says of a service that cannot start
    assert (tmp_path / "logs" / "svc.log").read_text() == (
        f"from an earlier `up`\nstarted {first}\nerror: last words of {first}\n"
        f"started {second}\nerror: last words of {second}\n")


def test_a_service_that_dies_while_postgres_restarts_is_restarted_meanwhile(tmp_path):
    """An embedded server's start (PostgreSQL's takes seconds, up to its timeout) runs beside
    the watch: it held every service's restart back for as long."""
    import threading

    from redrive.watched import Server

    release = threading.Event()

    class SlowServer:  # a daemon (no child process of ours, as PostgreSQL), gone and slow to come back
        pid, running = 1, False

        def start(self):
            release.wait(20)
            self.running = True

    stack = Stack(Settings(data_dir=tmp_path))
    watched = Server("postgres", SlowServer())
    watched.started()
    stack.servers.append(watched)
    try:
        child = stack.start_child("svc", [sys.executable, "-c", "pass"], dict(os.environ))  # dies at once, each time
        deadline = time.monotonic() + 20
        stack.watch(lambda: child.restarts == 2 or time.monotonic() > deadline)
        assert child.restarts == 2 and watched.restarting is not None and watched.restarting.is_alive()
        release.set()
        stack.watch(lambda: watched.restarting is None or time.monotonic() > deadline)
        assert watched.server.running and watched.failure is None and watched.retry_at is None
    finally:
        release.set()
        stack.stop()
