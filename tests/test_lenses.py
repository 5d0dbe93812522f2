"""Lens architectures at initialisation, prediction, saving and loading, and the LightningLens wrapper."""

import json

import pytest
import torch

from lensio.errors import BadInputError, LensError, StoreMismatchError
from lensio.reader import LayerBatches
from lensio.store import open_store
from train.lenses import (
    DLALens,
    FullLens,
    LowRankLens,
    TranslatorLens,
    frozen_parts_from_store,
    resolve_lens_class,
)
from train.loss import blocked_head_kl, targets_from_batch
from train.module import LightningLens
from train.saving import lens_config, load_lens, save_lens
from tests.helpers_pipeline import extract_store, plain_hf_model

LAYER = 1
LENS_CLASSES = {"full": FullLens, "translator": TranslatorLens, "lowrank": LowRankLens, "dla": DLALens}


@pytest.fixture(scope="module")
def model_store(tmp_path_factory, tiny_model_dir, text_corpus_dir):
    """(open store, model dir) for each tiny model."""
    return open_store(extract_store(tmp_path_factory, tiny_model_dir, text_corpus_dir)), tiny_model_dir


@pytest.fixture(scope="module")
def gpt2_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir):
    return open_store(extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir))


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory, tiny_llama_dir, text_corpus_dir):
    return open_store(extract_store(tmp_path_factory, tiny_llama_dir, text_corpus_dir))


def first_positions(store, n_sequences: int = 2):
    """z [tok, head, d_head] and scale [tok] of the first sequences."""
    z = torch.from_numpy(store.read_activations(f"layers/{LAYER}/z", 0, n_sequences))
    scale = torch.from_numpy(store.group["final/scale"][:n_sequences])
    return z.reshape(-1, *z.shape[2:]), scale.reshape(-1)


def head_outputs_by_hand(store, z: torch.Tensor) -> torch.Tensor:
    """[tok, head, d_model]: each head's z times its slice of W_O."""
    W_O = store.params[f"W_O/{LAYER}"]  # [head, d_head, d_model]
    return torch.stack([z[:, head] @ W_O[head] for head in range(W_O.shape[0])], dim=1)


def final_norm_module(model_dir):
    hf_model = plain_hf_model(str(model_dir))
    return hf_model.transformer.ln_f if hasattr(hf_model, "transformer") else hf_model.model.norm


def make_lens(store, kind: str, **options):
    return resolve_lens_class(kind)(frozen_parts_from_store(store, LAYER), **options)


def perturb(lens, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return lens


# --- initialisation --------------------------------------------------------------------------------


def test_store_unembedding_is_model_lm_head(model_store):
    store, model_dir = model_store
    lm_head = plain_hf_model(str(model_dir)).lm_head

    assert torch.equal(store.params["W_U"], lm_head.weight.detach().T)


@pytest.mark.parametrize("kind", ["translator", "lowrank"])
def test_lens_init_is_final_norm_then_unembed(model_store, kind):
    store, model_dir = model_store
    z, scale = first_positions(store)
    lens = make_lens(store, kind)
    head_out = head_outputs_by_hand(store, z)

    with torch.no_grad():
        expected = final_norm_module(model_dir)(head_out) @ store.params["W_U"] + store.params["b_U"]
        logits = lens(z, scale)

    assert logits.shape == (32, 4, 512)
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_full_lens_init_is_unembed(model_store):
    store, _ = model_store
    z, scale = first_positions(store)
    head_out = head_outputs_by_hand(store, z)

    with torch.no_grad():
        logits = make_lens(store, "full")(z, scale)

    assert torch.allclose(logits, head_out @ store.params["W_U"] + store.params["b_U"], rtol=1e-5, atol=1e-6)


def test_dla_lens_formula(model_store):
    store, _ = model_store
    z, scale = first_positions(store)
    head_out = head_outputs_by_hand(store, z)
    if store.final_norm["kind"] == "layernorm":
        head_out = head_out - head_out.mean(-1, keepdim=True)  # the LayerNorm centres every summand
    expected = head_out / scale[:, None, None] * store.params["final_norm/weight"] @ store.params["W_U"] \
        + store.params["b_U"]

    with torch.no_grad():
        logits = make_lens(store, "dla")(z, scale)

    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_dla_requires_scale(gpt2_store):
    z, _ = first_positions(gpt2_store)

    with pytest.raises(ValueError, match="scale"):
        make_lens(gpt2_store, "dla")(z)


@pytest.mark.parametrize(("kind", "per_head"), [
    ("dla", 0), ("full", 32 * 512 + 512), ("translator", 32 * 32 + 32), ("lowrank", 5 * (32 + 512)),
])
def test_lens_parameter_counts(gpt2_store, kind, per_head):
    lens = make_lens(gpt2_store, kind, **({"rank": 5} if kind == "lowrank" else {}))

    assert lens.n_trainable == 4 * per_head


def test_lens_buffers_are_frozen(gpt2_store):
    lens = make_lens(gpt2_store, "translator")
    parameter_ids = {id(p) for p in lens.parameters()}

    for name, buffer in lens.named_buffers():
        assert id(buffer) not in parameter_ids, name
        assert buffer.requires_grad is False, name


# --- predict ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "translator", "lowrank", "dla"])
def test_predict_from_z_and_results(gpt2_store, kind):
    store = gpt2_store
    lens = perturb(make_lens(store, kind))
    z = torch.from_numpy(store.read_activations(f"layers/{LAYER}/z", 0, 2))  # [seq, pos, head, d_head]
    scale = torch.from_numpy(store.group["final/scale"][:2])  # [seq, pos]
    results = head_outputs_by_hand(store, z.reshape(-1, 4, 8)).reshape(2, 16, 4, 32)

    with torch.no_grad():
        from_z = lens.predict(z, scale)
        from_results = lens.predict(results, scale)
        logits = lens(z.reshape(-1, 4, 8), scale.reshape(-1))

    assert from_z.shape == (2, 16, 4, 512)
    assert torch.allclose(from_z.sum(-1), torch.ones(2, 16, 4), atol=1e-5)
    assert torch.all(from_z >= 0)
    assert torch.allclose(from_z, from_results, atol=1e-6)
    assert torch.allclose(from_z.reshape(-1, 4, 512), logits.softmax(-1), atol=1e-6)


def test_predict_single_position(gpt2_store):
    lens = make_lens(gpt2_store, "translator")
    z, _ = first_positions(gpt2_store)

    with torch.no_grad():
        probs = lens.predict(z[0])  # [head, d_head]

    assert probs.shape == (4, 512)
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)


