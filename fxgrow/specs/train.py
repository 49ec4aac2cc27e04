"""The `train:` section of a spec (owned by the training loop).

Every field has a default, so `train: {}` is a valid (digits, SGD, cosine) run. Data
accepts a short string (`digits`, `fashion_mnist`, `synthetic`, `python: pkg.mod:fn`)
or a mapping with `name` and that dataset's options.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .base import StrictModel

# Seeds go to torch, numpy (below 2**32, plus the DDP rank) and scikit-learn.
Seed = Annotated[int, Field(ge=0, le=2 ** 31 - 1)]
MAX_IMAGE_SIZE = 4096
MAX_SYNTHETIC_VALUES = 1 << 30  # float32 values of both splits and the prototypes: 4 GiB


# --- data -------------------------------------------------------------------------

class _DataBase(StrictModel):
    # Random crop (zero padding) + horizontal flip, done on the device per batch.
    augment: Literal["none", "crop_flip"] = "none"
    crop_padding: int = Field(4, ge=0, le=256)


class _Resizable(_DataBase):
    image_size: int | None = Field(None, ge=1, le=MAX_IMAGE_SIZE, description="resize images to this square size")
    channels: Literal[1, 3] | None = Field(None, description="repeat grayscale to 3 channels")
    pad_to: int | None = Field(None, ge=1, le=MAX_IMAGE_SIZE, description="zero-pad images (after any resize) to this "
                                                         "square size, e.g. 28x28 Fashion-MNIST to 32x32")


class DigitsData(_Resizable):
    """scikit-learn's bundled 8x8 digits (1,797 images): no download, fixed split."""

    name: Literal["digits"] = "digits"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: Seed = 0


class SyntheticData(_DataBase):
    """Gaussian clusters around random class prototypes: learnable, any shape."""

    name: Literal["synthetic"] = "synthetic"
    shape: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [3, 32, 32], min_length=1)
    num_classes: int = Field(10, ge=2)
    train_size: int = Field(1024, ge=1)
    test_size: int = Field(256, ge=1)
    noise: float = Field(1.0, ge=0)
    data_seed: Seed = 0

    @model_validator(mode="after")
    def _fits(self):
        values = (self.train_size + self.test_size + self.num_classes) * math.prod(self.shape)
        if values > MAX_SYNTHETIC_VALUES:
            raise ValueError(f"{values:,} values ((train_size + test_size + num_classes) x shape) is more than "
                             f"{MAX_SYNTHETIC_VALUES:,}: make the data smaller")
        return self


class FashionMNISTData(_Resizable):
    """The full Fashion-MNIST (70,000 images). `root` holds the four idx gzip files
    (Debian's dataset-fashion-mnist layout), the same files uncompressed, or
    torchvision's `FashionMNIST/raw` tree."""

    name: Literal["fashion_mnist"] = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    train_size: int | None = Field(None, ge=10, le=60000, description="train on a class-balanced subset: "
                                   "the first train_size/10 images of each class, in file order (the test "
                                   "split stays whole)")


class CIFARData(_DataBase):
    """CIFAR-10/100 in the python pickle format (`cifar-10-batches-py/`,
    `cifar-100-python/`) under `root`, or `root` being that folder itself."""

    name: Literal["cifar10", "cifar100"]
    root: str


class ImageFolderData(_DataBase):
    """`root/<train>/<class>/*.png|jpg` and `root/<test>/<class>/...`."""

    name: Literal["imagefolder"] = "imagefolder"
    root: str
    train: str = "train"
    test: str = "val"
    image_size: int = Field(32, ge=1, le=MAX_IMAGE_SIZE)
    in_memory: bool | None = Field(None, description="decode all images once; default: when under 2 GiB")
    workers: int = Field(2, ge=0)


class PythonData(_DataBase):
    """`entry: module:function`; the function (called with `kwargs`) returns
    `(train, test)` torch datasets, or a dict with keys `train` and `test`."""

    name: Literal["python"] = "python"
    entry: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    workers: int = Field(2, ge=0)


BYTE_VOCAB = 257  # 256 byte values + <|endoftext|>


