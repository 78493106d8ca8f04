"""What tests/ops checks: the PromQL expressions, metric names and settings that deploy/ names,
read from the files themselves (so a rename in either place breaks a test)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.serving import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "foundry-local.json"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
CHART = DEPLOY / "helm" / "foundry-local"
ADAPTER_VALUES = DEPLOY / "helm" / "prometheus-adapter-values.yaml"
INFERENCEPOOL_VALUES = DEPLOY / "helm" / "inferencepool-values.yaml"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"

# Grafana's variables, as the e2e test fills them in: every model and instance, and a rate window
# that covers the whole test (its traffic is over within a minute).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$model": ".*",
    "$instance": ".+",
}

_METRIC = re.compile(r"\bfoundry_local_[a-z0-9_]+\b")
_NOT_METRICS = {"foundry_local_py", "foundry_local_sdk"}  # our package; Foundry Local's SDK package


@dataclass(frozen=True)
class Expr:
    source: str
    """Where it comes from: 'dashboard: <panel> [<refId>]' or 'alert: <name>'."""
    expr: str
    """PromQL, with Grafana's variables filled in."""


def tool(name: str) -> str | None:
    return shutil.which(name)


def run(cmd: list[str], cwd: Path | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, **kw)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def fill_variables(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    if "$" in expr:
        raise AssertionError(f"an unknown Grafana variable in {expr!r}")
    return expr


def dashboard_exprs() -> list[Expr]:
    out = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            source = f"dashboard: {panel['title']} [{target['refId']}]"
            out.append(Expr(source, fill_variables(target["expr"])))
    return out


def dashboard_variable_queries() -> list[tuple[str, str, str]]:
    """(variable, metric, label) of each ``label_values(metric, label)`` query variable."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
        assert m, f"variable {var['name']}: not a label_values() query"
        out.append((var["name"], m.group(1), m.group(2)))
    return out


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_exprs() -> list[Expr]:
    return [Expr(f"alert: {rule['alert']}", rule["expr"].strip()) for rule in alert_rules()]


def split_comparison(expr: str) -> tuple[str, str, str] | None:
    """``(left, operator, right)`` when ``expr``'s outermost operator is a comparison (an alert's
    threshold), else None. Brackets, braces, parentheses and strings are skipped."""
    depth = 0
    quote = ""
    i = 0
    found = None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            two = expr[i : i + 2]
            if two in (">=", "<=", "==", "!="):
                found = (i, two)
                i += 2
                continue
            if c in "<>":
                found = (i, c)
        i += 1
    if found is None:
        return None
    at, op = found
    return expr[:at].strip(), op, expr[at + len(op) :].strip()


def metric_names(text: str) -> set[str]:
    return set(_METRIC.findall(text)) - _NOT_METRICS


def exposed_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition can produce (a histogram's _bucket, _sum and
    _count included), from its TYPE lines and its samples: a labelled counter nobody has
    incremented yet has a TYPE line and no sample."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind in ("histogram", "summary"):
                names.update({name + "_bucket", name + "_sum", name + "_count"})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def files_naming_metrics() -> dict[str, Path]:
    """The files whose metric names must exist: dashboard, alerts, the chart's templates and
    values (HPA, InferencePool), the prometheus-adapter rules, the endpoint picker's values."""
    files = {
        "dashboard": DASHBOARD,
        "alerts": ALERTS,
        "prometheus-adapter rules": ADAPTER_VALUES,
        "endpoint picker values": INFERENCEPOOL_VALUES,
    }
    for path in sorted(CHART.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".tpl", ".txt"):
            files[f"chart: {path.relative_to(CHART)}"] = path
    return files
