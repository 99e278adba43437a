"""The Grafana dashboard against a real Prometheus scraping a real /metrics endpoint.

Every panel query is evaluated by a Prometheus server (the `prometheus` binary, on the
loopback, scraping once a second) with Grafana's variables filled in, and must parse
and return data. The static tests check the dashboard against the metrics contract.
"""

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from alexnetd.pipeline.jpeg import REASONS as SKIP_REASONS
from alexnetd.pipeline.stage import STAGES
from alexnetd.service.metrics import DALI_METRICS, EXPORTED_METRICS, STATES
from daemon_helpers import cli, free_port, start_args, status, wait_for

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "alexnetd.json"

# The metrics the daemon exports, as service/metrics.py defines them; Prometheus adds
# `up` for the scrape job itself.
PROMETHEUS_METRICS = ("up",)

SCRAPE_INTERVAL_S = 1
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval);
# one more scrape of slack keeps two samples in every window.
GRAFANA_VARS = {"__rate_interval": "5s", "__interval": "2s", "__range": "1m",
                "__range_s": "60", "__interval_ms": "2000"}


# ---------------------------------------------------------------- the dashboard's queries

def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # rows hold their panels when collapsed


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dash: dict):
    """(panel title, refId, expr, instant) for every Prometheus target on the dashboard."""
    out = []
    for p in _panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append((p["title"], t["refId"], t["expr"], bool(t.get("instant"))))
    return out


METRIC_NAME = re.compile(r"\b(alexnetd_[a-z0-9_]+|up)\b")
SELECTOR = re.compile(r"\b(alexnetd_[a-z0-9_]+|up)\s*(\{[^}]*\})?")


def metric_names(expr: str) -> set[str]:
    # Strip label matchers first: their values may contain anything.
    return set(METRIC_NAME.findall(re.sub(r"\{[^}]*\}", "{}", expr)))


