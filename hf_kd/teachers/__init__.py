"""Teacher signals: online models, cached logits, synthetic targets."""
