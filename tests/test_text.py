"""The `text` data source on files the tests write: documents, the held-out split, byte
and BPE tokens, packing into blocks, the tokenizer cache, and every bad input."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import fxgrow.train.text as text_mod
from fxgrow.errors import SpecError
from fxgrow.specs.root import parse_spec
from fxgrow.specs.train import TrainSpec
from fxgrow.train.data import DataError, load_data
from fxgrow.train.text import EOT, load_tokenizer, pack, split_on_separator

WORDS = ("the quick brown fox jumps over the lazy dog while a small cat sleeps near the warm fire "
         "and the old man reads a long book about ships trains rivers and mountains").split()


def write_docs(folder: Path, count: int = 12, words: int = 40, seed: int = 0) -> list[str]:
    """`count` files of English-like text, one document each; returns their texts."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(count):
        picks = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
        texts.append(f"Document {i}: " + " ".join(WORDS[j] for j in picks) + ".\n")
        (folder / f"doc{i:02d}.txt").write_text(texts[-1])
    return texts


def text_spec(folder: Path, **kw):
    return TrainSpec(data={"name": "text", "files": str(folder / "*.txt"), "block_size": 8, **kw}).data


def held_out_by_hand(texts: list[str], seed: int, fraction: float) -> list[bool]:
    """The documented rule: held out when blake2b(seed, text) / 2**64 < test_fraction."""
    def unit(t):
        return int.from_bytes(hashlib.blake2b(f"{seed}\0".encode() + t.encode(), digest_size=8).digest(),
                              "little") / 2 ** 64
    return [unit(t) < fraction for t in texts]


def byte_ids(texts: list[str]) -> list[int]:
    return [i for t in texts for i in (*t.encode(), 256)]


# --- packing and the split ---------------------------------------------------------------

