"""The core layer: the run configuration, the errors a user can cause, mixed precision, progress bars, CUDA graph
capture.

It imports nothing of fastfilm outside `fastfilm.core` (and not `kernels`); every other layer may import it.
"""
