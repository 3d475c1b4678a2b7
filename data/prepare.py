"""
Turn text files into training data: data/<name>/train.bin, val.bin, meta.json.

    python data/prepare.py                                  # tinyshakespeare, bytes
    python data/prepare.py --tokenization=bpe               # the same text, GPT-2 BPE
    python data/prepare.py --input=a.txt,b.txt --name=mine  # your own files
    python data/prepare.py --input a.txt b.txt              # argparse style works too

Without --input the corpus is tinyshakespeare: data/shakespeare/input.txt, or
downloaded there on first use. Offline, it falls back to a corpus every Python
has, the standard library's own source, so the quick start still runs; meta.json
records which corpus was used.

The last --val_fraction of the corpus is the validation split, cut at a UTF-8
character boundary so both tokenizations split exactly the same text.
- bytes: the raw UTF-8 bytes, vocab 256, stored as uint8
- bpe:   tiktoken's GPT-2 encoding, vocab 50257, stored as uint16
- bytes_gpt2: the raw bytes with an end marker (id 256) after each GPT-2
         token, vocab 257, stored as uint16: for a pooled model that pools by
         GPT-2 tokens (--embedder=pooled --boundary=gpt2)
- hf:    a Hugging Face tokenizer from a local folder (--tokenizer_dir, e.g. a
         distillation teacher's), recorded as "hf:<folder>"; needs transformers
A pooled byte model (byte_tokenizer.py) reads bytes data: it finds its chunk
ends itself, from the bytes (or at bytes_gpt2's markers, which it cannot find
itself: a GPT-2 token's end depends on the bytes after it).
meta.json (never pickle) holds the vocab, dtype, token and byte counts.
token_bytes.npy holds the bytes of text each token id stands for, checked to
rebuild the corpus exactly: train.py divides by them for bits per byte, with
no tokenizer loaded.
"""

import http.client
import io
import json
import os
import re
import sys
import sysconfig
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere: find the project modules
import tokenizer  # noqa: E402  (torch-free: preparing data never loads the model)
from cli import UserError, parse_config, run  # noqa: E402
from tokenizer import HF_PREFIX, TOKEN_BYTES_NAME, TOKENIZATIONS  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_PATH = Path("shakespeare") / "input.txt"  # under the data folder, where nanoGPT keeps it
DOWNLOAD_TIMEOUT_S = 10  # offline, fail fast and use the fallback corpus
STDLIB_CORPUS_BYTES = 3_000_000  # about 3x tinyshakespeare: enough text to learn from, quick to tokenize
UTF8_MAX_CONTINUATION = 3  # a UTF-8 character is one lead byte and at most 3 continuation bytes
ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as the "surrogateescape" decoder writes it


@dataclass
class PrepareConfig:
    input: str = ""  # comma-separated text files; empty = the default corpus (tinyshakespeare)
    tokenization: str = "bytes"  # bytes | bpe | bytes_gpt2 | hf
    tokenizer_dir: str = ""  # for --tokenization=hf: a folder with a Hugging Face tokenizer (or a .gguf file)
    name: str = ""  # output folder under the data folder; empty = <first input's stem or "default">_<tokenization>
    val_fraction: float = 0.1  # the last this-much of the corpus is the validation split
    data_dir: str = ""  # where dataset folders go; empty = the folder holding this script


# ----------------------------------------------------------------------------
# reading the corpus

def read_corpus(paths):
    """
    The files' bytes, concatenated in the order given. A file that does not end
    with a newline gets one before the next file, so the last line of one file
    never runs into the first line of the next; otherwise the bytes are untouched.
    """
    parts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"input file {str(path)!r} not found")
        data = path.read_bytes()
        if parts and parts[-1] and not parts[-1].endswith(b"\n"):
            parts.append(b"\n")
        parts.append(data)
    return b"".join(parts)


def download_tinyshakespeare():
    """tinyshakespeare's bytes from nanoGPT's address. Raises OSError when offline."""
    with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return response.read()


def stdlib_sources():
    """The standard library's top-level modules in sorted order, whole files, until about STDLIB_CORPUS_BYTES."""
    paths, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total >= STDLIB_CORPUS_BYTES:
            break
        paths.append(path)
        total += path.stat().st_size
    return paths


