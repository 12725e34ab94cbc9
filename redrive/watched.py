"""What `redrive up` watches and starts again when it dies: each service's process (Child)
and each embedded server it owns (Server)."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from redrive.service_log import Output, ServiceLog
from shared.child_process import terminate_with_parent

# How long a dead service's output may take to reach its log: its pipe ends once every process
# holding it is gone (one it started could hold it longer; then the rest follows when it ends).
OUTPUT_DRAIN_S = 5.0

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log: ServiceLog
    proc: subprocess.Popen | None = None
    output: Output | None = None  # this start's, being copied into the log
    restarts: int = 0
    started_at: float = 0.0
    retry_at: float | None = None  # dead: when to start it again

    @property
    def log_path(self) -> Path:
        return self.log.path

    def start(self) -> None:
        # Into a pipe that this process copies into the log, rather than the log file itself:
        # a file the service held open could not be rotated under it.
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=terminate_with_parent)
        self.output = self.log.follow(self.proc.stdout, self.name)
        self.started_at = time.monotonic()

    def ended(self) -> None:
        """Wait (a little) until what the dead process wrote is all in the log."""
        if self.output is not None:
            self.output.wait(OUTPUT_DRAIN_S)

    def last_error(self) -> str:
        """The line of this start's output that says why it stopped: its last ``error:`` line
        (one line, as every command writes it), else its last line."""
        tail = tuple(self.output.tail) if self.output else ()  # at once: its copier may still append
        lines = [ANSI.sub("", line).strip() for line in tail]
        lines = [line for line in lines if line]
        said = [line for line in lines if line.startswith(("error:", "invalid configuration:"))]
        if not said and not lines:
            return "it wrote nothing"
        return (said or lines)[-1].removeprefix("error:").strip()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ended()


@dataclass
class Server:
    """An embedded server `up` started (EmbeddedNats or EmbeddedPostgres) and watches as it
    does its services: started again, on the same port and data, when it is gone."""

    name: str
    server: object
    pid: int | None = None  # of the start watched
    restarts: int = 0
    started_at: float = 0.0
    retry_at: float | None = None  # when it is down: when to start it again
    restarting: threading.Thread | None = None  # a start under way (PostgreSQL's takes seconds)
    failure: Exception | None = None  # how that start failed

    def started(self) -> None:
        self.pid = self.server.pid
        self.started_at = time.monotonic()
        self.retry_at = None

    def gone(self) -> str | None:
        """How it ended ("exited (-9)", "stopped (pid N is gone)"), once, when it is no longer running."""
        if self.retry_at is not None or self.server.running:
            return None
        proc = getattr(self.server, "proc", None)  # nats-server is our child, PostgreSQL a daemon
        if proc is not None and proc.returncode is not None:
            return f"exited ({proc.returncode})"
        return f"stopped (pid {self.pid} is gone)"

    def restart(self) -> None:
        self.server.start()
        self.started()

    def restart_in_background(self) -> None:
        """Start it again, in a thread of its own when it is a daemon (PostgreSQL: its start
        takes seconds); ``restarting`` until done, then ``failure`` says how it went (None:
        running). A child of ours (nats-server, quick to start) starts in this thread: it is
        told to die with the thread that started it (PR_SET_PDEATHSIG follows the thread, not
        the process), and a helper thread ends at once."""
        def run() -> None:
            try:
                self.restart()
            except Exception as exc:  # noqa: BLE001 - said by the watch loop, which tries again later
                self.failure = exc

        self.retry_at, self.failure = None, None
        self.restarting = threading.Thread(target=run, name=f"restart-{self.name}", daemon=True)
        if hasattr(self.server, "proc"):
            run()  # here (see above); ``restarting`` is a thread that never ran: not alive, reported next round
        else:
            self.restarting.start()
