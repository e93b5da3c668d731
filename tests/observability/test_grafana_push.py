"""`gptoss dashboards push` against a local stand-in of Grafana's HTTP API."""

import socket

import pytest

from cli.main import main
from observability.dashboards import build_dashboards
from observability.grafana import GrafanaPushError, folder_uid, push_dashboards

from .grafana_standin import GrafanaStandin

TOKEN = "secret-token"
UIDS = {"gptoss-overview", "gptoss-engine", "gptoss-experts", "gptoss-autoscaling"}


@pytest.fixture
def grafana():
    with GrafanaStandin(TOKEN) as g:
        yield g


def count(g, method, path):
    return sum(1 for r in g.requests if r == (method, path))


def test_push_creates_then_updates_in_place(grafana):
    first = push_dashboards(grafana.url, TOKEN)
    assert first[0] == {"kind": "folder", "uid": "gptoss", "title": "gptoss", "action": "created"}
    assert {s["uid"] for s in first[1:]} == UIDS
    assert all(s["action"] == "created" and s["version"] == 1 for s in first[1:])
    assert set(grafana.folders) == {"gptoss"} and set(grafana.dashboards) == UIDS
    ids = {uid: d["id"] for uid, d in grafana.dashboards.items()}
    built = build_dashboards()
    for uid, d in grafana.dashboards.items():
        assert d["folderUid"] == "gptoss"
        assert {k: v for k, v in d["dashboard"].items() if k != "id"} == built[uid]

    second = push_dashboards(grafana.url, TOKEN)
    assert second[0]["action"] == "exists"
    assert all(s["action"] == "updated" and s["version"] == 2 for s in second[1:])
    assert count(grafana, "POST", "/api/folders") == 1  # the folder was created once
    assert set(grafana.folders) == {"gptoss"} and set(grafana.dashboards) == UIDS
    assert {uid: d["id"] for uid, d in grafana.dashboards.items()} == ids  # same objects, updated
    assert all(d["version"] == 2 for d in grafana.dashboards.values())


def test_cli_push_to_named_folder(grafana, capsys):
    assert main(["dashboards", "push", "--url", grafana.url, "--token", TOKEN, "--folder", "Serving / gpt-oss"]) == 0
    out = capsys.readouterr().out
    assert folder_uid("Serving / gpt-oss") == "serving-gpt-oss"
    assert grafana.folders["serving-gpt-oss"]["title"] == "Serving / gpt-oss"
    assert {d["folderUid"] for d in grafana.dashboards.values()} == {"serving-gpt-oss"}
    assert "folder Serving / gpt-oss (uid serving-gpt-oss): created" in out
    assert sum(line.startswith("created gptoss-") for line in out.splitlines()) == 4


def test_existing_folder_with_same_title_is_reused(grafana):
    grafana.folders["made-by-hand"] = {"id": 99, "uid": "made-by-hand", "title": "gptoss", "version": 1}
    summary = push_dashboards(grafana.url, TOKEN)
    assert summary[0] == {"kind": "folder", "uid": "made-by-hand", "title": "gptoss", "action": "exists"}
    assert set(grafana.folders) == {"made-by-hand"}
    assert {d["folderUid"] for d in grafana.dashboards.values()} == {"made-by-hand"}


def test_push_to_grafana_under_a_sub_path():
    with GrafanaStandin(TOKEN, prefix="/grafana") as g:
        push_dashboards(g.url, TOKEN)
        push_dashboards(g.url + "/", TOKEN)
        assert set(g.dashboards) == UIDS and all(d["version"] == 2 for d in g.dashboards.values())


def one_line_error(capsys) -> str:
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in cap.err, cap.err
    assert err.startswith("gptoss dashboards: ")
    return err


def test_wrong_token_exits_2_with_a_clear_message(grafana, capsys):
    assert main(["dashboards", "push", "--url", grafana.url, "--token", "wrong"]) == 2
    err = one_line_error(capsys)
    assert "401" in err and "token" in err and grafana.url in err
    assert not grafana.folders and not grafana.dashboards


def test_unreachable_url_exits_2(capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["dashboards", "push", "--url", f"http://127.0.0.1:{port}", "--token", TOKEN]) == 2
    err = one_line_error(capsys)
    assert f"cannot reach Grafana at http://127.0.0.1:{port}" in err and "refused" in err.lower()


@pytest.mark.parametrize("args, flag", [(["--url", "localhost:3000", "--token", "t"], "--url"),
                                        (["--url", "http://localhost:3000"], "--token")])
def test_bad_or_missing_flags_exit_2(args, flag, capsys, monkeypatch):
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    monkeypatch.delenv("GRAFANA_URL", raising=False)
    assert main(["dashboards", "push", *args]) == 2
    assert flag in one_line_error(capsys)


def test_push_error_is_raised_not_printed(grafana):
    with pytest.raises(GrafanaPushError, match="401"):
        push_dashboards(grafana.url, "wrong")
