"""`gptoss dashboards export DIR`, `gptoss dashboards push --url URL --token T` and `gptoss alerts export DIR`."""

from __future__ import annotations

import os
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser("dashboards", help="Grafana dashboards: write them as JSON or push them to Grafana")
    dsub = p.add_subparsers(dest="dashcmd", required=True)
    e = dsub.add_parser("export", help="write one <uid>.json per dashboard into DIR")
    e.add_argument("dir", help="output directory (created if missing)")
    e.set_defaults(fn=run_export)
    ps = dsub.add_parser("push", help="create or update the dashboards on a Grafana server")
    ps.add_argument("--url", default=os.environ.get("GRAFANA_URL"),
                    help="Grafana base URL, e.g. http://grafana:3000 (default $GRAFANA_URL)")
    # The env default keeps the token out of shell history and process listings.
    ps.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"),
                    help="service-account token with Editor rights (default $GRAFANA_TOKEN)")
    ps.add_argument("--folder", default="gptoss", help="folder to put them in (created if missing)")
    ps.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    ps.set_defaults(fn=run_push)
    a = sub.add_parser("alerts", help="Prometheus alerting rules: write them as a rules file")
    asub = a.add_subparsers(dest="alertcmd", required=True)
    ae = asub.add_parser("export", help="write gptoss-alerts.yaml (a Prometheus rules file) into DIR")
    ae.add_argument("dir", help="output directory (created if missing)")
    ae.set_defaults(fn=run_alerts_export)


def run_alerts_export(args) -> int:
    from cli.generate import UsageError
    from observability.alerts import export
    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"DIR: '{out}' is a file, not a directory")
    print(f"wrote {export(out)}")
    return 0


def run_export(args) -> int:
    from cli.generate import UsageError
    from observability.dashboards import export
    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"DIR: '{out}' exists and is not a directory")
    try:
        paths = export(out)
    except OSError as e:
        raise UsageError(f"DIR: cannot write to '{out}' ({e.strerror or e})") from None
    print(f"wrote {len(paths)} dashboards to {out}: {', '.join(p.name for p in paths)}")
    return 0


def run_push(args) -> int:
    from cli.generate import UsageError
    from observability.grafana import GrafanaPushError, push_dashboards
    if not args.url:
        raise UsageError("--url: required (or set GRAFANA_URL)")
    if not args.token:
        raise UsageError("--token: required (or set GRAFANA_TOKEN)")
    try:
        summary = push_dashboards(args.url, args.token, folder=args.folder, timeout=args.timeout)
    except GrafanaPushError as e:
        raise UsageError(str(e)) from None
    for s in summary:
        if s["kind"] == "folder":
            print(f"folder {s['title']} (uid {s['uid']}): {s['action']}")
        else:
            print(f"{s['action']} {s['uid']} (version {s['version']}): {s['url']}")
    return 0
