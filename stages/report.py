"""DVC stage: the comparison report (reports/report.md, self-contained reports/report.html, figures)."""

from pathlib import Path

from newllm.pipeline import run_stage

OUT = Path("reports")


def main(params, run) -> None:
    from newllm.report.build import FIGURES, build_report

    result = build_report(params, Path("."), OUT)
    run.log_artifact(OUT / "report.html")
    run.finish(result)
    # the experiment's parent run carries its answer: the runs table sorted by headline/newllm_test_ppl
    # ranks the ablations, and Compare of two parents shows their headlines and loss curves side by side
    run.answer_on_parent(result, [OUT / "report.html", OUT / "figures" / FIGURES[0]])
    print(f"report: {OUT / 'report.html'} (New-LLM test PPL {result['newllm_test_ppl']:.2f}, {result['decision_band']})")


if __name__ == "__main__":
    run_stage("report", main)
