"""KL(model || lens): hand-computed values, and the blocked loss against a materialised reference."""

import math

import pytest
import torch

from lensio.schema import FinalNorm
from lensio.store import open_store
from train.lenses import FrozenParts, FullLens, LowRankLens, frozen_parts_from_store, resolve_lens_class
from train.loss import Targets, block_tokens_for, blocked_head_kl, kl_div_logits, targets_from_batch
from train.module import LightningLens
from tests.helpers_pipeline import extract_store

LAYER = 1
N_TOKENS = 45  # not a multiple of any block size below, so the last block is partial
LENS_KINDS = ["full", "translator", "lowrank", "dla"]
# Float32 rounding of terms as large as ln(d_vocab) ~ 6 nats: the blocked loss and the reference add
# them in different orders, so the mean KL per position may differ by about this much.
KL_ATOL = 1e-6


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir):
    return open_store(extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir))


@pytest.fixture(scope="module")
def batch(store):
    """z [tok, head, d_head], scale [tok] and normalized [tok, d_model] of the first N_TOKENS positions."""
    z = torch.from_numpy(store.read_activations(f"layers/{LAYER}/z", 0, 3)).reshape(-1, 4, 8)[:N_TOKENS]
    scale = torch.from_numpy(store.group["final/scale"][:3]).reshape(-1)[:N_TOKENS]
    normalized = torch.from_numpy(store.group["final/normalized"][:3]).reshape(-1, 32)[:N_TOKENS]
    return z, scale, normalized


def perturbed_lens(store, kind: str) -> torch.nn.Module:
    """A lens of ``kind`` moved away from its initialisation, so every parameter affects the loss."""
    options = {"rank": 3} if kind == "lowrank" else {}
    lens = resolve_lens_class(kind)(frozen_parts_from_store(store, LAYER), **options)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return lens


def model_logits(store, normalized: torch.Tensor) -> torch.Tensor:
    return normalized.float() @ store.params["W_U"] + store.params["b_U"]


# --- hand-computed values --------------------------------------------------------------------------


def test_kl_identical_is_zero():
    logits = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, -1.0]])

    assert torch.allclose(kl_div_logits(logits, logits), torch.zeros(2), atol=1e-7)
    assert torch.allclose(kl_div_logits(logits, logits + 5.0), torch.zeros(2), atol=1e-6)


def test_kl_two_tokens_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    # 0.5 * ln(0.5 / 0.25) + 0.5 * ln(0.5 / 0.75) = 0.5 * ln(4 / 3)
    expected = 0.14384103622589042

    assert kl_div_logits(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)


