"""The GPU benchmark's parts, one module each; ``python -m scripts.bench_gpu`` runs them."""
