"""Servers on 127.0.0.1 for the tests: real ones for tracking (an S3-compatible store in moto's server mode and an
MLflow tracking server on SQLite, artifacts written by the clients straight to the bucket with boto3), and the
base of the in-process stand-ins for APIs that cannot run here (KFP, Kubernetes, vLLM)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BUCKET = "caopd"
# Distinctive values, so a test can grep for them anywhere they must not appear.
S3_KEY_ID, S3_SECRET = "AKIACAOPDTESTKEY0001", "caopd-test-secret-5f1e0c2a9b7d"
ADMIN_USER, ADMIN_PASSWORD = "caopd-admin", "admin-pw-3c9e71d05a8b"
FLASK_SECRET_KEY = "flask-key-0d4b2f6e9a1c"
# The auth app's config as the chart writes it: nobody holds anything without a grant, and a password is checked
# once a minute per user rather than hashed on every request.
AUTH_INI = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///unused.db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
auth_cache_ttl_seconds = 60
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{url} did not answer within {timeout_s} s: {log.read_text()[-2000:]}")


class Server:
    def __init__(self, argv: list[str], health: str, env: dict[str, str], log: Path, timeout_s: float = 90) -> None:
        self.argv, self.health, self.env, self.log, self.timeout_s = argv, health, env, log, timeout_s
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        handle = self.log.open("ab")
        self.process = subprocess.Popen(self.argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        _wait(self.health, self.process, self.timeout_s, self.log)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": endpoint}


def start_s3(workdir: Path) -> tuple[Server, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = Server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], endpoint,
                    {**os.environ, **s3_env(endpoint)}, workdir / "moto.log").start()
    return server, endpoint


def start_mlflow(workdir: Path, s3_endpoint: str, port: int | None = None, auth: bool = False
                 ) -> tuple[Server, str]:
    """An MLflow server on SQLite with its artifacts on the S3 server; with ``auth``, caopd's authenticated app
    (MLflow's basic-auth plus the protected alias), its users and permissions in the same database, the admin
    ADMIN_USER. The server's access log (``server.log``) has a line per request."""
    from caopd.config.tracking import AUTH_APP_NAME, CREDENTIALS_DIR_ENV, PASSWORD_ENV, TOKEN_ENV, USERNAME_ENV
    from caopd.tracking.server_app import AUTH_DATABASE_ENV

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    database = f"sqlite:///{workdir / 'mlflow.db'}"
    argv = [mlflow, "server", "--backend-store-uri", database, "--default-artifact-root", f"s3://{BUCKET}/mlflow",
            "--no-serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k not in (USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV, CREDENTIALS_DIR_ENV)}
    env.update(s3_env(s3_endpoint))
    if auth:
        (workdir / "auth.ini").write_text(AUTH_INI)
        argv += ["--app-name", AUTH_APP_NAME]
        env.update({"MLFLOW_AUTH_CONFIG_PATH": str(workdir / "auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN_USER,
                    "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": FLASK_SECRET_KEY,
                    AUTH_DATABASE_ENV: database})
        # As the chart's init container does: the auth database and its admin, before the server starts.
        subprocess.run([sys.executable, "-m", "caopd.tracking.server_app"], env=env, check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(argv, f"{url}/health", env, workdir / "server.log").start()
    return server, url


class InProcessHTTP:
    """A stand-in API served from a thread on 127.0.0.1 at ``url``; subclasses give ``_handler()`` and call this
    ``__init__`` once their state exists. ``with`` starts and stops it."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class QuietHandler(BaseHTTPRequestHandler):
    """No access log on the test's output; one way to answer: a JSON document (dict) or text (str)."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict | str, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
