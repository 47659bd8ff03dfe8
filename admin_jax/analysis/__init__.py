"""Measurements of why Post-LN is hard to train and what Admin changes (spec section 7).

Each command writes a CSV and a PNG into `--out`:

    python -m admin_jax.analysis.output_change  output change vs encoder depth at init (7.1)
    python -m admin_jax.analysis.grad_norms     per-sublayer gradient norms at init (7.3)
    python -m admin_jax.analysis.dependency     dependency beta_{i,j} on the residual branches (7.2)
    python -m admin_jax.analysis.omega          the omegas a workdir's profiling pass wrote

Every command also has a plain function that takes a model or values, for tests and notebooks.
"""
