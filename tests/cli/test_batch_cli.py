"""`gptoss batch`: a Batch API input file through the model in process, results in input order."""

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _line(cid, url="/v1/chat/completions", **body):
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "gpt-oss-120b", **body}}


def test_a_file_runs_in_process_and_its_results_keep_input_order(tiny_ckpt, tmp_path, capsys):
    from cli.main import main
    chat = [_line(f"c{i}", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=6, temperature=0)
            for i in range(3)]
    chat.insert(1, _line("bad", messages=[], max_tokens=6))  # the endpoint's own 400, in its place
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--model", str(tiny_ckpt), "-i", _write(tmp_path / "in.jsonl", chat), "-o", str(out),
                 "--concurrency", "2"]) == 1  # a line failed
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in got] == ["c0", "bad", "c1", "c2"]
    assert [x["response"]["status_code"] for x in got] == [200, 400, 200, 200]
    assert got[1]["response"]["body"]["error"]["param"] == "messages"
    assert all(x["response"]["body"]["usage"]["completion_tokens"] == 6 for x in got if x["custom_id"] != "bad")
    assert "completed: 3 of 4 succeeded, 1 failed" in capsys.readouterr().err
    comp = [_line("a", "/v1/completions", prompt="Once", max_tokens=4)]
    assert main(["batch", "--model", str(tiny_ckpt), "-i", _write(tmp_path / "c.jsonl", comp), "-o", "-"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["response"]["body"]["object"] == "text_completion"


@pytest.mark.parametrize("lines, says", [
    (["not json"], "--input: the first line's url must be one of"),
    ([_line("a"), "{oops"], "line 2: this line is not valid JSON"),
    ([_line("a"), _line("a")], "line 2: custom_id 'a' is used by an earlier line"),
])
def test_an_input_that_does_not_validate_is_refused_naming_its_lines(tmp_path, capsys, lines, says):
    from cli.main import main
    assert main(["batch", "-i", _write(tmp_path / "in.jsonl", lines), "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptoss batch: --input: ") and says in err and "Traceback" not in err
    assert main(["batch", "-i", str(tmp_path / "none.jsonl"), "-o", "x"]) == 2
    assert "--input: cannot read" in capsys.readouterr().err
