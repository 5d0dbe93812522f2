"""Lens architectures. Every lens maps each head's output to logits over the vocabulary.

A lens is split in two so that the loss can be computed in blocks (see ``train.loss``):

* ``features(head_out, scale)`` is the cheap, differentiable part, [tok, head, d_model] in and
  [tok, head, d_in] out;
* ``project(features)`` maps features to logits [head, tok, d_vocab] and dominates the cost.

All work is batched over heads with einsum or batched matmuls; nothing loops over heads.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lensio.schema import FinalNorm

LENS_REGISTRY: dict[str, type["Lens"]] = {}


@dataclass
class FrozenParts:
    """The base model's fixed tensors a lens of one layer builds on, all float32."""

    W_O: torch.Tensor  # [head, d_head, d_model]
    b_O: torch.Tensor  # [d_model]
    W_U: torch.Tensor  # [d_model, d_vocab]
    b_U: torch.Tensor  # [d_vocab]
    norm_weight: torch.Tensor  # [d_model]
    norm_bias: torch.Tensor  # [d_model]
    norm_kind: FinalNorm
    norm_eps: float
    logit_softcap: float | None = None

    @property
    def n_heads(self) -> int:
        return self.W_O.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_O.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_O.shape[2]

    @property
    def d_vocab(self) -> int:
        return self.W_U.shape[1]


def register(cls: type["Lens"]) -> type["Lens"]:
    LENS_REGISTRY[cls.kind] = cls
    return cls


