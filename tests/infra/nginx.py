"""nginx from the Debian package, running the documented conditions-DB cache config
(nginx/calloop-conddb.conf) in front of a service (tests and benchmarks).

The config is used as shipped, with only its listen address, upstream and cache
directory replaced; nginx runs in the foreground from a temporary prefix and is stopped
by the pid of the process started here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.infra.postgres import free_port

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "nginx" / "calloop-conddb.conf"
# what the shipped file says, and what a test run puts in its place
LISTEN, UPSTREAM, CACHE_DIR = (
    "listen 127.0.0.1:8080;",
    "server 127.0.0.1:8081;",
    "/var/cache/nginx/calloop-conddb",
)


def nginx_binary() -> str | None:
    """The nginx executable, if installed (``apt-get install nginx-light``)."""
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


def render(upstream: str, port: int, cache_dir: Path) -> str:
    """The shipped config for this upstream (``host:port``), port and cache directory;
    fails if the shipped file no longer says what is replaced."""
    text = SHIPPED.read_text()
    for shipped in (LISTEN, UPSTREAM, CACHE_DIR):
        if shipped not in text:
            raise RuntimeError(f"{SHIPPED} no longer contains {shipped!r}")
    return (
        text.replace(LISTEN, f"listen 127.0.0.1:{port};")
        .replace(UPSTREAM, f"server {upstream};")
        .replace(CACHE_DIR, str(cache_dir))
    )


class NginxCache:
    """``with NginxCache("127.0.0.1:8123") as cache: requests.get(cache.url + ...)``."""

    def __init__(self, upstream: str) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
        self.binary = binary
        self.upstream = upstream
        self.base = Path(tempfile.mkdtemp(prefix="calloop-nginx-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def _main_config(self) -> Path:
        site = self.base / "calloop-conddb.conf"
        site.write_text(render(self.upstream, self.port, self.base / "cache"))
        temp = "\n".join(
            f"    {kind}_temp_path {self.base / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # as root, nginx's workers would switch to a user that cannot enter the
        # private temporary directory
        user = "user root;\n" if os.geteuid() == 0 else ""
        main = self.base / "nginx.conf"
        main.write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {self.base / 'nginx.pid'};\n"
            f"error_log {self.base / 'error.log'} warn;\nevents {{ worker_connections 512; }}\n"
            f"http {{\n    access_log off;\n{temp}\n    include {site};\n}}\n"
        )
        return main

    def start(self, timeout: float = 20.0) -> NginxCache:
        """Start nginx and wait until it accepts connections."""
        config = self._main_config()
        log = (self.base / "stderr.log").open("wb")
        self._process = subprocess.Popen(
            [self.binary, "-p", str(self.base), "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: master and workers
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not listen: {self.log_tail()}") from None
                time.sleep(0.05)

    def log_tail(self) -> str:
        """The end of nginx's own messages (for failure messages)."""
        text = ""
        for name in ("stderr.log", "error.log"):
            path = self.base / name
            if path.exists():
                text += path.read_text(errors="replace")
        return text[-2000:]

    def stop(self) -> None:
        """Stop nginx (graceful, then kill) and remove its files."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGQUIT)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> NginxCache:
        return self.start()

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
