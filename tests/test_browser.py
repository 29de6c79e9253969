"""Headless Chromium renders the MLflow pages `make ui` prints (served by a real `mlflow server`) and a
static HTML report page. README's pictures come from the same code over the project's own store:
`newllm screenshots`."""

import base64
import io
import json
from pathlib import Path
from urllib.parse import urlencode

import pytest
from helpers import default_params
from test_mlflow_server import CELL, CONTEXT_DIMS, api, label, mlflow_server, two_run_store

from newllm import tracking
from newllm.report.browser import check_mlflow_pages, find_chromium, mlflow_pages, render_page

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium binary found (Debian: "
                                "apt-get install chromium; .ci/run installs it; or set NEWLLM_CHROMIUM)")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _test_ppl(ctx: int) -> float:
    return 5.0 + abs(ctx - 16) / 10  # context_dim 16 is best, then 32, then the baseline's 256


def _answer_every_parent(root: Path, uri: str) -> None:
    """A report stage per experiment of two_run_store, answering on its parent run as stages/report.py does."""
    (root / "report.html").write_text("<p>report</p>")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("DVC_ROOT", raising=False)
        for exp, ctx in CONTEXT_DIMS.items():
            mp.setenv("DVC_EXP_NAME", exp)
            with tracking.stage_run("report", default_params(context_dim=ctx, tracking={"uri": uri, "experiment": "t"})) as run:
                run.answer_on_parent({"newllm_test_ppl": _test_ppl(ctx), "newllm_test_ppl_std": 0.25,
                                      "transformer_test_ppl": 4.0, "test_ppl_ratio_vs_transformer": _test_ppl(ctx) / 4},
                                     [root / "report.html"])
                run.finish({"newllm_test_ppl": _test_ppl(ctx)})


def test_the_pages_make_ui_prints_open_on_the_answer_and_one_loss_curve_per_ablation(tmp_path: Path):
    uri, run_ids = two_run_store(tmp_path)  # the default run and two context_dim ablations
    _answer_every_parent(tmp_path, uri)
    with mlflow_server(uri, tmp_path) as base:
        exp_id = api(base, "experiments/get-by-name", {"experiment_name": "t"})["experiment"]["experiment_id"]
        links = tracking.ui_links(base, exp_id, CELL, answer=True)  # what `make ui` prints after a report
        doms = mlflow_pages(links, tmp_path / "shots")
        compare = render_page(f"{base}/#/compare-runs?" + urlencode({"runs": json.dumps(list(run_ids.values())),
                                                                      "experiments": json.dumps([exp_id])}), budget_ms=60000)
        parents = {r["info"]["run_name"].split(" @ ")[0]: r["info"]["run_id"] for r in api(
            base, "runs/search", body={"experiment_ids": [exp_id], "filter": tracking.PARENTS_FILTER})["runs"]}
        params = {name: {q["key"]: q["value"] for q in api(base, "runs/get", {"run_id": rid})["run"]["data"]["params"]}
                  for name, rid in parents.items()}
        ticked = [parents["context_dim=16"], parents["context_dim=32"]]  # tick two parents, press Compare
        parents_compared = render_page(f"{base}/#/compare-runs?" + urlencode(
            {"runs": json.dumps(ticked), "experiments": json.dumps([exp_id]), **tracking.ML_MODE}), budget_ms=60000)
        parent_page = render_page(f"{base}/#/experiments/{exp_id}/runs/{ticked[0]}?{urlencode(tracking.ML_MODE)}",
                                  budget_ms=60000)
    runs = doms["runs"]
    # the runs table in MLflow's model-training mode, the loss curves first: what `newllm screenshots` checks too
    metric, legend = check_mlflow_pages(doms)
    # the answer: one row per experiment (named by its change), best New-LLM test PPL first, its columns shown
    order = [runs.find(f">{name} @ ") for name in ("context_dim=16", "context_dim=32", "baseline")]
    assert 0 <= order[0] < order[1] < order[2], (order, runs[-3000:])
    for column in ("context_dim", "headline/newllm_test_ppl", "headline/newllm_test_ppl_std"):
        assert f">{column}<" in runs, column
    assert f"| {CELL}" not in runs  # the stage runs are not rows of the answer
    # the baseline's parent changed nothing, and shows its commit's value in the changed column
    assert params == {"baseline": {"context_dim": "256"}, "context_dim=16": {"context_dim": "16"},
                      "context_dim=32": {"context_dim": "32"}}, params
    # Compare of two parents: the headline side by side, and the report they share
    for value in ("headline/newllm_test_ppl", str(_test_ppl(16)), str(_test_ppl(32)), "report.html"):
        assert value in parents_compared, value
    assert "No metrics to display" not in parents_compared and "No common artifacts" not in parents_compared
    # a parent's page in the model-training view (not GenAI's "Evaluations"), its headline listed
    assert "Evaluations" not in parent_page and "headline/newllm_test_ppl" in parent_page, parent_page[-2000:]
    assert sorted(legend) == sorted(f"{label(e)} | {CELL}" for e in CONTEXT_DIMS), legend  # one line per ablation
    # Compare (tick runs, press Compare) shows the figure the runs share: figures sit at the artifact root
    assert "No common artifacts" not in compare and "curves.png" in compare, compare[-2000:]
    for name in ("runs", "curves"):
        png = (tmp_path / "shots" / f"mlflow_{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 20_000  # a rendered page, not a blank one


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
