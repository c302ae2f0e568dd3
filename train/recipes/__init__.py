"""Recipes from the field on top of the trainer: feature cache, two-backbone fusion, staged fine-tuning,
ensembles with TTA, pseudo-labels and class-balanced sampling. CLI: `python -m train.recipes COMMAND`."""
