"""
tokenizer.py: every tokenization's ids and bytes, GPT-2's cuts as markers, Hugging Face tokenizers, and
the teaching BPE against a hand-worked example and against tiktoken run on the merges it learns.
"""

from pathlib import Path

import numpy as np
import pytest
import tiktoken

import tokenizer as tk
from cli import UserError


# ----------------------------------------------------------------------------
# bytes_gpt2: GPT-2's cuts as markers in the byte stream

def test_bytes_gpt2_marks_each_gpt2_token_end(gpt2):
    text = "Hi, there  you!\nok"
    end = tk.GPT2_TOKEN_END
    pieces = [b"Hi", b",", b" there", b" ", b" you", b"!", b"\n", b"ok"]  # GPT-2's tokens of the text, by hand
    assert tk.encode("bytes_gpt2", text) == [i for piece in pieces for i in [*piece, end]]
    assert tk.encode("bytes_gpt2", "") == []


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


# ----------------------------------------------------------------------------
# the teaching BPE (exercise 16)

# Sennrich et al.'s example, as CS336's first assignment works it
LOW_LOWER = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"


@pytest.mark.exercise(16)
def test_bpe_learns_the_hand_worked_merges():
    # The pieces: "low" once, " low" 4 times, " lower" 2, " widest" 3, " newest" 6 (a word keeps its space).
    # Pair counts: es 9, st 9, we 8, lo 7, ow 7, " l" 6, " n" 6, ne 6, ew 6, ... So:
    # 1. st (9, tied with es: the greater pair wins)   2. e+st (9)   3. o+w (7, tied with l+o)   4. l+ow (7)
    # 5. w+est (6: of the pairs at 6, (w, est) is the greatest)   6. n+e (6)   7. ne+west (6)
    # 8. " "+newest (6, tied with " "+low: b"newest" > b"low")   9. " "+low (6)   10. w+i (3, the greatest of the 3s)
    ranks = tk.train_bpe(LOW_LOWER, 10)
    learnt = [token for token in ranks if len(token) > 1]
    assert learnt == [b"st", b"est", b"ow", b"low", b"west", b"ne", b"newest", b" newest", b" low", b"wi"]
    assert [ranks[token] for token in learnt] == list(range(256, 266))
    assert all(ranks[bytes([b])] == b for b in range(256))
    # encoding: a piece that is a token whole, and one joined by the merges in their order
    assert tk.bpe_encode(" newest", ranks) == [ranks[b" newest"]]
    assert tk.bpe_encode(" lower", ranks) == [ranks[b" low"], ord("e"), ord("r")]
    assert tk.bpe_encode(" wider", ranks) == [ord(" "), ranks[b"wi"], ord("d"), ord("e"), ord("r")]
    # merging stops when every piece is one token
    ranks = tk.train_bpe(LOW_LOWER, 1000)
    assert all(tk.bpe_encode(piece, ranks) == [ranks[piece.encode()]] for piece in ["low", " lower", " widest"])
    assert len(ranks) < 256 + 1000


@pytest.mark.exercise(16)
def test_bpe_encodes_as_tiktoken_does_with_the_merges_it_learns():
    corpus = (Path(tk.__file__).parent / "README.md").read_text(encoding="utf-8")
    ranks = tk.train_bpe(corpus, 150)
    assert len(ranks) == len(set(ranks.values())) > 256 + 100  # one id per token
    # tiktoken's own encoder (its Rust core, not its teaching copy) on these ranks and the same pieces
    encoding = tiktoken.Encoding("teaching", pat_str=tk.BPE_PIECES, mergeable_ranks=ranks, special_tokens={})
    text = (Path(tk.__file__).parent / "model.py").read_text(encoding="utf-8") + "naïve café 東京 🙂!\n\n  it's\t"
    ids = tk.bpe_encode(text, ranks)
    assert ids == encoding.encode_ordinary(text)
    by_id = {i: token for token, i in ranks.items()}
    assert b"".join(by_id[i] for i in ids) == text.encode("utf-8")  # lossless