class TextData(StrictModel):
    """Local text files for language modelling, tokenized offline and packed into blocks.

    `files` are globs (`**` recursive, `~` expanded, relative to the working directory);
    each file is one document, or several when `separator` lines split it (fortunes: `%`).
    Documents are joined with an end-of-text token (one after every document) and cut into
    `block_size`-token blocks; the last partial block of each split is dropped. The
    held-out split is by document: a document is held out when a hash of (`split_seed`,
    its text) falls below `test_fraction` (so duplicates share a split and a document's
    split never depends on the other files). `tokenizer: byte` uses the UTF-8 bytes (ids
    0-255, end-of-text 256); `bpe` trains a byte-level BPE with the `tokenizers` library
    on the training documents, cached under $FXGROW_CACHE (nothing is downloaded)."""

    name: Literal["text"] = "text"
    files: list[str] = Field(min_length=1, description="glob patterns of the text files")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of paths to leave out, "
                               "e.g. '*.dat'")
    separator: str | None = Field(None, min_length=1, description="a line that separates documents inside "
                                  "a file (the line itself is dropped)")
    decode_errors: Literal["strict", "replace"] = Field("strict", description="bytes that are not UTF-8: "
                                                        "an error naming the file, or U+FFFD")
    tokenizer: Literal["byte", "bpe"] = "byte"
    vocab_size: int | None = Field(None, le=1 << 20, description="the model's vocabulary; default 257 for "
                                   "byte (may be larger), the BPE's target size (default 1024) for bpe")
    min_frequency: int = Field(2, ge=1, description="bpe: a pair merges when seen at least this often")
    block_size: int = Field(128, ge=2, description="tokens per training example")
    test_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 0
    max_tokens: int | None = Field(None, ge=2, description="keep the first max_tokens of the training "
                                   "stream (small CPU runs)")
    max_test_tokens: int | None = Field(None, ge=2, description="the same for the held-out stream")
    label_by: Literal["pattern"] | None = Field(
        None, description="sequence classification: `pattern` makes each pattern of `files` one class "
                          "(its index the label); each class is packed into blocks of its own, and "
                          "max_tokens / max_test_tokens cap every class's stream (equal caps, balanced classes)")

    @field_validator("files", "exclude", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("files", "exclude")
    @classmethod
    def _no_empty_pattern(cls, patterns: list[str]) -> list[str]:
        if any(not p.strip() for p in patterns):
            raise ValueError("empty pattern")
        return patterns

    @field_validator("vocab_size")
    @classmethod
    def _vocab_fits_bytes(cls, value: int | None) -> int | None:
        if value is not None and value < BYTE_VOCAB:
            raise ValueError(f"too small: a byte-level vocabulary needs at least {BYTE_VOCAB} "
                             "(256 byte values + <|endoftext|>)")
        return value

    @field_validator("max_tokens", "max_test_tokens")
    @classmethod
    def _holds_a_block(cls, value: int | None, info: ValidationInfo) -> int | None:
        block = info.data.get("block_size")
        if value is not None and block is not None and value < block:
            raise ValueError(f"less than block_size {block}: no block would remain")
        return value

    @property
    def vocab(self) -> int:
        """The vocabulary the model predicts over (token ids are below it)."""
        if self.vocab_size is not None:
            return self.vocab_size
        return BYTE_VOCAB if self.tokenizer == "byte" else 1024


DataSpec = Annotated[
    Union[DigitsData, SyntheticData, FashionMNISTData, CIFARData, ImageFolderData, PythonData, TextData],
    Field(discriminator="name"),
]


# --- optimization -----------------------------------------------------------------

class SGDSpec(StrictModel):
    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class AdamWSpec(StrictModel):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)


OptimizerSpec = Annotated[Union[SGDSpec, AdamWSpec], Field(discriminator="name")]


class ScheduleSpec(StrictModel):
    """Learning-rate factor per optimizer step: linear warm-up to 1, then `cosine`
    (reaching `min_factor` after the last step), `multistep` (times `gamma` at each
    milestone, in epochs) or `constant`."""

    name: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    min_factor: float = Field(0.0, ge=0, le=1)
    milestones: list[float] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.warmup_steps is not None and "warmup_epochs" in self.model_fields_set:
            raise ValueError("give warmup_epochs or warmup_steps, not both")
        if self.milestones and self.name != "multistep":
            raise ValueError(f"milestones only apply to multistep (schedule is {self.name!r})")
        if self.milestones != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ValueError("milestones must be positive and increasing")
        return self


# --- the section --------------------------------------------------------------------

class TrainSpec(StrictModel):
    data: DataSpec = Field(default_factory=DigitsData)
    epochs: int = Field(10, ge=1)
    steps: int | None = Field(None, ge=1, description="total optimizer steps; replaces epochs")
    batch_size: int = Field(128, ge=1, description="global batch (split across DDP ranks)")
    eval_batch_size: int | None = Field(None, ge=1)
    seed: Seed = 0
    optimizer: OptimizerSpec = Field(default_factory=SGDSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    objective: Literal["auto", "classification", "causal_lm"] = Field(
        "auto", description="auto: causal_lm for text data without labels, classification otherwise")
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm")

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA
    compile: bool = False
    channels_last: bool | Literal["auto"] = "auto"  # auto: on CUDA for models with Conv2d
    find_unused_parameters: bool = False  # DDP: set when sub-models skip parameters

    eval_every_epochs: int | None = Field(1, ge=1)
    eval_every_steps: int | None = Field(None, ge=1)
    log_every_steps: int = Field(50, ge=1)
    checkpoint: bool = True
    checkpoint_every_steps: int | None = Field(None, ge=1, description="default: every epoch end")
    progress: Literal["auto", "bar", "plain", "none"] = "auto"

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            name, sep, rest = value.partition(":")
            if sep and name.strip() == "python":
                return {"name": "python", "entry": rest.strip()}
            return {"name": value.strip()}
        return value

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_default_name(cls, value: Any) -> Any:
        if isinstance(value, dict) and "name" not in value:
            return {**value, "name": "sgd"}
        return value

    @field_validator("objective")
    @classmethod
    def _objective_fits_data(cls, value: str, info: ValidationInfo) -> str:
        data = info.data.get("data")
        if data is None:  # the data field failed: its own error says why
            return value
        if value == "classification" and isinstance(data, TextData) and data.label_by is None:
            raise ValueError("text data has no class labels (give train.data.label_by: pattern): its objective "
                             "is causal_lm")
        if value == "causal_lm" and isinstance(data, TextData) and data.label_by is not None:
            raise ValueError("labelled text (train.data.label_by) trains sequence classification, not causal_lm")
        if value == "causal_lm" and not isinstance(data, (TextData, PythonData)):
            raise ValueError(f"causal_lm needs token data (text, or python data yielding token ids), "
                             f"not {data.name}")
        return value

    @property
    def objective_name(self) -> str:
        """The objective this run trains with (`auto` resolved from the data)."""
        if self.objective != "auto":
            return self.objective
        return "causal_lm" if isinstance(self.data, TextData) and self.data.label_by is None else "classification"

    @model_validator(mode="after")
    def _epochs_or_steps(self):
        if self.steps is not None and "epochs" in self.model_fields_set:
            raise ValueError("give epochs or steps, not both")
        return self
