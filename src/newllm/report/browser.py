"""Headless Chromium: render a page (the MLflow UI, `reports/report.html`) to its DOM and a screenshot.

No Python browser driver: one `chromium --headless --dump-dom --screenshot` process per page, with a fresh
profile, no network beyond the page itself, and `--virtual-time-budget` so a React app (MLflow's UI) has
fetched and rendered its data before the DOM is dumped. Debian: `apt-get install chromium`.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from newllm.errors import PipelineError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars")


class BrowserError(PipelineError):
    """No Chromium binary, or Chromium failed to render the page."""


def find_chromium() -> str | None:
    """$NEWLLM_CHROMIUM if set, else the first Chromium/Chrome on PATH (or /usr/bin/chromium)."""
    if os.environ.get("NEWLLM_CHROMIUM"):
        return shutil.which(os.environ["NEWLLM_CHROMIUM"])
    for name in CANDIDATES:
        if found := shutil.which(name):
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def _as_url(page: str | os.PathLike) -> str:
    if isinstance(page, os.PathLike) or not str(page).startswith(("http://", "https://", "file:", "data:")):
        path = Path(page).resolve()
        if not path.is_file():
            raise BrowserError(f"no such page: {path}")
        return path.as_uri()
    return str(page)


def render_page(page: str | os.PathLike, screenshot: Path | None = None, budget_ms: int = 15000,
                window: tuple[int, int] = (1400, 900), timeout_s: float = 120.0) -> str:
    """Load `page` (a URL or an HTML file) in headless Chromium and return the rendered DOM as HTML.

    `budget_ms` of virtual time let scripts and fetches settle first (Chromium skips idle time, so a
    budget is usually far faster than its wall-clock value). With `screenshot`, a PNG of `window` size
    is written there too. Raises BrowserError when Chromium is missing, fails or times out.
    """
    binary = find_chromium()
    if binary is None:
        raise BrowserError("no Chromium found (apt-get install chromium, or set NEWLLM_CHROMIUM)")
    url = _as_url(page)
    with tempfile.TemporaryDirectory(prefix="newllm-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={int(budget_ms)}",
               f"--window-size={window[0]},{window[1]}"]
        if screenshot is not None:
            screenshot = Path(screenshot).resolve()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.unlink(missing_ok=True)
            cmd.append(f"--screenshot={screenshot}")
        cmd += ["--dump-dom", url]
        # Own session: a timeout ends Chromium's renderer/zygote children too, not only the launcher.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "HOME": profile})
        try:
            dom, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise BrowserError(f"Chromium did not render {url} within {timeout_s:.0f} s") from None
    if proc.returncode != 0 or not dom.strip():
        tail = "\n".join(err.strip().splitlines()[-5:])
        raise BrowserError(f"Chromium exited {proc.returncode} on {url} with no DOM:\n{tail}")
    if screenshot is not None and not screenshot.is_file():
        raise BrowserError(f"Chromium wrote no screenshot for {url} at {screenshot}")
    return dom


def mlflow_pages(links: dict[str, str], out_dir: Path, window: tuple[int, int] = (1800, 1000),
                 budget_ms: int = 60000) -> dict[str, str]:
    """Each MLflow UI page of `links` (name -> URL, as `make ui` prints them) rendered to
    out_dir/mlflow_<name>.png; returns name -> rendered DOM (what a browser test asserts on)."""
    return {name: render_page(url, screenshot=Path(out_dir) / f"mlflow_{name}.png", budget_ms=budget_ms, window=window)
            for name, url in links.items()}


def check_mlflow_pages(doms: dict[str, str]) -> tuple[str, list[str]]:
    """What README promises of the pages `make ui` prints, read from their rendered DOMs (`mlflow_pages`):
    `runs` is the runs table in model-training mode (not the GenAI home), and `curves` opens on the
    `curves` section, before MLflow's own metric sections, with a loss chart first -> (that chart's metric,
    its legend: one run name per line). Raises BrowserError naming what is not so, e.g. after an MLflow
    upgrade moves the UI's switches."""
    runs, curves = doms["runs"], doms["curves"]
    if "Welcome" in runs or "Evaluation runs" in runs or "Runs" not in runs:
        raise BrowserError("the runs link did not open MLflow's runs table in model-training mode")
    at = {name: curves.find(f">{name}<") for name in ("curves", "Model metrics", "System metrics")}
    if at["curves"] < 0 or any(0 <= at[s] < at["curves"] for s in ("Model metrics", "System metrics")):
        raise BrowserError(f"the curves link's chart view does not open on the curves section (positions {at})")
    entries = re.findall(r">([^<>]+) \((curves/[a-z_]+)\)<", curves)  # a legend entry: `<run name> (<metric>)`
    if not entries or not entries[0][1].endswith("loss"):
        raise BrowserError(f"the curves link's first chart is not a loss curve: {entries[:1] or 'no legend found'}")
    metric = entries[0][1]
    return metric, [name for name, m in itertools.takewhile(lambda e: e[1] == metric, entries)]
