"""Loading the frozen model through TransformerLens's TransformerBridge.

``--model`` accepts a TransformerLens or Hugging Face model name, a local Hugging Face directory, or
a ``.gguf`` file. Every kind is loaded with transformers first (eager attention, float32, eval mode)
and then wrapped with ``TransformerBridge.boot_transformers``, which gives the same hook names and
weight shapes for every architecture. Weights stay raw: no folding or centring.
"""

import logging
import struct
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensio.errors import ModelLoadError
from lensio.schema import FinalNorm

logger = logging.getLogger(__name__)


class ModelSourceKind(str, Enum):
    HUB = "hub"
    LOCAL_DIR = "local-dir"
    GGUF = "gguf"


@dataclass(frozen=True)
class ModelSource:
    """Origin of a model. ``name`` is the resolved name recorded in the store."""

    kind: ModelSourceKind
    name: str
    path: str | None = None
    revision: str | None = None


def parse_model_source(value: str, revision: str | None = None) -> ModelSource:
    """Classify a ``--model`` value; resolve TransformerLens aliases such as ``gpt2-small`` quietly."""
    text = value.strip()
    if not text:
        raise ModelLoadError("invalid model '': pass a model name, a local Hugging Face directory or a .gguf file")
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {text!r} not found; check the path")
        return ModelSource(ModelSourceKind.GGUF, name=path.stem, path=str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{text!r} is a folder but not a Hugging Face model (no config.json); "
                                 "pass a folder written by save_pretrained, a model name or a .gguf file")
        return ModelSource(ModelSourceKind.LOCAL_DIR, name=path.resolve().name, path=str(path.resolve()))
    if path.exists():
        raise ModelLoadError(f"{text!r} is a file but not a .gguf model; pass a model name, a local Hugging Face "
                             "directory or a .gguf file")
    if text.startswith((".", "/", "~")) or _looks_like_path(text):
        raise ModelLoadError(f"model path {text!r} not found; check the path (a Hub name has the form "
                             "'name' or 'org/name')")
    return ModelSource(ModelSourceKind.HUB, name=resolve_model_alias(text), revision=revision)


def _looks_like_path(text: str) -> bool:
    """Tell a mistyped local path from a Hub name, which is ``name`` or ``org/name`` without a file suffix."""
    parts = text.replace("\\", "/").split("/")
    if len(parts) > 2 or text.endswith("/") or "\\" in text:
        return True
    if len(parts) == 2 and Path(parts[0]).expanduser().is_dir():
        return True  # the folder exists here, so a typo in the name beneath it is far likelier than a Hub org
    return Path(text).suffix.lower() in MODEL_FILE_SUFFIXES


