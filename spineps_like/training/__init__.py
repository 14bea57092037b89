"""Training of the bundled models on phantoms: ``python -m spineps_like.training.semantic`` (semantic nnU-Net) and
``python -m spineps_like.training.instance`` (instance Unet3D). Modules import their heavy dependencies lazily."""
