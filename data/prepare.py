"""
Turn a corpus into training data: token shards in data/<name>/, listed in its meta.json.

    python data/prepare.py                                  # tinyshakespeare, bytes
    python data/prepare.py --tokenization=bpe               # the same text, GPT-2 BPE
    python data/prepare.py --input=a.txt,b.txt --name=mine  # your own files, or folders of them
    python data/prepare.py --input a.txt b.txt              # argparse style works too
    python data/prepare.py --input=docs.jsonl --tokenization=bpe --num_proc=8   # records (needs datasets)
    python data/prepare.py --input=hf:roneneldan/TinyStories --max_bytes=500000000 --tokenization=bpe

--input is text files and folders, or records whose --text_field is a document: .jsonl or .parquet
files, or a dataset hf:NAME[:CONFIG] streamed from the Hugging Face hub. Without it, the corpus is
tinyshakespeare (offline: the standard library's source). Validation is the same text in every
tokenization: the last --val_fraction of a text's bytes (at a character boundary); for records,
whose count is known only at the stream's end, document i when floor((i + 1) * f) > floor(i * f).
Each document ends with a blank line.

Memory stays bounded: the text is read in pieces of about PIECE_BYTES, cut where GPT-2's BPE
starts a token anyway (so they tokenize as the whole text does), --num_proc processes tokenize
them, and the ids go to shards of about SHARD_TOKENS tokens: train_0000.bin, ... (a split of one
shard is train.bin or val.bin, as in nanoGPT). meta.json, written last, lists the shards;
token_bytes.npy holds the bytes each token id stands for (bits per byte without a tokenizer).
An interrupted run continues from progress.json, after its finished shards.
Tokenizations: bytes (vocab 256), bpe (tiktoken's GPT-2, 50257), bytes_gpt2 (the bytes with an
end marker, id 256, after each GPT-2 token: --boundary=gpt2), hf (a tokenizer in --tokenizer_dir).
"""

import collections
import contextlib
import http.client
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import shlex
import signal
import sys
import sysconfig
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

# run as a script from anywhere: find the project's modules one folder up (tokenizer.py needs no torch)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tokenizer  # noqa: E402
from cli import UserError, parse_config, require, run, write_atomic  # noqa: E402
from tokenizer import HF_PREFIX, TOKEN_BYTES_NAME, TOKENIZATIONS  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
STDLIB_CORPUS_BYTES = 3_000_000  # about 3x tinyshakespeare: enough text to learn from, quick to tokenize
UTF8_MAX_CONTINUATION = 3  # a UTF-8 character is one lead byte and at most 3 continuation bytes
PIECE_BYTES = 1 << 20  # the text one worker tokenizes at a time
SHARD_TOKENS = 1 << 27  # a split's shard is closed once it holds this many tokens
RECORD_KINDS = {".jsonl": "json", ".parquet": "parquet"}  # record files, by the datasets loader that reads them
DOCUMENT_END = b"\n\n"
# a newline between two visible ASCII characters: GPT-2's BPE (and most byte-level BPEs) start a token there
PIECE_CUT = re.compile(rb"[!-~]\n(?=[!-~])")
SHARD_FILE = re.compile(r"(train|val)(_\d+)?\.bin(\.tmp)?")
WRITE_FIX = "pick a writable --data_dir with free space"  # what a failed write tells the user


@dataclass
class PrepareConfig:
    input: str = ""  # comma-separated text files or folders, .jsonl/.parquet files, or hf:NAME[:CONFIG]
    tokenization: str = "bytes"  # bytes | bpe | bytes_gpt2 | hf
    tokenizer_dir: str = ""  # for hf: a folder with a Hugging Face tokenizer (or a .gguf file)
    name: str = ""  # the dataset's folder; empty = <first input's stem or "default">_<tokenization>
    val_fraction: float = 0.1  # this much of the corpus is the validation split (see above)
    data_dir: str = ""  # where dataset folders go; empty = the folder holding this script
    text_field: str = "text"  # records: the field that holds a document's text
    max_bytes: int = 0  # read at most about this many bytes of text (whole documents); 0 = all
    num_proc: int = 1  # tokenizing processes


# ----------------------------------------------------------------------------
# reading: text files as one byte string, records as documents, both cut into pieces

