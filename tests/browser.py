"""Headless Chromium for the tests: does every image of an HTML page load?

``image_load_report(html_path)`` copies the page to a hidden temporary file in the same directory
(relative image paths resolve as for the page itself) with a script appended that, on the window's
``load`` event (which waits for every image to load or fail), writes ``[src, complete &&
naturalWidth > 0]`` for every ``<img>`` into a new element, URI-encoded JSON. ``chromium --headless
--dump-dom`` prints the DOM after the load event; the JSON is read back from it. Chromium runs in its
own process group with a temporary HOME, TMPDIR and profile; the group is killed when it is done or times
out, and so are the processes that left it (crashpad) but name the temporary directory.
Debian's ``chromium`` package: ``bin/install-system-packages`` installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

REPORT_ID = "dre-image-load-report"

# Appended after the page's own content (the HTML parser moves it into <body>); it runs before the
# load event, so its listener sees every image in its final state.
INJECTED = """
<script>
window.addEventListener("load", function () {
  var result = Array.prototype.map.call(document.images, function (img) {
    return [img.getAttribute("src"), img.complete && img.naturalWidth > 0];
  });
  var out = document.createElement("div");
  out.id = "%s";
  out.hidden = true;
  out.textContent = encodeURIComponent(JSON.stringify(result));
  document.documentElement.appendChild(out);
});
</script>
""" % REPORT_ID

REPORT_RE = re.compile(r'<div id="%s"[^>]*>([^<]*)</div>' % REPORT_ID)

FLAGS = [
    "--headless", "--no-sandbox",       # root (CI) needs --no-sandbox
    "--disable-gpu", "--disable-dev-shm-usage",   # small /dev/shm in containers
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--allow-file-access-from-files",
    "--virtual-time-budget=5000",       # ms of virtual time: also wait for timers after load
    "--dump-dom",
]


def chromium() -> str | None:
    """Path of the chromium binary (Debian's ``chromium``), None when absent."""
    return shutil.which("chromium")


def _kill_leftovers(tag: str) -> None:
    """SIGKILL the processes whose command line names `tag` (our temporary directory): Chromium's
    crashpad handlers put themselves in a session of their own."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if tag.encode() in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def _stderr_text(stderr: bytes) -> str:
    """Chromium's stderr without the D-Bus noise of a machine without a session bus, last 6000
    characters."""
    lines = stderr.decode(errors="replace").splitlines()
    kept = [line for line in lines if "dbus" not in line and "unexpected operator" not in line]
    return "\n".join(kept)[-6000:] or "(empty)"


def image_load_report(html_path, timeout=60) -> dict[str, bool]:
    """Open html_path (file://) in headless Chromium and return {src attribute of every <img>: loaded}
    where loaded means the image finished loading with naturalWidth > 0 (a missing or corrupt file is
    False). Raises AssertionError with Chromium's stderr if the browser fails or the page cannot be read.

    An ``<img>`` without a src attribute is reported under ``""``; images sharing a src are True only
    when all of them loaded. Images added to the page after its load event are not seen. A truncated
    PNG with an intact header counts as loaded (Chromium draws what it can decode).
    """
    exe = chromium()
    if exe is None:
        raise AssertionError("chromium not found: install Debian's chromium (bin/install-system-packages)")
    page = Path(html_path).resolve()
    try:
        content = page.read_bytes()
    except OSError as exc:
        raise AssertionError(f"cannot read the page {page}: {exc}") from exc

    fd, copy_name = tempfile.mkstemp(prefix=".image-check-", suffix=".html", dir=page.parent)
    copy = Path(copy_name)
    work = tempfile.mkdtemp(prefix="dre-chromium-")
    env = dict(os.environ, HOME=work, TMPDIR=work, XDG_CONFIG_HOME=os.path.join(work, "config"),
               XDG_CACHE_HOME=os.path.join(work, "cache"))     # a killed chromium leaves files there
    cmd = [exe, *FLAGS, f"--user-data-dir={os.path.join(work, 'profile')}", copy.as_uri()]
    proc = None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content + INJECTED.encode())
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"chromium did not finish {page} within {timeout} s; stderr:\n"
                                 f"{_stderr_text(stderr)}") from None
        if proc.returncode != 0:
            raise AssertionError(f"chromium exited with {proc.returncode} on {page}; stderr:\n"
                                 f"{_stderr_text(stderr)}")
        found = REPORT_RE.findall(stdout.decode(errors="replace"))
        if len(found) != 1:
            raise AssertionError(f"no image report in chromium's DOM of {page} (the page's load event "
                                 f"did not come, or the page swallowed the appended script); "
                                 f"stderr:\n{_stderr_text(stderr)}")
        report: dict[str, bool] = {}
        for src, loaded in json.loads(urllib.parse.unquote(found[0])):
            src = "" if src is None else src
            report[src] = report.get(src, True) and bool(loaded)
        return report
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # whatever of the group is still there
            except ProcessLookupError:
                pass
        _kill_leftovers(work)
        copy.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
