"""Metrics, watched as users watch them: a real Prometheus scrapes a real TorchServe (shipped
config.properties, Prometheus mode) while known requests go through, and its HTTP API must give
the values those requests imply. The Grafana dashboard and docs/metrics.md use only the metrics that exist."""

from __future__ import annotations

import base64
import json
import re
import time

import numpy as np
import pytest
import requests

from harness.archives import running_server
from harness.files import encode
from harness.servers import REPO, Prometheus, RedisServer
from sam_fast_serve.common.wire import decode_pickled
from sam_fast_serve.server.metrics import METRICS, STAGES, TORCHSERVE_METRICS

DASHBOARD = REPO / "dashboards" / "sam-fast-serve.json"
MODEL = "sam-fast"
CLICK = {"points": [[120.0, 100.0]]}  # one point: 3 masks (multimask)
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def series_names() -> set[str]:
    """Every series name the documented metrics give in Prometheus (histograms as their three)."""
    names = set()
    for metric in (*METRICS, *TORCHSERVE_METRICS):
        suffixes = ("_bucket", "_sum", "_count") if metric.kind == "histogram" else ("",)
        names.update(metric.name + suffix for suffix in suffixes)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names (in matchers and by/without lists), strings, durations or numbers."""
    text = re.sub(r'"[^"]*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set(re.findall(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()", text))
    return names - PROMQL_WORDS


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="y{"}[5m]))) / b / 1e6') == {
        "a_bucket",
        "b",
    }


def test_dashboard_reads_only_documented_metrics_and_shows_each_of_ours():
    used = set().union(*map(metric_names, dashboard_queries()))
    assert used <= series_names(), used - series_names()
    for metric in METRICS:
        assert any(name.startswith(metric.name) for name in used), metric.name


def test_docs_document_every_metric_with_its_type_and_labels():
    section = (REPO / "docs" / "metrics.md").read_text().split("\n## Metrics\n")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| `([\w:]+)` \| (\w+ \| [^|]*) \|", section, re.M))
    for metric in (*METRICS, *TORCHSERVE_METRICS):
        labels = ", ".join(f"`{label}`" for label in metric.labels) or "-"
        assert rows.get(metric.name) == f"{metric.kind} | {labels}", metric.name
    assert set(rows) == {metric.name for metric in (*METRICS, *TORCHSERVE_METRICS)}


@pytest.fixture(scope="module")
def watched(tmp_path_factory, random_checkpoint):
    """TorchServe (shared Redis store, a local cache that holds one embedding) scraped by Prometheus."""
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))
    redis_server.start()
    # fp32 (bf16 is emulated on AVX2-only CPUs, 9x slower): a test_vit embedding is 4 MiB.
    handler = {"embedding_store": redis_server.url, "dtype": "float32", "embedding_cache_bytes": 6 * 2**20}
    try:
        with running_server(tmp_path_factory.mktemp("torchserve"), random_checkpoint, handler=handler) as server:
            prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{server.ports['metrics']}"])
            prometheus.start()
            try:
                yield server, redis_server, prometheus
            finally:
                prometheus.stop()
    finally:
        redis_server.stop()


def value(prometheus: Prometheus, expression: str) -> float:
    (sample,) = prometheus.query(expression)
    return float(sample["value"][1])


def wait_for(prometheus: Prometheus, expression: str, expected: float, timeout: float = 30) -> None:
    """Until Prometheus has scraped `expression` == `expected`."""
    deadline = time.monotonic() + timeout
    found = None
    while time.monotonic() < deadline:
        result = prometheus.query(expression)
        found = float(result[0]["value"][1]) if result else None
        if found == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"{expression} = {found}, expected {expected}")


def test_prometheus_gets_the_values_known_requests_give(watched, chelsea, astronaut):
    server, redis_server, prometheus = watched
    url = f"{server.inference_url}/predictions/{MODEL}"
    headers = {**server.auth(), "Accept": "application/json"}
    selector = f'{{ModelName="{MODEL}"}}'
    # Counters known in advance are published at 0 when the worker starts.
    wait_for(prometheus, f"sum(sam_embedding_store_errors_total{selector})", 0)
    assert len(prometheus.query(f"sam_embedding_lookups_total{selector}")) == 4

    def send(body: bytes | dict) -> requests.Response:
        if isinstance(body, dict):
            return requests.post(url, json=body, headers=headers, timeout=300)
        return requests.post(
            url, data=body, headers={**headers, "Content-Type": "application/octet-stream"}, timeout=300
        )

    first, second, third = chelsea, astronaut[:200, :300], np.ascontiguousarray(chelsea[:, ::-1])
    statuses, masks = [], {"automatic": 0, "prompted": 0}
    for image in (first, second):  # each: local miss, shared miss; the second evicts the first locally
        reply = send(encode(image))
        statuses.append(reply.status_code)
        masks["automatic"] += len(reply.json())
    reply = requests.post(url, data=encode(first), headers=server.auth(), timeout=300)  # local miss, shared hit
    statuses.append(reply.status_code)
    masks["automatic"] += len(decode_pickled(reply.text))
    first_id = reply.headers["X-Image-Id"]
    reply = send({"image": base64.b64encode(encode(first)).decode(), **CLICK})  # local hit
    statuses.append(reply.status_code)
    masks["prompted"] += sum(len(entry["masks"]) for entry in reply.json()["prompts"])
    reply = send({"image_id": first_id, **CLICK})  # local hit
    statuses.append(reply.status_code)
    masks["prompted"] += sum(len(entry["masks"]) for entry in reply.json()["prompts"])
    statuses.append(send({"image_id": "0" * 32, **CLICK}).status_code)  # local miss, shared miss: 404
    statuses.append(send(b"not an image").status_code)  # 415, before any store
    redis_server.stop()
    try:
        reply = send(encode(third))  # local miss; shared read and write fail: answered anyway
        statuses.append(reply.status_code)
        masks["automatic"] += len(reply.json())
        statuses.append(send({"image_id": "f" * 32, **CLICK}).status_code)  # local miss, shared read fails: 503
    finally:
        redis_server.start()
    assert statuses == [200, 200, 200, 200, 200, 404, 415, 200, 503]
    assert masks["prompted"] == 6

    by_status = {"200": 6, "404": 1, "415": 1, "503": 1}
    wait_for(prometheus, f"sum(sam_answers_total{selector})", sum(by_status.values()))
    for status, count in by_status.items():
        assert value(prometheus, f'sam_answers_total{{ModelName="{MODEL}", status="{status}"}}') == count
    for mode, count in {"automatic": 4, "prompted": 2}.items():
        assert value(prometheus, f'sam_images_total{{ModelName="{MODEL}", mode="{mode}"}}') == count
        assert value(prometheus, f'sam_masks_total{{ModelName="{MODEL}", mode="{mode}"}}') == masks[mode]
    lookups = {("local", "hit"): 2, ("local", "miss"): 6, ("shared", "hit"): 1, ("shared", "miss"): 3}
    for (tier, result), count in lookups.items():
        query = f'sam_embedding_lookups_total{{ModelName="{MODEL}", tier="{tier}", result="{result}"}}'
        assert value(prometheus, query) == count, query
    assert value(prometheus, f"sam_embedding_store_errors_total{selector}") == 3  # read + write, then read

    # Stages: decode per request; the engine's and the wire's per answered image (6).
    for stage in STAGES:
        count = 9 if stage == "decode" else 6
        assert value(prometheus, f'sam_stage_seconds_count{{ModelName="{MODEL}", stage="{stage}"}}') == count, stage
    for stage in ("decode", "image_encoder", "mask_decoder", "postprocess", "wire_encode"):
        assert value(prometheus, f'sam_stage_seconds_sum{{ModelName="{MODEL}", stage="{stage}"}}') > 0, stage
    decoded = [first, second, first, first, third]  # images sent (the 415 is not an image)
    assert value(prometheus, f"sam_image_megapixels_count{selector}") == len(decoded)
    megapixels = sum(image.shape[0] * image.shape[1] for image in decoded) / 1e6
    assert value(prometheus, f"sam_image_megapixels_sum{selector}") == pytest.approx(megapixels)
    assert value(prometheus, f"HandlerTime{selector}") > 0

    # Every dashboard query runs and finds data. A rate() needs two scrapes of a series, and the
    # last requests' series may be a single scrape old: give each a few scrapes.
    for expression in dashboard_queries():
        query = expression.replace("$model", MODEL).replace("$__rate_interval", "5m")
        deadline = time.monotonic() + 10
        while not prometheus.query(query) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert prometheus.query(query), query
