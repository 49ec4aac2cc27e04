"""Growth of chains that hold masks (prune_regrow) and slices (sorted_slicing)."""
import pytest
import torch

from fxgrow.errors import FxgrowError
from fxgrow.nn.mask import MaskProducer
from fxgrow.passes import Pipeline
from fxgrow.passes.compander import CompanderPass
from fxgrow.passes.grow_model import grow_model
from fxgrow.passes.prune_regrow import PruneRegrowCallback, PruneRegrowPass
from fxgrow.passes.prune_regrow_masks import masked_weights
from fxgrow.passes.sorted_slicing import SortedSlicingPass
from fxgrow.passes.template_mixing import TemplateMixingPass
from fxgrow.subnets import extract, find_state, subnet
from fxgrow.train.callbacks import ModelChange
from tests.test_grow import trained_like
from tests.zoo import ConvBN, ResNetTiny


def stacked(build, x, seed, slicing=True, **prune):
    passes = [TemplateMixingPass(template_init="preserve"), CompanderPass(),
              PruneRegrowPass(**{"initial_sparsity": 0.5, "final_sparsity": 0.8, "init_distribution": "uniform",
                                 "schedule": {"start": 0, "end": 10, "every": 2}, **prune})]
    if slicing:
        passes.append(SortedSlicingPass(width={"fractions": [0.5, 1.0]}, depth={"blocks": "all"}))
    return trained_like(Pipeline(passes)(build(), x, seed=seed).graph_module, seed)


class Ctx:
    """The part of the loop the prune/regrow callback uses at growth."""

    def __init__(self, model, step, total_steps=20):
        self.model, self.step, self.total_steps, self.optimizer, self.seed = model, step, total_steps, None, 0
        self.records = []

    def log(self, record):
        self.records.append(record)


def test_fused_masks_stay_on_the_diagonal():
    """New blocks zeroed (test-only setting): the grown net is the sum of the two masked
    source nets, so every source block kept its own net's mask."""
    x = torch.randn(4, 1, 8, 8)
    nets = [stacked(ConvBN, x, seed, slicing=False) for seed in range(2)]
    assert not torch.equal(*(masked_weights(n)[1].mask for n in nets))  # different layouts
    grown = grow_model(nets[0], [n.state_dict() for n in nets], 2, x, new_coefficients="zero")
    new = grown.model
    torch.testing.assert_close(new.eval()(x), nets[0](x) + nets[1](x), rtol=1e-5, atol=1e-5)
    for w in masked_weights(new):
        assert grown.fresh(w.key) is not None and w.mask[grown.fresh(w.key)].eq(1).all()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_relayout_keeps_the_source_masks_and_the_sparsity_invariant(scope):
    x = torch.randn(4, 3, 8, 8)
    net = stacked(ResNetTiny, x, 0, slicing=False, scope=scope)
    callback = PruneRegrowCallback(PruneRegrowPass(**{
        "initial_sparsity": 0.5, "final_sparsity": 0.8, "init_distribution": "uniform", "scope": scope,
        "schedule": {"start": 0, "end": 10, "every": 2}}).spec)
    ctx = Ctx(net, step=4)
    callback.on_train_start(ctx)
    callback.on_micro_step(ctx, 0)
    assert not ctx.records  # same model: nothing to lay out
    before = {w.key: w.mask.clone() for w in masked_weights(net)}
    grown = grow_model(net, [net.state_dict()], 2, x)
    ctx.model = grown.model
    callback.on_model_replaced(ctx, net, grown.model, ModelChange(cause="grow", fresh=grown.fresh))
    target = callback.schedule.sparsity_at(4)  # the event at step 4 set the sparsity in force
    (record,) = ctx.records
    assert record["prune_regrow/relayout_target_sparsity"] == target
    assert record["prune_regrow/actual_sparsity"] == pytest.approx(target, abs=1e-3)
    for w in masked_weights(ctx.model):
        assert not hasattr(w.mask_module, "fresh")  # growth's marks travel in the ModelChange, not on masks
        old = before[w.key]
        corner = w.mask[:old.shape[0], :old.shape[1]]  # band 0 of every dim: the source block
        if scope == "global" or w.nnz() >= int(old.count_nonzero()):
            assert torch.equal(corner, old), w.key


def test_sliced_growth_keeps_sub_models_exact():
    """Slicing is re-applied on the grown graph: width 1/2 of the grown net is the source
    net (its channels, masks and statistics), and every grown sub-model equals its extract."""
    x = torch.randn(4, 3, 8, 8)
    net = stacked(ResNetTiny, x, 0)
    state = find_state(net)
    slicing = SortedSlicingPass(width={"fractions": [0.5, 1.0]}, depth={"blocks": "all"})  # as in stacked()
    grown = grow_model(net, [net.state_dict()], 2, x, carried=[slicing])
    new = grown.model
    callback = PruneRegrowCallback(PruneRegrowPass(**{
        "initial_sparsity": 0.5, "final_sparsity": 0.8, "init_distribution": "uniform",
        "schedule": {"start": 0, "end": 10, "every": 2}}).spec)
    ctx = Ctx(net, step=0)
    callback.on_train_start(ctx)
    ctx.model = new
    callback.on_model_replaced(ctx, net, new, ModelChange(cause="grow", fresh=grown.fresh))
    new.eval()
    grown = find_state(new)
    assert grown.points == state.points and grown.num_blocks == state.num_blocks
    assert all(grown.full[g] == 2 * state.full[g] for g in state.full)
    with subnet(new, 0.5):
        torch.testing.assert_close(new(x), net(x), rtol=1e-5, atol=1e-5)
    for point in grown.points:
        with subnet(new, *point):
            torch.testing.assert_close(extract(new, *point)(x), new(x), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, MaskProducer) for m in new.modules()) == len(masked_weights(net))


def test_filter_granularity_masks_are_refused():
    x = torch.randn(2, 1, 8, 8)
    net = Pipeline([TemplateMixingPass(), PruneRegrowPass(granularity="filter")])(ConvBN(), x).graph_module
    with pytest.raises(FxgrowError, match="granularity: filter"):
        grow_model(net, [net.state_dict()], 2, x)
