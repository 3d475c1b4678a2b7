"""tokenizer.py: every tokenization's ids and bytes, the segmenters, the lossless chunk codec."""

import numpy as np
import pytest

import tokenizer as tk
from cli import UserError


def random_byte_strings(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=rng.integers(0, 48), dtype=np.uint8).tobytes() for _ in range(n)]


# code points from ASCII, Latin-1, Greek, CJK, emoji (4 UTF-8 bytes), plus NUL and newlines
CODE_POINT_RANGES = [(0, 0), (10, 10), (32, 126), (0xA0, 0xFF), (0x391, 0x3C9), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F)]


def random_unicode_strings(n, seed):
    rng = np.random.default_rng(seed)
    strings = []
    for _ in range(n):
        ranges = [CODE_POINT_RANGES[i] for i in rng.integers(0, len(CODE_POINT_RANGES), size=rng.integers(0, 24))]
        strings.append("".join(chr(rng.integers(lo, hi + 1)) for lo, hi in ranges))
    return strings



# ----------------------------------------------------------------------------
# segmenters and the codec

@pytest.mark.parametrize("max_chunk_bytes", [3, tk.MAX_CHUNK_BYTES])
def test_round_trip_of_random_bytes_and_unicode(segmenter_name, max_chunk_bytes):
    segmenter = tk.Segmenter(segmenter_name, max_chunk_bytes, fixed_chunk_bytes=5)
    inputs = random_byte_strings(1500, seed=1) + [s.encode("utf-8") for s in random_unicode_strings(1500, seed=2)]
    for data in inputs:
        chunks = segmenter.split(data)
        assert tk.join_chunks(chunks) == data
        assert all(1 <= len(c) <= max_chunk_bytes for c in chunks)


def test_edge_cases_round_trip(segmenter_name):
    segmenter = tk.Segmenter(segmenter_name, max_chunk_bytes=4, fixed_chunk_bytes=3)
    cases = [b"", b"\x00", b"a\x00\x00b", b"\xff\xfe\xc3(", b"\xed\xa0\x80 lone surrogate", " ".encode() * 40,
             "🙂🙂 東京 naïve".encode(), "x" * 33 + "\n\n\n"]
    for data in cases:
        data = data if isinstance(data, bytes) else data.encode()
        chunks = segmenter.split(data)
        assert tk.join_chunks(chunks) == data and all(1 <= len(c) <= 4 for c in chunks)
    assert segmenter.split("") == [] and segmenter.split("🙂") == segmenter.split("🙂".encode())


def test_segmenters_by_hand():
    text = b"Hi, there  you!\nok"
    # a chunk closes after a spacelike byte that follows a non-spacelike one
    assert tk.Segmenter("space").split(text) == [b"Hi,", b" there ", b" you!", b"\nok"]
    assert tk.Segmenter("fixed", fixed_chunk_bytes=4).split(text) == [b"Hi, ", b"ther", b"e  y", b"ou!\n", b"ok"]
    # split, never truncated: 20 letters with max 8 become 8 + 8 + 4
    assert tk.Segmenter("space", max_chunk_bytes=8).split(b"a" * 20) == [b"a" * 8, b"a" * 8, b"a" * 4]


def test_gpt2_segmenter_cuts_at_gpt2_tokens(gpt2):
    text = b"Hi, there  you!\nok"
    assert tk.Segmenter("gpt2").split(text) == [b"Hi", b",", b" there", b" ", b" you", b"!", b"\n", b"ok"]


def test_bad_segmenter_is_a_user_error():
    with pytest.raises(UserError, match="--segmenter"):
        tk.Segmenter("words")


# ----------------------------------------------------------------------------
# token ids back to bytes

def test_byte_table():
    table = tk.token_byte_table("bytes")
    assert len(table) == 256
    assert all(table[i] == bytes([i]) for i in range(256))


def test_bpe_table_rebuilds_utf8_text(gpt2):
    table = tk.token_byte_table("bpe")
    assert len(table) == tk.GPT2_VOCAB == gpt2.n_vocab
    encoding = gpt2
    text = "Hello, world!  Tabs\tand\nnewlines, café, naïve, 東京, emoji 🙂🚀 and <|endoftext|> as text."
    ids = encoding.encode(text, disallowed_special=())
    assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    assert table[50256] == b"<|endoftext|>"


