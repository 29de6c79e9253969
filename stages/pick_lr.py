"""DVC stage `pick_lr`: each model's learning rate, the sweep cell (dvc.yaml's `*_sweep`, on `seed`) with the
lowest val loss; test is never looked at. Writes data/lr/<model>.json (the lr, which the replicate seeds
read) and, in its metrics, every cell's val loss."""

from newllm.pipeline import run_stage


def main(params, run) -> None:
    import json
    import math

    from newllm.config import stages
    from newllm.errors import PipelineError
    from newllm.protocol import LR_DIR, pick, sweep_record
    from newllm.registry import compared
    from newllm.report.figures import lr_sweep

    declared = stages(params)
    chosen, curves = {}, {}
    for spec in compared(params.baselines):
        val, improved = {}, {}
        for lr in params.protocol.lrs:
            path = declared[sweep_record(spec.record, lr)].metrics_file
            if not path.is_file():
                raise PipelineError(f"missing {path}: run `dvc repro` so every sweep cell has run")
            m = json.loads(path.read_text())
            val[lr], improved[lr] = float(m["val_loss"]), m["best_epoch"] > 0
        # a cell that never beat its initial weights is a candidate only when no cell did: the model then
        # goes on, flagged here and in the report, rather than stopping every other model's results
        never = not any(improved.values())
        lr = pick(val if never else {k: v for k, v in val.items() if improved[k]})
        lrs = sorted(val)
        # a best lr at the end of the sweep may not be the optimum: the sweep does not bracket it
        edge = len(lrs) > 1 and lr in (lrs[0], lrs[-1])
        chosen[spec.record] = {"lr": lr, "val_loss": val[lr], "at_sweep_edge": edge, "never_improved": never,
                               "val_loss_by_lr": {str(k): v if improved[k] and math.isfinite(v) else None
                                                  for k, v in sorted(val.items())}}
        curves[spec.display] = {k: v for k, v in val.items() if improved[k]}
        print(f"pick_lr: {spec.display}: lr {lr} (val loss {val[lr]:.4f}"
              + (", at the edge of the sweep" if edge else "")
              + ("; NO lr beat the initial weights: flagged in the report" if never else "") + ")")
    out = LR_DIR
    out.mkdir(parents=True, exist_ok=True)
    for record, choice in chosen.items():  # the lr alone: a replicate reruns only when its model's pick moves
        (out / f"{record}.json").write_text(json.dumps({"lr": choice["lr"]}) + "\n")
    run.log_figure(lr_sweep(curves), "lr_sweep.png")
    run.finish(chosen)


if __name__ == "__main__":
    run_stage("pick_lr", main)
