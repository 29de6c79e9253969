"""The fault suite as a table: every fault of tests/faults.py tried on a scratch copy of the pipeline.

    python benchmarks/faults.py [fault ...]     (or `make faults`; default: all)

Prints, per fault: what happened, seconds to fail or recover, outputs left cached (must be 0 for a failure),
MLflow runs left RUNNING (must be 0), metrics identical after a resume (must be yes)."""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from faults import FAULTS, Row, Unavailable, base_project  # noqa: E402


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        print(f"error: unknown fault {unknown[0]!r} (faults: {', '.join(FAULTS)})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="newllm-faults-") as tmp:
        t0 = time.perf_counter()
        base = base_project(Path(tmp))
        print(f"scratch pipeline reproduced in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = []
        for name in names or list(FAULTS):
            try:
                row = FAULTS[name](base, Path(tmp))
            except Unavailable as e:  # not a failure: this machine cannot stage it (a row says why)
                row = Row(name, f"skipped: {e}", 0.0, 0, 0, ok=True)
            rows.append(row)
            print(f"{name}: {'ok' if row.ok else 'NOT OK'} ({row.seconds:.1f} s)", file=sys.stderr)
    print("| fault | what happened | seconds | outputs cached | runs left RUNNING | metrics identical | as required |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        happened = r.happened.replace("|", "\\|")
        print(f"| {r.fault} | {happened} | {r.seconds:.1f} | {r.cached} | {r.running} | {r.identical} | "
              f"{'yes' if r.ok else '**no**'} |")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
