"""The FiLM model (Perez et al., AAAI 2018) in plain PyTorch: FiLM generator + FiLMed network.

Structure and parameter names mirror the public original code (`ethanjperez/film`, `vr/models/film_gen.py`
FiLMGen and `vr/models/filmed_net.py` FiLMedNet), so that `to_original_state_dict` / `from_original_state_dict`
are a renaming of prefixes. The hot path of every ResBlock (BN → FiLM → ReLU → + residual) and every
coordinate-map concatenation goes through one seam, dispatched on `kernels`:

- `reference`: plain PyTorch, written as the original code (concatenate, convolve, normalise, modulate);
- `triton`: the fused kernels in the `kernels` package;
- `compile`: `torch.compile` of the kernels package's PyTorch reference ops.

All three modes share one state-dict: a checkpoint trained with one runs with the others.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfilm.core.config import KERNEL_MODES, ModelConfig

NULL, START, END, UNK = 0, 1, 2, 3


def coord_map(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """Two coordinate maps [2, H, W]: channel 0 is x (varies along the width), channel 1 is y, in [-1, 1]."""
    x = torch.linspace(-1, 1, w, device=device, dtype=dtype).view(1, w).expand(h, w)
    y = torch.linspace(-1, 1, h, device=device, dtype=dtype).view(h, 1).expand(h, w)
    return torch.stack([x, y], 0)


def _check_kernels(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got '{mode}'")
    return mode


class CoordConv(nn.Module):
    """A conv whose input is `cat(x, coords)`: weight [C_out, C_in + 2, k, k], the coordinates as 2 extra columns.

    The reference concatenates the maps, as the original code. The kernel modes never materialise the
    concatenation: they add the coordinate columns' contribution as a bias map (see `kernels.conv_coords`).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, padding: int, relu: bool, kernels: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim + 2, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.padding, self.relu, self.kernels = padding, relu, kernels
        # Same initialisation as nn.Conv2d (the model then applies Kaiming-uniform to every weight).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "reference":
            out = F.conv2d(cat_coords(x), self.weight, self.bias, padding=self.padding)
            return F.relu(out) if self.relu else out
        import kernels

        return kernels.conv_coords(
            x, self.weight, self.bias, padding=self.padding, relu=self.relu, impl=self.kernels
        )


def cat_coords(x: torch.Tensor) -> torch.Tensor:
    """`x` [N, C, H, W] with the two coordinate maps appended as channels, in `x`'s memory layout (a cat with the
    expanded maps alone comes out NCHW, and cuDNN would transpose a channels_last model's input back)."""
    n, _, h, w = x.shape
    coords = coord_map(h, w, x.device, x.dtype).unsqueeze(0).expand(n, 2, h, w)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        coords = coords.contiguous(memory_format=torch.channels_last)
    return torch.cat([x, coords], 1)


