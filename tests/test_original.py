"""`fastfilm import-original`: checkpoints in the original code's layout (legacy and zip), refused pickles,
argument mapping; and `train.init_from` / `train.trainable` as functions."""

import pytest
import torch

from fastfilm.config import ConfigError, ModelConfig
from fastfilm.data.tokenize import SPECIAL_TOKENS
from fastfilm.files import original
from fastfilm.files.checkpoint import CheckpointError
from fastfilm.files.export import load_model_folder
from fastfilm.model import FiLMModel, to_original_state_dict

WORDS = ["What", "color", "is", "the", "cube", "How", "many", "spheres", "are", "there"]
ANSWERS = ["blue", "red", "0", "1", "2"]


class Exploit:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def vocab_of(words, answers):
    q = dict(SPECIAL_TOKENS)
    for w in sorted(words):
        q[w] = len(q)
    a = dict(SPECIAL_TOKENS)
    for w in sorted(answers):
        a[w] = len(a)
    return q, a


def original_vocab(words=WORDS):
    """The vocab dict as the original's `utils.load_vocab` returns it (idx_to_token maps with int keys)."""
    q, a = vocab_of(words, ANSWERS)
    p = dict(SPECIAL_TOKENS, scene=4, count=5)
    v = {"question_token_to_idx": q, "program_token_to_idx": p, "answer_token_to_idx": a}
    for k in ("question", "program", "answer"):
        v[f"{k}_idx_to_token"] = {i: t for t, i in v[f"{k}_token_to_idx"].items()}
    return v


def tiny_model(stem="features", **kw):
    if stem == "features":
        cfg = ModelConfig(
            stem="features",
            feature_channels=6,
            feature_size=5,
            module_dim=8,
            num_blocks=2,
            wordvec_dim=8,
            rnn_hidden_dim=12,
            classifier_proj_dim=16,
            classifier_fc_dims=[16],
            **kw,
        )
    else:
        cfg = ModelConfig(
            image_size=32,
            stem_num_layers=2,
            module_dim=8,
            num_blocks=2,
            wordvec_dim=8,
            rnn_hidden_dim=12,
            classifier_proj_dim=16,
            classifier_fc_dims=[16],
            **kw,
        )
    q, a = vocab_of(WORDS, ANSWERS)
    torch.manual_seed(3)
    model = FiLMModel(cfg, len(q), len(a))
    with torch.no_grad():  # non-trivial BN statistics, so that eval-mode parity means something
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model.eval(), cfg


def original_kwargs(cfg: ModelConfig, vocab):
    """program_generator_kwargs / execution_engine_kwargs exactly as the original's train_model.py builds them."""
    pg = {
        "encoder_vocab_size": len(vocab["question_token_to_idx"]),
        "decoder_vocab_size": len(vocab["program_token_to_idx"]),
        "wordvec_dim": cfg.wordvec_dim,
        "hidden_dim": cfg.rnn_hidden_dim,
        "rnn_num_layers": cfg.rnn_num_layers,
        "rnn_dropout": 0,
        "parameter_efficient": True,
        "output_batchnorm": False,
        "bidirectional": False,
        "encoder_type": "gru",
        "decoder_type": "linear",
        "gamma_option": "linear",
        "gamma_baseline": 1.0,
        "num_modules": cfg.num_blocks,
        "module_num_layers": 1,
        "module_dim": cfg.module_dim,
        "debug_every": float("inf"),
    }
    feature_dim = (
        (cfg.feature_channels, cfg.feature_size, cfg.feature_size)
        if cfg.stem == "features"
        else (3, cfg.image_size, cfg.image_size)
    )
    ee = {
        "vocab": vocab,
        "feature_dim": feature_dim,
        "stem_batchnorm": True,
        "stem_num_layers": cfg.stem_num_layers,
        "module_dim": cfg.module_dim,
        "module_residual": True,
        "module_batchnorm": True,
        "classifier_proj_dim": cfg.classifier_proj_dim,
        "classifier_downsample": "maxpoolfull",
        "classifier_fc_layers": tuple(cfg.classifier_fc_dims),
        "classifier_batchnorm": True,
        "classifier_dropout": 0,
        "num_modules": cfg.num_blocks,
        "stem_kernel_size": cfg.stem_kernel_size,
        "stem_stride": cfg.stem_stride,
        "stem_padding": cfg.stem_padding if cfg.stem == "pixels" else None,
        "module_num_layers": 1,
        "module_batchnorm_affine": False,
        "module_dropout": 0,
        "module_input_proj": 1,
        "module_kernel_size": 3,
        "use_gamma": True,
        "use_beta": True,
        "use_coords": 1,
        "debug_every": float("inf"),
        "print_verbose_every": float("inf"),
        "condition_method": "bn-film",
        "condition_pattern": (1,) * cfg.num_blocks,
        "verbose": False,
    }
    return pg, ee


def write_original(path, model, cfg, legacy, drop_tracked=True, **changes):
    """A checkpoint in the layout of the original's scripts/train_model.py."""
    vocab = original_vocab()
    pg, ee = original_kwargs(cfg, vocab)
    for k, v in changes.items():
        (pg if k.startswith("pg.") else ee)[k[3:]] = v
    states = to_original_state_dict(model.state_dict())
    if drop_tracked:  # 2017 files (torch 0.2/0.3) have no num_batches_tracked
        states = {
            n: {k: v for k, v in s.items() if "num_batches_tracked" not in k} for n, s in states.items()
        }
    ckpt = {
        "args": {
            "model_type": "FiLM",
            "learning_rate": 3e-4,
            "weight_decay": 1e-5,
            "batch_size": 64,
            "optimizer": "Adam",
            "debug_every": float("inf"),
            "feature_dim": "1024,14,14",
        },
        "program_generator_kwargs": pg,
        "program_generator_state": states["program_generator_state"],
        "execution_engine_kwargs": ee,
        "execution_engine_state": states["execution_engine_state"],
        "baseline_kwargs": None,
        "baseline_state": None,
        "baseline_type": None,
        "vocab": vocab,
        "train_losses": [2.3, 1.1],
        "val_accs": [0.5],
        "best_val_acc": 0.5,
        "model_t": 11000,
    }
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path


