"""fxgrow's passes inside other frameworks' training loops, built on `fxgrow.Session`:

- `fxgrow.integrations.lightning`: a Lightning `Callback` (`FxgrowCallback`) and, for
  several sub-models a step, a LightningModule mixin (`FxgrowMicroSteps`);
  `pip install 'fxgrow[lightning]'`.
- `fxgrow.integrations.hf`: a Hugging Face `TrainerCallback` (`FxgrowTrainerCallback`) and a
  `Trainer` subclass (`FxgrowTrainer`) for what callbacks cannot do; `pip install 'fxgrow[hf]'`.
- `fxgrow.integrations.hf_extract`: a SortedNet sub-model of a Hugging Face model as the same
  class built from a smaller config (`extract_hf`), or a refusal naming the config field.

Each module imports its framework (seconds); nothing here does, and `import fxgrow` never
imports either.
"""
