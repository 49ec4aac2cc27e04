"""Template mixing (MixtureGrowth): a layer's weight is a linear mix of templates.

`TemplateBank` holds the templates one or more layers share; the weight chain starts at
`get_attr(<bank>.templates)` and `MixProducer` (rank 0) turns them into the weight.

Before growth a bank holds K templates of the weight's shape and the producer holds K
coefficients: `W = sum_k alpha[k] * T[k]`.

After growth by g the bank holds `sets` template sets of K (one per source network,
still of the small shape) and the weight is a grid of blocks, block (r, c) covering
output band r and input band c:

    B[r, c] = sum_k alpha[r, c, k] * T[set(r, c), k]

where set(r, c) depends on the row only (`set_axis="row"`: the vertical layout, or a
layer whose inputs did not grow) or on the column only (`"col"`: horizontal, or a layer
whose outputs did not grow, e.g. the classifier). The band-major grid is then permuted
along dims 0 and 1 (`perm_out`, `perm_in`) to the channel order of the grown graph, which
differs from band-major only where a dim holds several channel groups (concat) or
repeats each channel (flatten into a linear).

Growth (`grow`): the source blocks (the diagonal; stacked rows for a layer whose inputs
stay, e.g. the first; side by side columns for one whose outputs stay, e.g. the
classifier) keep source net i's alphas over its own template set, every other block gets
new alphas (`new_coefficients`) over the set the layout picks; a bank of n source nets
holds their n template sets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import FxgrowError
from .base import Producer

if TYPE_CHECKING:
    from ..growth import Growth


class TemplateBank(nn.Module):
    """`templates`: (sets * K, *weight_shape). Layers sharing a bank share this tensor."""

    def __init__(self, templates: torch.Tensor, sets: int = 1):
        super().__init__()
        if templates.shape[0] % sets:
            raise ValueError(f"{templates.shape[0]} templates do not split into {sets} sets")
        self.templates = nn.Parameter(templates)
        self.sets = sets

    @property
    def per_set(self) -> int:
        return self.templates.shape[0] // self.sets

    def extra_repr(self) -> str:
        return f"sets={self.sets}, K={self.per_set}, shape={tuple(self.templates.shape[1:])}"

    def grow(self, growth: "Growth", path: str) -> nn.Module:
        """Source net i's template sets become sets i * S .. (i + 1) * S - 1 (S = its sets)."""
        if growth.sources_count == 1:
            return self
        key = f"{path}.templates"
        return TemplateBank(torch.cat([s[key] for s in growth.sources]), sets=growth.sources_count * self.sets)


