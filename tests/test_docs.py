"""The documentation site builds strictly, the README stays a front page, and every page is
reachable from the navigation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_the_site_builds_strictly(tmp_path):
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                           cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert (tmp_path / "site" / "serving" / "index.html").exists()


def test_every_page_is_in_the_navigation():
    def pages(nav: list) -> set[str]:
        found: set[str] = set()
        for item in nav:
            for value in item.values():
                found |= pages(value) if isinstance(value, list) else {value}
        return found

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert pages(config["nav"]) == {p.name for p in (REPO / "docs").glob("*.md")}


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make train" in text and "make test" in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        assert (REPO / target).exists(), target
