"""The `text` data source: local files -> documents -> token ids -> packed blocks.

Nothing is downloaded. Byte-level ids are the UTF-8 bytes; a byte-level BPE is trained
with the `tokenizers` library on the training documents only (the held-out text never
shapes the vocabulary) and cached, with both token streams, under
`$FXGROW_CACHE/text/<key>`, where the key hashes every document's text and split, the
tokenizer settings and the `tokenizers` version: a second run with the same files and
settings reads the cache instead of training again.

A block is `block_size` consecutive tokens of the stream `doc, <eot>, doc, <eot>, ...`;
its targets are the block itself (the causal-LM objective shifts them, as Hugging
Face's `labels=` does).
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..specs.train import BYTE_VOCAB, TextData

EOT = "<|endoftext|>"
CACHE_FORMAT = 1


def _error(message: str):
    from .data import DataError  # data.py imports this module lazily
    return DataError(message)


@dataclass
class Document:
    text: str
    source: Path
    held_out: bool = False


# --- files and documents -----------------------------------------------------------------

def find_files(spec: TextData) -> list[Path]:
    """The regular files the globs match, minus `exclude`, each once (a file matched by
    two patterns or through a symlink is read once), in pattern order, sorted within."""
    return list(labelled_files(spec))


def labelled_files(spec: TextData) -> dict[Path, int]:
    """find_files' paths, each with the index of the first pattern that matched it. With
    `label_by: pattern` that index is the file's class, so a file two patterns match is an
    error naming both."""
    seen: dict[str, Path] = {}
    label: dict[str, int] = {}
    for i, pattern in enumerate(spec.files):
        hits = sorted(h for h in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(h))
        kept = [h for h in hits if not any(fnmatch.fnmatchcase(h, x) for x in spec.exclude)]
        if not kept:
            why = f"all {len(hits)} matching files are excluded" if hits else "no file matches"
            raise _error(f"train.data.files.{i}: {why} {pattern!r} (from {os.getcwd()})")
        for h in kept:
            real = os.path.realpath(h)
            if spec.label_by is not None and label.get(real, i) != i:
                raise _error(f"train.data.files.{i}: {h} is matched by files.{label[real]} too; with label_by: "
                             "pattern each file is of one class (leave it out of one with train.data.exclude)")
            seen.setdefault(real, Path(h))
            label.setdefault(real, i)
    return {path: label[real] for real, path in seen.items()}


def read_documents(spec: TextData, paths: list[Path]) -> list[Document]:
    """Every document of every file, in file order. A file that is empty, binary (a NUL
    byte) or, with `decode_errors: strict`, not UTF-8 is an error naming it."""
    limit = 2 << 30
    total = sum(p.stat().st_size for p in paths)
    if total > limit:
        raise _error(f"train.data.files: {len(paths)} files, {total:,} bytes: more than {limit:,} to tokenize in "
                     "memory; narrow the globs")
    docs = []
    for path in paths:
        raw = path.read_bytes()
        nul = raw.find(b"\0")
        if nul >= 0:
            raise _error(f"train.data.files: {path} is binary (a NUL byte at {nul}); "
                         "leave it out with train.data.exclude")
        try:
            text = raw.decode("utf-8", errors=spec.decode_errors)
        except UnicodeDecodeError as e:
            raise _error(f"train.data.files: {path} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                         "leave it out with train.data.exclude, or set train.data.decode_errors: replace") from None
        pieces = split_on_separator(text, spec.separator)
        if not pieces:
            what = "empty or only separators" if spec.separator else "empty"
            raise _error(f"train.data.files: {path} has no text (it is {what}); leave it out with train.data.exclude")
        docs += [Document(piece, path) for piece in pieces]
    return docs


def split_on_separator(text: str, separator: str | None) -> list[str]:
    """`text` cut at lines equal to `separator` (the lines themselves dropped); pieces with
    no visible text (before a leading separator, between two in a row) are not documents."""
    if separator is None:
        return [text] if text.strip() else []
    pieces, current = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == separator:
            pieces.append("".join(current))
            current = []
        else:
            current.append(line)
    pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def _unit(seed: int, text: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0".encode() + text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64


def assign_split(docs: list[Document], seed: int, fraction: float) -> None:
    """Hold a document out when hash(seed, its text) < fraction: its split depends on
    nothing but itself, and duplicates share one. At least one document lands on each
    side (the lowest hash is held out, the highest trained on)."""
    if len(docs) < 2:
        where = f"{docs[0].source}" if docs else "the files"
        raise _error(f"train.data: {len(docs)} document in {where}; a held-out split needs at least 2 "
                     "(add files, or cut files into documents with train.data.separator)")
    units = [_unit(seed, d.text) for d in docs]
    for d, u in zip(docs, units):
        d.held_out = u < fraction
    if not any(d.held_out for d in docs):
        docs[units.index(min(units))].held_out = True
    if all(d.held_out for d in docs):
        docs[units.index(max(units))].held_out = False


# --- tokens -------------------------------------------------------------------------------

def byte_stream(texts: list[str]) -> torch.Tensor:
    """UTF-8 bytes of each text followed by the end-of-text id 256, as one int32 stream."""
    eot = torch.tensor([BYTE_VOCAB - 1], dtype=torch.int32)
    parts = []
    for text in texts:
        parts += [torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).to(torch.int32),
                  eot]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def train_bpe(texts: list[str], vocab_size: int, min_frequency: int):
    """A byte-level BPE (GPT-2's pre-tokenizer, the 256 byte symbols, `<|endoftext|>`)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise _error("train.data.tokenizer: bpe needs the `tokenizers` package (pip install tokenizers)") from None
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def bpe_stream(tok, texts: list[str]) -> torch.Tensor:
    """Each text's ids followed by the end-of-text id; `<|endoftext|>` written in a text is
    encoded as text, never as the separator."""
    tok.encode_special_tokens = True
    eot = tok.token_to_id(EOT)
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts += [torch.tensor(enc.ids, dtype=torch.int32), torch.tensor([eot], dtype=torch.int32)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def cache_key(spec: TextData, docs: list[Document]) -> str:
    import tokenizers

    h = hashlib.blake2b(digest_size=16)
    h.update(repr(("fxgrow-text", CACHE_FORMAT, tokenizers.__version__, spec.tokenizer, spec.vocab,
                   spec.min_frequency)).encode())
    for d in docs:  # order, text and split of every document
        h.update(hashlib.blake2b(d.text.encode(), digest_size=16).digest())
        h.update(b"T" if d.held_out else b"t")
    return h.hexdigest()


def bpe_streams(spec: TextData, docs: list[Document]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(train stream, test stream, facts) from the cache, or by training and encoding."""
    from .data import cache_dir

    folder = cache_dir() / "text" / cache_key(spec, docs)
    tokens, tok_file = folder / "tokens.pt", folder / "tokenizer.json"
    if tokens.is_file() and tok_file.is_file():
        try:
            saved = torch.load(tokens, map_location="cpu", weights_only=True)
            if saved.get("format") == CACHE_FORMAT:
                return saved["train"], saved["test"], {**saved["facts"], "cache": str(folder), "cached": True}
        except Exception:  # a damaged cache entry is rebuilt, not trusted
            pass
    tok = train_bpe([d.text for d in docs if not d.held_out], spec.vocab, spec.min_frequency)
    train = bpe_stream(tok, [d.text for d in docs if not d.held_out])
    test = bpe_stream(tok, [d.text for d in docs if d.held_out])
    facts = {"tokenizer_vocab": tok.get_vocab_size(), "eot": tok.token_to_id(EOT)}
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(tok_file, lambda p: tok.save(str(p)))
    _atomic(tokens, lambda p: torch.save({"format": CACHE_FORMAT, "train": train, "test": test, "facts": facts}, p))
    return train, test, {**facts, "cache": str(folder), "cached": False}


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent runs each write their own
    write(tmp)
    os.replace(tmp, path)


def load_tokenizer(folder: str | Path):
    """The BPE a run trained (its report's `data.cache`), for decoding ids back to text."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


# --- blocks -------------------------------------------------------------------------------

def pack(stream: torch.Tensor, block_size: int) -> torch.Tensor:
    """[n, block_size] consecutive blocks of `stream` (a view); the last partial one dropped."""
    n = len(stream) // block_size
    return stream[: n * block_size].view(n, block_size)


def class_streams(stream: torch.Tensor, eot: int, counts: list[int]) -> list[torch.Tensor]:
    """`stream` (documents each followed by one end-of-text id, classes in order) cut after
    the documents of each class; `counts` are the classes' document counts."""
    ends = (stream == eot).nonzero().flatten()
    if len(ends) != sum(counts):  # the streams' contract: one end-of-text after every document
        raise RuntimeError(f"{len(ends)} end-of-text ids for {sum(counts)} documents")
    out, start, done = [], 0, 0
    for n in counts:
        done += n
        stop = int(ends[done - 1]) + 1 if done else 0
        out.append(stream[start:stop])
        start = stop
    return out


def text_splits(spec: TextData) -> tuple[Any, Any, dict[str, Any]]:
    """(train, test, what was read) for a `text` spec: each split the packed blocks, or
    with `label_by` a (blocks, labels) pair."""
    labels = labelled_files(spec)
    paths = list(labels)
    docs = read_documents(spec, paths)
    assign_split(docs, spec.split_seed, spec.test_fraction)
    if spec.tokenizer == "byte":
        train = byte_stream([d.text for d in docs if not d.held_out])
        test = byte_stream([d.text for d in docs if d.held_out])
        facts = {"tokenizer_vocab": BYTE_VOCAB, "eot": BYTE_VOCAB - 1}
    else:
        train, test, facts = _rank_zero_first(lambda: bpe_streams(spec, docs))
    top = int(max(train.max(), test.max()))
    if top >= spec.vocab:
        raise _error(f"train.data.vocab_size: {spec.vocab} is too small for token id {top}")
    if spec.label_by is not None:
        return _labelled_splits(spec, docs, labels, train, test, {"files": len(paths), **facts})
    splits, info = [], {"files": len(paths)}
    for name, stream, cap in (("train", train, spec.max_tokens), ("test", test, spec.max_test_tokens)):
        count = sum(d.held_out == (name == "test") for d in docs)
        stream = stream[:cap] if cap is not None else stream
        blocks = pack(stream, spec.block_size)
        if not len(blocks):
            split = "training" if name == "train" else "held-out"
            raise _error(f"train.data.block_size: {spec.block_size} is more than the {len(stream)} tokens of the "
                         f"{split} split ({count} documents); lower it, add text"
                         + (", or raise test_fraction" if name == "test" else ""))
        splits.append(blocks)
        info[name] = {"documents": count, "tokens": len(stream), "blocks": len(blocks)}
    info.update(tokenizer=spec.tokenizer, vocab_size=spec.vocab, block_size=spec.block_size, **facts)
    return splits[0], splits[1], info


def _labelled_splits(spec: TextData, docs: list[Document], labels: dict[Path, int], train: torch.Tensor,
                     test: torch.Tensor, facts: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """(blocks, labels) per split: every class's documents packed into blocks of their own
    (documents are in file order, so in class order), each class's stream capped alike."""
    splits, classes = [], [{"pattern": p} for p in spec.files]
    for name, stream, cap in (("train", train, spec.max_tokens), ("test", test, spec.max_test_tokens)):
        held = name == "test"
        counts = [sum(d.held_out == held and labels[d.source] == c for d in docs) for c in range(len(spec.files))]
        blocks = []
        for c, part in enumerate(class_streams(stream, facts["eot"], counts)):
            part = part[:cap] if cap is not None else part
            packed = pack(part, spec.block_size)
            if not len(packed):
                split = "training" if name == "train" else "held-out"
                raise _error(f"train.data.files.{c}: its {split} split has {len(part)} tokens ({counts[c]} "
                             f"documents), less than one block of {spec.block_size}; lower block_size or add text")
            blocks.append(packed)
            classes[c][name] = {"documents": counts[c], "tokens": len(part), "blocks": len(packed)}
        splits.append((torch.cat(blocks), torch.cat([torch.full((len(b),), c, dtype=torch.long)
                                                     for c, b in enumerate(blocks)])))
    info = {"files": facts.pop("files"), "classes": classes, "label_by": spec.label_by,
            "train": {"blocks": len(splits[0][1])}, "test": {"blocks": len(splits[1][1])},
            "tokenizer": spec.tokenizer, "vocab_size": spec.vocab, "block_size": spec.block_size, **facts}
    return splits[0], splits[1], info


def _rank_zero_first(build):
    """Under DDP, rank 0 trains and caches the tokenizer while the others wait, then they
    read its cache: every rank gets the same vocabulary."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    if dist.get_rank() != 0:
        dist.barrier()
    out = build()
    if dist.get_rank() == 0:
        dist.barrier()
    return out
