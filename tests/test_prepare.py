"""data/prepare.py: a corpus -> token shards and meta.json. Offline: the downloader is always replaced."""

import errno
import json
import math
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from cli import UserError
# as data.prepare (a namespace package), the name worker processes import it by
from data import prepare

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "data" / "prepare.py"

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
    """(folder, meta, train ids, val ids): each split's shards read back in the order meta.json lists them."""
    config = prepare.PrepareConfig(data_dir=str(tmp_path / "data"), **overrides)
    out_dir = prepare.prepare(config)
    meta = json.loads((out_dir / "meta.json").read_text())
    train, val = ([np.fromfile(out_dir / s["file"], dtype=meta["dtype"]) for s in meta["shards"][split]]
                  for split in ("train", "val"))
    return out_dir, meta, np.concatenate(train), np.concatenate(val)


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
        # a small corpus is one shard per split, with nanoGPT's file names
        "shards": {"train": [{"file": "train.bin", "tokens": len(train), "bytes": len(train)}],
                   "val": [{"file": "val.bin", "tokens": len(val), "bytes": len(val)}]},
    }
    # the last tenth is validation, give or take the step back to a character boundary
    assert len(data) * 0.1 <= len(val) <= len(data) * 0.1 + 4
    assert sorted(p.name for p in out_dir.iterdir()) == ["meta.json", "token_bytes.npy", "train.bin", "val.bin"]


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
    assert f"next: python train.py --dataset={commas}" in out and "train:" in out and "val:" in out
    assert "shards: 1 train + 1 val" in out


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
        files, corpus = prepare.default_corpus(tmp_path)
        assert (files, corpus) == ([tmp_path / "shakespeare" / "input.txt"], "tinyshakespeare")
    assert len(calls) == 1
    assert (tmp_path / "shakespeare" / "input.txt").read_bytes() == TEXT.encode("utf-8")


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
    assert train.tobytes() + val.tobytes() == b"".join(p.read_bytes() for p in sources)  # each ends with a newline
    assert not (tmp_path / "data" / "shakespeare").exists()  # nothing half-downloaded left behind


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("input", "tokenization", "name", "val_fraction", "data_dir", "text_field", "max_bytes", "num_proc"):
        assert f"--{key} " in out


def test_script_runs_from_another_directory(tmp_path):
    corpus = write(tmp_path / "notes.txt", TEXT)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(corpus), f"--data_dir={tmp_path / 'data'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"next: python train.py --dataset={tmp_path / 'data' / 'notes_bytes'}" in result.stdout
    assert (tmp_path / "data" / "notes_bytes" / "meta.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--tokenisation=bpe"], "did you mean --tokenization?"),
    (["--input=/no/such/file.txt", "--data_dir=/no/such/dir"], "/no/such/file.txt"),
    (["--input=empty"], "--input empty is a folder with no files in it"),
    (["--input=c.txt", "--num_proc=0"], "--num_proc must be at least 1"),
    (["--input=c.txt", "--max_bytes=-5"], "--max_bytes 0 (all) or more"),
    (["--input=c.txt,hf:some/dataset"], "a hub dataset (hf:NAME) must be the only --input"),
    (["--input=c.txt,d.jsonl"], "--input mixes kinds of input (json, text)"),
    (["--input=c.txt", "--name=../../x", "--data_dir=d"], "--name must be a folder name"),
])
def test_script_reports_bad_input_in_one_line(tmp_path, args, message):
    write(tmp_path / "c.txt", TEXT)
    write(tmp_path / "d.jsonl", '{"text": "a document"}\n')
    (tmp_path / "empty").mkdir()
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