def test_kl_three_tokens_by_hand():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.full((3,), 1 / 3)
    # 0.7 * ln(2.1) + 0.2 * ln(0.6) + 0.1 * ln(0.3)
    expected = 0.2967937361247722

    assert kl_div_logits(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_not_symmetric():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    # KL(q || p) = 0.25 * ln(0.5) + 0.75 * ln(1.5)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)

    assert kl_div_logits(q.log(), p.log()).item() == pytest.approx(expected, rel=1e-6)


def test_kl_temperature_divides_logits():
    # At temperature 2 the logits [0, 2 ln 3] give [0.25, 0.75], and 2 ln 0.5 gives [0.5, 0.5].
    target = 2 * torch.tensor([0.5, 0.5]).log()
    lens = torch.tensor([0.0, 2 * math.log(3)])

    assert kl_div_logits(target, lens, temperature=2.0).item() == pytest.approx(0.14384103622589042, rel=1e-6)


def test_lightning_kl_loss_by_hand():
    p, q = torch.tensor([[0.5, 0.5], [0.7, 0.3]]), torch.tensor([[0.25, 0.75], [0.7, 0.3]])

    loss = LightningLens.kl_loss(p.log(), q.log())

    assert loss.item() == pytest.approx(0.14384103622589042 / 2, rel=1e-6)


def test_lightning_kl_loss_broadcasts_heads():
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(5, 11, generator=generator)  # [tok, d_vocab]
    lens = torch.randn(5, 3, 11, generator=generator)  # [tok, head, d_vocab]
    expected = torch.stack([kl_div_logits(target, lens[:, head]) for head in range(3)]).mean()

    assert torch.allclose(LightningLens.kl_loss(target, lens), expected, rtol=1e-6)


def test_targets_from_full_logits_equal_factored(store, batch):
    _, _, normalized = batch
    W_U, b_U = store.params["W_U"], store.params["b_U"]

    factored = targets_from_batch({"normalized": normalized}, W_U, b_U, None).dense()
    full = targets_from_batch({"logits": model_logits(store, normalized)}, W_U, b_U, None)

    assert torch.allclose(factored.probs, full.probs, atol=1e-6)
    assert torch.equal(factored.top1, full.top1)


# --- blocked loss against the materialised reference -----------------------------------------------


def reference_loss(lens, z, scale, target_logits, layer_sum: bool, temperature: float):
    """Mean KL from every lens logit at once; also the per-head KL sums and top-1 matches."""
    logits = lens(z, scale)  # [tok, head, d_vocab], no soft-cap in GPT-2
    if layer_sum:
        summed = logits.sum(1)
        if lens.kind != "full":
            summed = summed - (lens.n_heads - 1) * lens.b_U  # b_U counted once, as in the model
        logits = summed.unsqueeze(1)  # [tok, 1, d_vocab]
    expanded = target_logits.unsqueeze(1).expand_as(logits)
    kl = kl_div_logits(expanded, logits, temperature)  # [tok, head]
    matches = (logits.argmax(-1) == target_logits.argmax(-1).unsqueeze(1)).sum(0)
    return kl.mean(), kl.sum(0), matches


def blocked_loss(lens, z, scale, targets, layer_sum: bool, temperature: float, rows: int):
    block_bytes = rows * 4 * lens.n_heads * lens.d_vocab
    assert block_tokens_for(lens.n_heads, lens.d_vocab, block_bytes) == rows
    features = lens.features(lens.head_outputs(z), scale)
    return blocked_head_kl(lens, features, targets, layer_sum=layer_sum, temperature=temperature,
                           block_bytes=block_bytes)


@pytest.mark.parametrize("rows", [1, 7, 45, 1000])
@pytest.mark.parametrize("objective", ["per-head", "layer-sum"])
@pytest.mark.parametrize("kind", LENS_KINDS)
def test_blocked_kl_matches_reference(store, batch, kind, objective, rows):
    z, scale, normalized = batch
    lens = perturbed_lens(store, kind)
    layer_sum = objective == "layer-sum"
    target_logits = model_logits(store, normalized)
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)
    params = [p for p in lens.parameters() if p.requires_grad]
    z_ref, z_blocked = z.clone().requires_grad_(), z.clone().requires_grad_()

    expected, expected_sums, expected_matches = reference_loss(lens, z_ref, scale, target_logits, layer_sum, 1.0)
    loss, summary = blocked_loss(lens, z_blocked, scale, targets, layer_sum, 1.0, rows)

    assert loss.shape == ()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=KL_ATOL)
    assert torch.allclose(summary.kl_sum, expected_sums, rtol=1e-5, atol=N_TOKENS * KL_ATOL)
    assert torch.equal(summary.top1_matches, expected_matches.float())
    assert summary.n_positions == N_TOKENS

    expected_grads = torch.autograd.grad(expected, [z_ref, *params])
    grads = torch.autograd.grad(loss, [z_blocked, *params])
    names = ["z"] + [name for name, p in lens.named_parameters() if p.requires_grad]
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert torch.count_nonzero(expected_grad) > 0, name
        assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-8), name


@pytest.mark.parametrize("kind", ["translator", "lowrank"])
def test_blocked_kl_temperature(store, batch, kind):
    z, scale, normalized = batch
    lens = perturbed_lens(store, kind)
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None, temperature=2.0)
    params = [p for p in lens.parameters() if p.requires_grad]

    expected, _, _ = reference_loss(lens, z, scale, model_logits(store, normalized), False, 2.0)
    loss, _ = blocked_loss(lens, z, scale, targets, False, 2.0, 7)

    assert torch.allclose(loss, expected, rtol=1e-5, atol=KL_ATOL)
    for grad, expected_grad in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-8)


