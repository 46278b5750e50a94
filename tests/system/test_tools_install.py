"""`sam-fast-serve` in the client-only install (`pip install .`, no extra, a fresh virtualenv): a
subcommand that needs the server's packages says which extra to install and exits 2, without a
traceback; the ones that need none (models, wait-ready, team, --help) run."""

from __future__ import annotations

import subprocess

import pytest

from harness.servers import REPO, free_port

NEEDS_EXTRA = {
    "archive": (["--checkpoint", "x.pth", "--config", str(REPO / "model-config.yaml")], "serve"),
    "checkpoint-name": (["--config", str(REPO / "model-config.yaml")], "serve"),
    "download": (["--config", str(REPO / "model-config.yaml")], "serve"),
    "random-checkpoint": (["random.pth"], "serve"),
    "docs": ([str(REPO / "docs")], "serve"),
    "samples": (["samples"], "test"),
}


def serve_tool(bin_dir, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / "sam-fast-serve"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.parametrize("command", NEEDS_EXTRA)
def test_subcommand_names_the_extra_it_needs(client_bin, command, tmp_path):
    args, extra = NEEDS_EXTRA[command]
    ran = serve_tool(client_bin, command, *args, cwd=tmp_path)
    assert ran.returncode == 2, ran.stderr
    assert f'pip install "sam-fast-serve[{extra}]"' in ran.stderr
    assert "Traceback" not in ran.stderr and "ModuleNotFoundError" not in ran.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_subcommands_of_the_client_install_run(client_bin, tmp_path):
    models = serve_tool(client_bin, "models", cwd=tmp_path)
    assert models.returncode == 0 and "`vit_b`" in models.stdout, models.stderr
    waited = serve_tool(
        client_bin, "wait-ready", "--management-url", f"http://127.0.0.1:{free_port()}", "--timeout", "1", cwd=tmp_path
    )
    assert waited.returncode == 1 and "not READY after 1 s" in waited.stderr
    # The team gateway is standard library only: without a token it says how to set one.
    team = serve_tool(client_bin, "team", "--listen", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    assert team.returncode == 1 and "SAM_FAST_TEAM_TOKEN" in team.stderr and "Traceback" not in team.stderr
    helped = serve_tool(client_bin, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "archive" in helped.stdout