def write_atomic(path, data):
    """Write to a temp file and rename it into place: an interrupted run never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
    except OSError as e:  # a full disk: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e.strerror or e}): free some space or pick another "
                        "--data_dir") from None
    os.replace(tmp, path)


def default_corpus(data_dir=DATA_DIR):
    """(bytes, corpus name, sources): tinyshakespeare, downloaded if need be, else the stdlib's source."""
    path = Path(data_dir) / TINYSHAKESPEARE_PATH
    if not path.is_file():
        try:
            data = download_tinyshakespeare()
        # no network, DNS failure and timeouts are OSErrors; a connection dropped mid-body is not
        except (OSError, http.client.HTTPException) as e:
            sources = stdlib_sources()
            if not sources:
                raise UserError(f"no default corpus: downloading tinyshakespeare failed ({e}) and "
                                "Python's standard library source is not installed; pass --input=FILE") from None
            print(f"note: could not download tinyshakespeare ({e}); "
                  f"using {len(sources)} files of Python's standard library source instead")
            return read_corpus(sources), "python-stdlib", [str(p) for p in sources]
        write_atomic(path, data)
        print(f"downloaded tinyshakespeare to {path}")
    return path.read_bytes(), "tinyshakespeare", [str(path)]


# ----------------------------------------------------------------------------
# splitting and tokenizing

def warn_if_not_utf8(data, corpus, tokenization):
    """Binary input (an executable) or another encoding (latin-1) is legal but rarely meant: say what happens to it."""
    try:
        data.decode("utf-8")
        return 0
    except UnicodeDecodeError:
        pass
    invalid = len(ESCAPED_BYTE.findall(data.decode("utf-8", errors="surrogateescape")))
    print(f"warning: {invalid:,} of {len(data):,} bytes of {corpus} are not UTF-8 (binary, or another encoding?): "
          "bytes and bytes_gpt2 keep every byte as it is; bpe and hf replace each invalid sequence with U+FFFD, "
          f"so they train on altered text (this run: {tokenization})", file=sys.stderr)
    return invalid


def split_point(data, fraction):
    """
    Where validation starts: at the last `fraction` of the bytes, moved back to
    the start of a UTF-8 character, so no character is split between train and
    val and the BPE split decodes to the same text as the byte split.
    """
    cut = int(len(data) * (1 - fraction))
    # continuation bytes look like 0b10xxxxxx; step back over at most one character's worth,
    # so bytes that are not UTF-8 at all still split near the requested point
    steps = 0
    while 0 < cut < len(data) and data[cut] & 0b1100_0000 == 0b1000_0000 and steps < UTF8_MAX_CONTINUATION:
        cut, steps = cut - 1, steps + 1
    return cut


def load_encoder(config):
    """What turns text into ids: tiktoken's GPT-2 encoding, a Hugging Face tokenizer, or nothing for bytes."""
    if config.tokenization == "bpe":
        return tokenizer.gpt2_encoding()
    if config.tokenization == "hf":
        if not config.tokenizer_dir:
            raise UserError("--tokenization=hf needs --tokenizer_dir=FOLDER (a Hugging Face model or tokenizer folder)")
        return tokenizer.load_hf_tokenizer(config.tokenizer_dir)
    return None


def tokenize(data, tokenization, encoder=None):
    """
    (token ids as a numpy array, UTF-8 bytes of the text they encode). For BPE
    and hf the bytes are decoded with invalid sequences replaced by U+FFFD, so
    the count is of the text after replacement: what the tokens decode back to.
    """
    if tokenization == "bytes":
        return np.frombuffer(data, dtype=np.uint8).copy(), data
    if tokenization == "bytes_gpt2":  # every byte kept, as bytes; GPT-2 cuts invalid UTF-8 byte by byte
        return tokenizer.mark_gpt2_token_ends(data), data
    text = data.decode("utf-8", errors="replace")
    if tokenization == "bpe":
        # encode_ordinary: a literal "<|endoftext|>" in the corpus is plain text, not the special token
        ids = encoder.encode_ordinary(text)
    else:
        ids = encoder.encode(text, add_special_tokens=False)
    return np.array(ids, dtype=id_dtype(tokenization, encoder)), text.encode("utf-8")


def id_dtype(tokenization, encoder=None):
    """The smallest dtype that holds every token id."""
    if tokenization == "bytes":
        return "uint8"
    if tokenization == "bytes_gpt2":
        return "uint16"  # 257 ids
    vocab_size = encoder.n_vocab if tokenization == "bpe" else len(encoder)
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def check_token_bytes(ids, table, text, split):
    """
    The tokens' byte strings must rebuild the text exactly, or bits per byte
    would divide by the wrong number of bytes. SentencePiece tokenizers may
    write a space before the text ("Hello" -> "▁Hello"); that one byte is
    harmless, since the first token of a split is never predicted.
    """
    rebuilt = b"".join(table[i] for i in ids)
    if rebuilt == text or (rebuilt == b" " + text and table[ids[0]].startswith(b" ")):
        return
    raise UserError(f"this tokenizer's tokens do not rebuild the {split} text byte for byte ({len(rebuilt):,} bytes "
                    f"for {len(text):,}), so bits per byte would be wrong: use a byte-level BPE or SentencePiece tokenizer")