def test_blocked_kl_softcap(store, batch):
    z, scale, normalized = batch
    lens = perturbed_lens(store, "full")
    lens.logit_softcap = 0.5  # small enough to change every logit of this model
    target_logits = 0.5 * torch.tanh(model_logits(store, normalized) / 0.5)
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, 0.5)

    expected, _, _ = reference_loss(lens, z, scale, target_logits, False, 1.0)
    loss, _ = blocked_loss(lens, z, scale, targets, False, 1.0, 7)

    assert torch.allclose(loss, expected, rtol=1e-5, atol=KL_ATOL)
    assert torch.allclose(targets.dense().probs, torch.softmax(target_logits, -1), atol=1e-6)
    # The soft-cap's tanh keeps its output for the backward pass, so the loss must not overwrite it.
    for grad, expected_grad in zip(torch.autograd.grad(loss, [lens.weight, lens.bias]),
                                   torch.autograd.grad(expected, [lens.weight, lens.bias])):
        assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("rows", [1, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["full", "translator", "lowrank"])  # dla has no parameters
def test_blocked_kl_parameter_grads_only(store, batch, kind, temperature, rows):
    """As in training: z needs no gradient, so the full lens takes its own in-place gradient path."""
    z, scale, normalized = batch
    lens = perturbed_lens(store, kind)
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None, temperature=temperature)
    params = [p for p in lens.parameters() if p.requires_grad]

    expected, _, _ = reference_loss(lens, z, scale, model_logits(store, normalized), False, temperature)
    loss, _ = blocked_loss(lens, z, scale, targets, False, temperature, rows)

    assert lens.has_projection_grads(params) is (kind == "full")
    assert torch.allclose(loss, expected, rtol=1e-5, atol=KL_ATOL)
    for grad, expected_grad in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        assert torch.count_nonzero(expected_grad) > 0
        assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-8)


def test_blocked_kl_backward_scales_gradients(store, batch):
    z, scale, normalized = batch
    lens = perturbed_lens(store, "full")
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)

    loss, _ = blocked_loss(lens, z, scale, targets, False, 1.0, 7)
    (once,) = torch.autograd.grad(loss, [lens.weight], retain_graph=True)
    (thrice,) = torch.autograd.grad(3 * loss, [lens.weight])

    assert torch.allclose(thrice, 3 * once, rtol=1e-6)


def test_blocked_kl_without_grad(store, batch):
    z, scale, normalized = batch
    lens = perturbed_lens(store, "translator")
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)

    with torch.no_grad():
        loss, _ = blocked_loss(lens, z, scale, targets, False, 1.0, 7)
    expected, _, _ = reference_loss(lens, z, scale, model_logits(store, normalized), False, 1.0)

    assert loss.requires_grad is False
    assert torch.allclose(loss, expected.detach(), rtol=1e-5, atol=KL_ATOL)


def test_blocked_kl_gradient_step_lowers_loss(store, batch):
    z, scale, normalized = batch
    lens = perturbed_lens(store, "lowrank")
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)
    optimizer = torch.optim.SGD(lens.parameters(), lr=0.05)

    before, _ = blocked_loss(lens, z, scale, targets, False, 1.0, 7)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after, _ = blocked_loss(lens, z, scale, targets, False, 1.0, 7)

    assert after.item() < before.item()


# --- top-k targets ---------------------------------------------------------------------------------


def model_copy_lens(store) -> FullLens:
    """A one-head full lens whose input is the final norm's output, so at init it computes the model's logits."""
    layer_parts = frozen_parts_from_store(store, LAYER)
    d_model = layer_parts.d_model
    parts = FrozenParts(W_O=torch.eye(d_model).unsqueeze(0), b_O=torch.zeros(d_model), W_U=layer_parts.W_U,
                        b_U=layer_parts.b_U, norm_weight=layer_parts.norm_weight, norm_bias=layer_parts.norm_bias,
                        norm_kind=layer_parts.norm_kind, norm_eps=layer_parts.norm_eps)
    return FullLens(parts)


def model_copy_kl(store, batch, targets: Targets) -> torch.Tensor:
    _, _, normalized = batch
    lens = model_copy_lens(store)
    features = lens.features(lens.head_outputs(normalized.float().unsqueeze(1)))  # [tok, 1, d_model]
    with torch.no_grad():
        loss, _ = blocked_head_kl(lens, features, targets)
    return loss


def test_dense_kl_zero_for_model_copy(store, batch):
    _, _, normalized = batch
    lens = model_copy_lens(store)
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)

    assert abs(model_copy_kl(store, batch, targets).item()) < KL_ATOL


def test_dense_kl_not_negative_for_model_copy(store, batch):
    _, _, normalized = batch
    lens = model_copy_lens(store)
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)

    assert model_copy_kl(store, batch, targets).item() >= 0.0


def topk_targets(logits: torch.Tensor, k: int) -> Targets:
    values, ids = torch.log_softmax(logits, -1).topk(k, dim=-1)
    return Targets(topk_logprobs=values, topk_ids=ids)


@pytest.mark.parametrize("k", [1, 8, 512])
def test_topk_kl_zero_for_model_copy(store, batch, k):
    _, _, normalized = batch
    lens = model_copy_lens(store)
    features = lens.features(lens.head_outputs(normalized.float().unsqueeze(1)))  # [tok, 1, d_model]

    with torch.no_grad():
        loss, summary = blocked_head_kl(lens, features, topk_targets(model_logits(store, normalized), k))

    assert abs(loss.item()) < 1e-5
    assert summary.top1_matches.item() == N_TOKENS


