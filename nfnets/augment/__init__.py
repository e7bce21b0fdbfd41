"""Training augmentation that runs on the accelerator, in JAX."""
