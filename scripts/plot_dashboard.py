"""Plot a run's dashboard from its CSV log as W&B shows it (each value, and its exponential
moving average): the DP-released statistics, the clip bound and epsilon.

    python scripts/plot_dashboard.py outputs/<run>/csv/version_0/metrics.csv --output docs/dashboard.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (key, title, smoothed): the noisy statistics get W&B's smoothing; the bound and epsilon
# are exact functions of released values, drawn as they are
PANELS = (
    ("private/loss", "private/loss (clipped, noisy, per expected image)", True),
    ("private/clipped_fraction", "private/clipped_fraction (noisy)", True),
    ("privacy/max_grad_norm", "privacy/max_grad_norm", False),
    ("privacy/epsilon", "privacy/epsilon", False),
)
# W&B's default smoothing: an exponential moving average with this weight on the past
SMOOTHING = 0.9


def series(path: Path, key: str) -> tuple[list[int], list[float]]:
    with open(path) as file:
        rows = [row for row in csv.DictReader(file) if row.get(key)]
    return [int(row["step"]) for row in rows], [float(row[key]) for row in rows]


def smoothed(values: list[float]) -> list[float]:
    """W&B's debiased exponential moving average."""
    average, out = 0.0, []
    for n, value in enumerate(values, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        out.append(average / (1 - SMOOTHING**n))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a run's csv/version_0/metrics.csv")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    panels = [panel for panel in PANELS if series(args.metrics, panel[0])[0]]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for axis, (key, title, smooth) in zip(axes[0], panels):
        steps, values = series(args.metrics, key)
        if smooth:
            axis.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1)
            axis.plot(steps, smoothed(values), color="tab:blue", linewidth=2)
        else:
            axis.plot(steps, values, color="tab:blue", linewidth=2)
        # a constant series (a fixed bound) keeps its value on the axis, not an offset from it
        axis.ticklabel_format(axis="y", useOffset=False)
        if max(values) - min(values) <= 1e-6 * abs(max(values)):
            axis.set_ylim(0, 2 * max(values) if max(values) > 0 else 1)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
