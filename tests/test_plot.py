"""plot.py: the curves drawn are the records logged, and a missing matplotlib is one line."""

import json
import sys

import pytest

import plot
from cli import UserError


def write_run(folder, losses, bpbs, cut_last_line=False):
    """A metrics.jsonl as train.py writes it: a training record every step, an evaluation record every second."""
    folder.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, 1):
        lines.append(json.dumps({"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 1000}))
        if step % 2 == 0:
            lines.append(json.dumps({"step": step, "seconds": 0.5 * step, "val_loss": 2.0, "val_bpb": bpbs[step // 2 - 1]}))
    text = "\n".join(lines) + "\n"
    if cut_last_line:
        text += '{"step": 9, "lo'  # a kill in the middle of a write
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_records_become_curves_in_the_order_logged(tmp_path):
    run = write_run(tmp_path / "a", [3.0, 2.5, 2.2, 2.0], [2.9, 2.4], cut_last_line=True)
    records = plot.read_metrics(run)
    assert plot.curve(records, "loss", "step") == ([1, 2, 3, 4], [3.0, 2.5, 2.2, 2.0])
    assert plot.curve(records, "val_bpb", "step") == ([2, 4], [2.9, 2.4])
    assert plot.curve(records, "val_bpb", "seconds") == ([1.0, 2.0], [2.9, 2.4])


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        plot.main([f"--runs={tmp_path / 'nothing'}"])
    run = write_run(tmp_path / "a", [3.0, 2.5], [2.9])
    with pytest.raises(UserError, match="labels"):
        plot.main([f"--runs={run}", "--labels=x,y"])
    with pytest.raises(UserError, match="no run has a record with both step and perplexity"):
        plot.main([f"--runs={run}", "--metrics=perplexity"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        plot.read_metrics(tmp_path / "b")


def test_without_matplotlib_it_says_how_to_get_it(tmp_path, monkeypatch):
    run = write_run(tmp_path / "a", [3.0, 2.5], [2.9])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot.main([f"--runs={run}", f"--out={tmp_path / 'loss.png'}"])
    assert not (tmp_path / "loss.png").exists()


def test_several_runs_in_one_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py draws with matplotlib (requirements-extra.txt)")
    runs = {"gelu": plot.read_metrics(write_run(tmp_path / "gelu", [3.0, 2.5, 2.2, 2.0], [2.9, 2.4])),
            "linear": plot.read_metrics(write_run(tmp_path / "linear", [3.1, 2.8, 2.7, 2.6], [3.0, 2.8]))}
    figure = plot.plot_runs(runs, ["loss", "val_bpb"])
    for panel, metric in zip(figure.axes, ["loss", "val_bpb"]):
        drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in panel.get_lines()}
        assert drawn == {label: plot.curve(records, metric, "step") for label, records in runs.items()}
    out = tmp_path / "figures" / "loss.png"
    plot.main([f"--runs={tmp_path / 'gelu'},{tmp_path / 'linear'}", f"--out={out}"])
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
