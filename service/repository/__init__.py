"""The model repository: which models and versions exist on disk, and how each model is configured."""
