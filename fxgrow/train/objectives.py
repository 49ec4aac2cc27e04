"""What the loop minimizes and measures, chosen by `train.objective`.

An objective turns (model output, targets) into the loss to back-propagate and the
device-side sums `[summed loss, correct, counted]` every metric comes from: the loop
adds sums over micro-steps, logging intervals, evaluation batches and DDP ranks, and
only then divides. So a test loss is the summed loss over every counted target of the
split divided by their number, and perplexity is exp of that mean token loss (not an
average of per-batch perplexities).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import FxgrowError

IGNORE_INDEX = -100  # targets with this value count for nothing (Hugging Face's convention)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or a Hugging Face style output's
    `.logits` (attribute or key)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise FxgrowError(f"the model returned {type(output).__name__}; the loop needs a logits tensor "
                          "(or an output with .logits)")
    return logits


class Objective:
    name = "objective"

    def __init__(self, num_classes: int = 0):
        self.num_classes = num_classes  # what the data's targets range over (0: unknown)
        self._checked = False

    def train_terms(self, output: Any, targets: torch.Tensor, label_smoothing: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss to back-propagate, detached float64 sums [loss, correct, counted])."""
        raise NotImplementedError

    def eval_sums(self, output: Any, targets: torch.Tensor) -> torch.Tensor:
        """float64 [summed loss, correct, counted] of one evaluation batch (no smoothing)."""
        raise NotImplementedError

    def metrics(self, sums: list[float]) -> dict[str, float]:
        loss, correct, count = sums
        if not count:
            return {"loss": math.nan, "accuracy": math.nan}
        return {"loss": loss / count, "accuracy": correct / count}

    def _check_width(self, logits: torch.Tensor) -> None:
        if not self._checked:
            problem = self.width_problem(logits.shape[-1])
            if problem:
                raise FxgrowError(f"the model {problem}")
        self._checked = True

    def width_problem(self, width: int, data_name: str = "") -> str | None:
        """Why `width` logits cannot cover the data's classes, or None."""
        if not self.num_classes or width >= self.num_classes:
            return None
        return (f"predicts {width} classes but the data has {self._data_classes(data_name)}: {width} logits "
                f"per {self.unit}; make the model's output at least that wide")

    def _data_classes(self, data_name: str) -> str:
        return f"{self.num_classes} classes" + (f" ({data_name})" if data_name else "")

    output_form = "(batch, classes)"  # what the model must return, in words
    unit = "example"

    def output_problem(self, logits: torch.Tensor, input_shape: list[int]) -> str | None:
        """Why logits of this shape cannot serve inputs of `input_shape`, or None."""
        if logits.dim() != 2 or logits.shape[0] != input_shape[0]:
            return f"the training loop needs {self.output_form} logits, one row per example"
        return None


class Classification(Objective):
    """Cross-entropy of one label per example (images, or sequences of token ids)."""

    name = "classification"

    def train_terms(self, output, targets, label_smoothing=0.0):
        logits = logits_of(output)
        self._check_width(logits)
        loss = F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)
        n = len(targets)
        with torch.no_grad():
            sums = torch.stack([loss.detach().double() * n, (logits.argmax(-1) == targets).sum().double(),
                                _count(n, loss.device)])
        return loss, sums

    def eval_sums(self, output, targets):
        logits = logits_of(output).float()
        return torch.stack([F.cross_entropy(logits, targets.long(), reduction="sum").double(),
                            (logits.argmax(-1) == targets).sum().double(),
                            _count(len(targets), logits.device)])


class CausalLM(Objective):
    """Next-token cross-entropy. Targets are the input ids themselves ([batch, tokens],
    `IGNORE_INDEX` where nothing is to be predicted, e.g. padding); position t's logits
    predict target t + 1, so the shift happens here, as in Hugging Face's `labels=` loss.
    The loss is the mean over counted (not ignored) target tokens; `accuracy` is next-token
    top-1 accuracy over the same tokens; `perplexity` = exp(mean token loss)."""

    name = "causal_lm"

    def _data_classes(self, data_name):
        return f"{self.num_classes} (train.data.vocab_size)"
    output_form = "(batch, tokens, vocab)"
    unit = "token"

    def output_problem(self, logits, input_shape):
        if logits.dim() != 3 or list(logits.shape[:2]) != list(input_shape[:2]):
            return f"causal_lm needs {self.output_form} logits, one row per input token"
        return None

    def _shifted(self, output, targets):
        logits = logits_of(output)
        if logits.dim() != 3 or targets.dim() != 2 or logits.shape[:2] != targets.shape:
            raise FxgrowError(f"causal_lm needs logits [batch, tokens, vocab] for targets [batch, tokens]; got "
                              f"logits {list(logits.shape)} for targets {list(targets.shape)}")
        self._check_width(logits)
        return logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten().long()

    def _sums(self, logits, target, loss_sum):
        counted = target != IGNORE_INDEX
        with torch.no_grad():
            correct = ((logits.argmax(-1) == target) & counted).sum().double()
            return torch.stack([loss_sum.detach().double(), correct, counted.sum().double()])

    def train_terms(self, output, targets, label_smoothing=0.0):
        logits, target = self._shifted(output, targets)
        loss_sum = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum",
                                   label_smoothing=label_smoothing)
        sums = self._sums(logits, target, loss_sum)
        return loss_sum / sums[2].clamp_min(1).to(loss_sum.dtype), sums

    def eval_sums(self, output, targets):
        logits, target = self._shifted(output, targets)
        return self._sums(logits, target, F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                                                          reduction="sum"))

    def metrics(self, sums):
        out = super().metrics(sums)
        out["perplexity"] = perplexity(out["loss"])
        return out


def _count(n: int, device: torch.device) -> torch.Tensor:
    return torch.full((), float(n), dtype=torch.float64, device=device)  # a fill, not a host-to-device copy


def perplexity(mean_token_loss: float) -> float:
    """exp of a mean token loss (in nats); inf past float range, NaN stays NaN."""
    if math.isnan(mean_token_loss):
        return mean_token_loss
    return math.exp(mean_token_loss) if mean_token_loss < 709 else math.inf


OBJECTIVES = {cls.name: cls for cls in (Classification, CausalLM)}


def build_objective(name: str, num_classes: int = 0) -> Objective:
    return OBJECTIVES[name](num_classes)