def substitute(expr: str, instance: str) -> str:
    values = {"instance": instance, **GRAFANA_VARS}

    def sub(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


QUERIES = panel_queries(load_dashboard())


# ---------------------------------------------------------------- static checks

def test_dashboard_has_its_variables():
    dash = load_dashboard()
    assert dash["uid"] == "alexnetd"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    inst = variables["instance"]
    assert inst["type"] == "query"
    assert inst["query"] == "label_values(alexnetd_train_steps_total, instance)"
    assert inst["datasource"]["uid"] == "${datasource}"


def test_every_panel_reads_the_datasource_variable():
    for p in _panels(load_dashboard()["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", (p["title"], t["refId"])


def test_panels_have_unique_ids_and_do_not_overlap():
    panels = list(_panels(load_dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_filters_by_instance():
    for title, ref, expr, _ in QUERIES:
        for name, matchers in SELECTOR.findall(expr):
            assert 'instance="$instance"' in matchers, f"{title}/{ref}: {name} in {expr!r}"


def test_queries_use_only_exported_metrics():
    known = set(EXPORTED_METRICS) | set(DALI_METRICS) | set(PROMETHEUS_METRICS)
    for title, ref, expr, _ in QUERIES:
        unknown = metric_names(expr) - known
        assert not unknown, f"{title}/{ref} uses metrics nobody exports: {sorted(unknown)}"


def test_dashboard_shows_every_exported_metric():
    shown = set().union(*(metric_names(expr) for _, _, expr, _ in QUERIES))
    assert (set(EXPORTED_METRICS) | set(DALI_METRICS)) - shown == set()


def test_rank_panels_split_by_rank():
    """The data-parallel row: every query keeps the rank label, so each rank is its own
    series (and the slowest one can be named)."""
    titles = {"Slowest rank", "Images/s by rank", "Trainer starved share by rank", "Busy share by rank and stage (now)"}
    found = {t: e for t, _, e, _ in QUERIES if t in titles}
    assert set(found) == titles
    for title, expr in found.items():
        assert all("by (rank" in part for part in expr.split("sum")[1:]), title


def test_queries_use_only_known_variables():
    for _, _, expr, _ in QUERIES:
        assert "$" not in substitute(expr, "127.0.0.1:1")


# ---------------------------------------------------------------- a metrics target
# The real daemon on the shared generated data set, serving /metrics on 127.0.0.1:PORT.

RANKS = 2  # the daemon below trains as two data-parallel CPU replicas, so rank panels compare two


@pytest.fixture(scope="module")
def daemon_metrics_url(prepared_data, tmp_path_factory):
    """"127.0.0.1:PORT" of a real daemon training on fake shards, once it has taken
    steps, validated and written a checkpoint, so every panel has something to show."""
    run_dir, port, remote_port = tmp_path_factory.mktemp("dashboard") / "run", free_port(), free_port()
    cli(*start_args(prepared_data, run_dir, port, "--checkpoint-every", 0.05, "--gpus", RANKS,
                    "--parallel", "data", "--augmenters", 1, "--device", "cpu",
                    "--remote-augmenters", f"127.0.0.1:{remote_port}"), check=True)
    # One remote augmenter host (it joins rank 0's gateway), so that its per-host series exist too.
    key = run_dir.parent / "cpu-host.key"
    cli("keys", "--run-dir", run_dir, "add", "cpu-host", "--out", key, check=True)
    remote = subprocess.Popen([sys.executable, "-m", "alexnetd", "augment", "--connect", f"127.0.0.1:{remote_port}",
                               "--key", str(key)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (s := status(run_dir)) and s["validation"] and s["checkpoint"]
                 and s["remote_augmenters"]["images"].get("cpu-host"), timeout=300,
                 what="a validation, a checkpoint and a remote host's images")
        yield f"127.0.0.1:{port}"
    finally:
        remote.kill()
        remote.wait()
        cli("stop", "--run-dir", run_dir, "--now")  # no final checkpoint: nothing reads it


# ---------------------------------------------------------------- a real Prometheus

class Prometheus:
    """A `prometheus` server on the loopback that scrapes one target every second."""

    def __init__(self, target: str, workdir: Path, binary: str):
        self.target = target
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
            "scrape_configs:\n"
            "  - job_name: alexnetd\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params):
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400: the query did not parse
            body = json.load(e)
        assert body["status"] == "success", f"{params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str, **params):
        return self.api("query", query=expr, **params)

    def wait_for_scrapes(self, n: int, timeout: float = 60.0) -> None:
        """Until the target has been scraped n times, successfully the last time."""
        expr = f'count_over_time(up{{instance="{self.target}"}}[5m]) and up == 1'

        def scraped() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            try:
                got = self.query(expr)["result"]
            except OSError:
                return False  # not listening yet
            return bool(got) and float(got[0]["value"][1]) >= n

        try:
            wait_for(scraped, timeout, what=f"{self.target} to be scraped {n} times")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}:\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def prometheus(daemon_metrics_url, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` server binary is not installed (make testdeps)")
    server = Prometheus(daemon_metrics_url, tmp_path_factory.mktemp("prometheus"), binary)
    try:
        server.wait_for_scrapes(6)
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- live checks

def test_instance_variable_lists_the_daemon(prometheus):
    values = prometheus.api("label/instance/values", **{"match[]": "alexnetd_train_steps_total"})
    assert prometheus.target in values


def test_target_exports_exactly_the_contract(prometheus):
    names = prometheus.api("label/__name__/values",
                           **{"match[]": f'{{instance="{prometheus.target}"}}'})
    # prometheus_client adds a _created series for each counter.
    exported = {n for n in names if n.startswith("alexnetd_") and not n.endswith("_created")}
    assert exported == set(EXPORTED_METRICS)


def test_every_stage_reason_and_state_has_a_series(prometheus):
    """Labelled series exist from the start, at zero, so that no panel is empty."""
    inst = f'instance="{prometheus.target}"'

    def labels(metric, label):
        return {r["metric"][label] for r in prometheus.query(f"{metric}{{{inst}}}")["result"]}

    for metric in ("alexnetd_stage_images_total", "alexnetd_stage_busy_seconds_total",
                   "alexnetd_stage_starved_seconds_total", "alexnetd_stage_blocked_seconds_total",
                   "alexnetd_stage_processes", "alexnetd_stage_restarts_total"):
        assert labels(metric, "stage") == set(STAGES), metric
    assert labels("alexnetd_skipped_samples_total", "reason") == set(SKIP_REASONS)
    assert labels("alexnetd_state", "state") == set(STATES)


def _values(result) -> list[float]:
    if "value" in result:
        return [float(result["value"][1])]
    return [float(v) for _, v in result["values"]]


# The daemon here decodes on the CPU; the DALI panel's family is checked in test_dali.py.
CPU_QUERIES = [q for q in QUERIES if not metric_names(q[2]) & set(DALI_METRICS)]


@pytest.mark.parametrize("title,ref,expr,instant", CPU_QUERIES,
                         ids=[f"{t}/{r}" for t, r, _, _ in CPU_QUERIES])
def test_panel_query_returns_data(prometheus, title, ref, expr, instant):
    promql = substitute(expr, prometheus.target)
    now = time.time()
    data = prometheus.query(promql, time=now)
    assert data["resultType"] == "vector", promql
    assert data["result"], f"{title}/{ref}: no data for {promql}"
    if not instant:  # Grafana draws these with query_range
        ranged = prometheus.api("query_range", query=promql, start=now - 10, end=now, step=1)
        assert ranged["result"], f"{title}/{ref}: no range data for {promql}"
    for series in data["result"]:
        for v in _values(series):
            assert math.isfinite(v), f"{title}/{ref}: {series['metric']} is {v}"
            if "share" in title.lower() or title == "Bottleneck":
                assert -1e-9 <= v <= 1 + 1e-9, f"{title}/{ref}: share {v} outside 0..1"


def test_bottleneck_names_one_stage(prometheus):
    (expr,) = [e for t, _, e, _ in QUERIES if t == "Bottleneck"]
    result = prometheus.query(substitute(expr, prometheus.target))["result"]
    assert len(result) == 1 and result[0]["metric"]["stage"] in STAGES


def test_slowest_rank_names_one_rank(prometheus):
    (expr,) = [e for t, _, e, _ in QUERIES if t == "Slowest rank"]
    result = prometheus.query(substitute(expr, prometheus.target))["result"]
    assert len(result) == 1 and result[0]["metric"]["rank"] in {str(r) for r in range(RANKS)}


def test_rank_panels_show_every_rank(prometheus):
    for title in ("Images/s by rank", "Trainer starved share by rank"):
        (expr,) = [e for t, _, e, _ in QUERIES if t == title]
        result = prometheus.query(substitute(expr, prometheus.target))["result"]
        assert {r["metric"]["rank"] for r in result} == {str(r) for r in range(RANKS)}, title
    (expr,) = [e for t, _, e, _ in QUERIES if t == "Busy share by rank and stage (now)"]
    result = prometheus.query(substitute(expr, prometheus.target))["result"]
    assert {(r["metric"]["rank"], r["metric"]["stage"]) for r in result} == {
        (str(r), s) for r in range(RANKS) for s in STAGES}


def test_state_panel_shows_one_state_and_the_device(prometheus):
    state, device = [e for t, _, e, _ in QUERIES if t == "State"]
    result = prometheus.query(substitute(state, prometheus.target))["result"]
    assert [r["metric"]["state"] in STATES for r in result] == [True]
    result = prometheus.query(substitute(device, prometheus.target))["result"]
    assert [r["metric"]["device"] for r in result] == ["cpu"]  # this suite's daemon trains on the CPU