def test_a_folder_is_its_files_in_sorted_order(tmp_path):
    folder = tmp_path / "texts"
    (folder / "b").mkdir(parents=True)
    write(folder / "b" / "2.txt", "two\n")
    write(folder / "a.txt", "one")  # no newline at its end: one is put before the next file
    write(folder / "b" / "10.txt", "ten\n" * 30)
    write(folder / ".hidden", "never read")
    out_dir, meta, train, val = run_prepare(tmp_path, input=str(folder))
    assert train.tobytes() + val.tobytes() == b"one\n" + b"ten\n" * 30 + b"two\n"
    assert (out_dir.name, meta["corpus"], meta["sources"]) == ("texts_bytes", "texts", [str(folder)])


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "ABSOLUTE"])
def test_a_name_that_leaves_the_data_folder_is_refused(tmp_path, name):
    corpus = write(tmp_path / "c.txt", TEXT)
    data_dir = tmp_path / "deep" / "down" / "data"  # deep enough that a name that escapes still lands in tmp_path
    name = str(tmp_path / "abs") if name == "ABSOLUTE" else name
    with pytest.raises(UserError, match="--name must be a folder name"):
        prepare.prepare(prepare.PrepareConfig(input=str(corpus), data_dir=str(data_dir), name=name))
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["c.txt"]  # nothing written, here or above


def printed_dataset(out):
    """The --dataset=... of the `next:` line a run of prepare.py printed."""
    (line,) = [line for line in out.splitlines() if line.startswith("next: python train.py --dataset=")]
    return line.removeprefix("next: python train.py --dataset=")


@pytest.mark.parametrize("data_dir", ["mydata", "ABSOLUTE", "DEFAULT"])
def test_the_next_command_finds_the_data(tmp_path, capsys, monkeypatch, data_dir):
    """train.py's --dataset is a folder under data/ or a path: the printed command names the written folder."""
    import train  # here: the rest of this file never loads torch
    monkeypatch.setattr(prepare, "DATA_DIR", tmp_path / "default")  # the default folder, in a temp copy
    monkeypatch.setattr(train, "DATA_DIR", tmp_path / "default")
    corpus = write(tmp_path / "c.txt", TEXT)
    options = {"mydata": ["--data_dir=mydata"], "ABSOLUTE": [f"--data_dir={tmp_path / 'abs'}"], "DEFAULT": []}
    prepare.main([f"--input={corpus}", *options[data_dir]])  # the tests run in tmp_path: mydata is tmp_path/mydata
    dataset = printed_dataset(capsys.readouterr().out)
    assert dataset == "c_bytes" if data_dir == "DEFAULT" else dataset.endswith("c_bytes")
    val = np.asarray(train.load_dataset(dataset, block_size=8).val)
    assert val.tobytes() == TEXT.encode()[prepare.split_point(TEXT.encode(), 0.1):]


