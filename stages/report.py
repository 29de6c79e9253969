"""DVC stage: the comparison report (reports/report.md, self-contained reports/report.html, figures)."""

from pathlib import Path

from newllm.pipeline import run_stage

OUT = Path("reports")


def main(params, run) -> None:
    from newllm.report.build import build_report

    result = build_report(params, Path("."), OUT)
    run.log_artifact(OUT / "report.html")
    run.finish(result)
    print(f"report: {OUT / 'report.html'} (New-LLM test PPL {result['newllm_test_ppl']:.2f}, {result['decision_band']})")


if __name__ == "__main__":
    run_stage("report", main)
