"""A stand-in for the part of Grafana's HTTP API that `gptoss dashboards push` uses.

No Grafana server package is reachable here, so this mimics the documented
behaviour closely enough to test idempotency: Bearer-token auth (401
otherwise), folders by uid (404 when missing, 409 on a duplicate uid or
title), dashboards upserted by uid with `overwrite` (version + 1 on update,
412 on a version mismatch without overwrite), lookups by uid.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class GrafanaStandin:
    def __init__(self, token: str = "secret-token", prefix: str = ""):
        self.token, self.prefix = token, prefix  # prefix: Grafana served under a sub-path
        self.folders: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}  # uid -> {"dashboard", "folderUid", "id", "version"}
        self.requests: list[tuple[str, str]] = []  # (method, path), for assertions
        self.lock = threading.Lock()
        self._next_id = 1
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{prefix}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # --- the API ---------------------------------------------------------------------------------

    def handle(self, method: str, path: str, body) -> tuple[int, object]:
        if method == "GET" and path == "/api/health":  # unauthenticated in Grafana too
            return 200, {"database": "ok", "version": "11.6.0"}
        if method == "GET" and path == "/api/folders":
            return 200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in self.folders.values()]
        if m := re.fullmatch(r"/api/folders/([\w-]+)", path):
            if method == "GET":
                f = self.folders.get(m[1])
                return (200, f) if f else (404, {"message": "folder not found", "status": "not-found"})
        if method == "POST" and path == "/api/folders":
            uid, title = body.get("uid") or f"auto{self._next_id}", body["title"]
            if uid in self.folders or any(f["title"] == title for f in self.folders.values()):
                return 409, {"message": "a folder with the same name or uid already exists"}
            self.folders[uid] = {"id": self._id(), "uid": uid, "title": title, "url": f"/dashboards/f/{uid}/",
                                 "version": 1}
            return 200, self.folders[uid]
        if method == "POST" and path == "/api/dashboards/db":
            return self._save(body)
        if m := re.fullmatch(r"/api/dashboards/uid/([\w-]+)", path):
            if method == "GET":
                d = self.dashboards.get(m[1])
                if not d:
                    return 404, {"message": "Dashboard not found"}
                return 200, {"dashboard": {**d["dashboard"], "id": d["id"], "version": d["version"]},
                             "meta": {"folderUid": d["folderUid"], "slug": d["dashboard"]["uid"]}}
        return 404, {"message": "Not found"}

    def _save(self, body) -> tuple[int, object]:
        dash, fuid = body.get("dashboard") or {}, body.get("folderUid", "")
        uid = dash.get("uid")
        if not uid or not dash.get("title"):
            return 400, {"message": "Dashboard title and uid are required"}
        if fuid and fuid not in self.folders:
            return 400, {"message": "folder not found"}
        old = self.dashboards.get(uid)
        if old and not body.get("overwrite") and dash.get("version") != old["version"]:
            return 412, {"status": "version-mismatch", "message": "The dashboard has been changed by someone else"}
        entry = {"dashboard": dash, "folderUid": fuid, "id": old["id"] if old else self._id(),
                 "version": old["version"] + 1 if old else 1}
        self.dashboards[uid] = entry
        return 200, {"id": entry["id"], "uid": uid, "url": f"/d/{uid}/{uid}", "status": "success",
                     "version": entry["version"], "slug": uid}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _serve(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                path = self.path.split("?")[0]
                path = path[len(standin.prefix):] if path.startswith(standin.prefix + "/") else "/not-under-prefix"
                with standin.lock:
                    standin.requests.append((method, path))
                    if path != "/api/health" and self.headers.get("Authorization") != f"Bearer {standin.token}":
                        status, out = 401, {"message": "Unauthorized"}
                    else:
                        try:
                            status, out = standin.handle(method, path, json.loads(raw) if raw else None)
                        except (ValueError, KeyError, TypeError) as e:
                            status, out = 400, {"message": f"bad request: {e}"}
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_PUT(self):
                self._serve("PUT")

            def do_DELETE(self):
                self._serve("DELETE")

        return Handler