def test_pack_cuts_consecutive_blocks_and_drops_the_partial_last():
    assert pack(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_byte_blocks_are_the_concatenated_documents_of_each_split(tmp_path):
    texts = write_docs(tmp_path / "t", count=12)
    texts[3] = "Caf\u00e9 \u00fcber \u00a9 \u2014 unicode bytes.\n"  # multi-byte UTF-8
    (tmp_path / "t" / "doc03.txt").write_text(texts[3])
    data = load_data(text_spec(tmp_path / "t", test_fraction=0.25, split_seed=3))
    held = held_out_by_hand(texts, 3, 0.25)
    assert 0 < sum(held) < len(texts)
    for split, keep in (("train", [not h for h in held]), ("test", held)):
        stream = byte_ids([t for t, k in zip(texts, keep) if k])
        x, y = getattr(data, split)
        n = len(stream) // 8
        assert x.tolist() == torch.tensor(stream[: n * 8]).view(n, 8).tolist()
        assert y is x  # causal-LM targets are the blocks themselves (the objective shifts them)
        assert data.info[split] == {"documents": sum(keep), "tokens": len(stream), "blocks": n}
    assert data.num_classes == 257 and data.info["eot"] == 256
    assert data.train[0].dtype == torch.int32 and data.prepare(data.train[0][:2]).dtype == torch.int64


def test_split_is_deterministic_seeded_and_per_document(tmp_path):
    texts = write_docs(tmp_path / "t", count=30)
    a, b = (load_data(text_spec(tmp_path / "t")) for _ in range(2))
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[0], b.test[0])
    other = load_data(text_spec(tmp_path / "t", split_seed=1))
    assert held_out_by_hand(texts, 0, 0.1) != held_out_by_hand(texts, 1, 0.1)
    assert other.info["test"]["documents"] == sum(held_out_by_hand(texts, 1, 0.1))
    # A document's split depends on its text alone: more files move none of the others,
    # and a copy of a held-out document is held out too.
    first = held_out_by_hand(texts, 0, 0.1).index(True)
    (tmp_path / "t" / "zz_copy.txt").write_text(texts[first])
    write_docs(tmp_path / "more", count=5, seed=9)
    grown = load_data(TrainSpec(data={"name": "text", "files": [str(tmp_path / "t" / "*.txt"),
                                                               str(tmp_path / "more" / "*.txt")],
                                      "block_size": 8}).data)
    assert grown.info["test"]["documents"] >= a.info["test"]["documents"] + 1
    held_stream = torch.tensor(byte_ids([t for t, h in zip(texts, held_out_by_hand(texts, 0, 0.1)) if h]))
    assert torch.equal(grown.test[0].flatten()[: len(held_stream) // 8 * 8], held_stream[: len(held_stream) // 8 * 8])


def test_a_split_never_comes_out_empty(tmp_path):
    write_docs(tmp_path / "t", count=2)
    for fraction in (0.01, 0.99):  # the rule alone may hold out nothing, or everything
        data = load_data(text_spec(tmp_path / "t", test_fraction=fraction))
        assert data.info["train"]["documents"] == data.info["test"]["documents"] == 1


def test_separator_lines_cut_documents():
    assert split_on_separator("a\n%\nb b\r\n%\n%\n  \n%\nc", "%") == ["a\n", "b b\r\n", "c"]
    assert split_on_separator("  \n", None) == []


def test_fortune_style_file_with_duplicate_globs_and_symlinks(tmp_path):
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "wit").write_text("".join(f"saying {i} {' '.join(WORDS[i:i + 6])}\n%\n" for i in range(20)))
    (folder / "wit.dat").write_bytes(b"\x00\x00\x00\x02\xff binary index")
    (folder / "wit.u8").symlink_to("wit")
    spec = TrainSpec(data={"name": "text", "files": [str(folder / "*"), str(folder / "wit")], "exclude": ["*.dat"],
                           "separator": "%", "block_size": 8}).data
    data = load_data(spec)
    assert data.info["files"] == 1  # the link and the second pattern name the same file
    assert data.info["train"]["documents"] + data.info["test"]["documents"] == 20


def test_max_tokens_keeps_the_head_of_each_stream(tmp_path):
    write_docs(tmp_path / "t", count=12)
    full = load_data(text_spec(tmp_path / "t"))
    capped = load_data(text_spec(tmp_path / "t", max_tokens=20, max_test_tokens=9))
    assert torch.equal(capped.train[0], full.train[0][:2]) and torch.equal(capped.test[0], full.test[0][:1])
    assert capped.info["train"]["tokens"] == 20 and capped.info["test"]["tokens"] == 9


# --- BPE -------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXGROW_CACHE", str(tmp_path / "cache"))
    calls = []
    real = text_mod.train_bpe
    monkeypatch.setattr(text_mod, "train_bpe", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    return calls


def test_bpe_tokens_decode_to_the_documents(tmp_path, cache):
    texts = write_docs(tmp_path / "t", count=12, words=200)
    texts[0] = f"A literal {EOT} inside a document is text, not a boundary. Caf\u00e9.\n"
    (tmp_path / "t" / "doc00.txt").write_text(texts[0])
    data = load_data(text_spec(tmp_path / "t", tokenizer="bpe", vocab_size=300, block_size=16, test_fraction=0.2))
    info = data.info
    tok = load_tokenizer(info["cache"])
    assert info["tokenizer_vocab"] <= 300 and int(data.train[0].max()) < 300 and tok.get_vocab_size() <= 300
    held = held_out_by_hand(texts, 0, 0.2)
    eot = info["eot"]
    for split, keep in (("train", [not h for h in held]), ("test", held)):
        ids = getattr(data, split)[0].flatten().tolist()
        wanted = [t for t, k in zip(texts, keep) if k]
        pieces = [[]]  # the stream cut at the end-of-text id: whole documents, then the cut one
        for i in ids:
            pieces.append([]) if i == eot else pieces[-1].append(i)
        decoded = [tok.decode(p) for p in pieces[:-1]]
        assert decoded == wanted[:len(decoded)] and len(decoded) >= len(wanted) - 1
    # merges happened: fewer tokens than bytes
    assert info["train"]["tokens"] < sum(len(t.encode()) + 1 for t, h in zip(texts, held) if not h)


def test_bpe_is_cached_by_content_and_settings(tmp_path, cache):
    write_docs(tmp_path / "t", count=12, words=100)
    spec = text_spec(tmp_path / "t", tokenizer="bpe", vocab_size=300)
    first = load_data(spec)
    second = load_data(spec)
    assert cache == [(300, 2)] and not first.info["cached"] and second.info["cached"]
    assert torch.equal(first.train[0], second.train[0]) and torch.equal(first.test[0], second.test[0])
    assert Path(first.info["cache"]).parent == tmp_path / "cache" / "text"
    load_data(text_spec(tmp_path / "t", tokenizer="bpe", vocab_size=320))  # another setting: trained again
    load_data(text_spec(tmp_path / "t", tokenizer="bpe", vocab_size=300, block_size=4))  # packing only: cached
    assert cache == [(300, 2), (320, 2)]
    (tmp_path / "t" / "doc05.txt").write_text("changed text, new vocabulary " * 20)
    load_data(spec)
    assert len(cache) == 3
    (Path(second.info["cache"]) / "tokens.pt").write_bytes(b"damaged")  # a broken entry is rebuilt
    (tmp_path / "t" / "doc05.txt").write_text(write_docs(tmp_path / "u", count=12, words=100)[5])
    rebuilt = load_data(spec)
    assert len(cache) == 4 and torch.equal(rebuilt.train[0], first.train[0])


# --- bad input ---------------------------------------------------------------------------

def test_no_matching_files_names_the_pattern(tmp_path):
    write_docs(tmp_path / "t", count=3)
    with pytest.raises(DataError, match=r"train.data.files.1: no file matches '.*nothing/\*.txt'"):
        load_data(TrainSpec(data={"name": "text", "files": [str(tmp_path / "t" / "*.txt"),
                                                            str(tmp_path / "nothing" / "*.txt")]}).data)
    with pytest.raises(DataError, match=r"train.data.files.0: all 3 matching files are excluded"):
        load_data(text_spec(tmp_path / "t", exclude=["*doc*"]))


@pytest.mark.parametrize("content, message", [
    (b"", r"doc01.txt has no text \(it is empty\)"),
    (b"  \n\n", r"doc01.txt has no text"),
    (b"abc\x00def", r"doc01.txt is binary \(a NUL byte at 3\)"),
    (b"caf\xe9 latin-1", r"doc01.txt is not UTF-8 \(byte 3: b'\\xe9 la'\).*decode_errors: replace"),
])
def test_bad_files_are_named(tmp_path, content, message):
    write_docs(tmp_path / "t", count=3)
    (tmp_path / "t" / "doc01.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_data(text_spec(tmp_path / "t"))


def test_replace_reads_latin1_with_replacement_characters(tmp_path):
    write_docs(tmp_path / "t", count=3)
    (tmp_path / "t" / "doc01.txt").write_bytes(b"caf\xe9 latin-1 " * 10)
    data = load_data(text_spec(tmp_path / "t", decode_errors="replace"))
    everything = torch.cat([data.train[0].flatten(), data.test[0].flatten()]).tolist()
    assert any(everything[i:i + 3] == list("\ufffd".encode()) for i in range(len(everything)))


def test_too_little_text_says_which_split(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "a.txt").write_text("only one document here")
    with pytest.raises(DataError, match="1 document in .*a.txt; a held-out split needs at least 2"):
        load_data(text_spec(folder))
    (folder / "b.txt").write_text("a second one")
    with pytest.raises(DataError, match=r"train.data.block_size: 64 is more than the \d+ tokens of the (training|held-out) split"):
        load_data(text_spec(folder, block_size=64))


@pytest.mark.parametrize("data, location, message", [
    ({"vocab_size": 100}, "train.data.vocab_size", "too small: a byte-level vocabulary needs at least 257"),
    ({"tokenizer": "bpe", "vocab_size": 200}, "train.data.vocab_size", "at least 257"),
    ({"max_tokens": 10}, "train.data.max_tokens", "less than block_size 128"),
    ({"files": []}, "train.data.files", "at least 1 item"),
    ({"augment": "crop_flip"}, "train.data.augment", "Extra inputs"),
    ({"tokenizer": "wordpiece"}, "train.data.tokenizer", "'byte' or 'bpe'"),
])
def test_spec_errors_name_the_field(data, location, message):
    with pytest.raises(SpecError) as info:
        parse_spec({"train": {"data": {"name": "text", "files": "x/*.txt", **data}}})
    assert any(loc == location and message in msg for loc, msg in info.value.errors), info.value.errors


@pytest.mark.parametrize("train, message", [
    ({"data": {"name": "text", "files": "x"}, "objective": "classification"}, "text data has no class labels"),
    ({"data": "digits", "objective": "causal_lm"}, "causal_lm needs token data .*not digits"),
    ({"data": {"name": "text", "files": ["x", "y"], "label_by": "pattern"}, "objective": "causal_lm"},
     r"labelled text \(train.data.label_by\) trains sequence classification"),
])
def test_objective_must_fit_the_data(train, message):
    with pytest.raises(SpecError, match=f"train.objective: {message}"):
        parse_spec({"train": train})


def test_objective_defaults_from_the_data():
    assert TrainSpec(data={"name": "text", "files": "x"}).objective_name == "causal_lm"
    assert TrainSpec().objective_name == "classification"
    assert TrainSpec(data="python: m:f", objective="causal_lm").objective_name == "causal_lm"
    labelled = {"name": "text", "files": ["x", "y"], "label_by": "pattern"}
    assert TrainSpec(data=labelled).objective_name == "classification"


# --- labelled text: each pattern a class ---------------------------------------------------

def test_label_by_pattern_packs_each_class_apart(tmp_path):
    a = write_docs(tmp_path / "a", count=10, seed=1)
    b = [t.upper() for t in write_docs(tmp_path / "b", count=14, seed=2)]
    for i, t in enumerate(b):
        (tmp_path / "b" / f"doc{i:02d}.txt").write_text(t)
    spec = TrainSpec(data={"name": "text", "files": [str(tmp_path / "a" / "*.txt"), str(tmp_path / "b" / "*.txt")],
                           "label_by": "pattern", "block_size": 8, "test_fraction": 0.3, "split_seed": 1,
                           "max_tokens": 400}).data
    data = load_data(spec)
    assert data.num_classes == 2 and data.info["label_by"] == "pattern"
    for split, held in (("train", False), ("test", True)):
        x, y = getattr(data, split)
        expected_x, expected_y = [], []
        for label, texts in enumerate((a, b)):
            keep = [t for t, h in zip(texts, held_out_by_hand(texts, 1, 0.3)) if h == held]
            stream = byte_ids(keep)[:400] if split == "train" else byte_ids(keep)
            n = len(stream) // 8
            expected_x += torch.tensor(stream[: n * 8]).view(n, 8).tolist()
            expected_y += [label] * n
            assert data.info["classes"][label][split] == {"documents": len(keep), "tokens": len(stream), "blocks": n}
        assert x.tolist() == expected_x and y.tolist() == expected_y  # no block mixes two classes
        assert y.dtype == torch.long
    assert data.info["classes"][0]["train"]["tokens"] == data.info["classes"][1]["train"]["tokens"] == 400


def test_label_by_pattern_with_bpe_cuts_at_the_class_boundary(tmp_path, cache):
    texts = [write_docs(tmp_path / "a", count=8, seed=1), write_docs(tmp_path / "b", count=8, seed=2, words=60)]
    spec = TrainSpec(data={"name": "text", "files": [str(tmp_path / "a" / "*.txt"), str(tmp_path / "b" / "*.txt")],
                           "label_by": "pattern", "block_size": 4, "tokenizer": "bpe", "vocab_size": 300,
                           "test_fraction": 0.25}).data
    data = load_data(spec)
    tok = load_tokenizer(data.info["cache"])
    x, y = data.train
    for label in (0, 1):  # each class's blocks decode to the head of that class's training text
        kept = [t for t, h in zip(texts[label], held_out_by_hand(texts[label], 0, 0.25)) if not h]
        decoded = tok.decode(x[y == label].flatten().tolist(), skip_special_tokens=True)
        assert len(decoded) > 100 and "".join(kept).startswith(decoded)


def test_label_by_pattern_refuses_a_file_of_two_classes(tmp_path):
    write_docs(tmp_path / "a", count=4)
    spec = TrainSpec(data={"name": "text", "files": [str(tmp_path / "a" / "*.txt"), str(tmp_path / "a" / "doc0*")],
                           "label_by": "pattern", "block_size": 8}).data
    with pytest.raises(DataError, match=r"train.data.files.1: .*doc00.txt is matched by files.0 too; with label_by: "
                                        r"pattern each file is of one class"):
        load_data(spec)
    spec = TrainSpec(data={"name": "text", "files": [str(tmp_path / "a" / "*.txt"), str(tmp_path / "a" / "doc0*")],
                           "block_size": 8}).data
    assert load_data(spec).info["files"] == 4  # unlabelled: read once, as before


def test_label_by_pattern_names_a_class_without_a_block(tmp_path):
    write_docs(tmp_path / "a", count=6)
    (tmp_path / "b").mkdir()
    for i in range(3):
        (tmp_path / "b" / f"s{i}.txt").write_text("hi\n")
    spec = TrainSpec(data={"name": "text", "files": [str(tmp_path / "a" / "*.txt"), str(tmp_path / "b" / "*.txt")],
                           "label_by": "pattern", "block_size": 16, "test_fraction": 0.4}).data
    with pytest.raises(DataError, match=r"train.data.files.1: its (training|held-out) split has \d+ tokens"):
        load_data(spec)
