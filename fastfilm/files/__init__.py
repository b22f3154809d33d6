"""The model-files layer: run folders and checkpoints, exported models, the original code's checkpoints, features.

It imports `fastfilm.core`, `fastfilm.model`, `fastfilm.data` (and `kernels` through the model), never a job or `cli`.
"""
