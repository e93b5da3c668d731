"""Render the chart with helm_python (Helm's own Go SDK, no helm binary, no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "gptoss"
VALUE_FILES = {"defaults": None, "20b": "values-20b.yaml", "120b-ep8": "values-120b-ep8.yaml"}
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the values files are meant for; kubernetes-validate has it


def user_values(name: str) -> dict:
    """The values a user passes (`-f FILE`), parsed the way helm parses them."""
    from helm_python.chart import values_from_yaml
    f = VALUE_FILES[name]
    return values_from_yaml((CHART / f).read_text()) if f else {}


def parse(manifests: dict[str, str]) -> list[dict]:
    """Rendered objects, in template order; NOTES.txt is text, not an object."""
    out = []
    for path in sorted(manifests):
        if not path.endswith("NOTES.txt"):
            out += [d for d in yaml.safe_load_all(manifests[path]) if d]
    return out


def kind(objs: list[dict], k: str) -> list[dict]:
    return [o for o in objs if o["kind"] == k]


def one(objs: list[dict], k: str) -> dict:
    found = kind(objs, k)
    assert len(found) == 1, f"expected one {k}, got {len(found)}"
    return found[0]


@pytest.fixture(scope="session")
def chart():
    from helm_python import Chart
    with Chart.load(CHART) as c:
        yield c


@pytest.fixture(scope="session")
def render(chart):
    def _render(values: dict | None = None, name: str = "gptoss", namespace: str = "llm") -> list[dict]:
        return parse(chart.render(values=values or {}, name=name, namespace=namespace))
    return _render
