"""fxgrow's passes in a Lightning Trainer: GraNet prune-and-regrow on a small CNN, digits, CPU,
under a minute. Lightning's own checkpoint every epoch; `--resume CKPT` continues one exactly
(masks, schedule, fxgrow's state). Any spec with one forward a step works (--spec, --model);
for sorted slicing's sub-models mix FxgrowMicroSteps into the module (see its docstring).

    pip install 'fxgrow[lightning]'
    python examples/integrations/lightning_granet.py [--epochs 6] [--out runs/lightning_granet]
    python examples/integrations/lightning_granet.py --resume runs/lightning_granet/epoch=2-step=66.ckpt
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

import fxgrow
from fxgrow.integrations.lightning import FxgrowCallback
from fxgrow.subnets import data_evaluator
from fxgrow.train.data import load_data

ROOT = Path(__file__).resolve().parents[2]


class Net(L.LightningModule):
    def __init__(self, session: fxgrow.Session):
        super().__init__()
        self.session = session
        self.net = session.module                     # growth would replace what is inside it

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # The passes' groups (e.g. no weight decay on the compander's v); a cosine schedule
        optimizer = torch.optim.SGD(self.session.param_groups(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        total = self.trainer.estimated_stepping_batches
        cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples/granet_digits.yaml"))
    parser.add_argument("--model", default=str(ROOT / "examples/models/small_cnn.py"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default="runs/lightning_granet")
    parser.add_argument("--resume", default=None, help="a checkpoint this script wrote")
    args = parser.parse_args(argv)

    spec = fxgrow.load_spec(args.spec)
    data = load_data(spec.train.data)                  # digits: scikit-learn's, no download
    x, y = data.train
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.prepare(x), y), batch_size=64,
                                         shuffle=True, drop_last=True)
    evaluate = data_evaluator(data, 256, torch.device("cpu"))
    session = fxgrow.Session(spec, args.model, evaluate=evaluate)  # the run's length comes from the Trainer
    callback = FxgrowCallback(session)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback, ModelCheckpoint(dirpath=args.out, save_top_k=-1)])
    trainer.fit(Net(session), loader, ckpt_path=args.resume)

    metrics = evaluate(session.model)
    torch.save(session.fold().state_dict(), Path(args.out) / "folded_state_dict.pt")  # plain layers
    pruning = callback.report.get("prune_regrow", {})
    print(f"test accuracy {metrics['accuracy']:.3f}, sparsity {pruning.get('actual_sparsity', 0):.3f} after "
          f"{pruning.get('events', 0)} pruning events; checkpoints and the folded model in {args.out}")
    return {"report": callback.report, "metrics": metrics, "session": session}


if __name__ == "__main__":
    main()
