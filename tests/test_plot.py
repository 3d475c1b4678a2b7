"""plot.py: the curves drawn are the records logged; no matplotlib or an unwritable --out is one line."""

import errno
import json
import os
import sys

from pathlib import Path

import pytest

from tools import plot
from cli import UserError


def write_run(folder, losses, bpbs, cut_last_line=False):
    """A metrics.jsonl as train.py writes it: a training record each step, an evaluation one every 2nd."""
    folder.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, 1):
        lines.append(json.dumps({"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 1000}))
        if step % 2 == 0:
            lines.append(json.dumps({"step": step, "seconds": 0.5 * step, "val_loss": 2.0,
                                     "val_bpb": bpbs[step // 2 - 1]}))
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
    with pytest.raises(UserError, match="named twice"):
        plot.main([f"--runs={run},{run}"])
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
        drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                 for line in panel.get_lines()}
        assert drawn == {label: plot.curve(records, metric, "step") for label, records in runs.items()}
    out = tmp_path / "figures" / "loss.png"
    plot.main([f"--runs={tmp_path / 'gelu'},{tmp_path / 'linear'}", f"--out={out}"])
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_runs_with_the_same_folder_name_are_labelled_by_their_paths():
    assert plot.labels_for(["out-a/gelu", "out-b/linear"]) == ["gelu", "linear"]
    assert plot.labels_for(["out-a/gelu", "out-b/gelu"]) == ["out-a/gelu", "out-b/gelu"]


def test_an_unwritable_out_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="plot.py draws with matplotlib (requirements-extra.txt)")
    run = write_run(tmp_path / "a", [3.0, 2.5], [2.9])
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="could not write.*pick another --out"):
        plot.main([f"--runs={run}", f"--out={tmp_path / 'a_file' / 'loss.png'}"])
    with pytest.raises(UserError, match="cannot write .xyz"):
        plot.main([f"--runs={run}", f"--out={tmp_path / 'loss.xyz'}"])
    # the disk fills half-way through the PNG: neither the PNG nor its temporary file is left
    from matplotlib.figure import Figure
    real_savefig = Figure.savefig

    def half_then_full(self, path, **options):
        real_savefig(self, path, **options)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Figure, "savefig", half_then_full)
    with pytest.raises(UserError, match="No space left"):
        plot.main([f"--runs={run}", f"--out={tmp_path / 'loss.png'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a_file"]
