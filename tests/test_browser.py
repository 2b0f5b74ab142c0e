"""tests/browser.py: headless Chromium tells which images of a page load."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from browser import chromium, image_load_report

pytestmark = pytest.mark.skipif(chromium() is None,
                                reason="chromium not installed (Debian package chromium: "
                                       "bin/install-system-packages)")


def write_png(path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)
    return path


def write_page(path: Path, *srcs: str) -> Path:
    imgs = "\n".join(f'<p><img src="{src}" alt="{src}"></p>' for src in srcs)
    path.write_text(f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>run report</title>"
                    f"</head>\n<body><h1>Report</h1>\n{imgs}\n</body></html>\n")
    return path


def live_processes():
    """{pid: (pgid, session id, command line)} of the live (non-zombie) processes."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            procs[int(entry.name)] = (int(fields[2]), int(fields[3]), cmdline)
    return procs


@pytest.fixture
def chromium_runs(monkeypatch):
    """The Popen objects browser.py starts; after the test, the processes of their groups and the
    ones naming their temporary directory must all be gone, and nothing of chromium's left in the
    temporary directory (a killed chromium cannot clean up its own files)."""
    import browser
    started = []

    class Recording(subprocess.Popen):
        def __init__(self, cmd, *args, **kwargs):
            super().__init__(cmd, *args, **kwargs)
            started.append((self, kwargs["env"]["HOME"]))

    monkeypatch.setattr(browser.subprocess, "Popen", Recording)
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    yield started
    assert started, "chromium was not started"
    for proc, home in started:
        left = {pid: cmd for pid, (pgid, sid, cmd) in live_processes().items()
                if pgid == proc.pid or sid == proc.pid or home in cmd}
        assert not left, f"chromium processes left behind: {left}"
        assert not os.path.exists(home), f"temporary chromium HOME {home} left behind"
    new = {name for name in set(os.listdir(tempfile.gettempdir())) - tmp_before if "chrom" in name.lower()}
    assert not new, f"chromium left {new} in {tempfile.gettempdir()}"


def test_valid_missing_and_corrupt_png(tmp_path, chromium_runs):
    write_png(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(np.random.default_rng(6).bytes(4000))
    page = write_page(tmp_path / "report.html", "good.png", "missing.png", "corrupt.png")
    before = sorted(os.listdir(tmp_path))
    assert image_load_report(page) == {"good.png": True, "missing.png": False, "corrupt.png": False}
    assert sorted(os.listdir(tmp_path)) == before      # the temporary copy of the page is gone


def test_page_without_images(tmp_path):
    page = write_page(tmp_path / "report.html")
    assert image_load_report(page) == {}


def test_relative_paths_resolve_from_the_page(tmp_path):
    """Image paths resolve from the page's directory: a subdirectory with a space in its name (raw
    and percent-encoded), and ../b.png (outside that directory: missing)."""
    (tmp_path / "my plots").mkdir()
    write_png(tmp_path / "my plots" / "a.png")
    write_png(tmp_path / "b.png")
    page = write_page(tmp_path / "report.html", "my plots/a.png", "my%20plots/a.png", "b.png",
                      "../b.png")
    assert image_load_report(page) == {"my plots/a.png": True, "my%20plots/a.png": True,
                                       "b.png": True, "../b.png": False}


def test_unreadable_page_is_an_assertion_error(tmp_path):
    with pytest.raises(AssertionError, match="cannot read the page"):
        image_load_report(tmp_path / "absent.html")


def test_page_that_swallows_the_check_is_an_assertion_error(tmp_path):
    """An unclosed comment hides everything after it, the appended check too: an error, not {}."""
    write_png(tmp_path / "good.png")
    page = tmp_path / "report.html"
    page.write_text('<html><body><img src="good.png"><!-- unclosed comment\n</body></html>\n')
    with pytest.raises(AssertionError, match="no image report"):
        image_load_report(page)


def test_timeout_kills_chromium(tmp_path, chromium_runs):
    """A page whose script never ends: AssertionError after the timeout, no chromium left behind."""
    page = tmp_path / "hang.html"
    page.write_text("<html><body><script>while (true) {}</script></body></html>\n")
    with pytest.raises(AssertionError, match="did not finish"):
        image_load_report(page, timeout=3)
    assert [p.name for p in tmp_path.iterdir()] == ["hang.html"]
