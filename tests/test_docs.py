"""The pages' links and images point at files that exist; run outputs stay within their budget."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
BUDGET_MB = 5.0  # benchmarks/README.md


def local_targets(page: Path) -> list[str]:
    targets = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_local_link_of_a_page_exists(page):
    missing = [t for t in local_targets(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing {missing}"


def test_run_outputs_left_the_docs_and_fit_their_budget():
    docs = ROOT / "docs"
    outputs = {".json", ".csv", ".log", ".txt"}
    strays = [str(p.relative_to(ROOT)) for p in docs.rglob("*") if p.suffix in outputs]
    assert not strays, f"run outputs in docs/ (they belong in benchmarks/): {strays}"
    # What is committed counts; runs keep their models, plots and logs locally (ignored).
    tracked = (
        subprocess.run(
            ["git", "ls-files", "-z", "benchmarks"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    size = sum((ROOT / p).stat().st_size for p in tracked if p and (ROOT / p).is_file())
    assert size < BUDGET_MB * 2**20, f"benchmarks/ holds {size / 2**20:.1f} MB in git"
