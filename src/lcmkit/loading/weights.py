"""Reading and writing weight files safely: safetensors first, pickles only through `weights_only=True`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weight file is missing, corrupt, unsafe, or does not match the model."""


SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


def _with_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def find_weights_file(folder: str | Path, variant: str | None = None) -> Path:
    """The weights file of a diffusers component folder, preferring safetensors over `.bin`."""
    folder = Path(folder)
    candidates = [_with_variant(n, variant) for n in SAFETENSORS_NAMES + PICKLE_NAMES]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    # as diffusers: a component without the variant (often the safety checker) uses its default weights
    if variant:
        for name in SAFETENSORS_NAMES + PICKLE_NAMES:
            if (folder / name).is_file():
                logger.warning("%s has no %r weights; loading %s instead", folder, variant, name)
                return folder / name
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    hint = f" (variant={variant!r})" if variant else ""
    raise WeightsError(
        f"no weights file in {folder}{hint}: looked for {candidates}; the folder holds {present}"
    )


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load tensors from `.safetensors`, or from a pickle (`.bin`, `.ckpt`, `.pt`) with `weights_only=True`.

    A pickle that would run code is refused by torch's restricted unpickler; we re-raise that as WeightsError.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(
                f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
            ) from None
    try:
        sd = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise WeightsError(
            f"{path} could not be loaded safely (only plain tensor pickles are accepted, weights_only=True): {e}"
        ) from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    return dict(sd)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a safetensors file (contiguous copies, shared storage broken)."""
    tensors = {
        k: v.detach().contiguous().clone() if _shares(v) else v.detach().contiguous()
        for k, v in state_dict.items()
    }
    save_file(tensors, str(path), metadata={"format": "pt"})


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def check_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Fail on missing keys and mismatched shapes, naming them; unexpected keys are also an error (strict loading)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_sample(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_sample(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {_sample(wrong)}")
    if problems:
        raise WeightsError(f"weights in {source} do not match {type(model).__name__}: " + "; ".join(problems))


def _sample(items: list[str], n: int = 8) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")
