"""Make sure a Chromium is there for the dashboard's browser tests (tests/browser).

Run as ``python tests/install_browser.py``: quiet and exit 0 when one is found already;
otherwise ``python -m playwright install chromium``, then (as root, where apt-get exists)
``apt-get install -y -q chromium``; exit 1 with a one-line instruction when still none.

The search (``find_browser``) is the one tests/browser/conftest.py uses: the executable in
``REDRIVE_TEST_BROWSER`` (a path or a name on PATH), else ``chromium``, ``chromium-browser``
or ``google-chrome`` on PATH, else the Chromium that Playwright installed for itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ENV = "REDRIVE_TEST_BROWSER"
NAMES = ("chromium", "chromium-browser", "google-chrome")
PLAYWRIGHT_OWN = "playwright"  # find_browser's answer for "launch Playwright's own Chromium"
HOW = ("no Chromium for the browser tests: run `python tests/install_browser.py` "
       f"(or apt-get install chromium, or set {ENV}=/path/to/chromium)")


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def system_browser() -> str | None:
    """The executable named by REDRIVE_TEST_BROWSER, else the first of NAMES on PATH."""
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        found = wanted if _executable(wanted) else shutil.which(wanted)
        if not found:
            raise LookupError(f"{ENV}={wanted!r} is not an executable (nor a name on PATH); {HOW}")
        return found
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def playwright_browser() -> str | None:
    """The Chromium Playwright downloaded for itself, if it is there (asked in a child
    process: Playwright's sync API cannot run inside a caller's event loop)."""
    code = ("import os\nfrom playwright.sync_api import sync_playwright\n"
            "with sync_playwright() as p:\n    e = p.chromium.executable_path\n"
            "print(e if os.path.isfile(e) else '')")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = out.stdout.strip() if out.returncode == 0 else ""
    return path or None


def find_browser(*, include_playwright: bool = True) -> str | None:
    """A Chromium executable path; PLAYWRIGHT_OWN when only Playwright's own is there; None
    when there is none. Raises LookupError when REDRIVE_TEST_BROWSER names nothing runnable."""
    found = system_browser()
    if found:
        return found
    if include_playwright and playwright_browser():
        return PLAYWRIGHT_OWN
    return None


def main() -> int:
    try:
        if find_browser():
            return 0
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    print("No Chromium found: trying `python -m playwright install chromium`…", file=sys.stderr)
    try:
        got = subprocess.run([sys.executable, "-m", "playwright", "install", "chromium"],
                             capture_output=True, text=True, timeout=900)
        said = [line for line in (got.stderr + got.stdout).splitlines() if line.strip()]
        if got.returncode != 0:
            why = next((line for line in said if line.lstrip().startswith("Error")), said[-1] if said else "")
            print(f"  it failed: {why.strip() or got.returncode}", file=sys.stderr)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"  it failed: {exc}", file=sys.stderr)
    if find_browser():
        return 0
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("Trying `apt-get install -y -q chromium`…", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False)  # a stale list: once more
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, check=False)
        if find_browser(include_playwright=False):
            return 0
    print("Could not get a Chromium: install one (Debian: `apt-get install chromium`) or set "
          f"{ENV}=/path/to/chromium, then run the browser tests again.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
