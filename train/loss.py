"""KL(p_model || q_lens) per position, in nats, computed in blocks so that full-vocabulary logits for
[tok x head x d_vocab] never exist at once.

``blocked_head_kl`` runs the lens projection and the loss one token block at a time. When gradients
are needed it computes each block's gradient with respect to the features and the projection's
parameters right away (one forward and one backward per block, no recomputation), accumulates
them, and hands them to autograd through a custom function. Peak memory is then one block of
logits plus its softmax, whatever the batch size.
"""

import math
from dataclasses import dataclass
from enum import Enum

import torch

from train.lenses import Lens, softcap

# Bytes of float32 logits in one block [head, tok, d_vocab]; the softmax gradient takes one more
# block. 256 MiB gives a SmolLM2 layer (9 heads x 49152) 148 tokens per block: on a 2-core AVX2 CPU
# the projection matmul ran at 13 GFLOP/s with 37 rows and 21 GFLOP/s with 128 (scratch timing,
# machine loaded), so smaller blocks cost speed.
DEFAULT_BLOCK_BYTES = 256 << 20


class Objective(str, Enum):
    """Target of the loss: each head's lens alone, or the sum of the layer's head lenses."""

    PER_HEAD = "per-head"
    LAYER_SUM = "layer-sum"


def kl_div_logits(target_logits: torch.Tensor, lens_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(target) || softmax(lens)) over the last axis, in nats, one value per position."""
    target_logp = torch.log_softmax(target_logits.float() / temperature, dim=-1)
    lens_logp = torch.log_softmax(lens_logits.float() / temperature, dim=-1)
    return (target_logp.exp() * (target_logp - lens_logp)).sum(dim=-1)


@dataclass
class Targets:
    """The model's distribution for a batch of positions: dense probabilities, or its top-k."""

    probs: torch.Tensor | None = None  # [tok, d_vocab]
    neg_entropy: torch.Tensor | None = None  # [tok], sum of p log p
    topk_logprobs: torch.Tensor | None = None  # [tok, k]
    topk_ids: torch.Tensor | None = None  # [tok, k]

    @classmethod
    def from_logits(cls, logits: torch.Tensor, temperature: float = 1.0) -> "Targets":
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
        probs = logprobs.exp()
        return cls(probs=probs, neg_entropy=(probs * logprobs).sum(-1))

    def __len__(self) -> int:
        return len(self.probs if self.probs is not None else self.topk_ids)

    def block(self, rows: slice) -> "Targets":
        return Targets(*(None if t is None else t[rows]
                         for t in (self.probs, self.neg_entropy, self.topk_logprobs, self.topk_ids)))

    @property
    def top1(self) -> torch.Tensor:
        """The model's own most likely next token at each position."""
        return self.probs.argmax(-1) if self.probs is not None else self.topk_ids[:, 0]

    def dense(self) -> "Targets":
        return self


@dataclass
class NormalizedTargets:
    """The model's distribution kept as its final-norm output [tok, d_model]; ``block`` builds the
    probabilities of a few positions at a time, so a whole batch's [tok x d_vocab] never exists."""

    normalized: torch.Tensor  # [tok, d_model]
    W_U: torch.Tensor  # [d_model, d_vocab]
    b_U: torch.Tensor  # [d_vocab]
    softcap_value: float | None = None
    temperature: float = 1.0

    def __len__(self) -> int:
        return len(self.normalized)

    def block(self, rows: slice) -> Targets:
        # Float32 even under autocast: the targets are the model's own logits, not a lens's estimate.
        with torch.autocast(self.normalized.device.type, enabled=False):
            logits = torch.addmm(self.b_U, self.normalized[rows].float(), self.W_U)  # [tok, d_vocab]
            return Targets.from_logits(softcap(logits, self.softcap_value), self.temperature)

    def dense(self) -> Targets:
        """Build every position's probabilities at once: [tok x d_vocab] float32."""
        return self.block(slice(None))


def targets_from_batch(target: dict[str, torch.Tensor], W_U: torch.Tensor, b_U: torch.Tensor,
                       softcap_value: float | None, temperature: float = 1.0) -> Targets | NormalizedTargets:
    """Return the model's distribution from stored final data. Factored data gives ``normalized @ W_U + b_U``
    (then soft-cap), built one block at a time; full logits and top-k are used as stored."""
    if "normalized" in target:
        return NormalizedTargets(target["normalized"], W_U, b_U, softcap_value, temperature)
    if "logits" in target:
        return Targets.from_logits(target["logits"].float(), temperature)
    return Targets(topk_logprobs=target["topk_logprobs"].float(), topk_ids=target["topk_ids"].long())


