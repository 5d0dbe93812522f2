"""Saving and loading trained lenses: a folder with ``config.json`` and ``lens.safetensors``.

The folder contains the lens's own tensors and the layer's W_O and final-norm weights. W_U and b_U
(tens to hundreds of MB) are read from a store of the same model at load time; a SHA-256 of W_U
recorded at training time makes sure they are the ones the lens was trained with.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lensio.errors import LensError
from lensio.schema import FinalNorm
from lensio.store import Store, open_store
from train.lenses import FrozenParts, Lens, resolve_lens_class

logger = logging.getLogger(__name__)

LENS_FORMAT = "headlens-lens"
LENS_FORMAT_VERSION = 1


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def lens_config(lens: Lens, *, layer: int, objective: str, store: Store, metrics: dict[str, Any] | None = None,
                training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the ``config.json`` record of a lens trained on ``store``."""
    return {
        "format": LENS_FORMAT, "format_version": LENS_FORMAT_VERSION, "lens": lens.kind, "objective": objective,
        "layer": layer, "options": lens.options,
        "shapes": {"n_heads": lens.n_heads, "d_head": lens.d_head, "d_model": lens.d_model, "d_vocab": lens.d_vocab},
        "final_norm": {"kind": lens.norm_kind.value, "eps": lens.norm_eps}, "logit_softcap": lens.logit_softcap,
        "W_U_sha256": tensor_sha256(lens.W_U),
        "store": {"url": store.url if "://" in store.url else os.path.abspath(store.url), "model": store.meta["model"]["name"], "tokens_sha256": store.meta["tokens_sha256"]},
        "metrics": metrics or {}, "training": training or {},
    }


def _remove_abandoned_siblings(out: Path) -> None:
    """Delete staging and retired folders of ``out`` that saves killed earlier left behind.

    Their names carry the saving process's pid, so folders of a save still running elsewhere are kept.
    """
    from lensio.lock import process_is_running

    for sibling in out.parent.glob(f".{out.name}.*"):
        kind, _, rest = sibling.name.removeprefix(f".{out.name}.").partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if process_is_running(int(pid)):
            continue
        if kind == "old" and not out.exists():
            # Killed between its two renames: the retired folder is the last complete lens, so put it back.
            os.replace(sibling, out)
            logger.warning("restored %s from %s, left by a save that was killed", out, sibling.name)
            continue
        logger.info("removing %s, left by a save that was killed", sibling)
        shutil.rmtree(sibling, ignore_errors=True)


def check_lens_destination(out_dir: str | Path) -> None:
    """Reject an output path that contains something other than a lens folder, which saving would replace.

    Raises:
        LensError: the path is a file, or a non-empty folder without a lens's ``config.json``.
    """
    out = Path(out_dir)
    if out.is_file():
        raise LensError(f"lens output {str(out)!r} is a file; pass a folder path with --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise LensError(f"lens output {str(out)!r} is a folder that does not hold a lens, and saving would replace "
                        "it; pass a new or empty folder with --out")


def save_lens(lens: Lens, out_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write the lens folder atomically: into a temporary sibling, then renamed into place.

    A save killed half-way leaves only the temporary folder (named ``.{name}.tmp-{pid}-*``), never a
    half-written ``out_dir``. An existing ``out_dir`` is replaced only once the new one is complete.
    The next save removes such folders once their process is gone.
    """
    out = Path(out_dir)
    check_lens_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_siblings(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        # mkdtemp creates the folder 0700; give it the permissions of a plain mkdir so others on a shared
        # cluster can read the lens, as they can read the store.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in lens.state_dict().items()}
        save_file(state, staging / "lens.safetensors")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # safetensors writes its file 0600 too.
        for written in staging.iterdir():
            written.chmod(0o666 & ~umask)
        if out.exists():
            retired = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, retired)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(retired, out)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %s lens to %s", lens.kind, out)
    return out


def read_lens_config(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    config_path = folder / "config.json"
    if not folder.is_dir() or not config_path.is_file() or not (folder / "lens.safetensors").is_file():
        raise LensError(f"{str(path)!r} is not a lens folder (expected config.json and lens.safetensors); pass a "
                        "folder written by lens-train")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise LensError(f"{config_path} is not valid JSON ({error.msg}); retrain the lens") from error
    if config.get("format") != LENS_FORMAT or config.get("format_version") != LENS_FORMAT_VERSION:
        raise LensError(f"{config_path} is not a version-{LENS_FORMAT_VERSION} headlens lens; retrain the lens")
    return config


def load_lens(path: str | Path, store: str | Store | None = None, layer: int | None = None) -> Lens:
    """Load a saved lens, taking W_U and b_U from ``store`` (default: the store it was trained on).

    Raises:
        LensError: the folder is not a lens, or the store's W_U differs from the one the lens was
            trained with (another model), or ``layer`` is given and differs from the lens's layer.
    """
    config = read_lens_config(path)
    if layer is not None and int(config["layer"]) != layer:
        raise LensError(f"lens {str(path)!r} was trained for layer {config['layer']}, not layer {layer}; pass a lens "
                        f"for layer {layer}")
    opened = store if isinstance(store, Store) else open_store(store or config["store"]["url"])
    W_U, b_U = opened.params["W_U"], opened.params["b_U"]
    if tensor_sha256(W_U) != config["W_U_sha256"]:
        raise LensError(f"lens {str(path)!r} was trained for model {config['store']['model']!r}, but store "
                        f"{opened.url!r} holds model {opened.meta['model']['name']!r} (W_U differs); pass a store of "
                        "the lens's model")
    state = load_file(str(Path(path) / "lens.safetensors"))
    parts = FrozenParts(W_O=state["W_O"], b_O=state["b_O"], W_U=W_U, b_U=b_U, norm_weight=state["norm_weight"],
                        norm_bias=state["norm_bias"], norm_kind=FinalNorm(config["final_norm"]["kind"]),
                        norm_eps=float(config["final_norm"]["eps"]), logit_softcap=config.get("logit_softcap"))
    lens = resolve_lens_class(config["lens"])(parts, **config.get("options", {}))
    lens.load_state_dict(state)
    lens.config = config
    lens.layer = int(config["layer"])
    return lens.eval()