class TextCorpus:
    """
    Text files read as one byte string, without holding it: the files in order,
    with a newline after each that lacks one (so the last line of one file never
    runs into the first line of the next). corpus[i] is one byte.
    """

    def __init__(self, paths, max_bytes=0):
        self.parts, needs_newline = [], False  # (a file, or the newline put after one; its length)
        for path in paths:
            if size := path.stat().st_size:
                self.parts += [(b"\n", 1)] * needs_newline + [(path, size)]
                needs_newline = b"".join(read_file(path, size - 1, size)) != b"\n"
        self.size = sum(size for _, size in self.parts)
        if max_bytes:
            self.size = char_start(self, min(self.size, max_bytes))

    def blocks(self, start, stop):
        """Bytes [start, stop) of the corpus, in blocks."""
        offset = 0
        for source, size in self.parts:
            lo, hi, offset = max(start - offset, 0), min(stop - offset, size), offset + size
            if lo < hi:
                yield from [source[lo:hi]] if isinstance(source, bytes) else read_file(source, lo, hi)

    def __len__(self):
        return self.size

    def __getitem__(self, position):
        return b"".join(self.blocks(position, position + 1))[0]


def read_file(path, start, stop):
    """Bytes [start, stop) of one file, in blocks of at most PIECE_BYTES."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            while start < stop:
                block = f.read(min(PIECE_BYTES, stop - start))
                if not block:
                    raise UserError(f"input file {str(path)!r} got shorter while being read: run again")
                start += len(block)
                yield block
    except OSError as e:
        raise UserError(f"cannot read input file {str(path)!r} ({e.strerror or e})") from None


def char_start(data, position):
    """position, moved back to a UTF-8 character's start: over at most 3 continuation bytes (0b10xxxxxx)."""
    # at most one character's worth, so bytes that are not UTF-8 at all still cut near the requested point
    steps = 0
    while 0 < position < len(data) and data[position] & 0b1100_0000 == 0b1000_0000 and steps < UTF8_MAX_CONTINUATION:
        position, steps = position - 1, steps + 1
    return position


def split_point(data, fraction):
    """Where validation starts: at the last `fraction` of the bytes, at a character boundary."""
    return char_start(data, int(len(data) * (1 - fraction)))


def text_pieces(blocks):
    """
    The blocks' bytes in pieces of PIECE_BYTES to 2 x PIECE_BYTES, each ending after
    a PIECE_CUT newline if there is one (else at a character boundary).
    """
    buffer = b""
    for block in blocks:
        buffer += block
        while len(buffer) >= 2 * PIECE_BYTES:
            match = PIECE_CUT.search(buffer, PIECE_BYTES - 2, 2 * PIECE_BYTES)
            end = match.end() if match else char_start(buffer, PIECE_BYTES)
            yield buffer[:end]
            buffer = buffer[end:]
    if buffer:
        yield buffer


def record_pieces(documents, val_fraction, max_bytes):
    """(split, piece): the documents, each ending in DOCUMENT_END, gathered per split into pieces of PIECE_BYTES."""
    pieces, sizes, taken = {"train": [], "val": []}, {"train": 0, "val": 0}, 0
    for i, text in enumerate(documents):
        split = "val" if math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction) else "train"
        pieces[split].append(text.encode("utf-8") + DOCUMENT_END)
        sizes[split] += len(pieces[split][-1])
        taken += len(pieces[split][-1])
        if sizes[split] >= PIECE_BYTES:
            yield split, b"".join(pieces[split])
            pieces[split], sizes[split] = [], 0
        if max_bytes and taken >= max_bytes:
            break
    yield from ((split, b"".join(parts)) for split, parts in pieces.items() if parts)


def record_documents(inputs, kind, text_field):
    """Every record's text, streamed by the datasets library from .jsonl/.parquet files or the hub."""
    # datasets' streaming reader loads torch whenever it is installed, unless told not to
    os.environ.setdefault("USE_TORCH", "0")
    datasets = require("datasets")
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as one line
    # opened now, so that a missing dataset or no network fails before anything is written
    with reading_errors(inputs):
        if kind == "hub":
            name, _, subset = inputs[0].removeprefix(HF_PREFIX).partition(":")
            stream = datasets.load_dataset(name, subset or None, split="train", streaming=True)
        else:
            stream = datasets.load_dataset(kind, data_files=[str(p) for p in inputs], split="train", streaming=True)
    return record_texts(stream, inputs, text_field)


