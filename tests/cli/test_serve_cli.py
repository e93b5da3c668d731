"""`gptoss serve` refuses to start what could not answer a request."""

import os
import subprocess
import sys
from pathlib import Path

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