@pytest.mark.parametrize("failure", ["under_a_file", "read_only"])
def test_an_unwritable_data_folder_is_one_line(tmp_path, monkeypatch, failure):
    corpus = write(tmp_path / "c.txt", TEXT)
    data_dir = tmp_path / "data"
    if failure == "under_a_file":  # no folder can be made there, even by root
        write(data_dir, "a file")
    else:  # what a read-only folder gives a user who is not root (root may write anywhere)
        def read_only(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(UserError, match=r"could not write .*c_bytes.*--data_dir"):
        prepare.prepare(prepare.PrepareConfig(input=str(corpus), data_dir=str(data_dir)))


# ----------------------------------------------------------------------------
# streaming: pieces, shards, workers, resuming

LINES = ["To be, or not to be: that is the question.", "  indented   spaces", "", "\ttab\tand\ttabs ",
         "ALL:", "Café — 😀 ok", "end.", "'s 're 've contractions", "12345 6789", "   ", "x"]


def random_text(n_lines, seed=0):
    """Lines of every kind GPT-2's pre-tokenizer treats apart (runs of spaces, blank lines, digits, non-ASCII)."""
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(LINES) + rng.choice(["\n", "\n", "\n\n", " \n", "\r\n"]) for _ in range(n_lines))


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 64 to 128 bytes and shards of 100 tokens: many of both from a few kilobytes."""
    monkeypatch.setattr(prepare, "PIECE_BYTES", 64)
    monkeypatch.setattr(prepare, "SHARD_TOKENS", 100)


def test_pieces_rebuild_the_text_and_end_where_asked(small_pieces):
    data = random_text(300).encode("utf-8") + "€".encode("utf-8") * 200  # a long line with no place to cut
    pieces = list(prepare.text_pieces(data[i:i + 50] for i in range(0, len(data), 50)))
    assert b"".join(pieces) == data and len(pieces) > 20
    visible = set(range(ord("!"), ord("~") + 1))
    start = 0
    for piece in pieces[:-1]:
        # the reference: the first newline between two visible ASCII bytes ending the piece at 64 to 127 bytes,
        # else 64 bytes moved back to the start of a character
        cuts = [end for end in range(64, 128) if data[start + end - 1] == ord("\n")
                and data[start + end - 2] in visible and data[start + end] in visible]
        expected = cuts[0] if cuts else next(end for end in (64, 63, 62, 61) if data[start + end] & 0xC0 != 0x80)
        assert len(piece) == expected
        start += len(piece)
    assert sum(len(p) == 63 for p in pieces) > 5  # the fallback was reached: 64 bytes of "€" end inside one


def test_gpt2_tokens_start_again_after_a_piece_cut(gpt2):
    """
    PIECE_CUT's promise, against tiktoken on the whole text: a newline between two
    visible ASCII characters ends GPT-2's tokens, whatever surrounds it, so text
    cut there tokenizes as the whole (pieces end there: the test above).
    """
    rng = np.random.default_rng(0)
    visible = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    for trial in range(400):
        left = random_text(rng.integers(0, 4), seed=trial)[:rng.integers(0, 60)] + rng.choice(visible) + "\n"
        right = rng.choice(visible) + random_text(rng.integers(0, 4), seed=trial + 1000)
        assert prepare.PIECE_CUT.search((left + right).encode(), len(left.encode()) - 2).end() == len(left.encode())
        assert gpt2.encode_ordinary(left) + gpt2.encode_ordinary(right) == gpt2.encode_ordinary(left + right), (left, right)


@pytest.mark.parametrize("tokenization", ["bytes", "bpe", "bytes_gpt2"])
def test_many_shards_hold_the_tokens_of_one_file(tmp_path, monkeypatch, tokenization, request):
    if tokenization != "bytes":
        request.getfixturevalue("gpt2")
    corpus = write(tmp_path / "c.txt", random_text(300))
    monkeypatch.setattr(prepare, "PIECE_BYTES", 64)
    _, one_meta, one_train, one_val = run_prepare(tmp_path, input=str(corpus), tokenization=tokenization, name="one")
    monkeypatch.setattr(prepare, "SHARD_TOKENS", 100)
    out_dir, meta, train, val = run_prepare(tmp_path, input=str(corpus), tokenization=tokenization, name="many")
    assert np.array_equal(train, one_train) and np.array_equal(val, one_val)
    assert len(meta["shards"]["train"]) > 10 and len(meta["shards"]["val"]) > 1
    assert [s["file"] for s in meta["shards"]["train"][:2]] == ["train_0000.bin", "train_0001.bin"]
    for split in ("train", "val"):
        assert meta[f"{split}_tokens"] == sum(s["tokens"] for s in meta["shards"][split]) == one_meta[f"{split}_tokens"]
        assert meta[f"{split}_bytes"] == sum(s["bytes"] for s in meta["shards"][split]) == one_meta[f"{split}_bytes"]
    assert {k: v for k, v in meta.items() if k != "shards"} == {k: v for k, v in one_meta.items() if k != "shards"}
    assert not (out_dir / "progress.json").exists() and not list(out_dir.glob("*.tmp"))


def test_small_pieces_give_the_tokens_of_the_whole_split(tmp_path, gpt2, small_pieces):
    corpus = write(tmp_path / "c.txt", TEXT)  # short lines: a piece cut in every window
    _, meta, train, val = run_prepare(tmp_path, input=str(corpus), tokenization="bpe")
    cut = prepare.split_point(TEXT.encode(), 0.1)
    assert train.tolist() == gpt2.encode_ordinary(TEXT.encode()[:cut].decode())
    assert val.tolist() == gpt2.encode_ordinary(TEXT.encode()[cut:].decode())
    assert len(meta["shards"]["train"]) > 3


def test_worker_processes_write_the_same_shards(tmp_path, gpt2, small_pieces):
    corpus = write(tmp_path / "c.txt", random_text(200))
    folders = [run_prepare(tmp_path, input=str(corpus), tokenization="bpe", num_proc=n, name=f"p{n}")[0]
               for n in (1, 2)]
    one, two = (sorted((p.name, p.read_bytes()) for p in folder.iterdir()) for folder in folders)
    assert one == two and len(one) > 10


class Interrupt:
    """tokenize_piece, with a Ctrl-C after `after` pieces; counts the pieces it tokenized."""

    def __init__(self, after):
        self.after, self.calls = after, 0

    def __call__(self, job):
        if self.calls == self.after:
            raise KeyboardInterrupt
        self.calls += 1
        return TOKENIZE_PIECE(job)


TOKENIZE_PIECE = prepare.tokenize_piece


def test_an_interrupted_run_resumes_without_redoing_finished_shards(tmp_path, monkeypatch, small_pieces, capsys):
    corpus = write(tmp_path / "c.txt", random_text(200))
    uninterrupted = Interrupt(after=math.inf)
    monkeypatch.setattr(prepare, "tokenize_piece", uninterrupted)
    _, _, whole_train, whole_val = run_prepare(tmp_path, input=str(corpus), name="whole")
    interrupt = Interrupt(after=30)
    monkeypatch.setattr(prepare, "tokenize_piece", interrupt)
    with pytest.raises(SystemExit) as stopped:
        prepare.main([f"--input={corpus}", f"--data_dir={tmp_path / 'data'}", "--name=cut"])
    assert stopped.value.code == 130 and "the same command continues" in capsys.readouterr().out
    folder = tmp_path / "data" / "cut"
    progress = json.loads((folder / "progress.json").read_text())
    kept = {s["file"]: os.stat(folder / s["file"]) for s in progress["shards"]["train"]}
    assert not (folder / "meta.json").exists() and len(kept) >= 3 and 0 < progress["pieces"] < 30

    resumed = Interrupt(after=math.inf)
    monkeypatch.setattr(prepare, "tokenize_piece", resumed)
    _, meta, train, val = run_prepare(tmp_path, input=str(corpus), name="cut")
    assert "resuming: " in capsys.readouterr().out
    assert np.array_equal(train, whole_train) and np.array_equal(val, whole_val)
    # the finished shards were kept as they were, and their pieces were not tokenized again
    for name, before in kept.items():
        after = os.stat(folder / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert resumed.calls == uninterrupted.calls - progress["pieces"]


def test_a_changed_input_starts_again(tmp_path, monkeypatch, small_pieces):
    corpus = write(tmp_path / "c.txt", random_text(200))
    monkeypatch.setattr(prepare, "tokenize_piece", Interrupt(after=30))
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path, input=str(corpus))
    monkeypatch.setattr(prepare, "tokenize_piece", TOKENIZE_PIECE)
    write(corpus, random_text(150, seed=1))
    _, _, train, val = run_prepare(tmp_path, input=str(corpus))
    assert train.tobytes() + val.tobytes() == corpus.read_bytes()


def test_max_bytes_takes_the_start_of_the_text(tmp_path):
    corpus = write(tmp_path / "c.txt", "é" * 1000)
    _, meta, train, val = run_prepare(tmp_path, input=str(corpus), max_bytes=1001)
    assert train.tobytes() + val.tobytes() == ("é" * 500).encode()  # 1001 bytes, back to a character boundary


# ----------------------------------------------------------------------------
# records: .jsonl and .parquet files, read by the datasets library (an optional extra)

def needs_datasets():
    return pytest.importorskip("datasets", reason="records are read by the datasets library, an optional extra")


DOCUMENTS = [f"Document {i}.\n" + random_text(i % 7 + 1, seed=i) for i in range(40)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def expected_splits(documents, every):
    """The reference split rule for val_fraction = 1 / every: documents every-1, 2 * every - 1, ... are validation."""
    kept = [d for d in documents if d]
    train = "".join(d + "\n\n" for i, d in enumerate(kept) if i % every != every - 1).encode()
    val = "".join(d + "\n\n" for i, d in enumerate(kept) if i % every == every - 1).encode()
    return train, val


def test_jsonl_documents_split_one_in_four(tmp_path):
    needs_datasets()
    records = [{"id": i, "text": d} for i, d in enumerate(DOCUMENTS)] + [{"id": -1, "text": None}, {"text": ""}]
    corpus = write_jsonl(tmp_path / "docs.jsonl", records[:20] + records[-2:] + records[20:])
    out_dir, meta, train, val = run_prepare(tmp_path, input=str(corpus), val_fraction=0.25)
    assert (train.tobytes(), val.tobytes()) == expected_splits(DOCUMENTS, 4)
    assert (out_dir.name, meta["corpus"], meta["sources"]) == ("docs_bytes", "docs.jsonl", [str(corpus)])


def test_records_split_the_same_text_in_every_tokenization(tmp_path, gpt2, small_pieces):
    needs_datasets()
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"body": d} for d in DOCUMENTS])
    _, _, byte_train, byte_val = run_prepare(tmp_path, input=str(corpus), text_field="body")
    _, meta, bpe_train, bpe_val = run_prepare(tmp_path, input=str(corpus), text_field="body", tokenization="bpe")
    assert (byte_train.tobytes(), byte_val.tobytes()) == expected_splits(DOCUMENTS, 10)
    assert gpt2.decode_bytes(bpe_train.tolist()) == byte_train.tobytes()
    assert gpt2.decode_bytes(bpe_val.tolist()) == byte_val.tobytes()
    assert len(meta["shards"]["train"]) > 3 and meta["train_bytes"] == len(byte_train)


def test_parquet_files_and_max_bytes(tmp_path):
    needs_datasets()
    pa = pytest.importorskip("pyarrow", reason="writing a parquet file needs pyarrow")
    import pyarrow.parquet as pq
    paths = [tmp_path / "part-0.parquet", tmp_path / "part-1.parquet"]
    for path, documents in zip(paths, (DOCUMENTS[:25], DOCUMENTS[25:])):
        pq.write_table(pa.table({"text": documents}), path)
    _, _, train, val = run_prepare(tmp_path, input=f"{paths[0]},{paths[1]}")
    assert (train.tobytes(), val.tobytes()) == expected_splits(DOCUMENTS, 10)
    # --max_bytes: whole documents until that many bytes of text are taken
    taken = np.cumsum([len(d.encode()) + 2 for d in DOCUMENTS])
    n = int(np.searchsorted(taken, 500)) + 1
    _, _, train, val = run_prepare(tmp_path, input=f"{paths[0]},{paths[1]}", max_bytes=500, name="capped")
    assert (train.tobytes(), val.tobytes()) == expected_splits(DOCUMENTS[:n], 10) and n < 25


@pytest.mark.parametrize("content, overrides, message", [
    ('{"text": "ok"}\n{"text": broken\n', {}, r"could not read the records of .*bad.jsonl \(ArrowInvalid: "),
    ('{"body": "no text field"}\n', {}, r"no field 'text' \(they have body\): pass --text_field=FIELD"),
    ('{"text": [1, 2]}\n', {}, "--text_field=text holds list, not text"),
    ("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS[:5]), {}, "too few documents for a val split"),
])
def test_bad_records_are_one_line_errors(tmp_path, content, overrides, message):
    needs_datasets()
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(content)
    with pytest.raises(UserError, match=message):
        run_prepare(tmp_path, input=str(corpus), **overrides)


def test_preparing_records_never_loads_torch(tmp_path):
    """The datasets library's streaming reader loads torch whenever it is installed, unless told not to."""
    needs_datasets()
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    code = ("import runpy, sys\n"
            f"sys.argv = ['prepare.py', '--input={corpus}', '--data_dir={tmp_path / 'data'}']\n"
            "runpy.run_path('data/prepare.py', run_name='__main__')\n"
            "print(sorted(m for m in ('torch', 'model') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_an_unreachable_hub_dataset_is_one_line_and_writes_nothing(tmp_path):
    needs_datasets()
    result = subprocess.run([sys.executable, str(SCRIPT), "--input=hf:nobody/nothing", f"--data_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: could not read the records of hf:nobody/nothing (")
    assert result.stderr.count("\n") == 1 and not list(tmp_path.iterdir())