def final_norm(x: torch.Tensor, parts: "Lens", scale: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the model's final norm over the last axis; with ``scale`` given, divide by it instead of the
    vector's own scale (direct logit attribution)."""
    if parts.norm_kind is FinalNorm.LAYERNORM:
        x = x - x.mean(dim=-1, keepdim=True)
        own_scale = (x.pow(2).mean(dim=-1, keepdim=True) + parts.norm_eps).sqrt()
    else:
        own_scale = (x.pow(2).mean(dim=-1, keepdim=True) + parts.norm_eps).sqrt()
    return x / (own_scale if scale is None else scale) * parts.norm_weight + parts.norm_bias


class Lens(nn.Module):
    """Base class: frozen model tensors as buffers, trainable tensors as parameters.

    Buffers ``W_U`` and ``b_U`` are not saved with a lens (the store contains them and a hash checks
    them on load); every other tensor is.
    """

    kind: ClassVar[str]
    uses_scale: ClassVar[bool] = False
    # True when autograd keeps none of ``project``'s output for the backward pass, so the loss may
    # overwrite the logits with their gradient. A subclass whose projection ends in, say, an exp
    # must leave it False.
    project_keeps_no_output: ClassVar[bool] = False

    def __init__(self, parts: FrozenParts, **options):
        super().__init__()
        self.n_heads, self.d_head, self.d_model, self.d_vocab = parts.n_heads, parts.d_head, parts.d_model, parts.d_vocab
        self.norm_kind, self.norm_eps, self.logit_softcap = parts.norm_kind, parts.norm_eps, parts.logit_softcap
        self.register_buffer("W_O", parts.W_O.float().clone())
        self.register_buffer("b_O", parts.b_O.float().clone())
        self.register_buffer("W_U", parts.W_U.float(), persistent=False)
        self.register_buffer("b_U", parts.b_U.float(), persistent=False)
        self.register_buffer("norm_weight", parts.norm_weight.float().clone())
        self.register_buffer("norm_bias", parts.norm_bias.float().clone())
        self.options = options

    def head_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """Per-head attention output: [tok, head, d_head] -> [tok, head, d_model]."""
        return torch.einsum("thd,hdm->thm", z, self.W_O)

    def features(self, head_out: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [head, tok, d_vocab] of features [tok, head, d_in], before any soft-cap."""
        raise NotImplementedError

    def has_projection_grads(self, inputs: list[torch.Tensor]) -> bool:
        """True when ``projection_grads`` can give the gradients of exactly ``inputs`` without autograd."""
        return False

    def projection_grads(self, features: torch.Tensor, grad_logits: torch.Tensor,
                         sums: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Add the gradients of ``project``'s parameters for ``grad_logits`` [head, tok, d_vocab] to ``sums``
        (None before the first block) and return them. Only called when ``has_projection_grads`` is True."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [tok, head, d_vocab] for z [tok, head, d_head]. Materialises every logit: use the blocked
        loss for training and evaluation."""
        logits = self.project(self.features(self.head_outputs(z), scale)).transpose(0, 1)
        return softcap(logits, self.logit_softcap)

    def predict(self, z_or_result: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [..., head, d_vocab] from z [..., head, d_head] or head results [..., head, d_model]."""
        lead = z_or_result.shape[:-2]
        flat = z_or_result.reshape(-1, *z_or_result.shape[-2:]).float()
        head_out = self.head_outputs(flat) if flat.shape[-1] == self.d_head and self.d_head != self.d_model else flat
        if scale is not None:
            scale = scale.reshape(-1, 1, 1).float()
        logits = softcap(self.project(self.features(head_out, scale)).transpose(0, 1), self.logit_softcap)
        return logits.softmax(-1).reshape(*lead, self.n_heads, self.d_vocab)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if not cap else cap * torch.tanh(logits / cap)


@register
class DLALens(Lens):
    """Direct logit attribution: the head's output through the model's own final scale and unembedding.

    No parameters. The head output is centred (LayerNorm models), divided by the final norm's
    per-position scale of the full residual stream, multiplied by the norm weight, and unembedded
    with ``b_U`` added; the norm's bias is left out because it is not part of any head's contribution.
    """

    kind = "dla"
    project_keeps_no_output = True
    uses_scale = True

    def features(self, head_out: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None:
            raise ValueError("the dla lens needs the final norm's scale of each position")
        if self.norm_kind is FinalNorm.LAYERNORM:
            head_out = head_out - head_out.mean(dim=-1, keepdim=True)
        return head_out / scale.reshape(-1, 1, 1) * self.norm_weight

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return torch.matmul(features.transpose(0, 1), self.W_U).add_(self.b_U)  # in place: one pass fewer


@register
class FullLens(Lens):
    """A free linear map per head from its output to the vocabulary, initialised from W_U and b_U
    (the lens of AttentionLens). d_model x d_vocab + d_vocab parameters per head."""

    kind = "full"
    project_keeps_no_output = True

    def __init__(self, parts: FrozenParts, **options):
        super().__init__(parts, **options)
        self.weight = nn.Parameter(parts.W_U.float().expand(self.n_heads, -1, -1).clone())  # [head, d_model, d_vocab]
        self.bias = nn.Parameter(parts.b_U.float().expand(self.n_heads, -1).clone())  # [head, d_vocab]

    def features(self, head_out: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return head_out

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), features.transpose(0, 1), self.weight)

    def has_projection_grads(self, inputs: list[torch.Tensor]) -> bool:
        return len(inputs) == 2 and inputs[0] is self.weight and inputs[1] is self.bias

    def projection_grads(self, features: torch.Tensor, grad_logits: torch.Tensor,
                         sums: list[torch.Tensor | None]) -> list[torch.Tensor]:
        # Accumulating in place with baddbmm_ saves allocating and adding a parameter-sized block
        # (1 GB on SmolLM2) for every token block.
        by_head_t = features.transpose(0, 1).transpose(1, 2)  # [head, d_model, tok]
        weight_sum, bias_sum = sums
        if weight_sum is not None and by_head_t.dtype == grad_logits.dtype == weight_sum.dtype:
            weight_sum.baddbmm_(by_head_t, grad_logits)
        else:  # the first block, or autocast's low-precision features: sums stay in the parameters' dtype
            block = torch.bmm(by_head_t, grad_logits).to(self.weight.dtype)
            weight_sum = block if weight_sum is None else weight_sum.add_(block)
        bias_block = grad_logits.sum(1).to(self.bias.dtype)
        return [weight_sum, bias_block if bias_sum is None else bias_sum.add_(bias_block)]


@register
class TranslatorLens(Lens):
    """An affine map per head initialised to the identity, then the model's frozen final norm and
    unembedding (the tuned-lens translator applied to one head). d_model x d_model + d_model per head."""

    kind = "translator"
    project_keeps_no_output = True

    def __init__(self, parts: FrozenParts, **options):
        super().__init__(parts, **options)
        self.weight = nn.Parameter(torch.eye(self.d_model).expand(self.n_heads, -1, -1).clone())  # [head, d_model, d_model]
        self.bias = nn.Parameter(torch.zeros(self.n_heads, self.d_model))  # [head, d_model]

    def features(self, head_out: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        translated = torch.einsum("thm,hmn->thn", head_out, self.weight) + self.bias
        return final_norm(translated, self)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return torch.matmul(features.transpose(0, 1), self.W_U).add_(self.b_U)  # in place: one pass fewer


@register
class LowRankLens(Lens):
    """W_U plus a per-head rank-r correction, applied to the head's output after the model's final norm.
    r x (d_model + d_vocab) parameters per head; ``rank`` defaults to 16."""

    kind = "lowrank"
    project_keeps_no_output = True

    def __init__(self, parts: FrozenParts, rank: int = 16, **options):
        super().__init__(parts, rank=rank, **options)
        self.rank = rank
        self.down = nn.Parameter(torch.randn(self.n_heads, self.d_model, rank) / math.sqrt(self.d_model))
        self.up = nn.Parameter(torch.zeros(self.n_heads, rank, self.d_vocab))  # zero: starts equal to W_U

    def features(self, head_out: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return final_norm(head_out, self)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        by_head = features.transpose(0, 1)  # [head, tok, d_model]
        logits = torch.matmul(by_head, self.W_U)  # [head, tok, d_vocab]
        return logits.add_(torch.bmm(torch.bmm(by_head, self.down), self.up)).add_(self.b_U)


def resolve_lens_class(lens: str | type[Lens]) -> type[Lens]:
    """Return the lens class for a registered name or pass a class through."""
    if isinstance(lens, type) and issubclass(lens, Lens):
        return lens
    try:
        return LENS_REGISTRY[str(lens)]
    except KeyError:
        from lensio.errors import BadInputError

        raise BadInputError(f"unknown lens {lens!r}; choose one of {', '.join(sorted(LENS_REGISTRY))}") from None


def frozen_parts_from_store(store, layer: int) -> FrozenParts:
    """Collect a layer's frozen tensors from an open store."""
    params = store.params
    store.z(layer)  # raises a clear error for a layer the store lacks
    return FrozenParts(
        W_O=params[f"W_O/{layer}"], b_O=params[f"b_O/{layer}"], W_U=params["W_U"], b_U=params["b_U"],
        norm_weight=params["final_norm/weight"], norm_bias=params["final_norm/bias"],
        norm_kind=FinalNorm(store.final_norm["kind"]), norm_eps=float(store.final_norm["eps"]),
        logit_softcap=store.logit_softcap,
    )
