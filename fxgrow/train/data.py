"""Datasets by name, and the batches the loop trains on.

A dataset that fits in memory is held as two tensors on the training device (uint8
images stay uint8 there); each step indexes a batch out of them, so on a GPU loading
costs a gather, not a DataLoader. Larger ones (an image folder, a user's dataset) stream
through a DataLoader. Both draw batches from the same per-epoch permutation, seeded by
(seed, epoch), so a run resumed mid-epoch sees exactly the batches it would have seen.
Normalization and augmentation happen on the device, per batch, seeded by the step.
Integer inputs other than uint8 are token ids: they reach the model as int64, untouched.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import FxgrowError
from ..specs.train import (CIFARData, DataSpec, DigitsData, FashionMNISTData, ImageFolderData,
                           PythonData, SyntheticData, TextData)

FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
IN_MEMORY_LIMIT = 2 << 30  # bytes


class DataError(FxgrowError):
    """A dataset could not be found or read."""


@dataclass
class Data:
    """Train and test splits plus how to turn a raw batch into model input.

    A split is either `(x, y)` tensors (in memory) or a torch `Dataset` (streamed)."""

    train: tuple[torch.Tensor, torch.Tensor] | Dataset
    test: tuple[torch.Tensor, torch.Tensor] | Dataset
    num_classes: int
    mean: torch.Tensor | None = None   # per channel, applied after scaling
    std: torch.Tensor | None = None
    augment: str = "none"
    crop_padding: int = 4
    workers: int = 0
    channels: int | None = None  # grayscale stored once, repeated to this many channels per batch
    info: dict | None = None  # what a source read (text: files, documents, tokens), for report.json

    def to(self, device: torch.device) -> "Data":
        def move(split):  # token blocks are their own targets: one copy on the device
            if not isinstance(split, tuple):
                return split
            moved = {id(t): t.to(device) for t in split}
            return tuple(moved[id(t)] for t in split)
        self.train, self.test = move(self.train), move(self.test)
        if self.mean is not None:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def example(self) -> torch.Tensor:
        """One prepared input (batch of 1), for FLOP counting."""
        x = self.train[0][:1] if isinstance(self.train, tuple) else self.train[0][0].unsqueeze(0)
        return self.prepare(x)

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)
                ) -> torch.Tensor:
        """Raw batch -> model input: token ids as int64; images scaled (uint8 to [0, 1]),
        normalized and augmented. `shard` (rank, world): x is that part of the global batch
        (see `crop_flip`)."""
        if is_token_ids(x):
            if generator is not None and self.augment != "none":
                raise DataError(f"train.data.augment: {self.augment} works on images; these inputs are "
                                f"integer token ids ({x.dtype})")
            return x.long()
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        if self.channels is not None and x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, *x.shape[2:])
        if self.mean is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - self.mean.view(shape)) / self.std.view(shape)
        if generator is not None and self.augment == "crop_flip":
            x = crop_flip(x, self.crop_padding, generator, shard)
        return x


def is_token_ids(x: torch.Tensor) -> bool:
    """Integer inputs are token ids, except uint8 (images)."""
    return not x.is_floating_point() and not x.is_complex() and x.dtype not in (torch.uint8, torch.bool)


def crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
              ) -> torch.Tensor:
    """Random crop after zero padding, then a random horizontal flip, per sample; one
    gather on x's device. The draws are made for the whole global batch and this rank
    takes its shard's, so a DDP run augments exactly as a single process would."""
    b, c, h, w = x.shape
    dev = x.device
    rank, world = shard
    mine = slice(rank * b, (rank + 1) * b)
    if padding:
        x = F.pad(x, (padding,) * 4)
        oy = torch.randint(0, 2 * padding + 1, (b * world, 1), device=dev, generator=generator)[mine]
        ox = torch.randint(0, 2 * padding + 1, (b * world, 1), device=dev, generator=generator)[mine]
        rows = oy + torch.arange(h, device=dev)
        cols = ox + torch.arange(w, device=dev)
        x = x[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(b * world, device=dev, generator=generator)[mine] < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


# --- batches ------------------------------------------------------------------------

def stable_seed(*parts: object) -> int:
    """A 63-bit seed from several values (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(seed, epoch)))


def step_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(stable_seed(seed, step, 1))


def _length(split) -> int:
    return len(split[1]) if isinstance(split, tuple) else len(split)


class Batches:
    """Batches of one split for this rank: training batches follow the per-epoch
    permutation (the global batch is cut into equal rank shards, the incomplete last one
    dropped); evaluation batches walk the split in order, ranks taking contiguous parts."""

    def __init__(self, data: Data, split: str, batch_size: int, device: torch.device,
                 rank: int = 0, world: int = 1, seed: int = 0):
        self.data, self.split, self.device = data, getattr(data, split), device
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.n = _length(self.split)
        if split == "train" and batch_size % world:
            raise FxgrowError(f"batch_size {batch_size} is not divisible by the {world} DDP processes")
        if split == "train" and self.n < batch_size:
            raise FxgrowError(f"batch_size {batch_size} exceeds the {self.n} training examples")

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Raw (inputs, targets) on the device for training batches start.. of `epoch`."""
        perm = epoch_permutation(self.n, self.seed, epoch)
        shard = self.batch_size // self.world
        if isinstance(self.split, tuple):
            perm = perm.to(self.split[1].device)  # one copy an epoch; each batch is a view of it
        return self._load(perm[b * self.batch_size + self.rank * shard:][:shard]
                          for b in range(start, self.steps_per_epoch))

    def sequential(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_rank = -(-self.n // self.world)
        lo, hi = self.rank * per_rank, min(self.n, (self.rank + 1) * per_rank)
        return self._load(slice(i, min(i + self.batch_size, hi)) for i in range(lo, hi, self.batch_size))

    def _load(self, index: Iterator[torch.Tensor | slice]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.split, tuple):
            x, y = self.split
            return ((x[i], y[i]) for i in index)
        batches = [list(range(len(self.split))[i]) if isinstance(i, slice) else i.tolist() for i in index]
        loader = DataLoader(self.split, batch_sampler=batches, num_workers=self.data.workers,
                            pin_memory=self.device.type == "cuda")
        return ((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in loader)


# --- datasets by name -----------------------------------------------------------------

def load_data(spec: DataSpec) -> Data:
    """Read the dataset a spec names (on CPU; `Data.to(device)` moves in-memory splits)."""
    loader = {DigitsData: _digits, SyntheticData: _synthetic, FashionMNISTData: _fashion_mnist,
              CIFARData: _cifar, ImageFolderData: _imagefolder, PythonData: _python, TextData: _text}[type(spec)]
    data = loader(spec)
    data.augment, data.crop_padding = getattr(spec, "augment", "none"), getattr(spec, "crop_padding", 0)
    return data


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a (N, C, ...) split, as the model sees it (uint8
    scaled to [0, 1]). uint8 goes through a 256-bin histogram: exact and fast."""
    if x.dtype == torch.uint8:
        levels = torch.arange(256, dtype=torch.float64) / 255
        counts = torch.stack([torch.bincount(x[:, c].flatten(), minlength=256) for c in range(x.shape[1])]).double()
        total, total_sq, count = counts @ levels, counts @ levels.square(), counts.sum(1)
    else:
        dims = [0] + list(range(2, x.dim()))
        total = sum(chunk.double().sum(dims) for chunk in x.split(4096))
        total_sq = sum(chunk.double().square().sum(dims) for chunk in x.split(4096))
        count = x.numel() // x.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def _in_memory(train: tuple, test: tuple, num_classes: int, channels: int | None = None) -> Data:
    mean, std = _channel_stats(train[0])
    if channels is not None:
        mean, std = mean.expand(channels).contiguous(), std.expand(channels).contiguous()
    return Data(train, test, num_classes, mean, std, channels=channels)


def _resize(x: torch.Tensor, image_size: int | None) -> torch.Tensor:
    if image_size is None or tuple(x.shape[-2:]) == (image_size, image_size):
        return x
    out = torch.cat([F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear",
                                   align_corners=False, antialias=image_size < x.shape[-1])
                     for chunk in x.split(8192)])
    return out.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else out


def _pad(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Zero-pad H and W to `size` (the extra row/column, if odd, goes bottom/right)."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    if size < max(h, w):
        raise DataError(f"train.data.pad_to: {size} is smaller than the {h}x{w} images")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(spec: DigitsData | FashionMNISTData, images: int, side: int, bytes_per_value: int) -> None:
    """Refuse, before allocating, a resized/padded dataset larger than this machine's memory."""
    size = max(spec.image_size or side, spec.pad_to or 0)
    need = images * size * size * bytes_per_value
    have = _physical_memory()
    if have is not None and need > have:
        field = "pad_to" if spec.pad_to and spec.pad_to >= (spec.image_size or side) else "image_size"
        raise DataError(f"train.data.{field}: {images:,} {spec.name} images at {size}x{size} take "
                        f"{need / 1e9:.1f} GB in memory; this machine has {have / 1e9:.1f} GB")


def _digits(spec: DigitsData) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_fits_in_memory(spec, 1797, 8, 4)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=spec.test_fraction,
                              random_state=spec.split_seed, stratify=y.numpy())
    x = _pad(_resize(x, spec.image_size), spec.pad_to)
    return _in_memory((x[tr], y[tr]), (x[te], y[te]), 10, spec.channels)


def _synthetic(spec: SyntheticData) -> Data:
    g = torch.Generator().manual_seed(spec.data_seed)
    prototypes = torch.randn(spec.num_classes, *spec.shape, generator=g)

    def split(n):
        y = torch.randint(0, spec.num_classes, (n,), generator=g)
        return prototypes[y] + spec.noise * torch.randn(n, *spec.shape, generator=g), y

    return Data(split(spec.train_size), split(spec.test_size), spec.num_classes)


def _fashion_mnist(spec: FashionMNISTData) -> Data:
    from torchvision.datasets import FashionMNIST

    check_fits_in_memory(spec, (spec.train_size or 60000) + 10000, 28, 1)
    root = _fashion_mnist_root(Path(spec.root))
    splits = []
    for train in (True, False):
        ds = FashionMNIST(root, train=train)
        x, y = ds.data.unsqueeze(1), ds.targets.long()
        if train and spec.train_size is not None:
            keep = balanced_subset(y, spec.train_size)
            x, y = x[keep], y[keep]
        splits.append((_pad(_resize(x, spec.image_size), spec.pad_to), y))
    return _in_memory(splits[0], splits[1], 10, spec.channels)


def balanced_subset(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Indices (sorted, file order) of the first `size / classes` items of each class; the
    first `size % classes` classes take one more. Deterministic: no seed to keep track of."""
    classes = int(labels.max()) + 1
    share, extra = divmod(size, classes)
    keep = [(labels == c).nonzero().flatten()[: share + (c < extra)] for c in range(classes)]
    return torch.cat(keep).sort().values


def _fashion_mnist_root(root: Path) -> Path:
    """A root in torchvision's layout (`<root>/FashionMNIST/raw/<idx files>`). Debian's
    package ships the idx files gzip'd in one flat folder, and torchvision reads only
    uncompressed ones in its own layout: a flat folder is linked, or uncompressed once,
    into a cache folder in that layout."""
    from torchvision.datasets import FashionMNIST

    names = [Path(file).stem for file, _ in FashionMNIST.resources]  # train-images-idx3-ubyte, ...
    if all((root / "FashionMNIST" / "raw" / n).is_file() for n in names):
        return root
    cached = cache_dir() / "fashion_mnist" / str(stable_seed(str(root.resolve())))
    raw = cached / "FashionMNIST" / "raw"
    if all((root / n).is_file() for n in names):
        raw.mkdir(parents=True, exist_ok=True)
        for n in names:
            if not (raw / n).is_file():
                (raw / n).unlink(missing_ok=True)  # a link left dangling by a moved source
                (raw / n).symlink_to((root / n).resolve())
        return cached
    if all((root / f"{n}.gz").is_file() for n in names):
        raw.mkdir(parents=True, exist_ok=True)
        for n in names:
            if not (raw / n).is_file():
                tmp = raw / f".{n}.{os.getpid()}.tmp"  # concurrent runs each write their own, then rename
                with gzip.open(root / f"{n}.gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, raw / n)
        return cached
    raise DataError(f"fashion_mnist: no Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) under {root}. "
                    f"Install Debian's copy with `{FASHION_MNIST_INSTALL}` or set data.root to a folder holding them.")


def cache_dir() -> Path:
    return Path(os.environ.get("FXGROW_CACHE", Path.home() / ".cache" / "fxgrow"))


def _cifar(spec: CIFARData) -> Data:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = {"cifar10": CIFAR10, "cifar100": CIFAR100}[spec.name]

    # torchvision checks the md5 of the official files; a local copy may be a re-packed
    # subset, so only require that the files exist (check_integrity with md5=None).
    class Local(base):
        train_list = [[f, None] for f, _ in base.train_list]
        test_list = [[f, None] for f, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    root = Path(spec.root)
    if root.name == base.base_folder:
        root = root.parent
    if not (root / base.base_folder).is_dir():
        raise DataError(f"{spec.name}: no {base.base_folder}/ under {spec.root}; download the python version "
                        f"from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there")
    splits = []
    for train in (True, False):
        try:
            ds = Local(root, train=train)
        except RuntimeError as e:
            raise DataError(f"{spec.name}: {root / base.base_folder}: {e}") from None
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append((x, torch.tensor(ds.targets, dtype=torch.int64)))
    return _in_memory(splits[0], splits[1], len(ds.classes))


def _imagefolder(spec: ImageFolderData) -> Data:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    tf = transforms.Compose([transforms.Resize(spec.image_size), transforms.CenterCrop(spec.image_size),
                             transforms.PILToTensor()])
    paths = [Path(spec.root) / sub for sub in (spec.train, spec.test)]
    for path in paths:
        if not path.is_dir():
            raise DataError(f"imagefolder: no folder {path} (expected {spec.root}/{{{spec.train},{spec.test}}}/<class>/<image>)")
    try:  # ImageFolder's loader converts to RGB
        train, test = (ImageFolder(str(path), transform=tf) for path in paths)
    except FileNotFoundError as e:
        raise DataError(f"imagefolder: {e}") from None
    if train.classes != test.classes:
        raise DataError(f"imagefolder: {spec.train} and {spec.test} have different classes")
    nbytes = (len(train) + len(test)) * 3 * spec.image_size ** 2
    if spec.in_memory or (spec.in_memory is None and nbytes <= IN_MEMORY_LIMIT):
        data = _in_memory(_decode_all(train, spec.workers), _decode_all(test, spec.workers), len(train.classes))
    else:
        sample = torch.stack([train[int(i)][0] for i in epoch_permutation(len(train), 0, 0)[:512]])
        mean, std = _channel_stats(sample)
        data = Data(train, test, len(train.classes), mean, std, workers=spec.workers)
    return data


def _decode_all(ds: Dataset, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*DataLoader(ds, batch_size=256, num_workers=workers))
    return torch.cat(xs), torch.cat(ys)


def _python(spec: PythonData) -> Data:
    module, _, attr = spec.entry.partition(":")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as e:
        raise DataError(f"python data {spec.entry!r}: {e}") from None
    out = fn(**spec.kwargs)
    train, test = (out["train"], out["test"]) if isinstance(out, dict) else out
    as_split = lambda ds: tuple(ds.tensors[:2]) if isinstance(ds, TensorDataset) else ds  # noqa: E731
    train, test = as_split(train), as_split(test)
    if isinstance(out, dict) and "num_classes" in out:
        num_classes = int(out["num_classes"])
    elif isinstance(train, tuple):
        num_classes = int(train[1].max()) + 1
    else:
        num_classes = len(getattr(train, "classes", ())) or 0
    return Data(train, test, num_classes, workers=spec.workers)


def _text(spec: TextData) -> Data:
    from .text import text_splits

    train, test, info = text_splits(spec)
    if spec.label_by is not None:  # (blocks, labels): sequence classification
        return Data(train, test, len(spec.files), info=info)
    return Data((train, train), (test, test), spec.vocab, info=info)
