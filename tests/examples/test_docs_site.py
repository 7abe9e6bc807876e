"""The docs site as a reader sees it: built with mkdocs, laid out by headless Chromium.

At 1280 px no table is wider than the page, no identifier in a table is broken over lines,
and no code block hides part of a line. ``TENANCY_DOCS_SCREENSHOTS=<folder>`` also saves
screenshots of the home page, the quick start and the capability matrix there.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = {"home": "", "quick-start": "getting-started/", "matrix": "capability-matrix/"}
CHECKED = [*PAGES.values(), "errors/"]
WIDTH = 1280

# Measured in the page once it has loaded; the result is written into the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener("load", () => {
  const problems = [];
  for (const table of document.querySelectorAll("article table")) {
    const box = table.closest(".md-typeset__scrollwrap") || table.parentElement;
    if (table.getBoundingClientRect().width > box.clientWidth + 1) {
      problems.push("table wider than the page: " + table.rows[0].innerText.slice(0, 60));
    }
    for (const code of table.querySelectorAll("code")) {
      if (code.getClientRects().length > 1) problems.push("broken over lines: " + code.innerText);
    }
  }
  for (const code of document.querySelectorAll("article pre > code")) {
    if (code.scrollWidth > code.clientWidth + 1) {
      problems.push("code block cut off: " + code.innerText.slice(0, 60));
    }
  }
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(problems);
  document.body.appendChild(out);
});
</script>"""


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed")
    pytest.skip(f"{what} not installed")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        _missing("chromium (apt-get install chromium)")
    assert found is not None
    return found


def run_chromium(*args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="tenancy-chromium-") as profile:
        command = [
            chromium(),
            *("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"),
            *("--disable-component-update", "--disable-sync", "--no-first-run"),
            f"--user-data-dir={profile}",
            *args,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The site built from docs/ (strict), served over http on 127.0.0.1."""
    chromium()
    if importlib.util.find_spec("material") is None:  # the mkdocs-material theme
        _missing("mkdocs-material (pip install -e '.[docs]')")
    folder = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        check=True,
        timeout=300,
    )
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("page", CHECKED)
def test_a_page_reads_at_1280_px_without_overflow_or_broken_names(
    site: tuple[Path, str], page: str
) -> None:
    folder, base = site
    html = (folder / page / "index.html").read_text()
    (folder / page / "probe.html").write_text(html.replace("</body>", PROBE + "</body>"))
    dom = run_chromium(
        f"--window-size={WIDTH},900",
        "--virtual-time-budget=5000",
        "--dump-dom",
        base + page + "probe.html",
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, "the probe did not run"
    problems = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert problems == [], problems


def test_screenshots_of_home_quick_start_and_matrix(site: tuple[Path, str]) -> None:
    _, base = site
    target = os.environ.get("TENANCY_DOCS_SCREENSHOTS")
    folder = Path(target) if target else Path(tempfile.mkdtemp(prefix="tenancy-shots-"))
    folder.mkdir(parents=True, exist_ok=True)
    for name, page in PAGES.items():
        shot = folder / f"{name}.png"
        run_chromium(
            f"--window-size={WIDTH},2400", "--hide-scrollbars", f"--screenshot={shot}", base + page
        )
        assert shot.stat().st_size > 20_000, f"{name}: an empty page"  # a blank PNG is ~4 KB
    if not target:
        shutil.rmtree(folder)