def record_texts(stream, inputs, text_field):
    with reading_errors(inputs):
        for batch in stream.iter(batch_size=1024):
            if text_field not in batch:
                raise UserError(f"the records have no field {text_field!r} (they have {', '.join(batch)}): "
                                "pass --text_field=FIELD")
            for text in batch[text_field]:
                if not isinstance(text, (str, type(None))):
                    raise UserError(f"--text_field={text_field} holds {type(text).__name__}, not text")
                if text:
                    yield text


@contextlib.contextmanager
def reading_errors(inputs):
    """The datasets library's errors (hub, network, Arrow's parse errors: many kinds) as one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"could not read the records of {', '.join(map(str, inputs))} "
                        f"({type(e).__name__}: {first_line})") from None


def input_files(inputs, out_dir):
    """The files of --input: each file, and each folder's files (sorted; hidden ones and out_dir skipped)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and out_dir.resolve() not in p.resolve().parents
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not found:
                raise UserError(f"--input {item} is a folder with no files in it")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"input file {str(item)!r} not found")
    return files


def download_tinyshakespeare():
    """tinyshakespeare's bytes from nanoGPT's address. Raises OSError when offline."""
    url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    # offline, give up soon and use the fallback corpus
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def stdlib_sources():
    """The standard library's top-level modules, sorted, whole files, until about STDLIB_CORPUS_BYTES."""
    paths, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total >= STDLIB_CORPUS_BYTES:
            break
        paths.append(path)
        total += path.stat().st_size
    return paths


def default_corpus(data_dir=DATA_DIR):
    """(files, corpus name): tinyshakespeare, downloaded if need be, else the standard library's source."""
    # where nanoGPT keeps it, under the data folder
    path = Path(data_dir) / "shakespeare" / "input.txt"
    if not path.is_file():
        try:
            data = download_tinyshakespeare()
        # no network, DNS failure and timeouts are OSErrors; a connection dropped mid-body is not
        except (OSError, http.client.HTTPException) as e:
            sources = stdlib_sources()
            if not sources:
                raise UserError(f"no default corpus: downloading tinyshakespeare failed ({e}) and Python's "
                                "standard library source is not installed; pass --input=FILE") from None
            print(f"note: could not download tinyshakespeare ({e}); "
                  f"using {len(sources)} files of Python's standard library source instead")
            return sources, "python-stdlib"
        write_atomic(path, data, WRITE_FIX)
        print(f"downloaded tinyshakespeare to {path}")
    return [path], "tinyshakespeare"


@dataclass
class Corpus:
    name: str  # what meta.json calls it
    sources: list  # what it was read from
    identity: list  # what a resumed run must find unchanged
    size: int  # bytes of text, where known before reading (the progress bar's total), else None
    pieces: object  # an iterator of (split, piece of text)


def open_corpus(config, data_dir, out_dir):
    """The corpus --input names (or the default one), ready to be read in pieces."""
    inputs = [p for p in config.input.split(",") if p]
    if len(inputs) > 1 and any(p.startswith(HF_PREFIX) for p in inputs):
        raise UserError(f"--input={config.input}: a hub dataset ({HF_PREFIX}NAME) must be the only --input")
    if inputs and inputs[0].startswith(HF_PREFIX):
        files, name, identity = inputs, inputs[0], inputs
    else:
        files, name = (input_files(inputs, out_dir), ", ".join(Path(p).name for p in inputs)) if inputs \
            else default_corpus(data_dir)
        identity = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    kinds = {"hub" if str(p).startswith(HF_PREFIX) else RECORD_KINDS.get(Path(p).suffix, "text") for p in files}
    if len(kinds) > 1:
        raise UserError(f"--input mixes kinds of input ({', '.join(sorted(kinds))}): prepare one kind at a time")
    if kinds != {"text"}:
        documents = record_documents(files, kinds.pop(), config.text_field)
        return Corpus(name, inputs, identity, config.max_bytes or None,
                      record_pieces(documents, config.val_fraction, config.max_bytes))
    corpus = TextCorpus(files, config.max_bytes)
    if not len(corpus):
        raise UserError(f"the corpus ({name}) is empty: nothing to train on")
    cut = split_point(corpus, config.val_fraction)
    if cut == 0 or cut == len(corpus):
        raise UserError(f"the corpus ({name}, {len(corpus)} bytes) is too small to split "
                        f"with --val_fraction={config.val_fraction}")
    pieces = itertools.chain((("train", p) for p in text_pieces(corpus.blocks(0, cut))),
                             (("val", p) for p in text_pieces(corpus.blocks(cut, len(corpus)))))
    return Corpus(name, [str(p) for p in (inputs or files)], identity, len(corpus), pieces)


