"""Headless Chromium renders the MLflow runs page (served by a real `mlflow server`) and a static HTML
report page. Set NEWLLM_SAVE_SCREENSHOTS=1 to also copy the runs-page screenshot to
reports/screenshots/mlflow_runs.png of this repository."""

import base64
import io
import os
import shutil
from pathlib import Path

import pytest
from helpers import REPO
from test_mlflow_server import api, mlflow_server, two_run_store

from newllm import cli
from newllm.report.browser import find_chromium, render_page

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium binary found (Debian: "
                                "apt-get install chromium; .ci/run installs it; or set NEWLLM_CHROMIUM)")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mlflow_runs_page_renders_both_runs(tmp_path: Path):
    uri, run_ids = two_run_store(tmp_path)
    with mlflow_server(uri, tmp_path) as base:
        exp_id = api(base, "experiments/get-by-name", {"experiment_name": "t"})["experiment"]["experiment_id"]
        shot = tmp_path / "mlflow_runs.png"
        dom = render_page(cli.runs_url(base, exp_id), screenshot=shot, budget_ms=15000)  # what `make ui` prints
    assert "Runs" in dom and "Welcome" not in dom  # the runs table, not MLflow's GenAI home
    for label in ("context_dim=16", "context_dim=32"):  # one parent run per experiment, named by its change
        assert label in dom, dom[-2000:]
    with mlflow_server(uri, tmp_path) as base:  # the chart view `make ui` also prints opens on the loss curves
        charts = render_page(cli.runs_url(base, exp_id) + "?compareRunsMode=CHART", budget_ms=15000)
    # sections in page order: "curves" (the loss curves) first; a section's charts show once its runs are
    # expanded under their parents
    at = {name: charts.find(f">{name}<") for name in ("curves", "Model metrics", "System metrics")}
    assert 0 < at["curves"] < min(at["Model metrics"], at["System metrics"]), at
    png = shot.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000  # a rendered page, not a blank one
    if os.environ.get("NEWLLM_SAVE_SCREENSHOTS") == "1":
        dest = REPO / "reports" / "screenshots" / "mlflow_runs.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)


def _png_data_uri() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [3, 1, 2])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_static_report_page_with_table_and_embedded_image(tmp_path: Path):
    page = tmp_path / "report.html"
    page.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>report</title></head><body>
<h1>New-LLM report</h1>
<table id="results"><tr><th>model</th><th>val PPL</th></tr><tr><td>New-LLM</td><td>7.87</td></tr></table>
<img id="curve" alt="curve" src="{_png_data_uri()}">
<script>
  const img = document.getElementById('curve');
  const mark = () => document.body.setAttribute('data-img-width', String(img.naturalWidth));
  img.complete ? mark() : img.addEventListener('load', mark);
</script></body></html>""")
    shot = tmp_path / "report.png"
    dom = render_page(page, screenshot=shot, budget_ms=2000, window=(800, 600))
    assert '<table id="results">' in dom and "<td>New-LLM</td><td>7.87</td>" in dom
    assert 'id="curve"' in dom and 'src="data:image/png;base64,' in dom
    assert 'data-img-width="100"' in dom  # 2 in x 50 dpi: the data: URI image decoded
    assert shot.read_bytes().startswith(PNG_MAGIC)