@pytest.mark.parametrize("k", [1, 8, 512])
def test_topk_kl_positive_and_below_full(store, batch, k):
    z, scale, normalized = batch
    lens = perturbed_lens(store, "translator")
    features = lens.features(lens.head_outputs(z), scale)
    logits = model_logits(store, normalized)
    full_targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)

    with torch.no_grad():
        topk_loss, topk_summary = blocked_head_kl(lens, features, topk_targets(logits, k))
        full_loss, full_summary = blocked_head_kl(lens, features, full_targets)

    assert topk_loss.item() > 1e-5  # the tiny model is close to uniform, so KL is small but not zero
    assert torch.all(topk_summary.kl_sum <= full_summary.kl_sum + 1e-4)
    if k == 512:  # every token kept: the coarsening changes nothing
        assert torch.allclose(topk_summary.kl_sum, full_summary.kl_sum, rtol=1e-4)


def identity_lens(d_vocab: int) -> FullLens:
    """A one-head full lens with identity W_O and W_U, so its logits are its input z."""
    eye = torch.eye(d_vocab)
    parts = FrozenParts(W_O=eye.unsqueeze(0), b_O=torch.zeros(d_vocab), W_U=eye, b_U=torch.zeros(d_vocab),
                        norm_weight=torch.ones(d_vocab), norm_bias=torch.zeros(d_vocab),
                        norm_kind=FinalNorm.RMSNORM, norm_eps=1e-5)
    return FullLens(parts)


def test_topk_kl_by_hand():
    # Model p = [0.5, 0.3, 0.2] with the top 2 kept, and lens q = [0.2, 0.3, 0.5].
    # KL over the buckets {0, 1, rest}: 0.5 ln(0.5 / 0.2) + 0.3 ln(0.3 / 0.3) + 0.2 ln(0.2 / 0.5)
    expected = 0.5 * math.log(2.5) + 0.2 * math.log(0.4)
    targets = Targets(topk_logprobs=torch.tensor([[0.5, 0.3]]).log(), topk_ids=torch.tensor([[0, 1]]))
    lens = identity_lens(3)
    lens_logits = torch.tensor([0.2, 0.3, 0.5]).log().reshape(1, 1, 3)  # [tok, head, d_vocab]

    with torch.no_grad():
        loss, _ = blocked_head_kl(lens, lens.features(lens.head_outputs(lens_logits)), targets)

    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dense_kl_by_hand_through_blocked_loss():
    lens = identity_lens(2)
    targets = targets_from_batch({"logits": torch.tensor([[0.5, 0.5]]).log()}, lens.W_U, lens.b_U, None)
    lens_logits = torch.tensor([0.25, 0.75]).log().reshape(1, 1, 2)

    with torch.no_grad():
        loss, _ = blocked_head_kl(lens, lens.features(lens.head_outputs(lens_logits)), targets)

    assert loss.item() == pytest.approx(0.14384103622589042, rel=1e-5)


def test_lowrank_up_zero_at_init(store):
    lens = LowRankLens(frozen_parts_from_store(store, LAYER), rank=4)

    assert torch.count_nonzero(lens.up) == 0
    assert tuple(lens.down.shape) == (4, 32, 4)
    assert lens.n_trainable == 4 * 4 * (32 + 512)


def test_kl_values_finite_for_extreme_logits():
    target = torch.tensor([[1000.0, 0.0, -1000.0]])
    lens = torch.tensor([[-1000.0, 0.0, 1000.0]])

    value = kl_div_logits(target, lens)

    assert torch.isfinite(value).all()
    assert value.item() == pytest.approx(2000.0, rel=1e-4)


@pytest.mark.parametrize("kind", ["full", "translator", "lowrank"])
def test_blocked_kl_under_bf16_autocast(store, batch, kind):
    """bf16-mixed training: parameter gradients come back in float32 and follow the float32 ones."""
    z, scale, normalized = batch
    lens = perturbed_lens(store, kind)
    params = [p for p in lens.parameters() if p.requires_grad]
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)
    expected = torch.autograd.grad(blocked_loss(lens, z, scale, targets, False, 1.0, 7)[0], params)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = blocked_loss(lens, z, scale, targets, False, 1.0, 7)
    grads = torch.autograd.grad(loss, params)

    for grad, expected_grad in zip(grads, expected):
        assert grad.dtype == torch.float32
        assert torch.isfinite(grad).all()
        assert ((grad - expected_grad).norm() / expected_grad.norm()).item() < 0.02, ((grad - expected_grad).norm() / expected_grad.norm()).item()