# ----------------------------------------------------------------------------
# tokenizing: one piece at a time, in worker processes

def tokenize(data, tokenization):
    """
    (token ids as a numpy array, UTF-8 bytes of the text they encode). For BPE
    and hf the bytes are decoded with invalid sequences replaced by U+FFFD, so
    the count is of the text after replacement: what the tokens decode back to.
    """
    if tokenization == "bytes":
        return np.frombuffer(data, dtype=np.uint8), data
    # bytes_gpt2 keeps every byte as it is (GPT-2 cuts invalid UTF-8 byte by byte)
    if tokenization == "bytes_gpt2":
        return tokenizer.mark_gpt2_token_ends(data), data
    text = data.decode("utf-8", errors="replace")
    return np.array(tokenizer.encode(tokenization, text), dtype=id_dtype(tokenization)), text.encode("utf-8")


def id_dtype(tokenization):
    """The smallest dtype that holds every token id."""
    vocab_size = len(tokenizer.token_byte_table(tokenization))
    return "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 1 << 16 else "uint32"


def check_token_bytes(ids, table, text, split, first):
    """
    The tokens' byte strings must rebuild the text, or bits per byte would divide by the wrong
    count. SentencePiece may put a space before the text ("Hello" -> "▁Hello"): harmless in a
    split's first piece, since a split's first token is never predicted.
    """
    rebuilt = b"".join(table[i] for i in ids.tolist())
    if rebuilt == text or (first and rebuilt == b" " + text and table[ids[0]].startswith(b" ")):
        return
    raise UserError(f"this tokenizer's tokens do not rebuild the {split} text byte for byte "
                    f"({len(rebuilt):,} bytes for {len(text):,}), so bits per byte would be wrong: "
                    "use a byte-level BPE or SentencePiece tokenizer")


def invalid_utf8(data):
    """How many bytes of data are not UTF-8 ("surrogateescape" writes each as one of 128 characters)."""
    try:
        data.decode("utf-8")
        return 0
    except UnicodeDecodeError:
        return sum("\udc80" <= c <= "\udcff" for c in data.decode("utf-8", errors="surrogateescape"))


def tokenize_piece(job):
    """One piece, in a worker: (split, ids, bytes of text they encode, bytes read, bytes that are not UTF-8)."""
    tokenization, split, first, data = job
    ids, text = tokenize(data, tokenization)
    # only a Hugging Face tokenizer can fail to rebuild its text: tiktoken's BPE and the bytes are lossless
    if tokenization.startswith(HF_PREFIX):
        check_token_bytes(ids, tokenizer.token_byte_table(tokenization), text, split, first)
    return split, ids, len(text), len(data), invalid_utf8(data)


