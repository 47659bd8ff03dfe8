"""admin-jax: deep Post-LN Transformers for translation that train stably, via Admin initialisation."""
