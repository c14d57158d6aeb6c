"""The documentation: the README stays a short, true front page; the site in docs/ builds strictly."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def nav_pages(nav: list) -> list[str]:
    """Every page file that mkdocs.yml's nav names, sections included."""
    pages = []
    for entry in nav:
        (value,) = entry.values()
        pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def test_the_site_builds_with_strict_checks(tmp_path):
    # --strict turns every warning into a failure: a broken link or anchor between pages, a
    # nav entry without its page, a page that does not render.
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for page in nav_pages(config["nav"]):
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), f"{page} was not built"
    reference = (site / "reference" / "index.html").read_text()
    assert "<table>" in reference and "KERAS_SERVE_MAX_PIXELS" in reference  # the options table, rendered


def test_every_page_in_docs_is_in_the_navigation_and_on_the_home_page():
    """A reader finds every page from the site's navigation and from the home page's table."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert set(nav_pages(config["nav"])) == pages
    home = (ROOT / "docs" / "index.md").read_text()
    linked = set(re.findall(r"\]\(([a-z0-9-]+\.md)\)", home))
    assert linked == pages - {"index.md"}, sorted(pages - {"index.md"} - linked)


def test_the_readme_is_a_five_minute_read_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "README.md is the front page: move detail into docs/"
    for heading in ("## Run it", "## Test it", "## The API", "## Serve your own model", "## Headline numbers",
                    "## Read more"):
        assert heading in text
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "README links to the docs pages"
    missing = [link for link in local if not (ROOT / link).is_file()]
    assert not missing, f"README links to files that do not exist: {missing}"


def project_paths() -> list[Path]:
    """The project's own files, relative to ROOT: what git tracks plus what it would add (not
    ignored), so the benchmark's peer venvs, uploads and build output never count."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return [Path(name) for name in listed.split("\0") if name]


def test_no_file_or_folder_is_named_after_a_ticket():
    names = {part for path in project_paths() for part in path.parts}
    named = sorted(n for n in names if re.search(r"(issue|ticket|bug)[-_ ]?\d+", n, re.IGNORECASE))
    assert not named, f"name these by what they do: {named}"
