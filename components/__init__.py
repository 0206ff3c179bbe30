"""cl-audit stages and what they share: models, data, training, metrics, artifacts."""
