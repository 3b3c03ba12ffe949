"""Training: input pipeline, augmentation, planning and the training loop (Keras)."""
