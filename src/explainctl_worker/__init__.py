"""The torch side of explainctl: models, the perturbation engine, artifacts, the worker."""