def _dense_kl_and_grad(targets: Targets, logits: torch.Tensor, temperature: float, grad_scale: float | None,
                       overwrite: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL [head, tok] for logits [head, tok, d_vocab], and its gradient times ``grad_scale``.

    KL(p || q) = sum p log p - sum p log q, and log q = l/T - logsumexp(l/T), so the KL needs one
    logsumexp and one dot product per row instead of a materialised log-softmax; the gradient with
    respect to the logits is (q - p) / T. With ``overwrite`` the gradient is built in the logits'
    own memory. Each pass over a block costs roughly a tenth of the projection matmul on a 2-core CPU
    (torch.profiler), so the gradient then takes three in-place passes and no new block.

    Everything here runs in float32, also under autocast: low-precision logits are widened first,
    since log_z and q - p lose most of their digits in bfloat16 where the lens fits well.
    """
    with torch.autocast(logits.device.type, enabled=False):
        return _float32_kl_and_grad(targets, logits, temperature, grad_scale, overwrite)


def _float32_kl_and_grad(targets: Targets, logits: torch.Tensor, temperature: float, grad_scale: float | None,
                         overwrite: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    own = overwrite or logits.dtype != torch.float32 or temperature != 1.0
    scaled = logits.float() if logits.dtype != torch.float32 else logits
    if temperature != 1.0:
        scaled = scaled.div_(temperature) if scaled is not logits else scaled / temperature
    log_z = torch.logsumexp(scaled, dim=-1)  # [head, tok]
    cross = torch.einsum("htv,tv->ht", scaled, targets.probs)
    # Float32 rounding of the three terms leaves about -2e-7 nats for identical distributions; a KL
    # is never negative, so clamp. The gradient below is exact either way.
    kl = (targets.neg_entropy - cross + log_z).clamp_min_(0.0)
    if grad_scale is None:
        return kl, None

    # s * q = exp(l/T - log_z + log s): the scale rides in the exponent instead of a separate pass.
    step = grad_scale / temperature
    shift = (log_z - math.log(step)).unsqueeze(-1)  # [head, tok, 1]
    grad = scaled.sub_(shift) if own else scaled - shift
    grad.exp_().sub_(targets.probs, alpha=step)
    return kl, grad
def _topk_kl(targets: Targets, lens_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL [head, tok] between distributions coarsened to the model's top k tokens plus one "rest" bucket,
    a lower bound of the full KL. Differentiable through autograd."""
    lens_logp = torch.log_softmax(lens_logits / temperature, dim=-1)
    ids = targets.topk_ids.unsqueeze(0).expand(lens_logp.shape[0], -1, -1)
    lens_top = lens_logp.gather(-1, ids)  # [head, tok, k]
    p_top = targets.topk_logprobs.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - lens_top.exp().sum(-1)).clamp_min(1e-12)
    return (p_top * (targets.topk_logprobs - lens_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


@dataclass
class HeadKL:
    """Loss summary of one batch: per head, summed over its positions."""

    kl_sum: torch.Tensor  # [head] sum of KL in nats
    top1_matches: torch.Tensor  # [head] positions where the lens's top token equals the model's
    n_positions: int


def block_tokens_for(n_heads: int, d_vocab: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    return max(1, block_bytes // (4 * max(1, n_heads) * d_vocab))


class _BlockedKL(torch.autograd.Function):
    """Autograd wrapper: the forward pass already computed every gradient, the backward pass scales them."""

    @staticmethod
    def forward(ctx, loss, n_inputs, *inputs_then_grads):
        # inputs_then_grads contains the n_inputs tensors that receive gradients, then their gradients.
        ctx.n_inputs = n_inputs
        ctx.save_for_backward(*inputs_then_grads[n_inputs:])
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        # A plain loss.backward() passes 1, so the sums go out as they are instead of being multiplied
        # into a new parameter-sized tensor (1 GB for a full lens on SmolLM2).
        if not bool(grad_output == 1):
            grads = tuple(g * grad_output for g in ctx.saved_tensors)
        else:
            grads = ctx.saved_tensors
        return (None, None, *grads, *([None] * ctx.n_inputs))


def blocked_head_kl(lens: Lens, features: torch.Tensor, targets: Targets | NormalizedTargets, *,
                    layer_sum: bool = False, temperature: float = 1.0,
                    block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[torch.Tensor, HeadKL]:
    """Mean KL over heads and positions for ``lens.project(features)`` against ``targets``.

    Args:
        lens: the lens whose ``project`` maps features [tok, head, d_in] to logits [head, tok, d_vocab].
        features: output of ``lens.features``; may require grad.
        targets: the model's distribution at the same positions, built one block at a time when given
            as ``NormalizedTargets``.
        layer_sum: fit the sum of the heads' logits instead of each head alone (AttentionLens's objective).

    Returns:
        The scalar loss (mean of KL in nats over positions, and over heads for the per-head objective),
        differentiable with respect to ``features`` and the lens parameters, and a ``HeadKL`` summary.
    """
    n_tok, n_heads = features.shape[0], features.shape[1]
    n_out_heads = 1 if layer_sum else n_heads
    rows = block_tokens_for(n_heads, lens.d_vocab, block_bytes)
    params = [p for p in lens.parameters() if p.requires_grad]
    needs_grad = torch.is_grad_enabled() and (features.requires_grad or bool(params))
    feature_leaf = features.detach().requires_grad_(features.requires_grad and needs_grad)
    grad_inputs: list[torch.Tensor] = []
    if feature_leaf.requires_grad:
        grad_inputs.append(feature_leaf)
    if needs_grad:
        grad_inputs.extend(params)
    needs_grad = needs_grad and bool(grad_inputs)
    dense = not (isinstance(targets, Targets) and targets.probs is None)
    # A lens may compute its projection's gradients itself, as FullLens does in place. Those are
    # gradients of the raw projection, so neither a layer sum nor a soft-cap may come between.
    direct_grads = (needs_grad and dense and not layer_sum and not lens.logit_softcap
                    and lens.has_projection_grads(grad_inputs))
    # The loss may build the gradient inside the logits when autograd does not keep them (tanh does).
    overwrite = lens.logit_softcap is None and lens.project_keeps_no_output
    grad_sums: list[torch.Tensor | None] = [None] * len(grad_inputs)
    kl_sum = torch.zeros(n_out_heads, device=features.device)
    top1 = torch.zeros(n_out_heads, device=features.device)
    normaliser = n_tok * n_out_heads

    for start in range(0, n_tok, rows):
        block = slice(start, min(start + rows, n_tok))
        block_targets = targets.block(block)
        with torch.set_grad_enabled(needs_grad and not direct_grads):
            logits = lens.project(feature_leaf[block])  # [head, tok, d_vocab]
            if layer_sum:
                logits = logits.sum(0, keepdim=True)
                if _shared_bias(lens):
                    logits = logits - (n_heads - 1) * lens.b_U  # count the shared b_U once
            logits = softcap(logits, lens.logit_softcap)
        with torch.no_grad():
            top1 += (logits.argmax(-1) == block_targets.top1.unsqueeze(0)).sum(-1)

        if dense:
            kl, grad_logits = _dense_kl_and_grad(block_targets, logits.detach(), temperature,
                                                 1.0 / normaliser if needs_grad else None, overwrite)
            if direct_grads:
                grad_sums = lens.projection_grads(feature_leaf[block], grad_logits, grad_sums)
            elif needs_grad:
                block_grads = torch.autograd.grad(logits, grad_inputs, grad_outputs=grad_logits, allow_unused=True)
                grad_sums = _accumulate(grad_sums, block_grads)
        else:
            with torch.set_grad_enabled(needs_grad):
                kl = _topk_kl(block_targets, logits, temperature)
            if needs_grad:
                block_grads = torch.autograd.grad(kl.sum() / normaliser, grad_inputs, allow_unused=True)
                grad_sums = _accumulate(grad_sums, block_grads)
        kl_sum += kl.detach().sum(-1)

    loss = kl_sum.sum() / normaliser
    summary = HeadKL(kl_sum=kl_sum, top1_matches=top1, n_positions=n_tok)
    if not needs_grad:
        return loss, summary
    # Route the precomputed gradients through autograd: features continue into the lens's trunk.
    grad_sums = [torch.zeros_like(t) if g is None else g for t, g in zip(grad_inputs, grad_sums)]
    inputs = ([features] if feature_leaf.requires_grad else []) + params
    return _BlockedKL.apply(loss, len(inputs), *inputs, *grad_sums), summary


def _accumulate(sums: list[torch.Tensor | None], grads: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
    """Add one block's gradients to the running sums. The first block's are copied: autograd may return
    broadcast views or tensors it shares with the graph."""
    updated = []
    for total, grad in zip(sums, grads):
        if grad is not None:
            total = grad.clone() if total is None else total.add_(grad)
        updated.append(total)
    return updated


def _shared_bias(lens: Lens) -> bool:
    """True when every head's logits carry the same ``b_U``, which the layer sum must count once."""
    return lens.kind in ("dla", "translator", "lowrank")


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)
