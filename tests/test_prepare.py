"""data/prepare.py: text files -> train.bin, val.bin, meta.json. Offline: the downloader is always replaced."""

import importlib.util
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from cli import UserError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "data" / "prepare.py"

# data/ is a plain folder, not a package: load the script as a module by its path
_spec = importlib.util.spec_from_file_location("prepare", SCRIPT)
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Café — 😀 ok\n" * 20


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may touch the network: downloading fails unless a test says otherwise."""
    def refuse():
        raise urllib.error.URLError("tests run offline")
    monkeypatch.setattr(prepare, "download_tinyshakespeare", refuse)


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def run_prepare(tmp_path, **overrides):
    config = prepare.PrepareConfig(data_dir=str(tmp_path / "data"), **overrides)
    out_dir = prepare.prepare(config)
    meta = json.loads((out_dir / "meta.json").read_text())
    train = np.fromfile(out_dir / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(out_dir / "val.bin", dtype=meta["dtype"])
    return out_dir, meta, train, val


def test_bytes_round_trip_and_meta(tmp_path):
    corpus = write(tmp_path / "corpus.txt", TEXT)
    out_dir, meta, train, val = run_prepare(tmp_path, input=str(corpus))
    data = TEXT.encode("utf-8")
    assert out_dir == tmp_path / "data" / "corpus_bytes"
    assert train.tobytes() + val.tobytes() == data
    assert meta == {
        "tokenization": "bytes", "vocab_size": 256, "dtype": "uint8",
        "corpus": "corpus.txt", "sources": [str(corpus)],
        "train_tokens": len(train), "val_tokens": len(val),
        "train_bytes": len(train), "val_bytes": len(val),
    }
    # the last tenth is validation, give or take the step back to a character boundary
    assert len(data) * 0.1 <= len(val) <= len(data) * 0.1 + 4
    assert not list(out_dir.glob("*.tmp"))


def test_bpe_tokens_decode_to_the_split_text(tmp_path, gpt2):
    # an invalid byte (0xff) is replaced by U+FFFD before encoding: 1 byte in the file, 3 in the text
    data = TEXT.encode("utf-8") + b"bad \xff byte\n" + TEXT.encode("utf-8")
    corpus = write(tmp_path / "mixed.txt", data)
    out_dir, meta, train, val = run_prepare(tmp_path, input=str(corpus), tokenization="bpe")
    cut = prepare.split_point(data, 0.1)
    train_text, val_text = (part.decode("utf-8", errors="replace") for part in (data[:cut], data[cut:]))
    assert gpt2.decode(train.tolist()) == train_text
    assert gpt2.decode(val.tolist()) == val_text
    assert out_dir.name == "mixed_bpe"
    assert meta["vocab_size"] == gpt2.n_vocab == 50257
    assert (meta["dtype"], meta["tokenization"]) == ("uint16", "bpe")
    token_bytes = np.load(out_dir / "token_bytes.npy")
    assert token_bytes[train].sum() == len(train_text.encode("utf-8"))  # bits per byte divides by the text's bytes
    assert meta["train_bytes"] == len(train_text.encode("utf-8")) == cut + 2
    assert meta["val_bytes"] == len(val_text.encode("utf-8")) == len(data) - cut
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert len(train) < meta["train_bytes"] / 2  # BPE does compress


def test_both_tokenizations_split_the_same_text(tmp_path, gpt2):
    corpus = write(tmp_path / "c.txt", TEXT)
    _, _, byte_train, byte_val = run_prepare(tmp_path, input=str(corpus))
    _, _, bpe_train, bpe_val = run_prepare(tmp_path, input=str(corpus), tokenization="bpe")
    assert gpt2.decode_bytes(bpe_train.tolist()) == byte_train.tobytes()
    assert gpt2.decode_bytes(bpe_val.tolist()) == byte_val.tobytes()


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_split_never_cuts_a_character(char):
    data = (char * 101).encode("utf-8")
    width = len(char.encode("utf-8"))
    for percent in range(1, 100):
        cut = prepare.split_point(data, percent / 100)
        assert cut % width == 0, (char, percent, cut)
        assert 0 <= len(data) * (1 - percent / 100) - cut < width
        data[:cut].decode("utf-8"), data[cut:].decode("utf-8")  # both halves are valid UTF-8


def test_split_of_non_utf8_bytes_stays_near_the_request():
    data = b"\x80" * 1000  # all continuation bytes: never a boundary, so step back no further than a character
    assert 900 - prepare.UTF8_MAX_CONTINUATION <= prepare.split_point(data, 0.1) <= 900


def test_several_inputs_in_order(tmp_path, capsys):
    a = write(tmp_path / "alpha.txt", "no newline at the end")
    b = write(tmp_path / "beta.txt", "second file\n" * 10)
    c = write(tmp_path / "gamma.txt", "third file\n" * 10)
    data_dir = f"--data_dir={tmp_path / 'data'}"
    # the argparse form (--input a.txt b.txt) and the --key=value form give the same dataset
    prepare.main(["--input", str(a), str(b), str(c), data_dir, "--name=spaced"])
    prepare.main([f"--input={a},{b},{c}", data_dir, "--name=commas"])
    spaced, commas = tmp_path / "data" / "spaced", tmp_path / "data" / "commas"
    expected = b"no newline at the end\n" + b"second file\n" * 10 + b"third file\n" * 10
    for out_dir in (spaced, commas):
        joined = (out_dir / "train.bin").read_bytes() + (out_dir / "val.bin").read_bytes()
        assert joined == expected
    meta = json.loads((spaced / "meta.json").read_text())
    assert meta["sources"] == [str(a), str(b), str(c)]
    assert meta["corpus"] == "alpha.txt, beta.txt, gamma.txt"
    assert (commas / "meta.json").read_text() == (spaced / "meta.json").read_text()
    out = capsys.readouterr().out
    assert "next: python train.py --dataset=commas" in out and "train:" in out and "val:" in out


def test_expand_input_list():
    expand = prepare.expand_input_list
    assert expand(["--input", "a", "b", "--name=x"]) == ["--input=a,b", "--name=x"]
    assert expand(["--name=x", "--input", "a"]) == ["--name=x", "--input=a"]
    assert expand(["--input=a,b"]) == ["--input=a,b"]
    assert expand(["--input", "-h"]) == ["--input", "-h"]  # no files: parse_config reports it
    assert expand([]) == []


@pytest.mark.parametrize("overrides, name", [
    (dict(input="/x/story.txt"), "story_bytes"),
    (dict(input="/x/story.txt,/y/other.md", tokenization="bpe"), "story_bpe"),
    (dict(), "default_bytes"),
    (dict(tokenization="bpe"), "default_bpe"),
    (dict(input="/x/story.txt", name="mine"), "mine"),
])
def test_dataset_name(overrides, name):
    assert prepare.dataset_name(prepare.PrepareConfig(**overrides)) == name


def test_empty_corpus_is_an_error(tmp_path):
    empty = write(tmp_path / "empty.txt", b"")
    with pytest.raises(UserError, match="is empty"):
        run_prepare(tmp_path, input=f"{empty},{empty}")
    assert not (tmp_path / "data" / "empty_bytes").exists()


def test_missing_file_is_an_error(tmp_path):
    good = write(tmp_path / "good.txt", TEXT)
    with pytest.raises(UserError, match="nowhere.txt"):
        run_prepare(tmp_path, input=f"{good},{tmp_path / 'nowhere.txt'}")


@pytest.mark.parametrize("overrides, message", [
    (dict(tokenization="chars"), "not one of bytes, bpe"),
    (dict(val_fraction=0.0), "between 0 and 1"),
    (dict(val_fraction=1.0), "between 0 and 1"),
])
def test_bad_settings_are_errors(tmp_path, overrides, message):
    corpus = write(tmp_path / "c.txt", TEXT)
    with pytest.raises(UserError, match=message):
        run_prepare(tmp_path, input=str(corpus), **overrides)


def test_too_small_to_split_is_an_error(tmp_path):
    corpus = write(tmp_path / "tiny.txt", "é")  # the cut would land inside the only character
    with pytest.raises(UserError, match="too small"):
        run_prepare(tmp_path, input=str(corpus))


def test_default_corpus_uses_the_local_tinyshakespeare(tmp_path, capsys):
    local = tmp_path / "data" / "shakespeare" / "input.txt"
    local.parent.mkdir(parents=True)
    write(local, TEXT)
    out_dir, meta, train, val = run_prepare(tmp_path)
    assert out_dir == tmp_path / "data" / "default_bytes"
    assert train.tobytes() + val.tobytes() == TEXT.encode("utf-8")
    assert meta["corpus"] == "tinyshakespeare"
    assert "note:" not in capsys.readouterr().out  # the (failing) downloader was never needed


def test_default_corpus_downloads_once_and_saves(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(prepare, "download_tinyshakespeare", lambda: calls.append(1) or TEXT.encode("utf-8"))
    for _ in range(2):
        data, corpus, sources = prepare.default_corpus(tmp_path)
        assert (data, corpus) == (TEXT.encode("utf-8"), "tinyshakespeare")
    assert len(calls) == 1
    assert (tmp_path / "shakespeare" / "input.txt").read_bytes() == TEXT.encode("utf-8")
    assert sources == [str(tmp_path / "shakespeare" / "input.txt")]


def test_default_corpus_falls_back_to_the_stdlib_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "STDLIB_CORPUS_BYTES", 200_000)  # a smaller slice keeps the test quick
    out_dir, meta, train, val = run_prepare(tmp_path)
    out = capsys.readouterr().out
    assert out.startswith("note: could not download tinyshakespeare") and out.count("\n") == 1
    assert out_dir.name == "default_bytes"  # the training script's default dataset exists offline too
    assert meta["corpus"] == "python-stdlib"
    # whole files, in sorted order, until the budget is reached; deterministic across runs
    sources = [Path(s) for s in meta["sources"]]
    assert sources == prepare.stdlib_sources() and sources == sorted(sources)
    assert all(p.suffix == ".py" for p in sources)
    sizes = [p.stat().st_size for p in sources]
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)
    assert train.tobytes() + val.tobytes() == prepare.read_corpus(sources)
    assert not (tmp_path / "data" / "shakespeare").exists()  # nothing half-downloaded left behind


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("input", "tokenization", "name", "val_fraction", "data_dir"):
        assert f"--{key} " in out


def test_script_runs_from_another_directory(tmp_path):
    corpus = write(tmp_path / "notes.txt", TEXT)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(corpus), f"--data_dir={tmp_path / 'data'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "next: python train.py --dataset=notes_bytes" in result.stdout
    assert (tmp_path / "data" / "notes_bytes" / "meta.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--tokenisation=bpe"], "did you mean --tokenization?"),
    (["--input=/no/such/file.txt", "--data_dir=/no/such/dir"], "/no/such/file.txt"),
])
def test_script_reports_bad_input_in_one_line(tmp_path, args, message):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr


def test_preparing_data_never_loads_the_model():
    """data/prepare.py reaches tokenizers through tokenizer.py: no torch, no model.py, no reparam.py."""
    code = ("import runpy, sys; sys.argv = ['prepare.py', '--help']\n"
            "try:\n    runpy.run_path('data/prepare.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'model', 'reparam', 'byte_tokenizer') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
