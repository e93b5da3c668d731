"""`gptoss serve` refuses to start what could not answer a request."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_serve_without_the_vocabulary_says_how_to_fix_it(tmp_path):
    """Harmony needs the o200k vocabulary for every request: without it the server would answer each
    one with a 500, so it does not start, and says which variable to set."""
    env = {**os.environ, "TIKTOKEN_ENCODINGS_BASE": str(tmp_path)}  # a folder without the file
    r = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--model", "demo", "--port", "8799"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "cannot load harmony's o200k vocabulary" in r.stderr and f"TIKTOKEN_ENCODINGS_BASE={tmp_path}" in r.stderr
    assert "Traceback" not in r.stderr


def _serve(*flags: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "serve", *flags], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flags, says", [
    (("--model", "/nonexistent"), "gptoss serve: --model: checkpoint path '/nonexistent' does not exist"),
    (("--tp", "3"), "gptoss serve: --tp 3 does not divide the 4 query heads"),
    (("--ep", "64"), "gptoss serve: --ep 64 exceeds the 8 experts"),
    (("--responses-file", "/proc/none/r.sqlite"), "gptoss serve: --responses-file: cannot use /proc/none/r.sqlite"),
    (("--batch-file", "/proc/none/b.sqlite"), "gptoss serve: --batch-file: cannot use /proc/none/b.sqlite"),
    (("--batch-store-mb", "-1"), "gptoss serve: --batch-store-mb: Input should be greater than or equal to 0"),
    (("--batch-concurrency", "0"), "gptoss serve: --batch-concurrency: Input should be greater than or equal to 1"),
    (("--websocket-max-minutes", "-1"),
     "gptoss serve: --websocket-max-minutes: Input should be greater than or equal to 0"),
])
def test_serve_names_a_bad_model_or_layout_before_starting_ray(tiny_ckpt, flags, says, capsys):
    """What a replica would fail on (no checkpoint there, heads --tp cannot split) is the user's input: it is
    answered with the flag, before Ray starts, not with a replica's traceback after it. In this process
    (the command itself is run by the port test below): Ray must still not be up afterwards."""
    model = () if "--model" in flags else ("--model", str(tiny_ckpt))
    assert _serve_here(capsys, *model, *flags, "--port", "8797").startswith(says)


def test_serve_names_a_malformed_reasoning_key(tiny_ckpt, capsys, monkeypatch):
    from cli.main import main
    assert main(["reasoning-key"]) == 0
    key = capsys.readouterr().out.strip()
    monkeypatch.setenv("GPTOSS_REASONING_KEY", key[:-2])
    assert _serve_here(capsys, "--model", str(tiny_ckpt), "--port", "8797").startswith(
        "gptoss serve: GPTOSS_REASONING_KEY is not a Fernet key")
    from deployments.sealed_reasoning import ReasoningSeal
    assert ReasoningSeal(key).open(ReasoningSeal(key).seal("x"), "rs_1") == "x"  # what it printed is a key


def _serve_here(capsys, *flags: str) -> str:
    """`gptoss serve` in this process, for a refusal before Ray starts: -> the last line of stderr."""
    import ray

    from cli.main import main
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not ray.is_initialized(), err
    return err.strip().splitlines()[-1]


def test_serve_names_a_port_it_cannot_listen_on(tiny_ckpt, capsys):
    """Serve's proxy would bind the API port only once Ray is up, and fail there with a traceback.
    The first case runs the command; the others its main() in this process (~4 s of imports each)."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _serve("--model", str(tiny_ckpt), "--port", str(port))
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"gptoss serve: --port: {port} is in use on 127.0.0.1"), r.stderr[-500:]
        assert "Traceback" not in r.stderr and "Started a local Ray instance" not in r.stderr
        for flags, says in [(("--port", "8797", "--metrics-port", str(port)), f"--metrics-port: {port} is in use"),
                            (("--port", "8797", "--metrics-port", "8797"), "--metrics-port: 8797 is also --port"),
                            (("--host", "no-such-host.invalid"), "--host: cannot listen on no-such-host.invalid")]:
            last = _serve_here(capsys, "--model", str(tiny_ckpt), *flags)
            assert last.startswith(f"gptoss serve: {says}"), last


def test_serve_gpu_without_the_gpus_refuses_instead_of_waiting(tiny_ckpt):
    """A local Ray has no autoscaler: replicas asking for GPUs it lacks would wait forever, the CLI with
    them. 64 replicas' GPUs are more than this machine (or a one-GPU device machine) has."""
    r = _serve("--model", str(tiny_ckpt), "--gpu", "--min-replicas", "64", "--max-replicas", "64",
               "--port", "8797", "--metrics-port", "8798")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("gptoss serve: --gpu: 64 replica(s) of 1 rank(s) need 64 GPU(s); Ray sees "), last
    assert "Traceback" not in r.stderr