def inputs(cfg, n=4):
    g = torch.Generator().manual_seed(1)
    if cfg.stem == "features":
        images = torch.randn(n, cfg.feature_channels, cfg.feature_size, cfg.feature_size, generator=g)
    else:
        images = torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g)
    q = torch.randint(4, 4 + len(WORDS), (n, 7), generator=g)
    q[:, 0], q[:, -1] = 1, 2
    q[0, 4:] = torch.tensor([2, 0, 0])  # a padded question
    return images, q, (q != 0).sum(1)


@pytest.mark.parametrize("stem", ["features", "pixels"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_import_gives_the_fixture_logits(tmp_path, stem, legacy):
    model, cfg = tiny_model(stem)
    path = write_original(str(tmp_path / "film.pt"), model, cfg, legacy)
    with open(path, "rb") as f:
        assert (f.read(2) == b"PK") != legacy  # the zip format starts with a zip header, legacy with a pickle
    out = str(tmp_path / "models" / "film")
    s = original.import_original(path, out)
    assert s["stem"] == stem
    imported, icfg, vocab = load_model_folder(out)
    assert vocab["question_token_to_idx"] == original_vocab()["question_token_to_idx"]
    assert len(vocab["answer_token_to_idx"]) == 4 + len(ANSWERS)
    for key in ("stem", "num_blocks", "module_dim", "rnn_hidden_dim", "stem_num_layers", "stem_stride"):
        assert getattr(icfg.model, key) == getattr(cfg, key), key
    x = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(imported(*x), model(*x))
    assert icfg.deepspeed["optimizer"]["params"]["lr"] == 3e-4
    from fastfilm.files.checkpoint import find_checkpoint

    assert find_checkpoint(out) == out  # eval, analyze and init_from accept the folder (manifest verified)


def test_pickled_class_is_refused_without_running(tmp_path):
    model, cfg = tiny_model()
    path = write_original(str(tmp_path / "ok.pt"), model, cfg, legacy=True)
    ckpt = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    for legacy in (True, False):
        bad = str(tmp_path / f"bad{legacy}.pt")
        torch.save({**ckpt, "args": Exploit(str(marker))}, bad, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match="refused: not loadable with weights_only=True") as e:
            original.read_original_checkpoint(bad)
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_cli_import_and_one_line_refusal(tmp_path, capsys):
    from fastfilm.cli import main

    model, cfg = tiny_model()
    path = write_original(str(tmp_path / "film.pt"), model, cfg, legacy=True)
    assert main(["import-original", path, "--out", str(tmp_path / "m"), "--set", "data.cache=/x/cache"]) == 0
    assert load_model_folder(str(tmp_path / "m"))[1].data.cache == "/x/cache"
    torch.save({"program_generator_state": Exploit(str(tmp_path / "p"))}, str(tmp_path / "bad.pt"))
    capsys.readouterr()
    assert main(["import-original", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused" in err
    assert not (tmp_path / "n").exists() and not (tmp_path / "p").exists()


def test_import_never_deletes_a_folder_it_did_not_write(tmp_path, capsys):
    """`import-original --out` a folder holding other files was deleted and replaced; now it is refused."""
    from fastfilm.cli import main

    model, cfg = tiny_model()
    path = write_original(str(tmp_path / "film.pt"), model, cfg, legacy=False)
    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "other_model.txt").write_text("keep")
    capsys.readouterr()
    assert main(["import-original", path, "--out", str(precious)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(precious) in err and "other_model.txt" in err, err
    assert [p.name for p in precious.iterdir()] == ["other_model.txt"]
    out = tmp_path / "m"
    for _ in range(2):  # an earlier import is replaced
        assert main(["import-original", path, "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "change, named",
    [
        ({"ee.use_coords": 2}, "use_coords"),
        ({"ee.condition_method": "concat"}, "condition_method"),
        ({"ee.module_num_layers": 2}, "module_num_layers"),
        ({"ee.classifier_downsample": "aggressive"}, "classifier_downsample"),
        ({"ee.some_new_arg": 1}, "some_new_arg"),
        ({"pg.output_batchnorm": True}, "output_batchnorm"),
        ({"pg.decoder_type": "gru"}, "decoder_type"),
        ({"pg.parameter_efficient": False}, "parameter_efficient"),
        ({"pg.another_arg": 0}, "another_arg"),
    ],
)
def test_argument_without_a_switch_is_named(tmp_path, change, named):
    model, cfg = tiny_model()
    path = write_original(str(tmp_path / "film.pt"), model, cfg, legacy=False, **change)
    with pytest.raises(ConfigError, match=named):
        original.import_original(path, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_not_an_original_checkpoint(tmp_path):
    torch.save({"module": {"w": torch.ones(1)}}, str(tmp_path / "x.pt"))
    with pytest.raises(CheckpointError, match="not a checkpoint of the original"):
        original.read_original_checkpoint(str(tmp_path / "x.pt"))
