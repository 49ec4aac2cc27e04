"""How many weights each masked layer keeps at a target sparsity (pure; exact counts).

Global scope keeps N - round(s N) over all layers; layer scope keeps each layer's initial
share scaled to the target, or with GraNet_uniform's classifier rule the classifier at a
fixed density and every other layer at one common density.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..analysis.erk import allocate_counts, layout_counts
from ..errors import FxgrowError


def keep_total(sizes: Sequence[int], sparsity: float) -> int:
    """Global scope: N - round(s * N) weights stay active."""
    n = sum(sizes)
    return n - round(sparsity * n)


def keep_per_layer(shapes: Sequence[Sequence[int]], sparsity: float, initial_sparsity: float,
                   distribution: str, power: float = 1.0, classifier: int | None = None,
                   classifier_density: tuple[float, float] | None = None) -> list[int]:
    """Layer scope. Each layer keeps its initial share, scaled to the overall target:
    c_l - round(c_l * (s_t - s_i) / (1 - s_i)), c_l its initial kept count (with a dense
    start every layer at s_t: n_l - round(s_t * n_l)).

    `classifier_density = (from_sparsity, density)` with `classifier` its layer's index
    (GraNet_uniform, dense start): once s_t >= from_sparsity the classifier keeps
    round(density * n_fc) and the others share the rest of N - round(s_t N) at one density
    (largest remainder, earlier layer first). The authors' int() of floats loses a weight or
    two (209/629/209 of 210/630/210 at 79%); here the total is exact."""
    if classifier_density is not None and classifier is not None and sparsity >= classifier_density[0]:
        return classifier_counts(shapes, sparsity, classifier, classifier_density[1])
    initial = layout_counts(shapes, initial_sparsity, distribution, power)
    return [c - round(c * (sparsity - initial_sparsity) / (1 - initial_sparsity)) for c in initial]


def classifier_counts(shapes: Sequence[Sequence[int]], sparsity: float, classifier: int, density: float) -> list[int]:
    sizes = [math.prod(s) for s in shapes]
    total = keep_total(sizes, sparsity)
    fc = round(density * sizes[classifier])
    if total < fc:
        raise FxgrowError(f"classifier_density: at sparsity {sparsity:.4g} the model keeps {total} weights, fewer "
                          f"than the {fc} the classifier alone keeps at density {density}; lower final_sparsity "
                          "or classifier_density.density")
    others = [i for i in range(len(sizes)) if i != classifier]
    rest = sum(sizes[i] for i in others)
    if total - fc > rest:
        raise FxgrowError(f"classifier_density: at sparsity {sparsity:.4g} the classifier at density {density} "
                          "leaves the other layers more weights than they have; raise classifier_density.from_sparsity")
    counts = allocate_counts([sizes[i] for i in others], [(total - fc) / rest] * len(others), total - fc) \
        if others else []
    out = dict(zip(others, counts))
    out[classifier] = fc
    return [out[i] for i in range(len(sizes))]