# --- saving and loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "translator", "lowrank", "dla"])
def test_save_load_round_trip(gpt2_store, tmp_path, kind):
    store = gpt2_store
    lens = perturb(make_lens(store, kind, **({"rank": 3} if kind == "lowrank" else {})))
    z, scale = first_positions(store)
    folder = save_lens(lens, tmp_path / "lens", lens_config(lens, layer=LAYER, objective="per-head", store=store))

    loaded = load_lens(folder, store)
    with torch.no_grad():
        expected, got = lens(z, scale), loaded(z, scale)

    assert type(loaded) is LENS_CLASSES[kind]
    assert loaded.layer == LAYER
    assert loaded.training is False
    assert torch.equal(got, expected)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "lens.safetensors"]


def test_save_load_keeps_rank(gpt2_store, tmp_path):
    lens = make_lens(gpt2_store, "lowrank", rank=3)
    folder = save_lens(lens, tmp_path / "lens", lens_config(lens, layer=LAYER, objective="layer-sum",
                                                            store=gpt2_store))

    loaded = load_lens(folder, gpt2_store)
    config = json.loads((folder / "config.json").read_text())

    assert loaded.rank == 3
    assert config["lens"] == "lowrank"
    assert config["layer"] == LAYER
    assert config["objective"] == "layer-sum"
    assert config["shapes"] == {"n_heads": 4, "d_head": 8, "d_model": 32, "d_vocab": 512}


def test_load_lens_default_store(gpt2_store, tmp_path):
    lens = perturb(make_lens(gpt2_store, "translator"))
    folder = save_lens(lens, tmp_path / "lens", lens_config(lens, layer=LAYER, objective="per-head",
                                                            store=gpt2_store))
    z, scale = first_positions(gpt2_store)

    loaded = load_lens(folder)

    assert torch.equal(loaded(z, scale).detach(), lens(z, scale).detach())


def test_load_lens_other_model_store(gpt2_store, llama_store, tmp_path):
    lens = make_lens(gpt2_store, "translator")
    folder = save_lens(lens, tmp_path / "lens", lens_config(lens, layer=LAYER, objective="per-head",
                                                            store=gpt2_store))

    with pytest.raises(LensError) as caught:
        load_lens(folder, llama_store)

    assert "W_U differs" in caught.value.message


def test_load_lens_layer_mismatch(gpt2_store, tmp_path):
    lens = make_lens(gpt2_store, "full")
    folder = save_lens(lens, tmp_path / "lens", lens_config(lens, layer=LAYER, objective="per-head",
                                                            store=gpt2_store))

    with pytest.raises(LensError) as caught:
        load_lens(folder, gpt2_store, layer=0)

    assert "layer 1" in caught.value.message
    assert "layer 0" in caught.value.message


