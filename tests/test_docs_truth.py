"""Statements in the docs and help that went stale once (issue 27, item 10), each tied to what
makes it true, so a new model, a renamed document or a changed output format fails here rather
than leaving a false sentence behind. Cheap: no model, no store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from phisearch.indexer.cli.build import _print_sync
from phisearch.indexer.manage import cluster as cluster_mod
from phisearch.indexer.manage import export as export_mod
from phisearch.indexer.store import CLUSTERS_DOC, LAST_RUN_DOC, SHARDS_DOC
from phisearch.ui.cli import app
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
SHIPPED = json.loads((REPO / "indexer/model/checkpoints/small64.json").read_text())
FIGURE = re.compile(r"(\d+) clusters, (\d+)% noise")


def test_idx_cluster_help_carries_no_figure_that_goes_stale():
    res = CliRunner().invoke(app, ["cluster", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "HDBSCAN" in res.output   # the help was read, not an error
    assert not re.search(r"\d+ ?%|\d+ clusters", res.output), res.output


def _paragraph(text: str, at: int) -> str:
    start = text.rfind("\n\n", 0, at)
    end = text.find("\n\n", at)
    return text[start + 2 if start >= 0 else 0:end if end >= 0 else len(text)]


def test_readme_cluster_figure_is_the_shipped_models_and_cites_where_it_was_recorded():
    """The README's `idx cluster` figure names its source; the source states the same figure
    for the checkpoint shipped now (a JSON: its model hash; a document: its step count in the
    same paragraph), so shipping another model makes this fail until the figure is redone."""
    line, = [ln for ln in (REPO / "README.md").read_text().splitlines()
             if ln.startswith("idx cluster")]
    m = re.search(FIGURE.pattern + r" \(([^)]+)\)", line)
    assert m, f"README's idx cluster line has no 'N clusters, P% noise (source)': {line}"
    clusters, noise, source = int(m[1]), int(m[2]), REPO / m[3]
    assert source.is_file(), f"README cites {m[3]}, which does not exist"
    if source.suffix == ".json":
        rec = json.loads(source.read_text())
        assert (rec["clusters"], round(100 * rec["noise"] / rec["points"])) == (clusters, noise)
        assert rec["model_sha256"] == SHIPPED["weights_sha256"], "recorded with another model"
        return
    text = source.read_text()
    hits = [h for h in FIGURE.finditer(text) if (int(h[1]), int(h[2])) == (clusters, noise)]
    assert hits, f"{m[3]} does not state {clusters} clusters, {noise}% noise"
    steps = f"{SHIPPED['steps']:,} steps"
    assert any(steps in _paragraph(text, h.start()) for h in hits), (
        f"{m[3]} states the figure, but not for the shipped checkpoint ({steps})")


def test_cluster_docstring_names_the_model_and_readout_each_benchmark_recorded():
    """Every benchmark JSON the docstring cites is named with the model and readout it was
    measured on; the shipped model's readout is the one its checkpoint record says."""
    doc = cluster_mod.__doc__ or ""
    cited = re.findall(r"\(([^()]*bench/results/(\w+)\.json[^()]*)\)", doc)
    assert len(cited) >= 3, cited
    for text, name in cited:
        col = json.loads((REPO / "bench/results" / f"{name}.json").read_text())["collection"]
        flat = " ".join(text.split())
        assert f"model {col['model_sha256'][:12]}" in flat, (name, flat)
        assert f"readout {col['readout']}" in flat, (name, flat)
    m = re.search(r"shipped small64's default readout is (\S+)", " ".join(doc.split()))
    assert m and m[1] == SHIPPED["readout"], (m and m[1], SHIPPED["readout"])


def test_export_names_the_stores_side_documents_and_loads_no_torch():
    """What export.py's comment says: its side documents are the store's own constants
    (cluster.DOC among them), and importing export pulls in no torch."""
    assert export_mod.SIDE_DOCS == (SHARDS_DOC, LAST_RUN_DOC, CLUSTERS_DOC)
    assert cluster_mod.DOC == CLUSTERS_DOC
    probe = "import sys, phisearch.indexer.manage.export; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
    assert "not imported" not in (REPO / "indexer/manage/export.py").read_text()


def test_watch_json_is_json_lines_and_the_readme_says_so(capsys):
    """`--json` prints one JSON object, except `idx build --watch --json`: one per sync, each
    on its own line. The README states that exception; the output keeps to it."""
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "`--json` prints exactly one JSON object on stdout" in readme
    assert "except `idx build --watch --json`, which prints one per sync, each on its own " \
           "line (JSON Lines)" in readme
    syncs = [{"new": i, "changed": 0, "deleted": 0, "unchanged": 3, "indexed": i, "seconds": 0.1,
              "points": 3 + i, "skipped": {"corrupt": 1}, "folders": {"/p": {"new": i}},
              "skipped_samples": [{"key": "a\nb"}]} for i in range(3)]
    for s in syncs:
        _print_sync(s, json_out=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert [json.loads(ln)["new"] for ln in lines] == [0, 1, 2]