def save_npy(path, array):
    """A numpy array in .npy format, atomically (np.load reads it back without pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomic(path, buffer.getvalue())


# ----------------------------------------------------------------------------
# the whole job

def dataset_name(config):
    if config.name:
        return config.name
    stem = Path(config.input.split(",")[0]).stem if config.input else "default"
    return f"{stem}_{config.tokenization}"


def prepare(config):
    """Write train.bin, val.bin, token_bytes.npy and meta.json; return the folder."""
    if config.tokenization == "pooled":
        raise UserError("a pooled byte model reads bytes data: run python data/prepare.py (--tokenization=bytes), "
                        "then python train.py --embedder=pooled")
    if config.tokenization not in TOKENIZATIONS:
        raise UserError(f"--tokenization={config.tokenization} is not one of {', '.join(TOKENIZATIONS)}")
    if not 0.0 < config.val_fraction < 1.0:
        raise UserError(f"--val_fraction must be between 0 and 1, got {config.val_fraction}")
    data_dir = Path(config.data_dir) if config.data_dir else DATA_DIR

    if config.input:
        sources = [p for p in config.input.split(",") if p]
        data, corpus = read_corpus(sources), ", ".join(Path(p).name for p in sources)
    else:
        data, corpus, sources = default_corpus(data_dir)
    if not data:
        raise UserError(f"the corpus ({corpus}) is empty: nothing to train on")
    warn_if_not_utf8(data, corpus, config.tokenization)

    cut = split_point(data, config.val_fraction)
    if cut == 0 or cut == len(data):
        raise UserError(f"the corpus ({corpus}, {len(data)} bytes) is too small to split "
                        f"with --val_fraction={config.val_fraction}")
    encoder = load_encoder(config)
    tokenization = config.tokenization
    if tokenization == "hf":  # the name tokenizer.py reads back: where the tokenizer lives
        tokenization = HF_PREFIX + str(Path(config.tokenizer_dir).resolve())
    splits = {"train": tokenize(data[:cut], config.tokenization, encoder),
              "val": tokenize(data[cut:], config.tokenization, encoder)}
    out_dir = data_dir / dataset_name(config)
    meta = {"tokenization": tokenization, "vocab_size": tokenizer.BYTE_VOCAB,
            "dtype": id_dtype(config.tokenization, encoder), "corpus": corpus, "sources": [str(s) for s in sources]}
    # the bytes of text each token id stands for: bits per byte's denominator, without a tokenizer at training time
    table = tokenizer.token_byte_table(tokenization)
    for split, (ids, text) in splits.items():
        check_token_bytes(ids, table, text, split)
        meta[f"{split}_tokens"] = len(ids)
    meta["vocab_size"] = len(table)
    save_npy(out_dir / TOKEN_BYTES_NAME, np.array([len(b) for b in table], dtype=np.int32))
    for split, (ids, text) in splits.items():
        meta[f"{split}_bytes"] = len(text)
        write_atomic(out_dir / f"{split}.bin", ids.tobytes())
    # meta.json last: its presence means the files beside it are complete
    write_atomic(out_dir / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return out_dir


def expand_input_list(argv):
    """Rewrite argparse's `--input a.txt b.txt` as `--input=a.txt,b.txt`, the form parse_config reads."""
    args, i = [], 0
    while i < len(argv):
        end = i + 1
        if argv[i] == "--input":  # a bare --input takes every following argument up to the next option
            while end < len(argv) and not argv[end].startswith("-"):
                end += 1
        files = argv[i + 1:end]
        args.append(f"--input={','.join(files)}" if files else argv[i])
        i = end
    return args


def main(argv=None):
    config = PrepareConfig()
    parse_config([config], expand_input_list(sys.argv[1:] if argv is None else list(argv)), usage=__doc__)
    out_dir = prepare(config)
    meta = json.loads((out_dir / "meta.json").read_text())
    print(f"corpus: {meta['corpus']} ({len(meta['sources'])} file{'s' * (len(meta['sources']) != 1)}), "
          f"{meta['tokenization']} tokenization, vocab {meta['vocab_size']}")
    for split in ("train", "val"):
        print(f"{split:>5}: {meta[split + '_bytes']:,} bytes -> {meta[split + '_tokens']:,} tokens")
    print(f"wrote {out_dir}/{{train.bin,val.bin,meta.json}}")
    print(f"next: python train.py --dataset={out_dir.name}")


if __name__ == "__main__":
    run(main)
