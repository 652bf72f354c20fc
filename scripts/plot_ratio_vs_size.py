"""Plot each clipping mode's step time, peak memory and matrix multiply-adds against the
non-private step's, over model size, from `python -m dpdit.profile` runs (one per model,
`profile.count_multiply_adds=true` for the multiply-add bound):

    python scripts/plot_ratio_vs_size.py --output docs/ratio_vs_size.png \\
        S/2=multirun/0/profile.json B/2=multirun/1/profile.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

QUANTITIES = (
    ("step_time", "step time"),
    ("peak_memory", "peak memory"),
    ("multiply_adds", "multiply-adds (the bound)"),
)


def points(runs: list[tuple[str, Path]]) -> dict[str, list[tuple[float, float, str, str]]]:
    """Per (mode, quantity): (trained parameters, ratio to vanilla, label) of every run."""
    found: dict[str, list] = {}
    for label, path in runs:
        records = json.loads(path.read_text())["records"]
        # one model per run: every record that was measured counts its parameters
        trained = next(r["trained_parameters"] for r in records if r.get("trained_parameters"))
        for record in records:
            ratio = record.get("vs_vanilla")
            if record["mode"] == "vanilla" or not ratio:
                continue
            for key, _ in QUANTITIES:
                if ratio.get(key):
                    found.setdefault(f"{record['mode']}/{key}", []).append((trained, ratio[key], label, record["mode"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=path/to/profile.json, one per model")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    runs = [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in args.runs]
    found = points(runs)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    modes = sorted({key.split("/")[0] for key in found})
    for i, mode in enumerate(modes):
        for (key, name), style in zip(QUANTITIES, ("o", "s", "^")):
            series = sorted(found.get(f"{mode}/{key}", []))
            if not series:
                continue
            axis.plot(
                [p[0] / 1e6 for p in series], [p[1] for p in series], style, color=f"C{i}", label=f"{mode}: {name}"
            )
            if key == "step_time":
                for x, y, label, _ in series:
                    axis.annotate(label, (x / 1e6, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("trained parameters (millions)")
    axis.set_ylabel("ratio to the non-private step")
    axis.legend(fontsize=8)
    batch = {r["batch_size"] for _, path in runs for r in json.loads(path.read_text())["records"]}
    axis.set_title(f"DP step against non-private, physical batch {', '.join(map(str, sorted(batch)))}")
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
