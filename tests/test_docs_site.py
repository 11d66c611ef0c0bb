"""The documentation site builds with `--strict` (no broken link, no missing reference, every
API page generated from the docstrings), and every result file the README or the site cites
exists and says where it came from. The code in the pages runs in `tests/test_readme.py`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
sys.path.insert(0, str(ROOT / "benchmarks"))
import provenance  # noqa: E402


def cited_results() -> dict[str, list[str]]:
    """Each result file the pages name, and the pages that name it."""
    cited: dict[str, list[str]] = {}
    for page in PAGES:
        for name in re.findall(r"benchmarks/results/([\w.+-]+\.json)", page.read_text()):
            cited.setdefault(name, []).append(str(page.relative_to(ROOT)))
    return cited


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "train_flops_per_token" in api and "in place on" in api  # fit's docstring


def test_the_docs_cite_result_files():
    assert len(cited_results()) >= 4  # the benchmarks page names its files


@pytest.mark.parametrize("name", sorted(cited_results()))
def test_each_cited_result_file_exists_with_its_provenance(name):
    path = ROOT / "benchmarks" / "results" / name
    assert path.is_file(), f"{name} is cited by {cited_results()[name]} but does not exist"
    record = json.loads(path.read_text())
    assert set(provenance.FIELDS) <= set(record), (
        f"{name} lacks {set(provenance.FIELDS) - set(record)}"
    )
    assert len(record["commit"]) == 40 and record["machine"]["cpu"]
