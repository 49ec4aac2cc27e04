"""The held-out perplexity (accuracy, for classification) a spec's rewritten model has before
its first step, on the spec's own data (the run's report gives the one after training): the "before" of a run's figure.

    python bench/start_perplexity.py examples/tiny_llama_pydocs.yaml examples/models/tiny_llama.py
    python bench/start_perplexity.py examples/tiny_bert_corpus.yaml examples/models/tiny_bert.py

The model is built and rewritten as `fxgrow apply` does (same seed, same initial weights), the
data prepared as its Trainer does (the cached BPE), and the test split evaluated once.
"""
from __future__ import annotations

import argparse

from fxgrow import api
from fxgrow.specs.root import load_spec
from fxgrow.train import Callback, Trainer


class _Before(Exception):
    pass


class EvaluateFirst(Callback):
    name = "evaluate_first"

    def on_train_start(self, ctx):
        raise _Before(ctx.evaluate())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("model", nargs="?")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    result = api.compile_spec(spec, api.build_model(spec, args.model))
    train = spec.train.model_copy(update={"progress": "none"})
    try:
        Trainer(result.graph_module, train, callbacks=result.callbacks + [EvaluateFirst()]).fit()
    except _Before as before:
        metrics = before.args[0]
        if "perplexity" in metrics:
            print(f"before training: test perplexity {metrics['perplexity']:.2f}, loss {metrics['loss']:.4f}, "
                  f"token accuracy {metrics['accuracy']:.4f}")
        else:  # classification (e.g. labelled text)
            print(f"before training: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
