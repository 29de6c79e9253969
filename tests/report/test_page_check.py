"""check_mlflow_pages on hand-written DOMs: what it accepts and what it refuses, no browser needed
(tests/test_browser.py runs it on pages a real Chromium rendered from a real `mlflow server`)."""

import pytest

from newllm.report.browser import BrowserError, check_mlflow_pages


def test_the_page_check_refuses_the_genai_home_and_a_chart_view_without_loss_curves():
    curves = '<h3>curves</h3> <span>a | x (curves/val_loss)</span><span>b | x (curves/val_loss)</span><h3>Model metrics</h3>'
    assert check_mlflow_pages({"runs": "<div>Runs</div>", "curves": curves}) == ("curves/val_loss", ["a | x", "b | x"])
    with pytest.raises(BrowserError, match="runs table"):
        check_mlflow_pages({"runs": "<h1>Welcome to MLflow</h1><div>Runs</div>", "curves": curves})
    with pytest.raises(BrowserError, match="curves section"):
        check_mlflow_pages({"runs": "<div>Runs</div>", "curves": "<h3>Model metrics</h3>" + curves})
    with pytest.raises(BrowserError, match="not a loss curve"):
        check_mlflow_pages({"runs": "<div>Runs</div>", "curves": curves.replace("val_loss", "val_accuracy")})
