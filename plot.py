"""
Loss curves of several runs in one PNG, for when a picture reads faster than a log.

    python plot.py --runs=out,out-rep                          # training loss and val bits per byte
    python plot.py --runs=out-a,out-b --metrics=val_bpb --x=seconds --out=budget.png
    python plot.py --runs=out-a,out-b --labels="gelu,rep_linear" --log_y

Each run is a folder holding train.py's (or distill.py's) metrics.jsonl, or the file itself.
One panel per metric, one line per run, the same colour for a run in every panel. Training
records (every --log_interval steps) carry loss, lr and tokens_per_s; evaluation records
(every --eval_interval steps) carry val_loss, val_bpb and seconds, the wall time spent
training so far. Needs matplotlib (pip install matplotlib), which nothing else here does.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from checkpointing import METRICS_NAME
from cli import UserError, parse_config, run

X_AXES = ("step", "seconds")
FIGURE_INCHES_PER_PANEL = (5.0, 3.6)  # width and height of one metric's panel
DPI = 120
METRIC_NAMES = {"loss": "training loss (nats per token)", "val_loss": "val loss (nats per token)",
                "val_bpb": "val bits per byte", "lr": "learning rate", "tokens_per_s": "training tokens/s"}


@dataclass
class PlotConfig:
    runs: str = "out"  # comma-separated run folders (or metrics.jsonl files)
    metrics: str = "loss,val_bpb"  # comma-separated: one panel each
    x: str = "step"  # step | seconds (evaluation records only: wall time spent training)
    labels: str = ""  # comma-separated legend labels, one per run; default: the folder names
    log_y: bool = False  # a logarithmic y axis
    out: str = "loss.png"


def read_metrics(run_path):
    """The records of one run's metrics.jsonl, in order. A last line cut short by a kill is skipped."""
    path = Path(run_path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        raise UserError(f"{path} not found: --runs names folders that train.py wrote (they hold {METRICS_NAME})")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):  # a bad line in the middle is not a kill: refuse rather than guess
                raise UserError(f"{path} line {number} is not JSON: is it a metrics.jsonl?") from None
    return records


def curve(records, metric, x):
    """(xs, ys) of the records that have both x and metric, in the order logged."""
    points = [(r[x], r[metric]) for r in records if x in r and metric in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs, metrics, x="step", labels=None, log_y=False):
    """A matplotlib figure: one panel per metric, one line per run ({label: records})."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib, which is not installed: pip install matplotlib") from None
    width, height = FIGURE_INCHES_PER_PANEL
    figure, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), height), squeeze=False)
    for panel, metric in zip(axes[0], metrics):
        for colour, (label, records) in enumerate(runs.items()):
            xs, ys = curve(records, metric, x)
            if xs:
                panel.plot(xs, ys, label=label, color=f"C{colour}", marker="." if len(xs) < 20 else None)
        panel.set_xlabel("seconds of training" if x == "seconds" else "step")
        panel.set_ylabel(METRIC_NAMES.get(metric, metric))
        if log_y:
            panel.set_yscale("log")
        panel.grid(alpha=0.3)
        panel.legend()
    figure.tight_layout()
    return figure


def main(argv=None):
    config = PlotConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    paths = [p for p in config.runs.split(",") if p.strip()]
    metrics = [m for m in config.metrics.split(",") if m.strip()]
    labels = [label for label in config.labels.split(",") if label.strip()] or [Path(p).name or p for p in paths]
    if not paths or not metrics:
        raise UserError("--runs and --metrics each need at least one name")
    if config.x not in X_AXES:
        raise UserError(f"--x={config.x} is not one of {', '.join(X_AXES)}")
    if len(labels) != len(paths):
        raise UserError(f"--labels has {len(labels)} names for {len(paths)} runs: give one per run")
    if len(set(labels)) != len(labels):
        raise UserError("two runs have the same label: name them with --labels")
    runs = {label: read_metrics(path) for label, path in zip(labels, paths)}
    for metric in metrics:
        if not any(curve(records, metric, config.x)[0] for records in runs.values()):
            raise UserError(f"no run has a record with both {config.x} and {metric}: "
                            f"metrics.jsonl records carry {', '.join(sorted({k for r in runs.values() for rec in r for k in rec}))}")
    figure = plot_runs(runs, metrics, config.x, log_y=config.log_y)
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(config.out, dpi=DPI)
    print(f"wrote {config.out}: {', '.join(metrics)} of {len(runs)} run(s) against {config.x}")


if __name__ == "__main__":
    run(main)
