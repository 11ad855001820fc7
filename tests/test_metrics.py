"""Metrics: one registry, alert rules and dashboard that only use what exists, the docs list
every metric, and a real relay serves them with /healthz and /readyz."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tests.conftest import unique_topic
from zeroloss import metrics
from zeroloss.embedded_broker import EmbeddedBroker, free_port
from zeroloss.errors import ConfigError
from zeroloss.outbox.spool import FileSpool

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "zeroloss.json"
OPERATIONS = ROOT / "docs" / "operations.md"
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression refers to (not functions, keywords or label names)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if re.match(r"\s*\(", expr[m.end() :]) or m.group() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def test_promql_name_extraction() -> None:
    assert promql_metrics(
        'histogram_quantile(0.99, sum by (le, group) (rate(zeroloss_x_bucket{a="b(c)"}[5m]))) '
        "> 1 and ignoring(state) time() - zeroloss_y > 2 * 86400"
    ) == {"zeroloss_x_bucket", "zeroloss_y"}


def test_alert_rules_are_well_formed_and_use_only_zeroloss_metrics() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    known = metrics.metric_names()
    names = []
    assert isinstance(doc["groups"], list) and doc["groups"]
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Zeroloss[A-Za-z]+", rule["alert"])
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            used = promql_metrics(rule["expr"])
            assert used, rule["expr"]
            assert used <= known, f"{rule['alert']}: unknown metrics {used - known}"
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    runbook = OPERATIONS.read_text()
    for name in names:
        assert f"{name}" in runbook, f"docs/operations.md has no runbook for {name}"


def test_alerts_cover_what_the_issue_asks_for() -> None:
    exprs = " ".join(r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"])
    for needle in (
        'oldest_age_seconds{state="pending"}',
        "expired_leases",
        'state="failed"',
        "doubt|malformed",
        "disk_free_bytes",
        "audit_loss_ratio",
        "consumer_lag_messages",
    ):
        assert needle in exprs


def test_the_dashboard_uses_only_zeroloss_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    known = metrics.metric_names()
    used: set[str] = set()
    for panel in doc["panels"]:
        for target in panel["targets"]:
            used |= promql_metrics(target["expr"])
    assert used <= known, used - known
    families = set(metrics.zeroloss_metric_families())
    shown = {n for n in families if any(u.startswith(n.removesuffix("_total")) for u in used)}
    assert shown == families, f"not on the dashboard: {families - shown}"


def test_the_docs_list_exactly_the_metrics_that_exist() -> None:
    documented = set(re.findall(r"^\| `(zeroloss_[a-z_]+)` \|", OPERATIONS.read_text(), re.M))
    assert documented == set(metrics.zeroloss_metric_families())


def test_labels_come_from_the_one_vocabulary() -> None:
    with pytest.raises(ConfigError, match="outcome"):
        metrics.relay_outcome("sent")
    with pytest.raises(ConfigError, match="outcome"):
        metrics.consumer_processed("g", "t", "ok")
    metrics.consumer_processed("billing", "orders", "duplicate", seconds=0.01)
    metrics.consumer_lag("billing", "orders", 3, 17)
    assert (
        metrics.REGISTRY.get_sample_value(
            "zeroloss_consumer_messages_total", {"group": "billing", "topic": "orders", "outcome": "duplicate"}
        )
        or 0
    ) >= 1
    assert (
        metrics.REGISTRY.get_sample_value(
            "zeroloss_consumer_lag_messages", {"group": "billing", "topic": "orders", "partition": "3"}
        )
        == 17
    )


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:  # closes the response's socket
            return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"relay exited: {log.read_text()[-3000:]}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:]}")
        time.sleep(0.1)


def sample(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


def start_relay(tmp_path: Path, target: str, port: int, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "relay.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zeroloss",
                "relay",
                "--source",
                f"spool://{tmp_path / 'spool'}",
                "--target",
                target,
                "--metrics-port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.kafka
def test_a_relay_serves_every_metric_and_its_health(kafka: EmbeddedBroker, tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "spool")
    for i in range(50):
        with spool.transaction() as tx:
            tx.add(topic=unique_topic("metrics") if i == 0 else "metrics-scrape", value=b"%d" % i)
    port = free_port()
    proc, log = start_relay(tmp_path, kafka.url, port, "--relay-id", unique_topic("m"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get(f"{base}/healthz")[0] == 200, 60, "/healthz", proc, log)

        def delivered() -> bool:
            text = get(f"{base}/metrics")[1]
            return (
                sample(text, "zeroloss_relay_messages_total", '{outcome="delivered"}') == 50
                and sample(text, "zeroloss_outbox_messages", '{state="success"}') == 50
            )

        wait_until(delivered, 120, "50 delivered and the gauges refreshed", proc, log)
        status, text = get(f"{base}/metrics")
        assert status == 200
        for name in metrics.zeroloss_metric_families():
            if not name.startswith("zeroloss_audit_"):  # those go to the audit's textfile
                assert f"# TYPE {name} " in text, name
        assert sample(text, "zeroloss_relay_claimed_total") == 50
        assert sample(text, "zeroloss_relay_broker_up") == 1
        assert sample(text, "zeroloss_relay_delivery_latency_seconds_count") == 50
        assert (sample(text, "zeroloss_relay_publish_seconds_count") or 0) >= 1
        assert (sample(text, "zeroloss_outbox_oldest_age_seconds", '{state="success"}') or 0) > 0
        assert (sample(text, "zeroloss_outbox_disk_total_bytes", f'{{path="{spool.root}"}}') or 0) > 0
        assert get(f"{base}/readyz") == (200, "ok\n")
        assert get(f"{base}/nope")[0] == 404
    finally:
        code = stop(proc)
        spool.close()
    assert code == 0, log.read_text()[-3000:]


def test_readyz_says_why_while_the_broker_is_down(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "spool")
    with spool.transaction() as tx:
        tx.add(topic="t", value=b"x")
    port = free_port()
    proc, log = start_relay(
        tmp_path, f"kafka://127.0.0.1:{free_port()}", port, "--timeout-s", "1", "--max-backoff-s", "1"
    )
    try:
        wait_until(lambda: "broker outage" in get(f"http://127.0.0.1:{port}/readyz")[1], 60, "an outage", proc, log)
        status, body = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503 and "broker outage" in body
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        text = get(f"http://127.0.0.1:{port}/metrics")[1]
        assert sample(text, "zeroloss_relay_broker_up") == 0
        assert (sample(text, "zeroloss_relay_messages_total", '{outcome="outage"}') or 0) >= 1
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]
        spool.close()


def test_the_relay_counts_every_outcome_with_one_label_vocabulary(tmp_path: Path) -> None:
    from tests.test_relay import FAST, ScriptedBroker
    from zeroloss.errors import BrokerError
    from zeroloss.relay import Relay

    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    outcomes = ("delivered", "retry", "rejected", "exhausted", "held", "outage")
    before = {o: value("zeroloss_relay_messages_total", outcome=o) for o in outcomes}
    claimed = value("zeroloss_relay_claimed_total")
    latency = value("zeroloss_relay_delivery_latency_seconds_count")
    spool = FileSpool(tmp_path / "spool")
    for v, k in ((b"ok", b"A"), (b"bad", b"B"), (b"later", b"B"), (b"flaky", b"C")):
        with spool.transaction() as tx:
            tx.add(topic="t", value=v, key=k)
    broker = ScriptedBroker([BrokerError("down"), {b"bad": "reject", b"flaky": "retry"}])
    relay = Relay(spool, broker, replace(FAST, stats_every_s=0.0))
    relay.drain(timeout_s=30)
    got = {o: value("zeroloss_relay_messages_total", outcome=o) - before[o] for o in outcomes}
    # outage: all 4 back; then ok delivered, bad rejected, later held behind it, flaky retried;
    # then flaky delivered; later stays parked behind the failed bad.
    assert got == {"delivered": 2, "retry": 1, "rejected": 1, "exhausted": 0, "held": 1, "outage": 4}
    assert value("zeroloss_relay_claimed_total") - claimed == 4 + 4 + 1
    assert value("zeroloss_relay_delivery_latency_seconds_count") - latency == 2
    assert value("zeroloss_outbox_messages", state="failed") == 1  # the gauges, refreshed by the relay
    assert value("zeroloss_outbox_parked") == 1
    assert relay.readiness() == (True, "ok")
    spool.close()
