"""Push the dashboards to a Grafana server over its HTTP API (grafana-client).

Idempotent by construction: the folder and every dashboard have stable uids,
the folder is created only when missing, and dashboards are posted with
`overwrite: true`, so a second push updates the same four dashboards in place
(Grafana bumps their versions) and creates nothing.
"""

from __future__ import annotations

import re
from urllib.parse import urlparse

from .dashboards import build_dashboards


class GrafanaPushError(Exception):
    """A push that cannot go on; the message is one line naming the problem."""


def folder_uid(name: str) -> str:
    """Stable folder uid from its name ("gptoss" -> "gptoss"); Grafana allows 40 chars of [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name.strip().lower()).strip("-")[:40] or "gptoss"


def _explain(e: Exception, url: str) -> str:
    from grafana_client.client import GrafanaException, GrafanaTimeoutError
    if isinstance(e, GrafanaTimeoutError):
        return f"Grafana at {url} did not answer in time"
    if isinstance(e, GrafanaException):
        status = e.status_code
        if status == 401:
            return f"Grafana at {url} rejected the token (401 Unauthorized): check --token"
        if status == 403:
            return f"the token is not allowed to write folders/dashboards on {url} (403 Forbidden): use an Editor token"
        detail = e.response.get("message") if isinstance(e.response, dict) else str(e.message)
        return f"Grafana at {url} answered {status or 'an error'}: {str(detail).splitlines()[0][:200]}"
    # Connection failures come from niquests unwrapped; keep the OS reason, drop the retry noise.
    text = str(e)
    host = re.search(r"Failed to resolve '([^']+)'", text)
    errno = re.findall(r"\[Errno -?\d+\][^')\]]*", text)
    reason = (f"cannot resolve host '{host[1]}'" if host else errno[-1].strip() if errno
              else text.splitlines()[0][:200] if text else type(e).__name__)
    return f"cannot reach Grafana at {url}: {reason}"


def _folder(api, title: str) -> tuple[str, bool]:
    """(uid, created) of the folder, creating it if missing."""
    from grafana_client.client import GrafanaClientError
    uid = folder_uid(title)
    try:
        api.folder.get_folder(uid)
        return uid, False
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
    try:
        api.folder.create_folder(title, uid=uid)
        return uid, True
    except GrafanaClientError as e:
        if e.status_code not in (409, 412):
            raise
    # A folder with this title exists under another uid (made by hand): use it rather than fail.
    for f in api.folder.get_all_folders():
        if f.get("title") == title:
            return f["uid"], False
    raise GrafanaPushError(f"folder '{title}' conflicts with an existing folder on Grafana")


def push_dashboards(url: str, token: str, folder: str = "gptoss", timeout: float = 10.0) -> list[dict]:
    """Create the folder if missing, then upsert every dashboard into it.

    Returns one entry per dashboard: uid, title, action (created/updated), version, url;
    plus a first entry for the folder. Raises GrafanaPushError with a one-line message.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise GrafanaPushError(f"--url: expected http(s)://host[:port][/path], got '{url}'")
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException

    # grafana-client appends "api" to the URL's path as is: a sub-path needs its trailing slash.
    base = url.rstrip("/") + ("/" if parsed.path.strip("/") else "")
    api = GrafanaApi.from_url(base, credential=token, timeout=timeout)
    summary: list[dict] = []
    try:
        fuid, created = _folder(api, folder)
        summary.append({"kind": "folder", "uid": fuid, "title": folder, "action": "created" if created else "exists"})
        for uid, dash in build_dashboards().items():
            try:
                api.dashboard.get_dashboard(uid)
                action = "updated"
            except GrafanaClientError as e:
                if e.status_code != 404:
                    raise
                action = "created"
            # id None: Grafana matches by uid; overwrite: replace whatever version is there.
            r = api.dashboard.update_dashboard({"dashboard": {**dash, "id": None}, "folderUid": fuid,
                                                "overwrite": True, "message": "gptoss dashboards push"})
            summary.append({"kind": "dashboard", "uid": r.get("uid", uid), "title": dash["title"],
                            "action": action, "version": r.get("version"), "url": r.get("url")})
    except GrafanaPushError:
        raise
    except (GrafanaException, OSError) as e:  # niquests' errors are OSErrors (IOError)
        raise GrafanaPushError(_explain(e, url)) from None
    finally:
        session = getattr(api.client, "s", None)  # grafana-client has no close(); free its pool
        if session is not None:
            session.close()
    return summary
