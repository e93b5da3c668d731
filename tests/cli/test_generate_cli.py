"""`gptoss generate` end to end (subprocess, the demo-shaped tiny checkpoint)."""

import json
import subprocess
import sys

import jsonschema
import pytest

GPTOSS = [sys.executable, "-m", "cli.main"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "pop"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "pop": {"type": "integer", "minimum": 0, "maximum": 9999}}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 10}}}}}]


def run(*args, ok=True):
    r = subprocess.run([*GPTOSS, "generate", *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "schema.json").write_text(json.dumps(SCHEMA))
    (d / "tools.json").write_text(json.dumps(TOOLS))
    (d / "messages.json").write_text(json.dumps([{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Weather in Paris?"}]))
    return d


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_json_schema_output(tiny_ckpt, files, kv):
    """kv: --kv-cache-dtype (fp8: the engine's pools in float8 e4m3); the grammar holds the answer either way."""
    r = run("--model", str(tiny_ckpt), "--prompt", "A city as JSON", "--json-schema", str(files / "schema.json"),
            "--max-reasoning-tokens", "8", "--max-tokens", "120", "--seed", "3", "--json", "--kv-cache-dtype", kv)
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["content"]), SCHEMA)
    assert out["usage"]["completion_tokens"] <= 120


def test_required_tool_call(tiny_ckpt, files):
    r = run("--model", str(tiny_ckpt), "--messages", str(files / "messages.json"), "--tools",
            str(files / "tools.json"), "--tool-choice", "required", "--max-reasoning-tokens", "4",
            "--max-tokens", "80", "--seed", "1", "--reasoning-effort", "low", "--json")
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "tool_calls", out
    [call] = out["tool_calls"]
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), TOOLS[0]["function"]["parameters"])


def test_bad_flags_are_named(tiny_ckpt, files, tmp_path, capsys):
    cases = [
        (["--temperature", "-1"], "--temperature"),
        (["--tool-choice", "nope", "--tools", str(files / "tools.json")], "--tool-choice"),
        (["--tool-choice", "required"], "--tool-choice"),
        (["--json-schema", str(tmp_path / "missing.json")], "--json-schema"),
        (["--reasoning-effort", "max"], "--reasoning-effort"),
        (["--kv-cache-dtype", "fp16"], "--kv-cache-dtype"),
        (["--tp", "3"], "--tp 3"),
        (["--ep", "0"], "--ep"),
        (["--tp", "2", "--ep", "2", "--attn-dp"], "--attn-dp needs --ep larger than --tp"),
        (["--max-reasoning-tokens", "-1"], "--max-reasoning-tokens: -1 is negative"),
        # schemas llguidance will not compile: the first line of its error, not the grammar's excerpt
        (["--json-schema", str(files / "bad_schema.json")], "--json-schema: invalid grammar"),
        (["--tools", str(files / "bad_tools.json"), "--tool-choice", "f"], "--tools: invalid grammar"),
    ]
    (files / "bad_schema.json").write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integr"}}}))
    (files / "bad_tools.json").write_text(json.dumps([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/x"}}}}}]))
    import torch
    if not torch.cuda.is_available():
        cases.append((["--gpu", "--prompt", "hi"], "--gpu: no CUDA device"))
    # In this process (a subprocess costs ~4 s of imports each); two of them also as the command,
    # for its exit status and stderr: an argparse refusal and one of the CLI's own.
    from cli.main import main
    for args, flag in cases:
        try:
            rc = main(["generate", "--model", str(tiny_ckpt), *args])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert flag in err and "Traceback" not in err, err
        assert flag in err.strip().splitlines()[-1], err  # the message ends the output
    for args, flag in [cases[0], cases[-2]]:
        r = run("--model", str(tiny_ckpt), *args, ok=False)
        assert r.returncode == 2 and flag in r.stderr.strip().splitlines()[-1], (args, r.stderr)


def test_ctrl_c_and_a_missing_vocabulary_end_in_one_line(tiny_ckpt, tmp_path):
    """Ctrl-C mid-generation (also with rank processes) exits 130 with one line, not Python's traceback;
    without the o200k vocabulary the command says which variable to set, not harmony's traceback."""
    import os
    import signal
    import time
    for extra in ([], ["--ep", "2"]):
        p = subprocess.Popen([*GPTOSS, "generate", "--model", str(tiny_ckpt), "--prompt", "hi", "--max-tokens", "3000",
                              "--max-reasoning-tokens", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True,
                             # a shell's background job (CI run with &) ignores SIGINT, and its children inherit
                             # that: give the command the terminal's default, as a user's Ctrl-C meets it
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(8)  # past the imports and the load: 3,000 tokens take far longer
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, (extra, err[-2000:])
        assert err.strip().splitlines()[-1] == "gptoss generate: interrupted" and "Traceback" not in err, err
    env = {**os.environ, "TIKTOKEN_ENCODINGS_BASE": str(tmp_path)}
    r = subprocess.run([*GPTOSS, "generate", "--model", str(tiny_ckpt), "--prompt", "hi"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"TIKTOKEN_ENCODINGS_BASE={tmp_path} does not hold it" in r.stderr.strip().splitlines()[-1]
