"""Datasets by name (written fixtures in the real on-disk formats, the installed
Fashion-MNIST), batch order and sharding, on-device augmentation."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from fxgrow.specs.train import TrainSpec
from fxgrow.train.data import FASHION_MNIST_INSTALL, Batches, Data, DataError, balanced_subset, crop_flip, load_data

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def data_spec(**kwargs):
    return TrainSpec(data=kwargs).data


# --- digits and synthetic ---------------------------------------------------------------

def test_digits_split_is_fixed_stratified_and_normalized():
    a, b = load_data(data_spec(name="digits")), load_data(data_spec(name="digits"))
    (xtr, ytr), (xte, yte) = a.train, a.test
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert torch.equal(xtr, b.train[0]) and torch.equal(yte, b.test[1])
    assert torch.bincount(yte).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]  # stratified
    prepared = a.prepare(xtr)
    assert prepared.mean().abs() < 1e-5 and (prepared.std() - 1).abs() < 1e-3


def test_digits_resized_to_32_rgb():
    data = load_data(data_spec(name="digits", image_size=32, channels=3))
    assert data.train[0].shape == (1437, 1, 32, 32)  # stored once, repeated per batch
    x = data.prepare(data.train[0][:5])
    assert x.shape == (5, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    assert data.mean.shape == (3,) and data.example().shape == (1, 3, 32, 32)


def test_digits_zero_padded_to_12():
    plain = load_data(data_spec(name="digits"))
    padded = load_data(data_spec(name="digits", pad_to=12))
    x = padded.train[0]
    assert x.shape == (1437, 1, 12, 12)
    assert torch.equal(x[..., 2:10, 2:10], plain.train[0])  # centred, the border all zeros
    assert x[..., :2, :].abs().sum() == 0 and x[..., :, 10:].abs().sum() == 0
    with pytest.raises(DataError, match="pad_to: 6 is smaller than the 8x8 images"):
        load_data(data_spec(name="digits", pad_to=6))


def test_synthetic_is_deterministic_and_shaped():
    spec = data_spec(name="synthetic", shape=[2, 5], num_classes=3, train_size=20, test_size=7)
    a, b = load_data(spec), load_data(spec)
    assert a.train[0].shape == (20, 2, 5) and a.test[1].shape == (7,)
    assert torch.equal(a.train[0], b.train[0]) and set(a.train[1].tolist()) <= {0, 1, 2}


def test_string_shorthands():
    assert TrainSpec(data="synthetic").data.name == "synthetic"
    python = TrainSpec(data="python: tests.test_data:tensor_splits").data
    assert python.name == "python" and python.entry == "tests.test_data:tensor_splits"


def tensor_splits(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.arange(n) % 3), \
        TensorDataset(torch.randn(5, 4, generator=g), torch.arange(5) % 3)


def test_python_entry_returns_datasets():
    data = load_data(data_spec(name="python", entry="tests.test_data:tensor_splits", kwargs={"n": 9}))
    assert data.train[0].shape == (9, 4) and data.num_classes == 3 and data.mean is None


def test_python_entry_error_names_it():
    with pytest.raises(DataError, match="no_such_function"):
        load_data(data_spec(name="python", entry="tests.test_data:no_such_function"))


# --- CIFAR and image folders, from files in the real formats ------------------------------------

def write_cifar(root: Path, name: str, per_file: int = 6) -> dict[str, np.ndarray]:
    """The python-pickle CIFAR layout: uint8 rows of 3072 (RGB planes), int labels."""
    rng = np.random.default_rng(0)
    folder, files, key, meta, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels",
                    ("batches.meta", "label_names"), 10),
        "cifar100": ("cifar-100-python", ["train", "test"], "fine_labels", ("meta", "fine_label_names"), 100),
    }[name]
    (root / folder).mkdir(parents=True)
    written = {}
    for f in files:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        entry = {"data": data, key: rng.integers(0, classes, per_file).tolist()}
        if name == "cifar100":
            entry["coarse_labels"] = [0] * per_file
        (root / folder / f).write_bytes(pickle.dumps(entry, protocol=2))
        written[f] = entry
    (root / folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"c{i}" for i in range(classes)]}))
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    written = write_cifar(tmp_path, name)
    data = load_data(data_spec(name=name, root=str(tmp_path)))
    (xtr, ytr), (xte, yte) = data.train, data.test
    train_files = [f for f in written if "test" not in f]
    assert xtr.dtype == torch.uint8 and xtr.shape == (6 * len(train_files), 3, 32, 32)
    first = written[train_files[0]]
    assert torch.equal(xtr[1], torch.from_numpy(first["data"][1].reshape(3, 32, 32)))
    key = "labels" if name == "cifar10" else "fine_labels"
    assert ytr[:6].tolist() == first[key]
    test_file = "test_batch" if name == "cifar10" else "test"
    assert torch.equal(xte[-1], torch.from_numpy(written[test_file]["data"][-1].reshape(3, 32, 32)))
    assert data.num_classes == (10 if name == "cifar10" else 100)
    # root may also name the batches folder itself
    inner = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    assert torch.equal(load_data(data_spec(name=name, root=str(inner))).train[0], xtr)


def test_cifar_missing_folder_says_where(tmp_path):
    with pytest.raises(DataError, match="no cifar-10-batches-py/ under"):
        load_data(data_spec(name="cifar10", root=str(tmp_path)))


COLORS = {"cat": (200, 10, 10), "dog": (10, 10, 200)}


def write_imagefolder(root: Path, per_class: int = 3) -> None:
    for split in ("train", "val"):
        for cls, color in COLORS.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 10 + i), color).save(root / split / cls / f"{i}.png")


def test_imagefolder_in_memory(tmp_path):
    write_imagefolder(tmp_path)
    data = load_data(data_spec(name="imagefolder", root=str(tmp_path), image_size=8, workers=0))
    (x, y), (xt, yt) = data.train, data.test
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.uint8 and yt.tolist() == [0, 0, 0, 1, 1, 1]
    for i, cls in enumerate(["cat", "cat", "cat", "dog", "dog", "dog"]):
        assert x[i].flatten(1).unique(dim=1).T.tolist() == [list(COLORS[cls])]


def test_imagefolder_streamed_matches_in_memory(tmp_path):
    write_imagefolder(tmp_path, per_class=4)
    kw = dict(name="imagefolder", root=str(tmp_path), image_size=8, workers=0)
    memory, stream = load_data(data_spec(**kw)), load_data(data_spec(**kw, in_memory=False))
    assert isinstance(stream.train, torch.utils.data.Dataset)
    a = list(Batches(memory, "train", 4, torch.device("cpu"), seed=3).epoch(1))
    b = list(Batches(stream, "train", 4, torch.device("cpu"), seed=3).epoch(1))
    assert len(a) == len(b) == 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_imagefolder_missing_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no folder .*val"):
        load_data(data_spec(name="imagefolder", root=str(tmp_path)))


# --- Fashion-MNIST ---------------------------------------------------------------------------------

@pytest.mark.skipif(not FASHION_ROOT.is_dir(),
                    reason=f"Fashion-MNIST is not installed at {FASHION_ROOT} ({FASHION_MNIST_INSTALL})")
def test_fashion_mnist_from_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FXGROW_CACHE", str(tmp_path))
    data = load_data(data_spec(name="fashion_mnist"))
    (x, y), (xt, yt) = data.train, data.test
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    with gzip.open(FASHION_ROOT / "t10k-labels-idx1-ubyte.gz") as f:  # read the labels independently
        magic, n = struct.unpack(">II", f.read(8))
        assert (magic, n) == (2049, 10000)
        assert yt.tolist() == list(f.read())
    with gzip.open(FASHION_ROOT / "train-images-idx3-ubyte.gz") as f:
        f.read(16)
        assert x[0, 0].flatten().tolist() == list(f.read(784))
    assert torch.bincount(y).tolist() == [6000] * 10
    # the uncompressed cache is reused; torchvision's own layout is accepted as a root
    cached = next(tmp_path.glob("fashion_mnist/*"))
    again = load_data(data_spec(name="fashion_mnist", root=str(cached), channels=3))
    assert torch.equal(again.train[0], x) and again.prepare(x[:2]).shape == (2, 3, 28, 28)
    # a class-balanced subset: the first images of each class in file order, the test split whole
    subset = load_data(data_spec(name="fashion_mnist", root=str(cached), train_size=1003))
    (xs, ys), (xst, _) = subset.train, subset.test
    assert torch.bincount(ys).tolist() == [101, 101, 101] + [100] * 7 and xst.shape[0] == 10000
    first = torch.cat([(y == c).nonzero().flatten()[: 100 + (c < 3)] for c in range(10)]).sort().values
    assert torch.equal(xs, x[first]) and torch.equal(ys, y[first])


def test_balanced_subset_by_hand():
    labels = torch.tensor([2, 0, 0, 1, 2, 1, 0, 2])
    assert balanced_subset(labels, 4).tolist() == [0, 1, 2, 3]  # 0: two, 1 and 2: one each
    assert balanced_subset(labels, 6).tolist() == [0, 1, 2, 3, 4, 5]


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FXGROW_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="apt-get update && apt-get install -y dataset-fashion-mnist"):
        load_data(data_spec(name="fashion_mnist", root=str(tmp_path)))


# --- batches ---------------------------------------------------------------------------------------

def tiny(n=10) -> Data:
    return Data((torch.arange(n).float()[:, None], torch.arange(n)), (torch.arange(5).float()[:, None],
                                                                     torch.arange(5)), n)


def test_epoch_batches_permute_and_drop_the_incomplete_last():
    batches = Batches(tiny(10), "train", 4, torch.device("cpu"), seed=7)
    assert batches.steps_per_epoch == 2
    epoch0 = torch.cat([y for _, y in batches.epoch(0)])
    assert len(epoch0) == 8 and len(set(epoch0.tolist())) == 8
    assert not torch.equal(epoch0, torch.cat([y for _, y in batches.epoch(1)]))
    assert torch.equal(epoch0, torch.cat([y for _, y in batches.epoch(0)]))  # same seed, same order
    assert torch.equal(epoch0[4:], torch.cat([y for _, y in batches.epoch(0, start=1)]))  # resume mid-epoch


def test_rank_shards_partition_the_global_batch():
    data = tiny(12)
    single = [y for _, y in Batches(data, "train", 6, torch.device("cpu"), seed=1).epoch(2)]
    shards = [[y for _, y in Batches(data, "train", 6, torch.device("cpu"), rank=r, world=3, seed=1).epoch(2)]
              for r in range(3)]
    for step, global_batch in enumerate(single):
        assert torch.equal(torch.cat([shards[r][step] for r in range(3)]), global_batch)
    evaluated = [torch.cat([y for _, y in Batches(data, "test", 2, torch.device("cpu"), rank=r, world=2)
                            .sequential()]) for r in range(2)]
    assert torch.cat(evaluated).tolist() == list(range(5))


def test_batch_size_checks():
    with pytest.raises(Exception, match="not divisible"):
        Batches(tiny(), "train", 5, torch.device("cpu"), world=2)
    with pytest.raises(Exception, match="exceeds the 10 training examples"):
        Batches(tiny(), "train", 11, torch.device("cpu"))


# --- augmentation ----------------------------------------------------------------------------------

def test_crop_flip_outputs_are_padded_crops_or_their_mirrors():
    x = torch.arange(2 * 2 * 5 * 5, dtype=torch.float32).view(2, 2, 5, 5) + 1
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    out = crop_flip(x, 1, torch.Generator().manual_seed(0))
    for b in range(2):
        candidates = [c for oy in range(3) for ox in range(3)
                      for c in (padded[b, :, oy:oy + 5, ox:ox + 5], padded[b, :, oy:oy + 5, ox:ox + 5].flip(2))]
        assert any(torch.equal(out[b], c) for c in candidates)
    seen = {tuple(crop_flip(x, 1, torch.Generator().manual_seed(s))[0, 0, 2].tolist()) for s in range(40)}
    assert len(seen) > 4  # offsets and flips actually vary


def test_crop_flip_shard_equals_slice_of_global_batch():
    x = torch.randn(8, 3, 6, 6)
    whole = crop_flip(x, 2, torch.Generator().manual_seed(5))
    for rank in range(2):
        part = crop_flip(x[rank * 4:(rank + 1) * 4], 2, torch.Generator().manual_seed(5), shard=(rank, 2))
        assert torch.equal(part, whole[rank * 4:(rank + 1) * 4])


def test_a_resized_dataset_larger_than_memory_is_refused_before_allocating(monkeypatch):
    from fxgrow.train import data as data_module
    monkeypatch.setattr(data_module, "_physical_memory", lambda: 8 << 30)
    with pytest.raises(DataError, match=r"train.data.image_size: 1,797 digits images at 4096x4096 take 120.6 GB"):
        load_data(data_spec(name="digits", image_size=4096))
    with pytest.raises(DataError, match=r"train.data.pad_to: 70,000 fashion_mnist images at 4000x4000"):
        load_data(data_spec(name="fashion_mnist", pad_to=4000, root="/nonexistent"))