def tokenized(jobs, num_proc):
    """tokenize_piece over the jobs, in order, in num_proc processes, with a few pieces in flight: bounded memory."""
    if num_proc == 1:
        yield from map(tokenize_piece, jobs)
        return
    # spawn: the same on every OS, and safe in a process that has started threads; Ctrl-C is the parent's to handle
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(tokenize_piece, (job,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------
# writing: shards, the progress that lets a run resume, and the manifest

def save_npy(path, array):
    """A numpy array in .npy format, atomically (np.load reads it back without pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomic(path, buffer.getvalue(), WRITE_FIX)


def save_json(path, value):
    write_atomic(path, json.dumps(value, indent=2) + "\n", WRITE_FIX)


class ShardWriter:
    """Token ids appended to each split's open shard (a .tmp file); close() renames them into place and lists them."""

    def __init__(self, out_dir, dtype, shards):
        self.out_dir, self.dtype, self.shards, self.open = out_dir, dtype, shards, {}

    def add(self, split, ids, n_bytes):
        if split not in self.open:
            name = f"{split}_{len(self.shards[split]):04d}.bin"
            self.open[split] = {"file": name, "tokens": 0, "bytes": 0,
                                "handle": open(self.out_dir / (name + ".tmp"), "wb")}
        shard = self.open[split]
        shard["handle"].write(ids.astype(self.dtype, copy=False).tobytes())
        shard["tokens"] += len(ids)
        shard["bytes"] += n_bytes

    def full(self):
        return any(shard["tokens"] >= SHARD_TOKENS for shard in self.open.values())

    def close(self):
        for split, shard in self.open.items():
            shard.pop("handle").close()
            os.replace(self.out_dir / (shard["file"] + ".tmp"), self.out_dir / shard["file"])
            self.shards[split].append(shard)
        self.open = {}


def resume_or_start(out_dir, job):
    """An interrupted run's progress, if it was this job and its shards are whole; else a fresh start."""
    path = out_dir / "progress.json"
    try:
        progress = json.loads(path.read_text())
        itemsize = np.dtype(progress["dtype"]).itemsize
        if progress["job"] == job and all((out_dir / s["file"]).stat().st_size == s["tokens"] * itemsize
                                          for shards in progress["shards"].values() for s in shards):
            print(f"resuming: {sum(map(len, progress['shards'].values()))} finished shards kept")
            return progress
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # meta.json first: a half-replaced dataset is never taken for a complete one
    for old in [out_dir / "meta.json", path] + [p for p in out_dir.iterdir() if SHARD_FILE.fullmatch(p.name)]:
        old.unlink(missing_ok=True)
    return {"job": job, "pieces": 0, "bytes_read": 0, "invalid": 0, "shards": {"train": [], "val": []}}


def warn_if_not_utf8(invalid, size, corpus, tokenization):
    """Binary input or another encoding (latin-1) is legal but rarely meant: say what happens to it."""
    if invalid:
        print(f"warning: {invalid:,} of {size:,} bytes of {corpus} are not UTF-8 (binary, or another "
              "encoding?): bytes and bytes_gpt2 keep every byte as it is; bpe and hf replace each invalid "
              f"sequence with U+FFFD, so they train on altered text (this run: {tokenization})", file=sys.stderr)


# ----------------------------------------------------------------------------
# the whole job

def dataset_name(config):
    """The dataset's folder: --name, or <first input's stem, or "default">_<tokenization>; never a path."""
    first = config.input.split(",")[0]
    # a hub dataset hf:OWNER/NAME:CONFIG is called NAME-CONFIG
    stem = first.removeprefix(HF_PREFIX).split("/")[-1].replace(":", "-") if first.startswith(HF_PREFIX) \
        else Path(first).stem if first else "default"
    name = config.name or f"{stem}_{config.tokenization}"
    # a path ("../../x") would write outside --data_dir, where the printed next command does not look
    if name == ".." or Path(name).name != name:
        raise UserError(f"--name must be a folder name, not a path (got {name!r}): the dataset goes under "
                        "--data_dir, so pass --data_dir=FOLDER to put it elsewhere")
    return name


def check_config(config):
    if config.tokenization not in TOKENIZATIONS:
        raise UserError(f"--tokenization={config.tokenization} is not one of {', '.join(TOKENIZATIONS)}")
    if config.tokenization == "hf" and not config.tokenizer_dir:
        raise UserError("--tokenization=hf needs --tokenizer_dir=FOLDER (a Hugging Face model or tokenizer folder)")
    if not 0.0 < config.val_fraction < 1.0:
        raise UserError(f"--val_fraction must be between 0 and 1, got {config.val_fraction}")
    if config.num_proc < 1 or config.max_bytes < 0:
        raise UserError(f"--num_proc must be at least 1 and --max_bytes 0 (all) or more, "
                        f"got {config.num_proc} and {config.max_bytes}")


def prepare(config):
    """Write the shards, token_bytes.npy and meta.json (last); return the folder."""
    check_config(config)
    data_dir = Path(config.data_dir) if config.data_dir else DATA_DIR
    out_dir = data_dir / dataset_name(config)
    corpus = open_corpus(config, data_dir, out_dir)
    # for hf the name tokenizer.py reads back says where the tokenizer lives
    tokenization = config.tokenization
    if tokenization == "hf":
        tokenization = HF_PREFIX + str(Path(config.tokenizer_dir).resolve())
    # the bytes of text each token id stands for: bits per byte's denominator, with no tokenizer in train.py
    table, dtype = tokenizer.token_byte_table(tokenization), id_dtype(tokenization)
    job = {"tokenization": tokenization, "inputs": corpus.identity, "val_fraction": config.val_fraction,
           "max_bytes": config.max_bytes, "text_field": config.text_field, "piece_bytes": PIECE_BYTES,
           "shard_tokens": SHARD_TOKENS}
    # a full disk or a read-only folder: one line; what was finished is kept for the next run
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        progress = resume_or_start(out_dir, job) | {"dtype": dtype}
        write_shards(corpus, tokenization, config.num_proc, ShardWriter(out_dir, dtype, progress["shards"]),
                     progress, out_dir)
    except OSError as e:
        raise UserError(f"could not write {out_dir} ({e.strerror or e}): pick a writable --data_dir with free "
                        "space; the shards already finished are kept, and the same command continues") from None
    for split in [split for split, shards in progress["shards"].items() if not shards][:1]:
        raise UserError(f"the corpus ({corpus.name}) has too few documents for a {split} split "
                        f"with --val_fraction={config.val_fraction}")
    for split, shards in progress["shards"].items():
        # a split of one shard keeps nanoGPT's name
        if len(shards) == 1:
            os.replace(out_dir / shards[0]["file"], out_dir / f"{split}.bin")
            shards[0]["file"] = f"{split}.bin"
    warn_if_not_utf8(progress["invalid"], progress["bytes_read"], corpus.name, config.tokenization)
    meta = {"tokenization": tokenization, "vocab_size": len(table), "dtype": dtype,
            "corpus": corpus.name, "sources": corpus.sources}
    for split, shards in progress["shards"].items():
        meta[f"{split}_tokens"] = sum(s["tokens"] for s in shards)
        meta[f"{split}_bytes"] = sum(s["bytes"] for s in shards)
    meta["shards"] = progress["shards"]
    save_npy(out_dir / TOKEN_BYTES_NAME, np.array([len(b) for b in table], dtype=np.int32))
    # meta.json last: its presence means the files beside it are complete
    save_json(out_dir / "meta.json", meta)
    (out_dir / "progress.json").unlink()
    return out_dir


def marked_first(pieces):
    """(split, whether it is its split's first piece, piece)."""
    seen = set()
    for split, data in pieces:
        yield split, split not in seen, data
        seen.add(split)


def write_shards(corpus, tokenization, num_proc, writer, progress, out_dir):
    """Tokenize the pieces after those already in finished shards; save the progress whenever shards close."""
    jobs = ((tokenization, split, first, data) for split, first, data in marked_first(corpus.pieces))
    bar = tqdm(total=corpus.size, initial=progress["bytes_read"], unit="B", unit_scale=True, dynamic_ncols=True,
               desc="tokenizing", disable=None)
    with bar:
        for split, ids, n_bytes, n_read, invalid in tokenized(itertools.islice(jobs, progress["pieces"], None),
                                                              num_proc):
            writer.add(split, ids, n_bytes)
            progress["pieces"] += 1
            progress["bytes_read"] += n_read
            progress["invalid"] += invalid
            bar.update(n_read)
            if writer.full():
                writer.close()
                save_json(out_dir / "progress.json", progress)
        writer.close()
    save_json(out_dir / "progress.json", progress)


def expand_input_list(argv):
    """Rewrite argparse's `--input a.txt b.txt` as `--input=a.txt,b.txt`, the form parse_config reads."""
    args, i = [], 0
    while i < len(argv):
        end = i + 1
        # a bare --input takes every following argument up to the next option
        if argv[i] == "--input":
            while end < len(argv) and not argv[end].startswith("-"):
                end += 1
        files = argv[i + 1:end]
        args.append(f"--input={','.join(files)}" if files else argv[i])
        i = end
    return args


def main(argv=None):
    config = PrepareConfig()
    parse_config([config], expand_input_list(sys.argv[1:] if argv is None else list(argv)), usage=__doc__)
    try:
        out_dir = prepare(config)
    except KeyboardInterrupt:
        print("\ninterrupted: the shards already finished are kept, and the same command continues after them")
        sys.exit(130)
    meta = json.loads((out_dir / "meta.json").read_text())
    shards = {split: len(meta["shards"][split]) for split in ("train", "val")}
    print(f"corpus: {meta['corpus']}, {meta['tokenization']} tokenization, vocab {meta['vocab_size']}, "
          f"shards: {shards['train']} train + {shards['val']} val")
    for split in ("train", "val"):
        print(f"{split:>5}: {meta[split + '_bytes']:,} bytes -> {meta[split + '_tokens']:,} tokens")
    print(f"wrote {out_dir}/ (the shards, token_bytes.npy and meta.json)")
    # train.py's --dataset is a folder under data/ or the path of one elsewhere
    dataset = out_dir.name if out_dir.parent.resolve() == DATA_DIR else str(out_dir)
    print(f"next: python train.py {shlex.quote('--dataset=' + dataset)}")


if __name__ == "__main__":
    run(main)