class MixProducer(Producer):
    """Mixes a bank's templates into one weight (see the module docstring).

    `alpha`: (rows, cols, K). `bank` and `source` are names, for inspection only: the
    templates arrive as the chain's input, so no module is referenced twice."""

    rank = 0
    role = "mix"

    def __init__(self, alpha: torch.Tensor, block_shape: tuple[int, ...], *, bank: str = "",
                 source: str = "", sets: int = 1, set_axis: str = "row",
                 set_index: torch.Tensor | None = None, perm_out: torch.Tensor | None = None,
                 perm_in: torch.Tensor | None = None):
        super().__init__()
        if alpha.dim() == 1:
            alpha = alpha.view(1, 1, -1)
        if alpha.dim() != 3:
            raise ValueError(f"alpha must be (rows, cols, K), got shape {tuple(alpha.shape)}")
        if set_axis not in ("row", "col"):
            raise ValueError(f"set_axis must be 'row' or 'col', got {set_axis!r}")
        rows, cols, _ = alpha.shape
        if sets > 1 and set_index is None and sets != (rows if set_axis == "row" else cols):
            raise ValueError(f"{sets} template sets need a set_index for a {rows}x{cols} grid")
        if len(block_shape) < 2 and cols > 1:
            raise ValueError("a 1-d weight cannot have input bands")
        self.alpha = nn.Parameter(alpha)
        self.block_shape = tuple(int(s) for s in block_shape)
        self.bank, self.source = bank, source
        self.sets, self.set_axis = sets, set_axis
        self.register_buffer("set_index", set_index)
        self.register_buffer("perm_out", perm_out)
        self.register_buffer("perm_in", perm_in)

    @property
    def grid(self) -> tuple[int, int]:
        return self.alpha.shape[0], self.alpha.shape[1]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        rows, cols = self.grid
        co, *rest = self.block_shape
        if not rest:
            return (rows * co,)
        return (rows * co, cols * rest[0], *rest[1:])

    def block_sets(self) -> list[list[int]]:
        """The template set each block (r, c) mixes."""
        rows, cols = self.grid
        band = rows if self.set_axis == "row" else cols
        index = (self.set_index.tolist() if self.set_index is not None
                 else [i % self.sets for i in range(band)])
        return [[index[r] if self.set_axis == "row" else index[c] for c in range(cols)]
                for r in range(rows)]

    def forward(self, templates: torch.Tensor) -> torch.Tensor:
        rows, cols, k = self.alpha.shape
        if self.sets == 1:
            # One template set: every block is a mix of the same K templates, one matmul.
            blocks = self.alpha.reshape(rows * cols, k) @ templates.reshape(k, -1)
            if rows == cols == 1 and self.perm_out is None:
                return blocks.view(self.block_shape)
            blocks = blocks.view(rows, cols, -1)
        else:
            t = templates.reshape(self.sets, k, -1)
            if self.set_index is not None:
                t = t.index_select(0, self.set_index)
            eq = "rck,rkx->rcx" if self.set_axis == "row" else "rck,ckx->rcx"
            blocks = torch.einsum(eq, self.alpha, t)
        co, *rest = self.block_shape
        if rest:
            ci, *kernel = rest
            w = blocks.view(rows, cols, co, ci, *kernel).transpose(1, 2)
            w = w.reshape(rows * co, cols * ci, *kernel)
        else:
            w = blocks.reshape(rows * co)
        if self.perm_out is not None:
            w = w.index_select(0, self.perm_out)
        if self.perm_in is not None:
            w = w.index_select(1, self.perm_in)
        return w

    def extra_repr(self) -> str:
        rows, cols, k = self.alpha.shape
        return (f"bank={self.bank!r}, K={k}, grid={rows}x{cols}, sets={self.sets}, "
                f"set_axis={self.set_axis}")

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.weight_shape

    @classmethod
    def solve_for(cls, gm: nn.Module, targets: dict[str, torch.Tensor]) -> dict[str, float]:
        return retarget(gm, targets, measure=False)

    def grow(self, growth: "Growth", path: str) -> nn.Module:
        """Every block of the grid widens (a grown producer grows again: fxgrow's own design,
        the authors' code grows once)."""
        # Orthogonal new alphas must see every source alpha of their template set, so the
        # first producer to grow notes those of all mixed weights.
        coefficients = growth.shared(_Coefficients, lambda: _Coefficients.noting_sources(growth))
        return _grown_producer(_plan_grid(path, self, growth), growth, coefficients)


