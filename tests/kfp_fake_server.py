"""A small stand-in for the KFP v2 REST API on 127.0.0.1 (there is no KFP server to run here).

It answers the endpoints kfp.Client calls for upload, versions, experiments, runs and recurring runs, keeps
what was created, and records every request (method, path, query, headers, JSON body or uploaded file).
``fail_with`` makes every request answer that HTTP status instead; ``fail_on`` does so for some paths only.
"""

from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import default as default_policy
from itertools import count
from urllib.parse import parse_qs, urlparse

from servers import InProcessHTTP, QuietHandler

API = "/apis/v2beta1"


class FakeKfp(InProcessHTTP):
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.pipelines: dict[str, str] = {}  # id -> display name
        self.versions: dict[str, list[dict]] = {}  # pipeline id -> versions
        self.experiments: dict[str, str] = {}
        self.runs: list[dict] = []
        self.recurring_runs: list[dict] = []
        self.fail_with: int | None = None
        self.fail_on: dict[str, int] = {}  # path suffix -> status, for failures after the health check
        self._ids = count(1)
        super().__init__()

    def uploads(self) -> list[dict]:
        return [r for r in self.requests if r["path"].startswith(f"{API}/pipelines/upload")]

    # --- the API ----------------------------------------------------------------------------------
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _add_version(self, pipeline_id: str, name: str, spec: bytes) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": self._new_id("version"), "display_name": name,
                   "spec": spec}
        self.versions.setdefault(pipeline_id, []).append(version)
        return version

    def answer(self, method: str, path: str, query: dict, body: dict | None, upload: bytes | None):
        def named(items, name):
            return [i for i in items if i["display_name"] == name] if name is not None else list(items)

        wanted = _filter_value(query)
        if (method, path) == ("GET", f"{API}/healthz"):
            return {"multi_user": False}
        if (method, path) == ("GET", f"{API}/pipelines"):
            found = named([{"pipeline_id": i, "display_name": n} for i, n in self.pipelines.items()], wanted)
            return {"pipelines": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", f"{API}/pipelines/upload"):
            name = query["name"][0]
            pipeline_id = self._new_id("pipeline")
            self.pipelines[pipeline_id] = name
            self._add_version(pipeline_id, name, upload)
            return {"pipeline_id": pipeline_id, "display_name": name}
        if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
            version = self._add_version(query["pipelineid"][0], query["name"][0], upload)
            return {k: v for k, v in version.items() if k != "spec"}
        if method == "GET" and path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pipeline_id = path.split("/")[-2]
            found = named(self.versions.get(pipeline_id, []), wanted)
            return {"pipeline_versions": [{k: v for k, v in f.items() if k != "spec"} for f in found]} if found else {}
        if (method, path) == ("GET", f"{API}/experiments"):
            found = named([{"experiment_id": i, "display_name": n} for i, n in self.experiments.items()], wanted)
            return {"experiments": found} if found else {}
        if (method, path) == ("POST", f"{API}/experiments"):
            experiment_id = self._new_id("experiment")
            self.experiments[experiment_id] = body["display_name"]
            return {"experiment_id": experiment_id, "display_name": body["display_name"]}
        if (method, path) == ("POST", f"{API}/runs"):
            self.runs.append(body)
            return {**body, "run_id": self._new_id("run"), "state": "PENDING"}
        if (method, path) == ("POST", f"{API}/recurringruns"):
            self.recurring_runs.append(body)
            return {**body, "recurring_run_id": self._new_id("recurring")}
        return None

    def _handler(self):
        fake = self

        class Handler(QuietHandler):
            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body, upload = None, None
                content_type = self.headers.get("Content-Type", "")
                if content_type.startswith("multipart/form-data"):
                    upload = _uploaded_file(content_type, raw)
                elif raw:
                    body = json.loads(raw)
                headers = {name.lower(): value for name, value in self.headers.items()}
                fake.requests.append({"method": method, "path": url.path, "query": query, "headers": headers,
                                      "body": body, "upload": upload})
                status = fake.fail_with or next((code for suffix, code in fake.fail_on.items()
                                                 if url.path.endswith(suffix)), None)
                if status is not None:
                    self._send(status, {"error": "injected failure", "code": status})
                    return
                answer = fake.answer(method, url.path, query, body, upload)
                if answer is None:
                    self._send(404, {"error": f"no such endpoint {method} {url.path}"})
                else:
                    self._send(200, answer)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

        return Handler


def _filter_value(query: dict) -> str | None:
    if "filter" not in query:
        return None
    predicates = json.loads(query["filter"][0])["predicates"]
    return next(p["stringValue"] for p in predicates if p["key"] in ("display_name", "name"))


def _uploaded_file(content_type: str, raw: bytes) -> bytes:
    message = BytesParser(policy=default_policy).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_payload(decode=True)
    raise AssertionError("no uploadfile in the multipart body")
