"""DVC stage: write data/dataset/{train,val,test}.txt from the configured source, and its stats."""

from pathlib import Path

from newllm.pipeline import run_stage

OUT = Path("data/dataset")


def main(params, run) -> None:
    from newllm.data.corpora import load_splits
    from newllm.data.stats import split_stats, write_splits
    from newllm.report.figures import pyplot

    splits = load_splits(params.dataset, params.dataset.seed)
    write_splits(OUT, splits)
    stats = split_stats(splits)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("train", "val", "test"):
        lengths = [len(line.split()) for line in getattr(splits, name)]
        if lengths:
            ax.hist(lengths, bins=30, alpha=0.6, label=f"{name} ({len(lengths)} lines)")
    ax.set(xlabel="words per line", ylabel="lines", title=f"dataset: {params.dataset.source}")
    ax.legend()
    run.log_figure(fig, "line_lengths.png")
    run.finish(stats)
    print(f"generate_dataset: {stats['train_lines']}/{stats['val_lines']}/{stats['test_lines']} lines, "
          f"{stats['tokens']} words, {stats['distinct_words']} distinct")


def precheck(params) -> None:
    from newllm.data.corpora import check_files

    check_files(params.dataset)


if __name__ == "__main__":
    run_stage("generate_dataset", main, precheck)