def preserving_templates(alphas: torch.Tensor, weights: list[torch.Tensor],
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """T with alphas @ T == the stacked weights: T = pinv(alphas) @ W (exact when the
    L x K alphas have full row rank, i.e. L <= K; = alphas^T W for orthonormal rows), in
    float64, or written into `out` in its dtype."""
    pinv = torch.linalg.pinv(alphas)  # K x L, small
    if out is None:
        out = torch.empty((alphas.shape[1], *weights[0].shape), dtype=torch.float64, device=weights[0].device)
    for k in range(alphas.shape[1]):  # T_k = sum_l pinv[k, l] W_l, without stacking the Ws
        torch.mul(weights[0].detach(), float(pinv[k, 0]), out=out[k])
        for l in range(1, len(weights)):
            out[k].add_(weights[l].detach(), alpha=float(pinv[k, l]))
    return out


# Below this condition number of a bank's alphas the mix of re-solved templates is within
# (K + L + 1) * eps * cond * max|W| of its target (the rounding of the L-term solve, of T
# and of the K-term mix, in the templates' dtype), small enough not to measure; above it
# `retarget` measures the residual.
_WELL_CONDITIONED = 10.0


def retarget(gm: nn.Module, targets: dict[str, torch.Tensor], measure: bool = True) -> dict[str, float]:
    """Re-solve bank templates so each mixed weight in `targets` ({"layer.weight": value})
    comes out as that value; layers of an affected bank not in `targets` keep their
    current mix. For a pass stacked after mixing that re-initialises its input (the
    compander's v = psi^-1(W)). Returns the max abs residual per key: 0 up to rounding
    when the bank has at most K layers (ungrown), a least-squares fit otherwise. Without
    `measure`, a well-conditioned bank (full row rank, the default orthonormal alphas)
    reports the rounding bound instead of evaluating every mix again: the templates are
    solved once."""
    producers = mix_producers(gm)
    by_source = {p.source: (path, p) for path, p in producers.items()}
    missing = [k for k in targets if k not in by_source]
    if missing:
        raise FxgrowError(f"not template-mixed: {', '.join(missing)}")
    banks = {by_source[k][1].bank for k in targets}
    residual: dict[str, float] = {}
    with torch.no_grad():
        for bank_path in banks:
            bank: TemplateBank = gm.get_submodule(bank_path)
            users = [p for p in producers.values() if p.bank == bank_path]
            if bank.sets != 1 or any(p.grid != (1, 1) for p in users):
                raise FxgrowError(f"cannot re-solve the templates of grown bank '{bank_path}'")
            alphas = torch.stack([p.alpha.detach().view(-1) for p in users]).to(torch.float64)
            values = [targets[p.source] if p.source in targets else p(bank.templates) for p in users]
            preserving_templates(alphas, values, out=bank.templates.data)
            cond = _row_condition(alphas)
            for p, v in zip(users, values):
                if measure or cond > _WELL_CONDITIONED:
                    residual[p.source] = float((p(bank.templates) - v).abs().max())
                else:
                    lo, hi = torch.aminmax(v)
                    eps = torch.finfo(bank.templates.dtype).eps
                    residual[p.source] = (sum(alphas.shape) + 1) * eps * cond * max(-float(lo), float(hi))
    return {k: residual[k] for k in targets}


def _row_condition(alphas: torch.Tensor) -> float:
    """||A||_inf * ||pinv(A)||_inf, or inf when A (L x K) has no full row rank."""
    if alphas.shape[0] > alphas.shape[1] or torch.linalg.matrix_rank(alphas) < alphas.shape[0]:
        return float("inf")
    norm = lambda m: float(m.abs().sum(1).max())  # noqa: E731  (the inf-norm: max row sum)
    return norm(alphas) * norm(torch.linalg.pinv(alphas))


def mix_producers(model: nn.Module) -> dict[str, MixProducer]:
    """{module path: producer} of every MixProducer in `model`, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MixProducer)}


# --- growth ----------------------------------------------------------------------------------

def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def _orthogonal_to(existing: list[torch.Tensor], k: int, generator: torch.Generator) -> torch.Tensor:
    """A random unit vector orthogonal to `existing` (Gram-Schmidt); just a random unit
    vector when they already span all K dims."""
    v = torch.randn(k, generator=generator, dtype=torch.float64)
    basis: list[torch.Tensor] = []
    for e in existing:
        r = e.to(torch.float64)
        for b in basis:
            r = r - (r @ b) * b
        if r.norm() > 1e-8:
            basis.append(_unit(r))
    if len(basis) >= k:
        return _unit(v)
    for b in basis:
        v = v - (v @ b) * b
    return _unit(v)


class _Coefficients:
    """Hands out new alphas; remembers the alphas using each template set, per layer
    (`scope: layer`, the authors' scope: a layer's members are orthogonalised among
    themselves) or per bank (`bank`: against every layer mixing that bank's set, which with
    share: pairs and K = 2 leaves no room: two diagonal alphas already span R^2)."""

    def __init__(self, how: str, noise: float, generator: torch.Generator, scope: str = "layer"):
        self.how, self.noise, self.generator, self.scope = how, noise, generator, scope
        self.used: dict[tuple[str, int], list[torch.Tensor]] = {}

    @classmethod
    def noting_sources(cls, growth: "Growth") -> "_Coefficients":
        out = cls(growth.options.get("new_coefficients", "orthogonal"), growth.options.get("noise", 0.0),
                  growth.generator, growth.options.get("orthogonal_scope", "layer"))
        for path, m in growth.model.named_modules():
            if isinstance(m, MixProducer):
                grid = _plan_grid(path, m, growth)
                for (r, c), alpha in grid.sourced.items():
                    out.note(m, grid.set_of(r, c), alpha)
        return out

    def _key(self, producer: MixProducer, template_set: int) -> tuple[str, int]:
        return (producer.source if self.scope == "layer" else producer.bank), template_set

    def note(self, producer: MixProducer, template_set: int, alpha: torch.Tensor) -> None:
        self.used.setdefault(self._key(producer, template_set), []).append(alpha.detach().flatten())

    def new(self, producer: MixProducer, template_set: int, k: int, copy_of: torch.Tensor) -> torch.Tensor:
        if self.how == "orthogonal":
            alpha = _orthogonal_to(self.used.get(self._key(producer, template_set), []), k, self.generator)
        elif self.how == "random":
            alpha = torch.randn(k, generator=self.generator, dtype=torch.float64)
        elif self.how == "copy":
            alpha = copy_of.detach().flatten().to(torch.float64).cpu().clone()
        elif self.how == "zero":  # test-only: proves where the source blocks land
            alpha = torch.zeros(k, dtype=torch.float64)
        else:
            raise ValueError(f"unknown new_coefficients {self.how!r}")
        if self.noise:
            alpha = alpha + self.noise * torch.randn(k, generator=self.generator, dtype=torch.float64)
        self.note(producer, template_set, alpha)
        return alpha


@dataclass
class _Grid:
    """One mixed weight's block grid once grown. An old grid of R0 x C0 blocks (1 x 1 before
    the first growth) becomes g*R0 x g*C0 along growing dims: block (b*R0 + r, b'*C0 + c) is
    old block (r, c) of band (b, b'), band-major; `perms` put it in the grown graph's order."""

    producer: MixProducer           # the one before this growth
    rows: int
    cols: int
    sets: list[list[int]]           # the template set of every block
    perms: tuple[torch.Tensor | None, torch.Tensor | None]
    sourced: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # block -> source alphas
    # every block -> the alphas of the old block it continues, in the source net that owns it (for `copy`)
    likes: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def set_of(self, r: int, c: int) -> int:
        return self.sets[r][c]


def _grown_perm(weight, dim: int, producer: MixProducer, blocks: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The grown dim's permutation into the band-major block grid, and the (band, old block,
    index in block) of every grown position, as band * blocks + old block, for the grid."""
    size = producer.block_shape[dim]
    old_perm = (producer.perm_out, producer.perm_in)[dim]
    band, old = weight.positions(dim, blocks * size)
    q = old if old_perm is None else old_perm.cpu()[old]  # the old grown order -> the old band-major grid
    perm = (band * blocks + q // size) * size + q % size
    return (None if torch.equal(perm, torch.arange(len(perm))) else perm), perm


def _plan_grid(path: str, producer: MixProducer, growth: "Growth") -> _Grid:
    weight, g, n = growth.weight(path), growth.factor, growth.sources_count
    shape = producer.block_shape
    r0, c0 = producer.grid
    grows = (weight.grows(0), len(shape) > 1 and weight.grows(1))
    perms = []
    for dim, blocks in ((0, r0), (1, c0)):
        if not grows[dim]:
            perms.append((producer.perm_out, producer.perm_in)[dim] if dim < len(shape) else None)
            continue
        fixed = weight.fixed_reasons(dim)
        if fixed:
            raise FxgrowError(f"'{producer.source}' dim {dim} mixes growing and fixed channel groups "
                              f"({'; '.join(fixed)})")
        perms.append(_grown_perm(weight, dim, producer, blocks)[0])
    rows, cols = (g * r0 if grows[0] else r0), (g * c0 if grows[1] else c0)
    layout = growth.options.get("layout", "vertical")
    old_sets, per_source = producer.block_sets(), producer.sets
    k = producer.alpha.shape[-1]
    sets = [[0] * cols for _ in range(rows)]
    grid = _Grid(producer, rows, cols, sets, tuple(perms))
    for big_r in range(rows):
        for big_c in range(cols):
            (br, r), (bc, c) = divmod(big_r, r0), divmod(big_c, c0)
            if grows[0] and grows[1]:
                source = br if br == bc else None
                owner = br if layout == "vertical" else bc
            else:  # one growing dim: its band is the source
                source = owner = br if grows[0] else bc
            owner = (source if source is not None and source < n else owner) % n
            sets[big_r][big_c] = owner * per_source + old_sets[r][c] if n > 1 else old_sets[r][c]
            grid.likes[big_r, big_c] = growth.sources[owner][f"{path}.alpha"].view(r0, c0, k)[r, c].to(
                torch.float64).cpu()
            if source is not None and source < n:
                grid.sourced[big_r, big_c] = grid.likes[big_r, big_c]
    return grid


def _set_layout(grid: _Grid) -> tuple[str, list[int]]:
    """The block sets as MixProducer holds them: one per row or one per column."""
    if all(len(set(row)) == 1 for row in grid.sets):
        return "row", [row[0] for row in grid.sets]
    columns = list(zip(*grid.sets))
    if all(len(set(col)) == 1 for col in columns):
        return "col", [col[0] for col in columns]
    raise FxgrowError(f"'{grid.producer.source}': growing again in another layout would mix template sets "
                      "within rows and columns; grow every time with the same layout")


def _grown_producer(grid: _Grid, growth: "Growth", coefficients: _Coefficients) -> MixProducer:
    p, n = grid.producer, growth.sources_count
    device = p.alpha.device
    k = p.alpha.shape[-1]
    alpha = torch.zeros(grid.rows, grid.cols, k, dtype=torch.float64)
    for (r, c), source in grid.sourced.items():
        alpha[r, c] = source
    for r in range(grid.rows):  # `copy` takes the alphas of the owning source net's block
        for c in range(grid.cols):
            if (r, c) not in grid.sourced:
                alpha[r, c] = coefficients.new(p, grid.set_of(r, c), k, grid.likes[r, c])
    sets = p.sets * n if n > 1 else p.sets
    axis, index = _set_layout(grid)
    set_index = None
    if sets > 1 and index != list(range(sets)):
        set_index = torch.tensor(index, dtype=torch.long, device=device)
    perm_out, perm_in = (None if q is None else q.to(device) for q in grid.perms)
    grown = MixProducer(alpha.to(device=device, dtype=p.alpha.dtype), p.block_shape, bank=p.bank,
                        source=p.source, sets=sets, set_axis=axis, set_index=set_index,
                        perm_out=perm_out, perm_in=perm_in)
    grown.alpha.requires_grad_(p.alpha.requires_grad)  # frozen coefficients stay frozen
    return grown