@pytest.mark.parametrize("tokenization", ["bytes", "bpe"])
def test_encode_round_trips_through_the_byte_table(tokenization, request):
    if tokenization == "bpe":
        request.getfixturevalue("gpt2")
    text = "ROMEO:\nBut soft, what light through yonder window breaks? café 東京 🙂 <|endoftext|>"
    ids = tk.encode(tokenization, text)
    assert all(isinstance(i, int) for i in ids)
    table = tk.token_byte_table(tokenization)
    assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    if tokenization == "bytes":
        assert ids == list(text.encode("utf-8"))
    else:
        assert len(ids) < len(text.encode("utf-8"))  # BPE merges bytes


@pytest.mark.parametrize("function", [tk.encode, tk.token_byte_table], ids=["encode", "token_byte_table"])
def test_unknown_tokenization_is_a_user_error(function):
    args = ("chars", "text") if function is tk.encode else ("chars",)
    with pytest.raises(UserError, match="unknown tokenization 'chars'") as info:
        function(*args)
    assert "\n" not in str(info.value)




# ----------------------------------------------------------------------------
# Hugging Face tokenizers: byte-level BPE and SentencePiece, built offline

def save_hf_tokenizer(backend, folder, **special):
    transformers = pytest.importorskip("transformers", reason="Hugging Face tokenizers need transformers")
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    return folder


def sentencepiece_tokenizer(folder, normalizers_extra=()):
    """
    A Llama-style tokenizer: "▁" for spaces, a "▁" put before the text, and
    byte fallback: a character outside the vocabulary becomes its UTF-8 bytes,
    pieces "<0xE6>" "<0x9D>" ... A newline is deliberately left out of the
    vocabulary, so it always falls back to "<0x0A>".
    """
    tokenizers = pytest.importorskip("tokenizers", reason="building a tokenizer offline needs tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.!?:'"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "a")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                                         byte_fallback=True))
    backend.normalizer = tokenizers.normalizers.Sequence(
        [*normalizers_extra, tokenizers.normalizers.Prepend("▁"), tokenizers.normalizers.Replace(" ", "▁")])
    backend.decoder = tokenizers.decoders.Sequence(
        [tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse(),
         tokenizers.decoders.Strip(" ", 1, 0)])
    return save_hf_tokenizer(backend, folder, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


SENTENCEPIECE_TEXT = "the cat sat.\nA naïve café, 東京 🙂!\n\tthe end: it's fine\n" * 20


def test_sentencepiece_byte_fallback_and_spaces_map_to_their_bytes(tmp_path):
    folder = sentencepiece_tokenizer(tmp_path / "sp")
    table = tk.token_byte_table(tk.HF_PREFIX + str(folder))
    hf = tk.load_hf_tokenizer(folder)
    assert table[hf.convert_tokens_to_ids("<0x0A>")] == b"\n"  # one byte, not the 6 of its name
    assert table[hf.convert_tokens_to_ids("▁the")] == b" the"
    ids = hf.encode(SENTENCEPIECE_TEXT, add_special_tokens=False)
    # the pieces rebuild the text, after the one space SentencePiece puts before it
    assert b"".join(table[i] for i in ids) == b" " + SENTENCEPIECE_TEXT.encode("utf-8")


def test_prepare_counts_the_bytes_of_a_sentencepiece_corpus(tmp_path):
    from data import prepare
    folder = sentencepiece_tokenizer(tmp_path / "sp")
    (tmp_path / "corpus.txt").write_text(SENTENCEPIECE_TEXT, encoding="utf-8")
    out = prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "corpus.txt"), tokenization="hf",
                                                tokenizer_dir=str(folder), data_dir=str(tmp_path)))
    meta = __import__("json").loads((out / "meta.json").read_text())
    token_bytes = np.load(out / "token_bytes.npy")
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        # every token but the first (never predicted, it holds the added space) covers its own bytes of text
        assert token_bytes[ids[1:]].sum() == meta[f"{split}_bytes"] - (token_bytes[ids[0]] - 1)


def test_a_tokenizer_that_does_not_rebuild_the_text_is_refused(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="building a tokenizer offline needs tokenizers")
    from data import prepare
    folder = sentencepiece_tokenizer(tmp_path / "lower", [tokenizers.normalizers.Lowercase()])
    (tmp_path / "corpus.txt").write_text(SENTENCEPIECE_TEXT, encoding="utf-8")
    with pytest.raises(UserError, match="do not rebuild the train text"):
        prepare.prepare(prepare.PrepareConfig(input=str(tmp_path / "corpus.txt"), tokenization="hf",
                                              tokenizer_dir=str(folder), data_dir=str(tmp_path)))
