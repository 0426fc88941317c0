""".github/workflows/ci.yml, checked without GitHub (nothing here runs it): the server job's Qdrant
is the compose file's pinned image, QDRANT_URL reaches the tests in that job only, and both jobs
run what .ci/run runs, ending with the README's test command."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def readme_test_command() -> str:
    """The test command of the README's set-up block: `bash scripts/test.sh   # ...`."""
    lines = [ln.split("#")[0].strip() for ln in (REPO / "README.md").read_text().splitlines()]
    found = [ln for ln in lines if re.fullmatch(r"bash scripts/test\.sh", ln)]
    assert found, "README.md names no test command"
    return found[0]


def ci_run_commands() -> list[str]:
    """The commands .ci/run runs, in order (its shell settings, cd and exports left out)."""
    lines = [ln.split("#")[0].strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(("set ", "cd ", "export "))]


def ci_run_exports() -> dict[str, str]:
    """The variables .ci/run exports (`export NAME=value`)."""
    lines = [ln.split("#")[0].strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    return dict(ln.removeprefix("export ").split("=", 1) for ln in lines
                if ln.startswith("export "))


def runs(job: dict) -> list[str]:
    return [s["run"].strip() for s in job["steps"] if "run" in s]


def test_triggers_and_runners(workflow):
    on = workflow.get("on", workflow.get(True))   # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(on)
    assert set(workflow["jobs"]) == {"server", "embedded"}
    for name, job in workflow["jobs"].items():
        assert job["runs-on"] == "ubuntu-latest", name
        setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))
        assert str(setup["with"]["python-version"]) == "3.11", name
        assert job["steps"][0]["uses"].startswith("actions/checkout@"), name


def test_the_server_job_runs_the_pinned_qdrant_of_the_compose_file(workflow):
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    pinned = compose["services"]["qdrant"]["image"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+", pinned), pinned
    job = workflow["jobs"]["server"]
    service = job["services"]["qdrant"]
    assert service["image"] == pinned
    assert "6333:6333" in [str(p) for p in service["ports"]]
    assert job["env"]["QDRANT_URL"] == "http://localhost:6333"
    # the key the tests send is the one the server was started with
    assert job["env"]["QDRANT_API_KEY"] == service["env"]["QDRANT__SERVICE__API_KEY"]
    wait = runs(job)[0]
    assert "/readyz" in wait and "$QDRANT_URL" in wait


def test_the_embedded_job_has_no_server(workflow):
    job = workflow["jobs"]["embedded"]
    assert "services" not in job
    places = [job.get("env", {}), *(s.get("env", {}) for s in job["steps"])]
    assert not any(k.startswith("QDRANT") for env in places for k in env)
    assert not any("QDRANT" in r for r in runs(job))


def test_both_jobs_run_what_ci_run_runs_ending_with_the_readme_test_command(workflow):
    command = readme_test_command()
    assert ci_run_commands()[-1] == command
    for name, job in workflow["jobs"].items():
        steps = [r for r in runs(job) if "QDRANT_URL" not in r]   # the server job's wait
        assert steps == ci_run_commands(), name
        assert steps[-1] == command, name


def test_both_jobs_set_what_ci_run_exports_so_the_slow_tests_run_in_ci(workflow):
    exports = ci_run_exports()
    assert exports.get("PHISEARCH_SLOW") == "1"     # scripts/test.sh then runs `slow` too
    for name, job in workflow["jobs"].items():
        assert {k: str(v) for k, v in job["env"].items() if k in exports} == exports, name
