"""Docs and results agree: every figure README.md and docs/*.md quote from results/*.json is stated
as the results file says (analysis/doc_claims.py holds the table of claims and generated tables),
and every results file records a clean commit and its provenance."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import doc_claims as dc  # noqa: E402

RESULTS = sorted((ROOT / "results").glob("*.json"))


def _failures(report):
    return "\n".join(f"{r['doc']}: {r['claim']}\n  expected: {r['expected']}\n  found: {r['found'] or 'nothing matching'}"
                     for r in report if not r["ok"])


def test_docs_state_every_quoted_figure_as_the_results_files_say():
    report = dc.check()
    assert len(report) == len(dc.CLAIMS) and report
    assert all(r["ok"] for r in report), "stale or missing figures (python analysis/doc_claims.py --fix):\n" + _failures(report)


def test_claims_cover_the_headline_results():
    """The figures the issue names are among the checked claims, stated the way it asks."""
    by_results = {}
    for c in dc.CLAIMS:
        for r in c.results:
            by_results.setdefault(r, []).append(c)
    sim = [c for c in by_results["bench_sim"] if isinstance(c, dc.Claim) and c.doc == "README.md"]
    assert sim and all("paired" in c.template and "unpaired" in c.template for c in sim)
    dyn = [c for c in by_results["bench_dynamic"] if isinstance(c, dc.Claim)]
    assert {c.doc for c in dyn} >= {"README.md", "docs/RESULTS.md"}
    assert all("{lo" in c.template and "{hi" in c.template and "{n} runs" in c.template for c in dyn)
    for name in ("bench_placer", "bench_migration_memory", "fig_bubble", "fig_memory", "fig_interleaved", "fig_zero_bubble",
                 "fig_capacity", "fig_balance", "fig_placement"):
        assert name in by_results, f"no claim reads results/{name}.json"


def _copy_docs(tmp_path: Path) -> Path:
    for doc in {c.doc for c in dc.CLAIMS}:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tmp_path / doc)
    return tmp_path


def test_a_stale_number_or_table_is_caught_and_fixed(tmp_path):
    root = _copy_docs(tmp_path)
    readme = (root / "README.md").read_text()
    claim = next(c for c in dc.CLAIMS if c.doc == "README.md" and "bench_sim" in c.results)
    match = claim.pattern().search(readme)
    assert match, "README.md lacks the simulator claim"
    stale = re.sub(r"\d+\.\d%", "99.9%", match.group(0), count=1)
    (root / "README.md").write_text(readme.replace(match.group(0), stale))
    results_md = (root / "docs/RESULTS.md").read_text()
    block = next(c for c in dc.CLAIMS if isinstance(c, dc.Block) and c.name == "fig_memory").pattern().search(results_md)
    assert block, "docs/RESULTS.md lacks the generated fig_memory table"
    body = block.group(2)
    edited = re.sub(r"\| \d+\.\d+ \(", "| 123.45 (", body, count=1)  # one in-flight count in the table's first row
    assert edited != body
    (root / "docs/RESULTS.md").write_text(results_md.replace(body, edited))
    bad = {r["claim"] for r in dc.check(str(root), str(ROOT / "results")) if not r["ok"]}
    assert "block fig_memory" in bad and any(b.startswith("fidelity vs real CPU runs") for b in bad)
    assert set(dc.fix(str(root), str(ROOT / "results"))) == {"README.md", "docs/RESULTS.md"}
    assert all(r["ok"] for r in dc.check(str(root), str(ROOT / "results")))


def test_a_claim_missing_from_the_docs_fails(tmp_path):
    root = _copy_docs(tmp_path)
    text = (root / "docs/RESULTS.md").read_text()
    (root / "docs/RESULTS.md").write_text(text.replace("The worst deviation is", "The largest deviation is"))
    missing = [r for r in dc.check(str(root), str(ROOT / "results")) if not r["ok"]]
    assert [r["found"] for r in missing] == [[]] and "worst deviation" in missing[0]["claim"]


def provenance_of(data: dict) -> dict | None:
    """The provenance record of a results file: `provenance` (what experiments/ scripts write), or
    the older spots (`run_info`, `environment.run_info`, top level) another script may still use."""
    for rec in (data.get("provenance"), data.get("run_info"), (data.get("environment") or {}).get("run_info"), data):
        if isinstance(rec, dict) and "git_commit" in rec:
            return rec
    return None


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_results_file_records_a_clean_commit_and_its_provenance(path):
    data = json.loads(path.read_text())
    prov = provenance_of(data)
    assert prov is not None, f"{path.name} records no provenance (git commit, packages, environment)"
    commit = prov["git_commit"] or ""
    assert re.fullmatch(r"[0-9a-f]{40}", commit), (
        f"{path.name} was written from commit {commit!r}: regenerate it from a clean checkout (experiments/rerun_all.sh)")
    assert prov.get("packages", {}).get("torch"), f"{path.name}: no package versions"
    assert prov.get("environment", {}).get("python"), f"{path.name}: no environment"
    how = prov.get("command") or prov.get("args") or data.get("config")
    assert how, f"{path.name}: no command line or arguments recorded"
