"""fxgrow's passes in a plain PyTorch loop (the README's loop): GraNet prune-and-regrow on a
small CNN, digits, CPU, under a minute; any spec works (--spec, --model).

    python examples/integrations/plain_loop.py [--spec examples/granet_digits.yaml] [--epochs 8]
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import fxgrow
from fxgrow.subnets import data_evaluator
from fxgrow.train.data import load_data

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples/granet_digits.yaml"))
    parser.add_argument("--model", default=str(ROOT / "examples/models/small_cnn.py"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="runs/plain_loop")
    args = parser.parse_args(argv)

    spec = fxgrow.load_spec(args.spec)
    data = load_data(spec.train.data)  # digits: scikit-learn's, no download
    x, y = data.train
    dataset = torch.utils.data.TensorDataset(data.prepare(x), y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True)

    # --- the loop -------------------------------------------------------------------------
    session = fxgrow.Session(spec, args.model, total_steps=args.epochs * len(loader), steps_per_epoch=len(loader))
    net = session.module                                  # train this; growth swaps what is inside
    session.make_optimizer(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    session.make_scheduler(lambda t: 0.5 * (1 + math.cos(math.pi * t / session.total_steps)))  # cosine
    session.start()
    for epoch in range(args.epochs):
        for x, y in loader:
            steps = session.step_start(x)                 # masks, growth, the step's sub-models
            session.optimizer.zero_grad(set_to_none=True) # re-read: growth may rebuild it
            for _ in steps:                               # one forward/backward per sub-model
                steps.scale(F.cross_entropy(net(x), y)).backward()
            session.after_backward()
            session.optimizer.step()
            session.scheduler.step()
            session.after_step()                          # pruning and regrowth events
    report = session.train_end()
    # ----------------------------------------------------------------------------------------

    metrics = data_evaluator(data, 256, torch.device("cpu"))(session.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(session.fold().state_dict(), out / "folded_state_dict.pt")  # plain layers
    sparsity = report.get("prune_regrow", {}).get("actual_sparsity")
    print(f"test accuracy {metrics['accuracy']:.3f}" + (f", sparsity {sparsity:.3f}" if sparsity is not None else "")
          + f"; folded model in {out / 'folded_state_dict.pt'}")
    return {"report": report, "metrics": metrics}


if __name__ == "__main__":
    main()
