"""
Loss curves of several runs in one PNG, for when a picture reads faster than a log.

    python tools/plot.py --runs=out,out-rep                    # training loss and val bits per byte
    python tools/plot.py --runs=out-a,out-b --metrics=val_bpb --x=seconds --out=budget.png

Each run is a folder holding train.py's (or distill.py's) metrics.jsonl, or the file itself:
one panel per metric, one line per run, labelled by its folder's name (by its path where two
folders share a name). Needs matplotlib, which nothing else here does.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# run from anywhere: the project's modules are one folder up
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import UserError, parse_config, run

METRICS_FILE = "metrics.jsonl"  # what train.py writes in its --out_dir
# Training records (every --log_interval steps) carry loss, lr and tokens_per_s; evaluation
# records (every --eval_interval steps) val_loss, val_bpb and seconds, the time spent training.
METRIC_NAMES = {"loss": "training loss (nats per token)", "val_loss": "val loss (nats per token)",
                "val_bpb": "val bits per byte", "lr": "learning rate",
                "tokens_per_s": "training tokens/s"}


@dataclass
class PlotConfig:
    runs: str = "out"  # comma-separated run folders (or metrics.jsonl files)
    metrics: str = "loss,val_bpb"  # comma-separated: one panel each
    x: str = "step"  # step | seconds (evaluation records only: wall time spent training)
    out: str = "loss.png"


def read_metrics(run_path):
    """One run's metrics.jsonl records, in order; a last line cut short by a kill is skipped."""
    path = Path(run_path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: --runs names folders that train.py wrote "
                        f"(they hold {METRICS_FILE})")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            # a bad line in the middle is not a kill: refuse rather than guess
            if number < len(lines):
                message = f"{path} line {number} is not JSON: is it a metrics.jsonl?"
                raise UserError(message) from None
    return records


def curve(records, metric, x):
    """(xs, ys) of the records that have both x and metric, in the order logged."""
    points = [(r[x], r[metric]) for r in records if x in r and metric in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs, metrics, x="step"):
    """A matplotlib figure: one panel per metric, one line per run ({label: records})."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib, which is not installed: "
                        "pip install matplotlib") from None
    # each panel 5 x 3.6 inches; a run keeps its colour in every panel
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.6), squeeze=False)
    for panel, metric in zip(axes[0], metrics):
        for colour, (label, records) in enumerate(runs.items()):
            xs, ys = curve(records, metric, x)
            if xs:
                marker = "." if len(xs) < 20 else None
                panel.plot(xs, ys, label=label, color=f"C{colour}", marker=marker)
        panel.set_xlabel("seconds of training" if x == "seconds" else "step")
        panel.set_ylabel(METRIC_NAMES.get(metric, metric))
        panel.grid(alpha=0.3)
        panel.legend()
    figure.tight_layout()
    return figure


def save(figure, out):
    """Write the figure to out whole or not at all (through a temporary file)."""
    out = Path(out)
    kind = out.suffix.lstrip(".").lower() or "png"
    if kind not in figure.canvas.get_supported_filetypes():
        raise UserError(f"--out={out}: matplotlib cannot write .{kind} files: "
                        "use .png, .pdf or .svg")
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(tmp, format=kind, dpi=120)
        os.replace(tmp, out)
    except OSError as e:
        if tmp.exists():
            tmp.unlink()
        raise UserError(f"could not write {out} ({e.strerror or e}): pick another --out") from None


def labels_for(paths):
    """Each run's folder name, or the path as given where two runs' folders share a name."""
    names = [Path(p).name or p for p in paths]
    if len(set(names)) == len(names):
        return names
    if len(set(paths)) < len(paths):
        raise UserError("a run is named twice in --runs")
    return paths


def main(argv=None):
    config = PlotConfig()
    parse_config([config], sys.argv[1:] if argv is None else argv, usage=__doc__)
    paths = [p for p in config.runs.split(",") if p.strip()]
    metrics = [m for m in config.metrics.split(",") if m.strip()]
    if not paths or not metrics:
        raise UserError("--runs and --metrics each need at least one name")
    if config.x not in ("step", "seconds"):
        raise UserError(f"--x={config.x} is not one of step, seconds")
    runs = {label: read_metrics(path) for label, path in zip(labels_for(paths), paths)}
    for metric in metrics:
        if not any(curve(records, metric, config.x)[0] for records in runs.values()):
            logged = sorted({key for records in runs.values() for r in records for key in r})
            raise UserError(f"no run has a record with both {config.x} and {metric}: "
                            f"metrics.jsonl records carry {', '.join(logged)}")
    save(plot_runs(runs, metrics, config.x), config.out)
    print(f"wrote {config.out}: {', '.join(metrics)} of {len(runs)} run(s) against {config.x}")


if __name__ == "__main__":
    run(main)
