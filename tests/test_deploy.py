"""deploy/: the compose file and Dockerfiles, checked without a Docker engine (none runs here).
Every `idx ...` command the compose file runs is parsed by the real `idx` Typer app, so a flag
renamed in the CLI breaks this test rather than a deployment."""

from __future__ import annotations

import re

import pytest
import typer
import yaml
from braceexpand import braceexpand
from conftest import REPO, shared_data_root
from phisearch.ui.cli import app

DEPLOY = REPO / "deploy"
QDRANT_URL = "http://qdrant:6333"   # service name and container port of the qdrant service
CORE = {"qdrant", "indexer", "ui", "serve"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def parse_idx(argv: list[str]) -> tuple[str, dict]:
    """argv = ["idx", CMD, *args] -> (CMD, its parsed params), through the real CLI's own parser
    (types, ranges, unknown options) without running the command."""
    assert argv[0] == "idx", argv
    group = typer.main.get_command(app)
    ctx = group.make_context("idx", [argv[1]])
    cmd = group.get_command(ctx, argv[1])
    assert cmd is not None, f"idx has no command {argv[1]!r}"
    return argv[1], cmd.make_context(argv[1], list(argv[2:]), parent=ctx).params


def idx_commands(compose: dict) -> dict[str, list[str]]:
    return {name: s["command"] for name, s in compose["services"].items()
            if isinstance(s.get("command"), list) and s["command"][:1] == ["idx"]}


def test_services_and_the_pinned_qdrant_server(compose):
    services = compose["services"]
    assert CORE <= set(services)
    q = services["qdrant"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+", q["image"]), q["image"]
    assert q["environment"]["QDRANT__SERVICE__API_KEY"].startswith("${QDRANT_API_KEY")
    assert "qdrant_storage:/qdrant/storage" in q["volumes"]
    assert "qdrant_storage" in compose["volumes"]            # a named volume, not a bind mount
    hc = q["healthcheck"]
    assert hc["test"][0] in ("CMD", "CMD-SHELL") and "/readyz" in " ".join(hc["test"])
    assert "6333" in " ".join(hc["test"]) and hc["retries"] >= 3
    # the key comes from .env and never sits on a command line
    env_example = (DEPLOY / ".env.example").read_text()
    assert re.search(r"^QDRANT_API_KEY=\S+", env_example, re.MULTILINE)
    for name, s in services.items():
        assert "api-key" not in " ".join(map(str, s.get("command") or [])), name
        if name != "qdrant":
            assert s["environment"]["QDRANT_API_KEY"].startswith("${QDRANT_API_KEY"), name


def test_indexer_is_one_shot_read_only_and_waits_for_a_healthy_server(compose):
    for name in ("indexer", "indexer-gpu"):
        s = compose["services"][name]
        assert s["restart"] == "no"
        assert s["depends_on"]["qdrant"]["condition"] == "service_healthy"
        mount = next(v for v in s["volumes"] if v.endswith(":/data:ro"))
        assert mount.startswith("${PHISEARCH_DATA")
        cmd, params = parse_idx(s["command"])
        assert cmd == "build" and params["qdrant_url"] == QDRANT_URL and params["json_out"]
        # the shards it names are the shared data's (PHISEARCH_DATA mounted at /data)
        files = [p for pat in params["data"] for p in braceexpand(pat)]
        assert len(files) == 14 and all(f.startswith("/data/") for f in files)
        missing = [f for f in files if not (shared_data_root() / f[len("/data/"):]).is_file()]
        assert not missing, missing
    assert parse_idx(compose["services"]["indexer-gpu"]["command"])[1]["device"] == "cuda"


def test_every_idx_command_parses_with_the_real_cli(compose):
    cmds = idx_commands(compose)
    assert set(cmds) >= CORE - {"qdrant"}
    for name, argv in cmds.items():
        cmd, params = parse_idx(argv)
        assert params["qdrant_url"] == QDRANT_URL, name
        assert params["collection"] == "phisearch", name
        s = compose["services"][name]
        if cmd in ("ui", "serve"):   # listens on every interface of its container, on the
            host = params["address" if cmd == "ui" else "host"]   # port that is published
            assert host == "0.0.0.0", name
            assert any(p.endswith(f":{params['port']}") for p in s["ports"]), name
            assert s["restart"] == "unless-stopped"
        if name.endswith("-gpu"):
            assert s["profiles"] == ["gpu"] and s["image"] == "phisearch:cuda"
            assert s["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
            assert s["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert compose["services"]["serve"]["healthcheck"]["test"][-1].count("/healthz") == 1


def test_the_parser_rejects_what_the_cli_rejects():
    """The check above has teeth: a wrong flag or value fails it."""
    with pytest.raises(Exception, match="No such option"):
        parse_idx(["idx", "serve", "--qdrant-url", QDRANT_URL, "--listen", "0.0.0.0"])
    with pytest.raises(Exception, match="65535"):
        parse_idx(["idx", "serve", "--port", "70000"])
    with pytest.raises(AssertionError, match="no command"):
        parse_idx(["idx", "serv"])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_torch_first_then_the_package(name):
    text = (DEPLOY / name).read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith(("FROM", "ARG"))
    install = next(i for i, ln in enumerate(lines) if "pip install ." in ln)
    if name == "Dockerfile":
        torch_line = next(i for i, ln in enumerate(lines) if "download.pytorch.org/whl/cpu" in ln)
        assert torch_line < install and "torch==" in lines[torch_line]
        assert re.search(r"TORCH_VERSION=2\.\d+\.\d+", text)
        # the same torch as scripts/install.sh installs on CPU hosts
        pinned = re.search(r"torch==([\d.]+)", (REPO / "scripts" / "install.sh").read_text())
        assert f"TORCH_VERSION={pinned.group(1)}" in text
    else:
        assert re.search(r"^ARG BASE=pytorch/pytorch:\S+-cuda\S+", text, re.MULTILINE)
    for ln in lines:   # everything copied exists in the build context (the repository root)
        if ln.startswith("COPY"):
            for src in ln.split()[1:-1]:
                assert (REPO / src).exists(), src
    assert 'CMD ["idx"' in text
    ignore = (DEPLOY / f"{name}.dockerignore").read_text()
    assert "*" in ignore.splitlines() and "!indexer" in ignore