@pytest.mark.parametrize("damage", ["no_config", "bad_json", "other_format", "not_a_folder"])
def test_load_lens_rejects_damaged_folder(gpt2_store, tmp_path, damage):
    lens = make_lens(gpt2_store, "translator")
    folder = save_lens(lens, tmp_path / "lens", lens_config(lens, layer=LAYER, objective="per-head",
                                                            store=gpt2_store))
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif damage == "other_format":
        (folder / "config.json").write_text(json.dumps({"format": "something-else", "format_version": 1}))
    else:
        folder = folder / "lens.safetensors"

    with pytest.raises(LensError):
        load_lens(folder, gpt2_store)


def test_save_lens_replaces_existing(gpt2_store, tmp_path):
    first = perturb(make_lens(gpt2_store, "translator"), seed=1)
    second = perturb(make_lens(gpt2_store, "translator"), seed=2)
    config = lens_config(first, layer=LAYER, objective="per-head", store=gpt2_store)
    save_lens(first, tmp_path / "lens", config)

    save_lens(second, tmp_path / "lens", config)
    loaded = load_lens(tmp_path / "lens", gpt2_store)

    assert torch.equal(loaded.weight, second.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]


# --- LightningLens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lens_cls", ["translator", TranslatorLens])
def test_lightning_lens_accepts_class_or_name(gpt2_store, lens_cls):
    module = LightningLens(gpt2_store.meta["model"]["name"], lens_cls, LAYER, store=gpt2_store.url)

    module.setup("fit")

    assert isinstance(module.lens, TranslatorLens)
    assert module.hparams["lens"] == "translator"


def test_lightning_lens_unknown_name(gpt2_store):
    with pytest.raises(BadInputError) as caught:
        LightningLens(None, "mirror", LAYER, store=gpt2_store.url)

    assert "'mirror'" in caught.value.message


@pytest.mark.parametrize("kind", ["full", "translator", "lowrank"])
def test_lightning_optimizer_sees_lens_parameters_only(gpt2_store, kind):
    module = LightningLens(None, kind, LAYER, lr=0.01, store=gpt2_store.url)
    module.setup("fit")

    optimizer = module.configure_optimizers()
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    optimized_ids = {id(p) for p in optimized}
    frozen_ids = {id(buffer) for buffer in module.lens.buffers()}

    assert optimized_ids == {id(p) for p in module.lens.parameters()}
    assert optimized_ids == {id(p) for p in module.parameters()}
    assert not optimized_ids & frozen_ids
    assert id(module.lens.W_U) not in optimized_ids
    assert id(module.lens.W_O) not in optimized_ids
    assert sum(p.numel() for p in optimized) == module.lens.n_trainable
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_lightning_setup_rejects_wrong_model(gpt2_store):
    module = LightningLens("another-model", "translator", LAYER, store=gpt2_store.url)

    with pytest.raises(StoreMismatchError) as caught:
        module.setup("fit")

    assert "'another-model'" in caught.value.message
    assert module.lens is None


def test_lightning_setup_accepts_store_model(gpt2_store):
    module = LightningLens(gpt2_store.meta["model"]["name"], "lowrank", LAYER, store=gpt2_store.url,
                           lens_options={"rank": 2})

    module.setup("fit")

    assert module.lens.rank == 2


def test_lightning_setup_rejects_layer_not_in_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir):
    url = extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir, layers="1")
    module = LightningLens(None, "translator", 0, store=url)

    with pytest.raises(BadInputError):
        module.setup("fit")


def test_lightning_forward_from_cache(gpt2_store):
    module = LightningLens(None, "translator", LAYER, store=gpt2_store.url)
    module.setup("fit")
    perturb(module.lens)
    z = torch.from_numpy(gpt2_store.read_activations(f"layers/{LAYER}/z", 0, 2))  # [seq, pos, head, d_head]

    with torch.no_grad():
        logits = module({f"blocks.{LAYER}.attn.hook_z": z})
        expected = module.lens(z.reshape(-1, 4, 8))

    assert logits.shape == (2, 16, 4, 512)
    assert torch.allclose(logits.reshape(-1, 4, 512), expected)


def test_lightning_training_step_is_blocked_kl(gpt2_store):
    module = LightningLens(None, "full", LAYER, store=gpt2_store.url)
    module.setup("fit")
    perturb(module.lens)
    batch = next(iter(LayerBatches(gpt2_store.url, LAYER, gpt2_store.train_range, 40, shuffle=False)))
    lens = module.lens
    targets = targets_from_batch(batch.target, lens.W_U, lens.b_U, None)

    loss = module.training_step(batch, 0)
    expected, _ = blocked_head_kl(lens, lens.features(lens.head_outputs(batch.z), batch.scale), targets)

    assert torch.allclose(loss, expected)
    assert loss.requires_grad


def test_frozen_parts_reject_layer_not_in_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir):
    store = open_store(extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir, layers="1"))

    with pytest.raises(BadInputError) as caught:
        frozen_parts_from_store(store, 0)

    assert "layer 0" in caught.value.message
