"""Initial sparse layouts: Erdos-Renyi-Kernel (ERK), Erdos-Renyi (ER) and uniform, as
exact per-layer counts.

ERK gives layer l a density proportional to ((sum of its weight's dims) / (product of its
dims)) ** power (RigL's `erk_power_scale`: 1 is ERK, 0 uniform); ER uses only the two
channel dims, (n_out + n_in) / (n_out * n_in), kernel dims left out (RigL's `erdos_renyi`,
which takes no power). Small layers stay denser. A layer the proportion would push above
density 1 is made dense and the factor is solved again for the others, until no layer
exceeds 1.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence


def erk_raw(shape: Sequence[int], power: float = 1.0) -> float:
    return (sum(shape) / math.prod(shape)) ** power


def er_raw(shape: Sequence[int]) -> float:
    """RigL's Erdos-Renyi proportion in torch's layout, (out, in, *kernel): the kernel dims do
    not count. A 1-d weight has no input dim: its one dim counts like ERK's."""
    if len(shape) < 2:
        return erk_raw(shape)
    n_out, n_in = shape[0], shape[1]
    return (n_out + n_in) / (n_out * n_in)


def proportional_densities(shapes: Sequence[Sequence[int]], density: float,
                           raw_of: Callable[[Sequence[int]], float]) -> list[float]:
    """Per-layer densities proportional to `raw_of(shape)`, capped at 1, whose
    element-weighted mean is `density` (in (0, 1])."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = [math.prod(s) for s in shapes]
    raw = [raw_of(s) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        weight = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        if weight == 0:  # every layer is dense
            return [1.0] * len(shapes)
        eps = budget / weight
        over = [i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        # Only the layer furthest above 1 is fixed per round: fixing it raises eps, which
        # may push others over, so the rest are decided by the next solve (RigL fixes every
        # tie of the maximum at once; a tie left out here stays above 1 and goes next).
        dense.add(max(over, key=lambda i: raw[i]))


def erk_densities(shapes: Sequence[Sequence[int]], density: float, power: float = 1.0) -> list[float]:
    """ERK: per-layer densities whose element-weighted mean is `density` (in (0, 1])."""
    return proportional_densities(shapes, density, lambda s: erk_raw(s, power))


def er_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    return proportional_densities(shapes, density, er_raw)


def uniform_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    return [float(density)] * len(shapes)


def allocate_counts(sizes: Sequence[int], densities: Sequence[float], total: int) -> list[int]:
    """Integer kept-counts per layer, each the floor or ceiling of size * density, summing
    to exactly `total` (largest remainder first; ties go to the earlier layer)."""
    ideal = [n * d for n, d in zip(sizes, densities)]
    counts = [min(n, math.floor(x)) for n, x in zip(sizes, ideal)]
    short = total - sum(counts)
    if not 0 <= short <= len(sizes) or total > sum(sizes):
        raise ValueError(f"cannot allocate {total} of {sum(sizes)} elements with densities {densities}")
    order = sorted((i for i in range(len(sizes)) if counts[i] < sizes[i]),
                   key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[:short]:
        counts[i] += 1
    if sum(counts) != total:  # fewer layers with room than units to place
        raise ValueError(f"cannot allocate {total} elements: layers are full")
    return counts


def layout_counts(shapes: Sequence[Sequence[int]], sparsity: float, distribution: str,
                  power: float = 1.0) -> list[int]:
    """How many weights each layer keeps at overall `sparsity`, exactly
    `N - round(sparsity * N)` in total (N = all elements). `power` is ERK's exponent."""
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes) - round(sparsity * sum(sizes))
    density = total / sum(sizes)
    if density == 0:
        return [0] * len(shapes)
    densities = {"erk": lambda: erk_densities(shapes, density, power), "er": lambda: er_densities(shapes, density),
                 "uniform": lambda: uniform_densities(shapes, density)}[distribution]()
    return allocate_counts(sizes, densities, total)
