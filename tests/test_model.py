"""The reference FiLM model: shapes, every paper switch, the paper's parameter counts, the original's key names."""

import dataclasses

import pytest
import torch

from fastfilm.config import ModelConfig
from fastfilm.model import (
    FiLMModel,
    coord_map,
    count_parameters,
    from_original_state_dict,
    to_original_state_dict,
)

V, A = 93, 32  # the vocabulary sizes of DESIGN.md's parameter counts (93 question tokens, 32 answer logits)


def tiny(**kw) -> ModelConfig:
    base = dict(
        image_size=32,
        stem_num_layers=2,
        module_dim=8,
        wordvec_dim=6,
        rnn_hidden_dim=10,
        classifier_proj_dim=12,
        classifier_fc_dims=[14],
        num_blocks=2,
    )
    base.update(kw)
    return ModelConfig(**base)


def questions(n: int, t: int = 7) -> torch.Tensor:
    q = torch.randint(4, V, (n, t))
    q[:, 0] = 1
    lengths = torch.randint(3, t + 1, (n,))
    for i, length in enumerate(lengths.tolist()):
        q[i, length - 1] = 2
        q[i, length:] = 0
    return q


def images(cfg: ModelConfig, n: int) -> torch.Tensor:
    if cfg.stem == "pixels":
        return torch.rand(n, 3, cfg.image_size, cfg.image_size)
    return torch.randn(n, cfg.feature_channels, cfg.feature_size, cfg.feature_size)


@pytest.mark.parametrize(
    "stem,expected,net",
    [("pixels", 59_107_528, 2_079_776), ("features", 59_495_752, 2_468_000)],
)
def test_paper_parameter_count(stem, expected, net):
    # The counts of the original code (DESIGN.md §1) for a 93-word vocabulary and 32 answer logits.
    m = FiLMModel(ModelConfig(stem=stem), V, A)
    assert count_parameters(m) == expected
    assert count_parameters(m.net) == net
    assert count_parameters(m.generator) == 57_027_752
    assert count_parameters(m.generator.encoder_rnn) == 52_813_824
    assert all(count_parameters(b) == 164_352 for b in m.net.blocks)
    assert count_parameters(m.net.classifier) == 628_256


def test_paper_shapes_pixels():
    cfg = ModelConfig(stem="pixels", rnn_hidden_dim=64, wordvec_dim=16)
    m = FiLMModel(cfg, V, A)
    assert m.net.module_hw == 14
    out = m(torch.rand(2, 3, 224, 224), questions(2))
    assert out.shape == (2, A)


def test_paper_shapes_features():
    cfg = ModelConfig(stem="features", rnn_hidden_dim=64, wordvec_dim=16)
    m = FiLMModel(cfg, V, A)
    assert m.net.module_hw == 14
    assert m.net.stem[0].weight.shape == (128, 1026, 3, 3)  # coordinates appended to the 1024 feature maps
    out = m(torch.randn(2, 1024, 14, 14), questions(2))
    assert out.shape == (2, A)


SWITCHES = [
    {},
    {"stem": "features", "feature_channels": 5, "feature_size": 6},
    {"num_blocks": 1},
    {"num_blocks": 3, "condition_pattern": [1, 0, 1]},
    *({"condition_method": m} for m in ("conv-film", "relu-film", "block-input-film", "block-output-film")),
    *({"gamma_option": g} for g in ("sigmoid", "tanh", "exp")),
    {"gamma_baseline": 0.0},
    {"use_gamma": False},
    {"use_beta": False},
    {"module_residual": False},
    {"module_batchnorm": False},
    {"module_batchnorm_affine": True},
    {"use_coords": False},
    {"rnn_num_layers": 2},
    {"bidirectional": True},
    {"encoder_type": "lstm"},
    {"classifier_proj_dim": 0, "classifier_downsample": "none"},
    {"classifier_downsample": "maxpool2"},
    {"classifier_downsample": "avgpoolfull"},
    {"classifier_fc_dims": []},
    {"classifier_fc_dims": [9, 7], "classifier_dropout": 0.1},
    {"module_dropout": 0.1},
    {"module_input_proj": 0},
    {"module_input_proj": 3},
    {"stem_batchnorm": False, "classifier_batchnorm": False},
    {"memory_format": "channels_last"},
]


