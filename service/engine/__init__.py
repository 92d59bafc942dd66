"""From an admitted request to its answer: loading, admission, batching and the model workers."""
