import pytest
import torch
from transformers import BertConfig, BertModel

from polymodal.encoders.hf_text import HFTextEncoder

PAD, CLS, SEP = 0, 1, 2
TINY = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "pad_token_id": PAD,
}


def _ids() -> torch.Tensor:
    """Two right-padded sequences of different lengths, each ``[CLS] ... [SEP] pad*``."""
    return torch.tensor([[CLS, 5, 17, 42, 8, SEP, PAD, PAD], [CLS, 9, 33, SEP, PAD, PAD, PAD, PAD]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[BertModel, str]:
    torch.manual_seed(0)
    source = BertModel(BertConfig(**TINY)).eval()  # saved with its pooler, which the encoder drops
    path = tmp_path_factory.mktemp("bert")
    source.save_pretrained(path)
    return source, str(path)


def _tiny(**kw) -> HFTextEncoder:
    torch.manual_seed(0)
    return HFTextEncoder(config={"model_type": "bert", **TINY}, **{"output_dim": 16, **kw})


def test_loading_directory_matches_hf_model(saved):
    source, path = saved
    torch.manual_seed(123)  # a different init: equality can only come from the saved weights
    cls_enc = HFTextEncoder(path, pool_type="cls", proj=None, output_dim=None).eval()
    mean_enc = HFTextEncoder(path, pool_type="mean", proj=None, output_dim=None).eval()
    ids = _ids()
    mask = (ids != PAD).long()
    with torch.no_grad():
        hidden = source(input_ids=ids, attention_mask=mask).last_hidden_state
        expected_mean = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(ids))])
        torch.testing.assert_close(cls_enc.forward_features(ids), hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cls_enc(ids), hidden[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean_enc(ids), expected_mean, atol=1e-5, rtol=1e-5)
    assert cls_enc.output_dim == cls_enc.width == 32 and cls_enc.modality == "text"
    assert getattr(cls_enc.transformer, "pooler", None) is None


def test_last_and_eos_pooling(saved):
    source, path = saved
    ids = _ids()
    with torch.no_grad():
        hidden = source(input_ids=ids, attention_mask=(ids != PAD).long()).last_hidden_state
        last = HFTextEncoder(path, pool_type="last", proj=None, output_dim=None).eval()(ids)
        eos = HFTextEncoder(path, pool_type="eos", eos_token_id=17, proj=None, output_dim=None).eval()(ids)
    # "last" is the [SEP] at 5 and 3; token 17 occurs only in row 0, row 1 falls back to its last token
    torch.testing.assert_close(last, torch.stack([hidden[0, 5], hidden[1, 3]]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eos, torch.stack([hidden[0, 2], hidden[1, 3]]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs eos_token_id"):
        HFTextEncoder(path, pool_type="eos")


@pytest.mark.parametrize("pool_type", ["cls", "mean", "last"])
def test_padding_invariance(pool_type):
    enc = _tiny(pool_type=pool_type).eval()
    ids = _ids()
    longer = torch.cat([ids, torch.full((2, 5), PAD)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(enc(longer), enc(ids), atol=1e-5, rtol=1e-5)
        # and padding really is masked: changing it to real tokens changes the embedding
        assert not torch.allclose(enc(torch.where(ids == PAD, 7, ids)), enc(ids), atol=1e-4)


@pytest.mark.parametrize("proj", ["linear", "mlp"])
def test_every_parameter_gets_a_gradient(proj):
    enc = _tiny(proj=proj, pool_type="mean").train()
    out = enc(_ids())
    assert out.shape == (2, 16)
    out.square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_output_and_gradients():
    enc = _tiny(pool_type="mean").train()
    runs = []
    for enable in (False, True):
        enc.zero_grad()
        enc.set_grad_checkpointing(enable)
        out = enc(_ids())
        out.square().sum().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}))
    flag = (
        "is_activation_checkpointing"
        if hasattr(enc.transformer, "is_activation_checkpointing")
        else ("is_gradient_checkpointing")
    )
    assert getattr(enc.transformer, flag)
    torch.testing.assert_close(runs[1][0], runs[0][0])
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, msg=name)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (torch.randn(2, 8), "integer tensor"),
        (torch.zeros(2, 3, 8, dtype=torch.long), r"2-D tensor of shape \(B, L\)"),
        (torch.zeros(2, 65, dtype=torch.long), r"L <= 64"),
        (torch.tensor([[1, 100]]), r"token ids in \[0, 100\)"),
        (torch.tensor([[1, -1]]), r"token ids in \[0, 100\)"),
    ],
)
def test_bad_input_raises(text, match):
    with pytest.raises(ValueError, match=match):
        _tiny()(text)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        HFTextEncoder()
    with pytest.raises(ValueError, match="not a local directory"):
        HFTextEncoder(str(tmp_path / "bert-base-uncased"))
    with pytest.raises(ValueError, match="model_type"):
        HFTextEncoder(config={"hidden_size": 32})
    with pytest.raises(ValueError, match="pool_type"):
        _tiny(pool_type="max")
    with pytest.raises(ValueError, match="proj=None keeps"):
        _tiny(proj=None, output_dim=8)


def test_config_object_pad_override_and_dtype():
    torch.manual_seed(0)
    enc = HFTextEncoder(config=BertConfig(**TINY), output_dim=8, pool_type="mean", pad_token_id=99, dtype=torch.float64)
    assert enc.pad_token_id == 99
    ids = torch.tensor([[CLS, 5, 99, 99]])
    assert enc.attention_mask(ids).tolist() == [[1, 1, 0, 0]]
    out = enc(ids)
    assert out.dtype == torch.float64 and out.shape == (1, 8)


def test_lock_layer_groups():
    enc = _tiny()
    groups = enc.layer_groups()
    assert len(groups) == 4  # embeddings, 2 layers, projection
    assert sum(len(g) for g in groups) == len(list(enc.parameters()))
    enc.lock(unlocked_layers=2)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in enc.named_parameters() if n == "proj.weight" or n.startswith("transformer.encoder.layer.1.")
    }


@pytest.mark.parametrize(
    "config",
    [
        {
            "model_type": "distilbert",
            "vocab_size": 100,
            "dim": 32,
            "n_layers": 2,
            "n_heads": 2,
            "hidden_dim": 64,
            "max_position_embeddings": 64,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        {
            "model_type": "roberta",
            "vocab_size": 100,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 66,
        },
    ],
    ids=["distilbert", "roberta"],
)
def test_other_architectures(config):
    torch.manual_seed(0)
    enc = HFTextEncoder(config=config, output_dim=8, pool_type="mean").eval()
    pad = enc.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, pad, pad]])
    longer = torch.cat([ids, torch.full((2, 3), pad)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(enc(longer), enc(ids), atol=1e-5, rtol=1e-5)
    assert enc.width == 32 and len(enc.layer_groups()) == 4