@pytest.mark.parametrize(
    "switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "paper"
)
def test_every_switch_runs_forward_backward(switch):
    torch.manual_seed(0)
    cfg = tiny(**switch)
    m = FiLMModel(cfg, V, A)
    out = m(images(cfg, 3), questions(3))
    assert out.shape == (3, A) and torch.isfinite(out).all()
    out.float().logsumexp(1).sum().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    # Parameters that cannot receive a gradient: a BN without affine has none; with use_gamma/use_beta off the
    # generator's unused half still gets an exact zero gradient through the split.
    assert not no_grad, no_grad


def test_film_params_and_override():
    torch.manual_seed(0)
    cfg = tiny()
    m = FiLMModel(cfg, V, A).eval()
    q, x = questions(4), images(cfg, 4)
    g, b = m.film_params(q)
    assert g.shape == b.shape == (4, cfg.num_blocks, cfg.module_dim)
    torch.testing.assert_close(m(x, q), m(x, q, film=(g, b)))
    # γ = 1 + Δγ: with the generator's output zeroed, γ is exactly the baseline.
    torch.nn.init.zeros_(m.generator.decoder_linear.weight)
    torch.nn.init.zeros_(m.generator.decoder_linear.bias)
    g, b = m.film_params(q)
    assert torch.all(g == 1.0) and torch.all(b == 0.0)


def test_question_feature_is_state_at_end_token():
    # The GRU state at the last non-NULL token, whatever padding follows (the original's `before_rnn`).
    torch.manual_seed(0)
    m = FiLMModel(tiny(), V, A).eval()
    q = questions(1, t=6)
    padded = torch.cat([q, torch.zeros(1, 5, dtype=torch.long)], 1)
    torch.testing.assert_close(m.generator.encode(q), m.generator.encode(padded))


def test_coord_map_matches_original():
    c = coord_map(3, 4)
    assert c.shape == (2, 3, 4)
    torch.testing.assert_close(c[0, 0], torch.linspace(-1, 1, 4))  # x along the width
    torch.testing.assert_close(c[1, :, 0], torch.linspace(-1, 1, 3))  # y along the height


@pytest.mark.parametrize("stem", ["pixels", "features"])
def test_original_state_dict_roundtrip(stem):
    cfg = tiny(stem=stem, feature_channels=5, feature_size=6)
    m = FiLMModel(cfg, V, A)
    sd = m.state_dict()
    orig = to_original_state_dict(sd)
    gen, net = orig["program_generator_state"], orig["execution_engine_state"]
    # The original's names: FiLMGen's encoder_embed/encoder_rnn/decoder_linear, FiLMedNet's stem.*, blocks as
    # "<i>.input_proj/conv1/bn1", classifier.* with build_classifier's indices.
    assert {"encoder_embed.weight", "encoder_rnn.weight_ih_l0", "decoder_linear.weight"} <= set(gen)
    assert {
        "stem.0.weight",
        "0.input_proj.weight",
        "0.conv1.bias",
        "0.bn1.running_mean",
        "1.conv1.weight",
    } <= set(net)
    assert {
        "classifier.0.weight",
        "classifier.1.running_var",
        "classifier.5.weight",
        "classifier.8.bias",
    } <= set(net)
    assert net["0.input_proj.weight"].shape == (cfg.module_dim, cfg.module_dim + 2, 1, 1)
    back = from_original_state_dict(orig)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_config_dataclass_defaults_are_the_paper():
    cfg = ModelConfig()
    assert (cfg.stem, cfg.stem_num_layers, cfg.stem_kernel_size, cfg.stem_stride) == ("pixels", 4, 4, 2)
    assert (cfg.num_blocks, cfg.module_dim, cfg.rnn_hidden_dim, cfg.wordvec_dim) == (4, 128, 4096, 200)
    assert cfg.condition_method == "bn-film" and cfg.gamma_baseline == 1.0 and not cfg.module_batchnorm_affine
    f = dataclasses.replace(ModelConfig(stem="features"))
    assert (f.stem_num_layers, f.stem_kernel_size, f.stem_stride, f.stem_padding) == (1, 3, 1, 1)