def test_serve_reports_why_the_model_group_did_not_start(tiny_ckpt, tmp_path):
    """A checkpoint whose config reads but whose weights do not fails in the replica: the CLI waits for
    Serve's verdict, then ends with the replica's own error as its last line (exit 1, Ray stopped), not
    with Ray's "Failed to update the deployments" traceback."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    st = next(bad.glob("*.safetensors"))
    os.truncate(st, st.stat().st_size // 2)
    r = _serve("--model", str(bad), "--port", "8797", "--metrics-port", "8798")
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("gptoss serve: the model group did not start: deployment group-gpt-oss: "
                           "models.weights.CheckpointError: cannot read safetensors file"), last
    # the driver's own stack never reaches the user (the controller's log lines carry the replica's)
    assert not any(ln.startswith("Traceback") for ln in r.stderr.splitlines())


def test_serve_config_checks_a_local_checkpoint_and_leaves_a_cluster_path_alone(tiny_ckpt, tmp_path, capsys):
    """`serve deploy` runs the YAML elsewhere: a path that exists here is checked like `gptoss serve` does,
    one that does not is the cluster's and is written as given."""
    from cli.main import main
    assert main(["serve-config", "--model", str(tiny_ckpt), "--tp", "3"]) == 2
    assert "gptoss serve-config: --tp 3 does not divide the 4 query heads" in capsys.readouterr().err
    out = tmp_path / "serve.yaml"
    assert main(["serve-config", "--model", "/models/gpt-oss-120b", "--tp", "8", "--out", str(out)]) == 0
    assert "/models/gpt-oss-120b" in out.read_text()


def test_serve_config_reads_stored_prompts_and_names_a_bad_one(tmp_path, capsys):
    import json

    import yaml

    from cli.main import main
    good = tmp_path / "prompts.yaml"
    good.write_text("- id: support\n  instructions: About {{product}}.\n  input: [{role: user, content: hi}]\n")
    out = tmp_path / "serve.yaml"
    assert main(["serve-config", "--prompts", str(good), "--out", str(out)]) == 0
    cfg = yaml.safe_load(out.read_text())["applications"][0]["args"]["config"]
    assert cfg["prompts"] == [{"id": "support", "version": "1", "instructions": "About {{product}}.",
                               "input": [{"role": "user", "content": "hi"}]}]
    for text, says in [(json.dumps([{"id": "x", "input": [{"role": "robot", "content": "hi"}]}]),
                        "--prompts: [0].input[0].role: Input should be"),
                       (json.dumps([{"id": "x"}, {"id": "x"}]), "--prompts: "),
                       ("{id: x}", "must hold a list of prompts")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        assert main(["serve-config", "--prompts", str(bad)]) == 2
        assert says in capsys.readouterr().err, text
    assert main(["serve-config", "--prompts", str(tmp_path / "none.yaml")]) == 2
    assert "--prompts: cannot read" in capsys.readouterr().err


def test_serve_answers_then_stops_cleanly_on_sigterm(tiny_ckpt, tmp_path):
    """The main job through its command: `gptoss serve` starts, answers the openai SDK, and on SIGTERM
    (docker stop, systemd, kill) stops Serve and Ray as Ctrl-C does: exit 0, its port free, and no
    native stack dump from Ray's own SIGTERM handler."""
    import signal
    import socket
    import time

    import openai

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    port, metrics = free_port(), free_port()
    out, err = (tmp_path / "out").open("w"), (tmp_path / "err").open("w")
    p = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--model", str(tiny_ckpt), "--port", str(port),
                          "--metrics-port", str(metrics), "--responses-file", str(tmp_path / "responses.sqlite")],
                         cwd=ROOT, env=dict(os.environ), stdout=out, stderr=err)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        t0 = time.time()
        while "OpenAI API ready" not in (tmp_path / "out").read_text():
            assert p.poll() is None and time.time() - t0 < 240, (tmp_path / "err").read_text()[-3000:]
            time.sleep(1)
        assert [m.id for m in client.models.list().data] == ["gpt-oss"]
        r = client.chat.completions.create(model="gpt-oss", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
        kept = client.responses.create(model="gpt-oss", input="Hi", max_output_tokens=4)
        conv = client.conversations.create(items=[{"role": "user", "content": "Hello"}])
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 0, (tmp_path / "err").read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stderr = (tmp_path / "err").read_text()
    from deployments.response_store import MemoryResponseStore
    back = MemoryResponseStore(path=str(tmp_path / "responses.sqlite"))  # what a restarted store starts with
    assert back.get(kept.id).response["output_text"] == kept.output_text and back.get(conv.id).items
    assert "gptoss serve: stopping" in stderr and "SIGTERM received" not in stderr and "Traceback" not in stderr
    with socket.socket() as s:  # nothing listens on the API port: Serve's proxy went with Ray (as a server
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # would bind it: past our connections' TIME_WAIT)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_serve_config_carries_the_flex_floor_and_names_a_bad_one(tmp_path, capsys):
    import yaml

    from cli.main import main
    out = tmp_path / "serve.yaml"
    assert main(["serve-config", "--flex-promote-s", "5", "--out", str(out)]) == 0
    cfg = yaml.safe_load(out.read_text())["applications"][0]["args"]["config"]
    assert cfg["models"][0]["engine"]["flex_promote_s"] == 5.0
    assert main(["serve-config", "--flex-promote-s", "-1"]) == 2
    assert "--flex-promote-s" in capsys.readouterr().err