def real_lengths(questions: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The number of real tokens of each question, as a CPU int64 tensor [N] (what packing needs).

    Given `lengths` win: the tokens after them are padding whatever their ids, and a NULL inside them is
    read as a token; they must be integers in [1, T] for questions [N, T] (else ValueError). Lengths on a GPU
    cost one device-to-host copy; the loader's are on the CPU. Without `lengths` they come from the padding:
    the number of non-NULL tokens (at least 1), as the original's `before_rnn` found <END>.
    """
    n, t = questions.shape
    if lengths is None:
        return (questions != NULL).sum(1).clamp(min=1).to("cpu", torch.int64)
    lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"question lengths must be integers, got {lengths.dtype}")
    lengths = lengths.to("cpu", torch.int64)
    if lengths.shape != (n,):
        raise ValueError(
            f"question lengths: expected shape [{n}] for questions {list(questions.shape)}, "
            f"got {list(lengths.shape)}"
        )
    if n and (int(lengths.min()) < 1 or int(lengths.max()) > t):
        raise ValueError(
            f"question lengths must lie in [1, {t}] (the questions' padded length), got "
            f"{int(lengths.min())}..{int(lengths.max())}"
        )
    return lengths


class FiLMGen(nn.Module):
    """Question → FiLM parameters: embeddings → GRU (last real token's state) → one linear layer → (γ, β)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.num_dir = 2 if cfg.bidirectional else 1
        hidden = cfg.rnn_hidden_dim // self.num_dir
        self.cond_feat_size = 2 * cfg.module_dim  # Δγ then β, per block
        self.encoder_embed = nn.Embedding(vocab_size, cfg.wordvec_dim)
        rnn = nn.GRU if cfg.encoder_type == "gru" else nn.LSTM
        self.encoder_rnn = rnn(
            cfg.wordvec_dim,
            hidden,
            cfg.rnn_num_layers,
            dropout=cfg.rnn_dropout,
            batch_first=True,
            bidirectional=cfg.bidirectional,
        )
        self.decoder_linear = nn.Linear(hidden * self.num_dir, cfg.num_blocks * self.cond_feat_size)
        self.rnn_autocast = cfg.rnn_autocast

    # On the CPU a one-layer unidirectional GRU runs `fastfilm.gru` (same maths, its weight gradients as one
    # GEMM each instead of one per time step); False: always `nn.GRU` (for comparisons).
    cpu_gru: bool = True
    # False: the RNN runs outside autocast, in float32 (`model.rnn_autocast`; on the GPU PyTorch's autocast runs
    # cuDNN's RNN in float16 whatever the autocast dtype, unscaled under bf16; README, "Precision").
    rnn_autocast: bool = True

    def _rnn_precision(self, embed: torch.Tensor):
        """(the RNN's input, the context to run the RNN in): as it is under autocast, or float32 outside it."""
        if self.rnn_autocast or not torch.is_autocast_enabled(embed.device.type):
            return embed, contextlib.nullcontext()
        return embed.float(), torch.autocast(embed.device.type, enabled=False)

    def _plain_gru(self) -> bool:
        rnn = self.encoder_rnn
        return isinstance(rnn, nn.GRU) and self.num_dir == 1 and rnn.num_layers == 1 and rnn.bias

    def static_encode(self, questions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The question feature at static shapes with the lengths on the device (graph mode, fastfilm/graphed.py).

        The RNN reads every padded position of `questions` [N, T] (cuDNN's RNN on a GPU: one call, no packing,
        so no host copy of the lengths), and each question's feature is the last layer's output at its last
        real token, gathered at `lengths - 1`. The RNN is causal, so that output is the state `encode` returns
        (the same logits within rounding, tests/test_graphed.py); the padding after a question only costs
        FLOPs. Unidirectional RNNs only: a backward direction would have read the padding first. Lengths are
        clamped to [1, T], not validated (validation reads them on the host).
        """
        if self.num_dir != 1:
            raise ValueError("static_encode: a bidirectional encoder must read each question's own length")
        n, t = questions.shape
        embed, precision = self._rnn_precision(self.encoder_embed(questions))
        with precision:
            out, _ = self.encoder_rnn(embed)  # [N, T, H]
        idx = (lengths.to(device=out.device, dtype=torch.int64) - 1).clamp(0, t - 1)
        return out.gather(1, idx.view(n, 1, 1).expand(n, 1, out.shape[2])).view(n, out.shape[2])

    def encode(self, questions: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The question feature [N, rnn_hidden_dim]: the RNN reads each question's real tokens only.

        `lengths` (real tokens per question, <START> … <END>) decide what is read: the padding after them is
        never looked at, whatever it holds (see `real_lengths`). The RNN runs on a packed sequence, so no
        FLOP is spent on padding. Unidirectional: the last layer's state after the last real token (the
        original's state at <END>; equal to it, since the RNN is causal). Bidirectional: the forward
        direction's state at <END> and the backward direction's state after it has read the question from
        <END> back to <START> (the original gathered the backward direction at <END> after it had read the
        padding: see README, "Bidirectional encoder").
        """
        n, t = questions.shape
        rnn = self.encoder_rnn
        width = rnn.hidden_size * self.num_dir
        if n == 0:
            return self.encoder_embed.weight.new_zeros(0, width)
        lengths = real_lengths(questions, lengths)
        embed, precision = self._rnn_precision(self.encoder_embed(questions))
        # on the CPU (and meta, for FLOP counts) a plain GRU runs fastfilm.gru
        cpu_gru = self.cpu_gru and embed.device.type in ("cpu", "meta") and self._plain_gru()
        packed = None  # a batch without padding reads the same without the packing (nn.GRU)
        if cpu_gru or int(lengths.min()) < t:
            packed = nn.utils.rnn.pack_padded_sequence(embed, lengths, batch_first=True, enforce_sorted=False)
        with precision:
            if cpu_gru:
                from fastfilm.gru import packed_gru_last

                return packed_gru_last(rnn, packed)
            _, h = rnn(embed if packed is None else packed)  # h_n comes back in the batch's order
        if isinstance(h, tuple):  # LSTM: (h_n, c_n)
            h = h[0]
        last = h.view(rnn.num_layers, self.num_dir, n, rnn.hidden_size)[-1]  # the last layer's directions
        return last.transpose(0, 1).reshape(n, width)

    def forward(
        self, questions: torch.Tensor, lengths: torch.Tensor | None = None, static: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, β), each [N, num_blocks, module_dim], with the γ option and baseline applied (`static`: the
        question feature from `static_encode`, lengths on the device)."""
        cfg = self.cfg
        feature = self.static_encode(questions, lengths) if static else self.encode(questions, lengths)
        film = self.decoder_linear(feature).view(-1, cfg.num_blocks, self.cond_feat_size)
        gammas, betas = film.split(cfg.module_dim, dim=-1)
        fn = {"linear": None, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp}[
            cfg.gamma_option
        ]
        if fn is not None:
            gammas = fn(gammas)
        if cfg.gamma_baseline != 0:
            gammas = gammas + cfg.gamma_baseline
        return gammas, betas


def _bn_momentum(bn: nn.BatchNorm2d | None) -> float:
    """The running-stats momentum `nn.BatchNorm2d` would use for this step (None: the cumulative average,
    1/num_batches_tracked, counted after this step's increment)."""
    if bn is None:
        return 0.1
    if bn.momentum is None:
        return 1.0 / float(max(int(bn.num_batches_tracked), 1))
    return bn.momentum


class FiLMedResBlock(nn.Module):
    """One ResBlock: [coords] → 1×1 conv → ReLU (= r) → 3×3 conv → BN → FiLM → ReLU → r + that.

    `condition_method` moves the FiLM layer as in the paper's ablations. The default placement (after an
    affine-free BN), with or without BN and residual, runs through one fused op in the kernel modes; the other
    placements run the reference code in every mode (announced once with a warning), never a wrong fusion.
    """

    def __init__(self, cfg: ModelConfig, with_cond: bool, kernels: str):
        super().__init__()
        dim = cfg.module_dim
        self.cfg, self.with_cond, self.kernels = cfg, with_cond, kernels
        self.method = cfg.condition_method
        if cfg.module_input_proj:
            k = cfg.module_input_proj
            if cfg.use_coords:
                self.input_proj = CoordConv(dim, dim, k, k // 2, relu=True, kernels=kernels)
            else:
                self.input_proj = nn.Conv2d(dim, dim, k, padding=k // 2)
        self.conv1 = nn.Conv2d(dim, dim, cfg.module_kernel_size, padding=cfg.module_kernel_size // 2)
        if cfg.module_batchnorm:
            self.bn1 = nn.BatchNorm2d(dim, affine=(not with_cond) or cfg.module_batchnorm_affine)
        self.drop = nn.Dropout2d(cfg.module_dropout) if cfg.module_dropout > 0 else None
        self.fused = (
            kernels != "reference"
            and with_cond
            and self.method == "bn-film"
            and self.drop is None
            and not (cfg.module_batchnorm and cfg.module_batchnorm_affine)
        )
        if kernels != "reference" and not self.fused:
            warnings.warn(
                f"kernels={kernels}: this ResBlock (condition_method={self.method}, with_cond={with_cond}, "
                f"dropout={cfg.module_dropout}, bn_affine={cfg.module_batchnorm_affine}) has no fused kernel; "
                "it runs the reference PyTorch code",
                stacklevel=2,
            )

    def _input_proj(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.module_input_proj:
            return x
        out = self.input_proj(x)
        return out if isinstance(self.input_proj, CoordConv) else F.relu(out)

    def forward(self, x: torch.Tensor, gammas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        cfg, cond = self.cfg, self.with_cond

        def film(t: torch.Tensor) -> torch.Tensor:
            return gammas[:, :, None, None] * t + betas[:, :, None, None]

        if self.method == "block-input-film" and cond:
            x = film(x)
        r = self._input_proj(x)
        z = self.conv1(r)
        if self.fused:
            import kernels

            bn = getattr(self, "bn1", None)
            if (
                bn is not None and self.training
            ):  # as nn.BatchNorm2d does (the kernel updates the running stats)
                bn.num_batches_tracked.add_(1)
            return kernels.bn_film_relu(
                z,
                gammas,
                betas,
                r if cfg.module_residual else None,
                bn.running_mean if bn is not None else None,
                bn.running_var if bn is not None else None,
                training=self.training,
                momentum=_bn_momentum(bn),
                eps=bn.eps if bn is not None else 1e-5,
                normalize=bn is not None,
                impl=self.kernels,
            )
        out = z
        if self.method == "conv-film" and cond:
            out = film(out)
        if cfg.module_batchnorm:
            out = self.bn1(out)
        if self.method == "bn-film" and cond:
            out = film(out)
        if self.drop is not None:
            out = self.drop(out)
        out = F.relu(out)
        if self.method == "relu-film" and cond:
            out = film(out)
        if cfg.module_residual:
            out = r + out
        if self.method == "block-output-film" and cond:
            out = film(out)
        return out


class BatchNormReLU(nn.BatchNorm2d):
    """`nn.BatchNorm2d` then ReLU as one module: in the kernel modes the ResBlock's fused op (kernels.bn_film_relu)
    with γ, β the BatchNorm's own weight and bias broadcast over the batch (stride 0), so one read and one write
    of the activation instead of BatchNorm's statistics, normalisation and ReLU passes. Its state-dict is
    `nn.BatchNorm2d`'s; the network builds it (and `nn.Identity` in the ReLU's slot, keeping the original's
    module indices) for the stem's and the classifier's BatchNorm + ReLU with `kernels="triton"`. `kernels =
    "reference"` (set per module by `kernels.mode: auto`'s measured choice) runs BatchNorm2d, then ReLU;
    `"compile"` the op's torch.compile."""

    def __init__(self, dim: int, kernels: str):
        super().__init__(dim)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "reference" or x.dim() != 4:
            return F.relu(super().forward(x))
        import kernels

        if (
            self.training and self.track_running_stats
        ):  # as nn.BatchNorm2d does (the kernel updates the buffers)
            self.num_batches_tracked.add_(1)
        n, c = x.shape[:2]
        gamma = self.weight if self.weight is not None else x.new_ones(c, dtype=torch.float32)
        beta = self.bias if self.bias is not None else x.new_zeros(c, dtype=torch.float32)
        use_batch_stats = self.training or not self.track_running_stats
        return kernels.bn_film_relu(
            x,
            gamma.unsqueeze(0).expand(n, c),
            beta.unsqueeze(0).expand(n, c),
            None,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            training=use_batch_stats,
            momentum=_bn_momentum(self),
            eps=self.eps,
            impl=self.kernels,
        )


def _bn_relu(dim: int, batchnorm: bool, kernels: str) -> list[nn.Module]:
    """The original's `[BatchNorm2d(dim)], ReLU`; with `kernels="triton"` `BatchNormReLU` and `Identity` (same
    indices, same state-dict). `compile` keeps the eager BatchNorm and ReLU: what it compiles (the ResBlock's op,
    the coordinate convolutions) is what was measured on CPUs (README, "Performance")."""
    if not batchnorm:
        return [nn.ReLU(inplace=True)]
    if kernels != "triton":
        return [nn.BatchNorm2d(dim), nn.ReLU(inplace=True)]
    return [BatchNormReLU(dim, kernels), nn.Identity()]


class FiLMedNet(nn.Module):
    """Image (+ FiLM parameters) → answer logits: stem → FiLMed ResBlocks → classifier."""

    def __init__(self, cfg: ModelConfig, num_answers: int, kernels: str):
        super().__init__()
        self.cfg = cfg
        dim = cfg.module_dim
        if cfg.stem == "pixels":
            in_ch, size = 3, cfg.image_size
        else:
            in_ch, size = cfg.feature_channels, cfg.feature_size
        self.stem_use_coords = cfg.stem_stride == 1 and cfg.use_coords
        layers: list[nn.Module] = []
        prev = in_ch
        for i in range(cfg.stem_num_layers):
            if i == 0 and self.stem_use_coords:
                layers.append(CoordConv(prev, dim, cfg.stem_kernel_size, cfg.stem_padding, False, kernels))
            else:
                layers.append(
                    nn.Conv2d(
                        prev, dim, cfg.stem_kernel_size, stride=cfg.stem_stride, padding=cfg.stem_padding
                    )
                )
            layers.extend(_bn_relu(dim, cfg.stem_batchnorm, kernels))
            prev = dim
            size = (size + 2 * cfg.stem_padding - cfg.stem_kernel_size) // cfg.stem_stride + 1
        if size <= 0:
            raise ValueError(f"model: the stem reduces a {cfg.image_size}px input to nothing")
        self.stem = nn.Sequential(*layers)
        self.module_hw = size

        pattern = cfg.condition_pattern or [1] * cfg.num_blocks
        self.blocks = nn.ModuleList(FiLMedResBlock(cfg, p > 0, kernels) for p in pattern)

        # Classifier, built as the original's `build_classifier` (same module indices).
        extra = 2 if cfg.use_coords else 0
        cls: list[nn.Module] = []
        prev_dim = (dim + extra) * size * size
        proj = cfg.classifier_proj_dim
        if proj > 0:
            if cfg.use_coords:
                cls.append(CoordConv(dim, proj, 1, 0, False, kernels))
            else:
                cls.append(nn.Conv2d(dim, proj, 1))
            cls.extend(_bn_relu(proj, cfg.classifier_batchnorm, kernels))
            prev_dim = proj * size * size
        ds = cfg.classifier_downsample
        if "maxpool" in ds or "avgpool" in ds:
            pool = nn.MaxPool2d if "maxpool" in ds else nn.AvgPool2d
            k = size if "full" in ds else int(ds[-1])
            pad = 0 if size % k == 0 else 1
            cls.append(pool(kernel_size=k, stride=k, padding=pad))
            prev_dim = (proj if proj > 0 else dim + extra) * math.ceil(size / k) ** 2
        cls.append(nn.Flatten())
        for d in cfg.classifier_fc_dims:
            cls.append(nn.Linear(prev_dim, d))
            if cfg.classifier_batchnorm:
                cls.append(nn.BatchNorm1d(d))
            cls.append(nn.ReLU(inplace=True))
            if cfg.classifier_dropout > 0:
                cls.append(nn.Dropout(cfg.classifier_dropout))
            prev_dim = d
        cls.append(nn.Linear(prev_dim, num_answers))
        self.classifier = nn.Sequential(*cls)

    def channels_last(self) -> bool:
        """Whether the visual path runs in channels_last: `memory_format` says so, or it is `auto` and the
        weights were converted (the trainer converts them on a GPU after `deepspeed.initialize`). The images
        are then converted here, so callers pass NCHW batches whatever the layout."""
        fmt = self.cfg.memory_format
        if fmt == "auto":
            w = next((m.weight for m in self.stem if isinstance(m, (nn.Conv2d, CoordConv))), None)
            return (
                w is not None
                and w.dim() == 4
                and w.is_contiguous(memory_format=torch.channels_last)
                and not w.is_contiguous()
            )
        return fmt == "channels_last"

    def forward(self, images: torch.Tensor, gammas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if not cfg.use_gamma:
            gammas = torch.ones_like(gammas)
        if not cfg.use_beta:
            betas = torch.zeros_like(betas)
        if self.channels_last():
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.stem(images)
        for i, block in enumerate(self.blocks):
            x = block(x, gammas[:, i], betas[:, i])
        if cfg.use_coords and cfg.classifier_proj_dim <= 0:
            x = cat_coords(x)
        return self.classifier(x)


class FiLMModel(nn.Module):
    """The whole FiLM model: `model(images, questions, lengths) -> logits` [N, num_answers]."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, num_answers: int, kernels: str = "reference"):
        super().__init__()
        self.cfg = cfg
        self.kernels = _check_kernels(kernels)
        self.generator = FiLMGen(cfg, vocab_size)
        self.net = FiLMedNet(cfg, num_answers, kernels)
        # The original's init: Kaiming-uniform on every conv and linear weight (biases keep PyTorch's init).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, CoordConv)):
                nn.init.kaiming_uniform_(m.weight)

    def film_params(
        self, questions: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, β) for each question, each [N, num_blocks, module_dim] (γ includes its baseline)."""
        return self.generator(questions, lengths)

    def forward(
        self,
        images: torch.Tensor,
        questions: torch.Tensor,
        lengths: torch.Tensor | None = None,
        film: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_film: bool = False,
        static: bool = False,
    ):
        """Answer logits; with `film=(γ, β)` those FiLM parameters replace the generator's. `static=True`: graph
        mode's question encoder (`FiLMGen.static_encode`: padded questions, lengths on the device)."""
        gammas, betas = film if film is not None else self.generator(questions, lengths, static=static)
        logits = self.net(images, gammas, betas)
        return (logits, (gammas, betas)) if return_film else logits


def layout_for(memory_format: str, device: torch.device) -> str:
    """`model.memory_format` resolved for `device`: `auto` is channels_last on a GPU (what cuDNN's convolutions
    want: no NCHW↔NHWC transposes), channels_first elsewhere."""
    if memory_format == "auto":
        return "channels_last" if device.type == "cuda" else "channels_first"
    return memory_format


def place(model: FiLMModel, device: torch.device) -> FiLMModel:
    """`model` moved to `device` in the layout training uses there (its 4-D weights channels_last when
    `layout_for` says so; the forward then converts the images): for evaluation and analysis outside training."""
    model.to(device)
    if layout_for(model.cfg.memory_format, device) == "channels_last":
        model.to(memory_format=torch.channels_last)
    return model


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _map_keys(sd: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for src, dst in pairs:
            if k.startswith(src):
                out[dst + k[len(src) :]] = v
                break
        else:
            raise KeyError(f"no mapping for state-dict key '{k}'")
    return out


def to_original_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our state-dict → the original code's: {'program_generator_state': FiLMGen's, 'execution_engine_state':
    FiLMedNet's} (the keys of the original checkpoints written by `scripts/train_model.py`)."""
    gen = _map_keys({k: v for k, v in sd.items() if k.startswith("generator.")}, [("generator.", "")])
    net_sd = {k: v for k, v in sd.items() if k.startswith("net.")}
    net = _map_keys(net_sd, [("net.blocks.", ""), ("net.stem.", "stem."), ("net.classifier.", "classifier.")])
    return {"program_generator_state": gen, "execution_engine_state": net}


def from_original_state_dict(original: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The original code's two state-dicts (as `to_original_state_dict` returns them) → ours."""
    sd = {f"generator.{k}": v for k, v in original["program_generator_state"].items()}
    for k, v in original["execution_engine_state"].items():
        if k.startswith(("stem.", "classifier.")):
            sd[f"net.{k}"] = v
        elif k.split(".", 1)[0].isdigit():
            sd[f"net.blocks.{k}"] = v
        else:
            raise KeyError(f"no mapping for the original's state-dict key '{k}'")
    return sd
