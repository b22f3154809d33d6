"""`train.init_from` and `train.trainable` as functions: vocabulary growth, strict loading, frozen parts."""

import pytest
import torch
import torch.nn.functional as F

from fastfilm.config import Config, ModelConfig
from fastfilm.data.tokenize import vocab_hash
from fastfilm.files.checkpoint import CheckpointError
from fastfilm.files.original import write_model_folder
from fastfilm.init_from import EMBEDDING_KEY, apply_trainable, init_from, trainable_parameters
from fastfilm.model import FiLMModel
from tests.test_original import ANSWERS, WORDS, inputs, original_vocab, tiny_model, write_original


def make_vocab(words):
    v = original_vocab(words)
    out = {k: v[k] for k in ("question_token_to_idx", "answer_token_to_idx")}
    out["question_family_names"] = {}
    out["hash"] = vocab_hash(out["question_token_to_idx"], out["answer_token_to_idx"])
    return out


@pytest.fixture
def source(tmp_path):
    """An exported model folder (tiny feature-stem model) and its vocab."""
    model, cfg = tiny_model()
    vocab = make_vocab(WORDS)
    c = Config(model=cfg)
    c.data.image_source = "features"
    folder = write_model_folder(model, c, vocab, str(tmp_path / "src"))
    return folder, model, cfg, vocab


def extended(vocab, new_words):
    q = dict(vocab["question_token_to_idx"])
    for w in new_words:
        q[w] = len(q)
    out = {**vocab, "question_token_to_idx": q}
    out["hash"] = vocab_hash(q, out["answer_token_to_idx"])
    return out


def test_vocabulary_expansion_keeps_old_ids_and_appends(source):
    folder, old, cfg, vocab = source
    new_vocab = extended(vocab, ["Which", "object", "biggest"])
    model = FiLMModel(cfg, len(new_vocab["question_token_to_idx"]), 4 + len(ANSWERS))
    torch.manual_seed(0)
    info = init_from(model, folder, new_vocab)
    assert info["new_words"] == ["Which", "object", "biggest"]
    n_old = len(vocab["question_token_to_idx"])
    emb, old_emb = model.state_dict()[EMBEDDING_KEY], old.state_dict()[EMBEDDING_KEY]
    assert emb.shape[0] == n_old + 3
    assert torch.equal(emb[:n_old], old_emb)
    new_rows = emb[n_old:]
    assert new_rows.abs().max() < 0.06 and new_rows.std() > 0.001  # N(0, 0.01²), not the fresh init (~N(0,1))
    for k, v in old.state_dict().items():
        if k != EMBEDDING_KEY:
            assert torch.equal(model.state_dict()[k], v), k
    # Old questions give the old logits.
    model.eval()
    x = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(*x), old(*x))


def test_same_vocabulary_loads_strictly(source):
    folder, old, cfg, vocab = source
    model = FiLMModel(cfg, len(vocab["question_token_to_idx"]), 4 + len(ANSWERS))
    assert init_from(model, folder, vocab)["new_words"] == []
    for k, v in old.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_vocabulary_that_is_not_an_extension_is_refused(source):
    folder, _, cfg, vocab = source
    words = [w for w in WORDS if w != "cube"] + ["block"]  # a word replaced: ids shift
    other = make_vocab(words)
    model = FiLMModel(cfg, len(other["question_token_to_idx"]), 4 + len(ANSWERS))
    with pytest.raises(CheckpointError, match="not the source's vocabulary followed by new words"):
        init_from(model, folder, other)


def test_other_answers_or_model_are_refused(source):
    folder, _, cfg, vocab = source
    answers = dict(vocab["answer_token_to_idx"], yes=len(vocab["answer_token_to_idx"]))
    with pytest.raises(CheckpointError, match="answer vocabulary differs"):
        init_from(FiLMModel(cfg, 14, len(answers)), folder, {**vocab, "answer_token_to_idx": answers})
    bigger = ModelConfig(**{**cfg.__dict__, "module_dim": 16})
    with pytest.raises(CheckpointError, match="do not fit"):
        init_from(FiLMModel(bigger, 14, 9), folder, vocab)


def test_init_from_an_original_checkpoint(tmp_path):
    old, cfg = tiny_model()
    path = write_original(str(tmp_path / "film.pt"), old, cfg, legacy=True)
    vocab = extended(make_vocab(WORDS), ["new"])
    model = FiLMModel(cfg, len(vocab["question_token_to_idx"]), 4 + len(ANSWERS)).eval()
    assert init_from(model, path, vocab)["new_words"] == ["new"]
    x = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(*x), old(*x))


def _train_steps(model, steps=3):
    opt = torch.optim.Adam(trainable_parameters(model), lr=1e-2, weight_decay=1e-5)
    model.train()
    x = inputs(model.cfg, n=6)
    target = torch.arange(6) % 5 + 4
    for _ in range(steps):
        loss = F.cross_entropy(model(*x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("frozen_mode", ["train", "eval"])
def test_trainable_generator_freezes_the_network(frozen_mode):
    model, _ = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = apply_trainable(model, "generator", frozen_mode)
    assert n == sum(p.numel() for p in model.net.parameters())
    _train_steps(model)
    after = model.state_dict()
    for name, _ in model.net.named_parameters():
        assert torch.equal(after[f"net.{name}"], before[f"net.{name}"]), name
    changed = [k for k in before if k.startswith("generator.") and not torch.equal(after[k], before[k])]
    assert changed  # the generator trained
    stats_changed = not torch.equal(
        after["net.blocks.0.bn1.running_mean"], before["net.blocks.0.bn1.running_mean"]
    )
    assert stats_changed == (frozen_mode == "train")  # BN statistics adapt only in train mode


def test_trainable_network_freezes_the_generator():
    model, _ = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_trainable(model, "network")
    _train_steps(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("generator."))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("net.") and "weight" in k)