def test_coordinate_maps_are_appended_in_the_inputs_layout():
    """cat_coords keeps channels_last (a plain cat with the expanded maps comes out NCHW: the reference CoordConv's
    conv and the classifier's then ran on an NCHW input in a channels_last model); same values either way."""
    from fastfilm.model import cat_coords

    x = torch.randn(3, 5, 4, 6)
    expect = torch.cat([x, coord_map(4, 6).expand(3, 2, 4, 6)], 1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = cat_coords(x.contiguous(memory_format=fmt))
        assert torch.equal(out, expect) and out.is_contiguous(memory_format=fmt), fmt


@pytest.mark.parametrize("cpu_gru", [True, False], ids=["fastfilm.gru", "nn.GRU"])
def test_rnn_autocast_off_runs_the_encoder_in_float32(cpu_gru):
    """`rnn_autocast = False` (the GPU comparison for cuDNN's float16 RNN under bf16 autocast): under autocast the
    question feature is the float32 one, bit for bit, on the packed and the static path."""
    torch.manual_seed(0)
    gen = FiLMModel(tiny(), V, A).generator
    gen.cpu_gru = cpu_gru
    q = questions(4)
    lengths = (q != 0).sum(1)
    exact = gen.encode(q), gen.static_encode(q, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gen.encode(q), gen.static_encode(q, lengths)
        gen.rnn_autocast = False
        fp32 = gen.encode(q), gen.static_encode(q, lengths)
    assert not any(torch.equal(m.float(), w) for m, w in zip(mixed, exact))  # autocast reaches the RNN
    for got, want in zip(fp32, exact):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    # the switch is the config's `model.rnn_autocast` (default true: autocast reaches the RNN)
    assert FiLMModel(tiny(), V, A).generator.rnn_autocast is True
    assert FiLMModel(tiny(rnn_autocast=False), V, A).generator.rnn_autocast is False


@pytest.mark.parametrize(
    "fmt, device, expect",
    [
        ("auto", "cuda", "channels_last"),
        ("auto", "cpu", "channels_first"),
        ("channels_last", "cpu", "channels_last"),
        ("channels_first", "cuda", "channels_first"),
    ],
)
def test_eval_places_the_model_in_the_layout_training_uses(fmt, device, expect):
    """`place` (eval, analyze): `layout_for` as the trainer resolves it; in channels_last the 4-D weights are
    converted and the logits are those of the NCHW model."""
    from fastfilm.model import layout_for, place

    assert layout_for(fmt, torch.device(device)) == expect
    if device != "cpu":
        return
    cfg = tiny(memory_format=fmt)
    torch.manual_seed(0)
    nchw = FiLMModel(cfg, V, A).eval()
    placed = place(FiLMModel(cfg, V, A).eval(), torch.device("cpu"))
    placed.load_state_dict(nchw.state_dict())
    convs = [m.weight for m in placed.modules() if isinstance(m, torch.nn.Conv2d)]
    if expect == "channels_last":
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert not all(w.is_contiguous() for w in convs)
    else:
        assert all(w.is_contiguous() for w in convs)
    x, q = images(cfg, 3), questions(3)
    with torch.no_grad():
        torch.testing.assert_close(placed(x, q), nchw(x, q), rtol=1e-5, atol=1e-6)
