"""fastfilm's fused GPU kernels (Triton), each with its plain-PyTorch reference; they know tensors, not models.

- `bn_film_relu`: residual + relu(γ·BatchNorm(z) + β) with an affine-free BatchNorm2d, in one op.
- `conv_coords`: a conv over cat(x, coordinate maps) without materialising the concatenation.
- `coord_map`, `coord_bias_map`: the coordinate maps and their share of a conv's output.

Every op takes `impl`: "triton" (the kernels; on a CPU they need TRITON_INTERPRET=1 set before triton is
imported), "reference" (plain PyTorch, the specification) or "compile" (torch.compile of the reference).
"""

from kernels.bn_film_relu import bn_film_relu, bn_film_relu_reference
from kernels.conv_coords import conv_coords, conv_coords_reference, coord_bias_map, coord_map

__all__ = [
    "bn_film_relu",
    "bn_film_relu_reference",
    "conv_coords",
    "conv_coords_reference",
    "coord_map",
    "coord_bias_map",
]
