"""tools/torchserve.py without a server: config ports, what the logs say of a failure, the run
folder's state."""

from __future__ import annotations

import pytest

from harness.servers import REPO
from sam_fast_serve.tools.torchserve import RunFolder, StartError, failure_reason, moved, read_ports, stop, with_ports

SHIPPED = (REPO / "config.properties").read_text()


def test_the_shipped_config_sets_all_five_ports_on_loopback():
    assert read_ports(SHIPPED) == {
        "inference": 8080,
        "management": 8081,
        "metrics": 8082,
        "grpc_inference": 7070,
        "grpc_management": 7071,
    }
    assert "grpc_inference_address=127.0.0.1" in SHIPPED and "grpc_management_address=127.0.0.1" in SHIPPED


def test_ports_move_together_and_are_written_back():
    ports = moved(read_ports(SHIPPED), 9080)
    assert ports == {
        "inference": 9080,
        "management": 9081,
        "metrics": 9082,
        "grpc_inference": 8070,
        "grpc_management": 8071,
    }
    text = with_ports(SHIPPED, ports)
    assert read_ports(text) == ports and "inference_address=http://127.0.0.1:9080\n" in text
    with pytest.raises(StartError, match="out of 1..65535"):
        moved(read_ports(SHIPPED), 100)


def test_a_port_left_to_the_default_or_set_twice_is_refused():
    with pytest.raises(StartError, match="sets no grpc_management_port"):
        read_ports(SHIPPED.replace("grpc_management_port=7071\n", ""))
    with pytest.raises(StartError, match="sets metrics_address 2 times"):
        with_ports(SHIPPED + "metrics_address=http://127.0.0.1:9999\n", {"metrics": 1234})


@pytest.mark.parametrize(
    ("console", "frontend", "worker", "reason"),
    [
        ("TorchServe is already running, please use torchserve --stop to stop TorchServe.", "", "",
         "another TorchServe lists itself in this run folder's pid file"),
        ("", "2026-12-07 [ERROR] main org.pytorch.serve.ModelServer - Failed to bind to address: /127.0.0.1:7070", "",
         "/127.0.0.1:7070 is in use: another server listens there"),
        ("java not found, please make sure JAVA_HOME is set properly.", "", "",
         "Java is not installed (or JAVA_HOME is wrong)"),
        ('Exception in thread "main" java.lang.IllegalArgumentException: bad model store', "", "",
         "TorchServe stopped: java.lang.IllegalArgumentException: bad model store"),
        ("", "", "W-9000 MODEL_LOG - Backend worker process died.\nW-9000 MODEL_LOG - Traceback (most recent call last):\n"
         "W-9000 MODEL_LOG - sam_fast_serve.common.errors.ConfigError: checkpoint x.pth fails its sha256 check",
         "the model failed to load: the worker died (sam_fast_serve.common.errors.ConfigError: checkpoint x.pth "
         "fails its sha256 check)"),
        ("", "W-9000 MODEL_LOG - Backend worker process died.", "",
         "the model failed to load: the worker died (no exception in model_log.log (killed, or out of memory?))"),
        ("", "2026-12-07 [INFO ] main org.pytorch.serve.ModelServer - Torchserve version: 0.12.0", "", None),
    ],
)  # fmt: skip
def test_failure_reasons_from_the_logs(console, frontend, worker, reason):
    assert failure_reason(console, frontend, worker) == reason


@pytest.mark.parametrize("written", ["", "[]", "{}", '{"inference_url": "http://127.0.0.1:8080"}', "not json"])
def test_a_state_file_that_is_not_start_s_is_none_and_stop_leaves_it(tmp_path, written):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.state_file.write_text(written)
    assert run.state() is None and run.pid() is None
    assert stop(run) is None