# Suffixes of model files; a --model value ending in one is a path, whatever follows a Hub name's rules.
MODEL_FILE_SUFFIXES = (".gguf", ".ggf", ".gguf.part", ".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".json")


def check_device(device: str) -> None:
    """Reject a device this torch build cannot use, before the model loads."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"invalid --device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU; use "
                                 "--device cpu, or install a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA GPUs are visible "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {device!r}: MPS is not available on this machine; use --device cpu")


def resolve_model_alias(name: str) -> str:
    """Map a TransformerLens alias (``gpt2-small``) to its Hugging Face name; other names pass through."""
    from transformer_lens.supported_models import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        return name


def _check_gguf_header(path: str) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path!r} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF'); "
                             "pass an intact .gguf model")


@dataclass
class LoadedModel:
    """The bridge around a frozen model, its tokenizer, and facts recorded in the store."""

    bridge: Any
    tokenizer: Any
    source: ModelSource

    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def d_head(self) -> int:
        return int(self.cfg.d_head)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.W_U.shape[-1])

    @property
    def max_context(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def hf_model(self) -> Any:
        return self.bridge.original_model

    @property
    def logit_softcap(self) -> float | None:
        cap = getattr(self.hf_model.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def model_record(self) -> dict[str, Any]:
        """Build the ``model`` group attribute: identity and shapes."""
        return {
            "name": self.source.name, "source": self.source.kind.value, "path": self.source.path,
            "revision": self.source.revision, "architecture": str(self.cfg.architecture),
            "weight_processing": "none", "n_layers": self.n_layers, "n_heads": self.n_heads,
            "d_model": self.d_model, "d_head": self.d_head, "d_vocab": self.d_vocab,
        }

    def tokenizer_record(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {
            "name": getattr(tok, "name_or_path", None) or self.source.name, "class": type(tok).__name__,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "vocab_size": len(tok),
        }

    def final_norm(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Describe the final norm: its record for the group attributes and its weight and bias arrays."""
        module = self.bridge.ln_final.original_component
        weight = module.weight.detach().float().cpu().numpy()
        if "gemma" in type(module).__name__.lower():
            weight = weight + 1.0  # Gemma's RMSNorm multiplies by (1 + weight)
        bias = getattr(module, "bias", None)
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None)
        if isinstance(module, torch.nn.LayerNorm) or bias is not None:
            kind = FinalNorm.LAYERNORM
        else:
            kind = FinalNorm.RMSNORM
        bias_array = bias.detach().float().cpu().numpy() if bias is not None else np.zeros_like(weight)
        record = {"kind": kind.value, "eps": float(eps if eps is not None else 1e-5), "module": type(module).__name__}
        return record, {"final_norm/weight": weight, "final_norm/bias": bias_array}

    def params(self, layers: tuple[int, ...]) -> dict[str, np.ndarray]:
        """W_O and b_O of the stored layers, the unembedding and the final norm, as float32 arrays."""

        def as_array(tensor: torch.Tensor | None, shape: tuple[int, ...]) -> np.ndarray:
            if tensor is None:
                return np.zeros(shape, dtype=np.float32)
            return tensor.detach().float().cpu().numpy()

        w_o = self.bridge.W_O  # [layer, head, d_head, d_model]
        try:
            b_o = self.bridge.b_O  # [layer, d_model]
        except AttributeError:
            b_o = None  # bias-free output projection (Llama, Qwen2, ...): stored as zeros
        arrays: dict[str, np.ndarray] = {}
        for layer in layers:
            arrays[f"W_O/{layer}"] = as_array(w_o[layer], (self.n_heads, self.d_head, self.d_model))
            arrays[f"b_O/{layer}"] = as_array(b_o[layer] if b_o is not None else None, (self.d_model,))
        arrays["W_U"] = as_array(self.bridge.W_U, (self.d_model, self.d_vocab))
        try:
            b_u = self.bridge.b_U
        except AttributeError:
            b_u = None
        arrays["b_U"] = as_array(b_u, (self.d_vocab,))
        arrays.update(self.final_norm()[1])
        return arrays


def load_model(source: ModelSource, device: str = "cpu") -> LoadedModel:
    """Load the model and tokenizer and wrap them in a TransformerBridge, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    check_device(device)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "eager"}
    if source.kind is ModelSourceKind.GGUF:
        _check_gguf_header(source.path)
        location, gguf_kwargs = str(Path(source.path).parent), {"gguf_file": Path(source.path).name}
    elif source.kind is ModelSourceKind.LOCAL_DIR:
        location, gguf_kwargs = source.path, {}
    else:
        location, gguf_kwargs = source.name, {"revision": source.revision} if source.revision else {}

    logger.info("loading model %s (%s)", source.name, source.kind.value)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **gguf_kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(location, **gguf_kwargs, **kwargs)
    except ImportError as error:
        raise ModelLoadError(f"loading {source.name!r} needs a missing package ({error}); for .gguf files install "
                             "headlens[gguf]") from error
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, struct.error) as error:  # struct.error: truncated GGUF
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if source.kind is ModelSourceKind.HUB:
            hint = ("check the name, or pass a local Hugging Face directory or a .gguf file "
                    "(the Hub may be unreachable from this machine)")
        else:
            hint = "check that the file or folder is a complete model"
        raise ModelLoadError(f"could not load model {source.name!r}: {first_line}; {hint}") from error

    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(source.name, hf_model=hf_model, tokenizer=tokenizer, device=device)
    bridge.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(bridge=bridge, tokenizer=tokenizer, source=source)

