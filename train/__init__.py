"""Fine-tuning of converted checkpoints: head swap, per-layer lr_mult, resumable checkpoints."""
