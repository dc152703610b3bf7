"""Reading and writing weight files safely: safetensors first, pickles only through `weights_only=True`."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lcmkit.io.errors import MissingModelFileError, ModelFileError, describe, one_line

logger = logging.getLogger(__name__)


class WeightsError(ModelFileError):
    """A weight file is missing, corrupt, unsafe, or does not match the model."""


class MissingWeightsError(WeightsError, MissingModelFileError):
    """No weights file where one is needed (also a FileNotFoundError)."""


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
    raise MissingWeightsError(
        f"no weights file in {folder}{hint}: looked for {candidates}; the folder holds {present}", folder
    )


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load tensors from `.safetensors`, or from a pickle (`.bin`, `.ckpt`, `.pt`) with `weights_only=True`.

    A pickle that would run code is refused by torch's restricted unpickler; we re-raise that as WeightsError, as
    any other damage: every error names the file.
    """
    path = Path(path)
    kind = sniff_weights_file(path)
    if kind == "safetensors" and path.suffix != ".safetensors":
        logger.info("%s is a safetensors file (by its header); reading it as one", path)
    if kind == "safetensors":
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(
                f"not a readable safetensors file (corrupt or truncated?): {describe(e)}", path
            ) from None
    try:
        sd = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise WeightsError(
            "could not be loaded safely: not a torch pickle of plain tensors (only those are read, with "
            f"weights_only=True): {_torch_load_reason(e)}",
            path,
        ) from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise WeightsError(f"does not hold a state dict of tensors (found a {type(sd).__name__})", path)
    return dict(sd)


def _torch_load_reason(error: Exception) -> str:
    """The telling part of torch.load's error: its weights-only message buries the reason after advice."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s+Check the documentation|$)", text, re.S)
    if found:  # without torch's advice to allow-list the global: this loader never does
        reason = one_line(found.group(1)).split(" Please use ")[0]
        return f"{type(error).__name__}: {reason}"
    return describe(error)


_LFS_POINTER = b"version https://git-lfs"


def sniff_weights_file(path: str | Path) -> str:
    """ "safetensors" or "pickle", judged by the first bytes; anything else raises a WeightsError saying what the
    file is instead (empty, a Git LFS pointer, an HTML page, text), so the message is not a deserializer's.

    A pickle may be a zip (torch.save since 1.6) or a bare pickle stream (older files, starting with 0x80).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise MissingWeightsError("weights file not found", path) from None
    except OSError as e:
        raise WeightsError(f"cannot be read: {e.strerror or e}", path) from None
    if not head:
        raise WeightsError("the weights file is empty (0 bytes): an interrupted download or copy?", path)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    if head[8:9] == b"{":  # safetensors: the header's length (8 bytes, little-endian), then the JSON header
        return "safetensors"
    if head.startswith(_LFS_POINTER):
        raise WeightsError(
            "is a Git LFS pointer (a small text file), not the weights: fetch the real file (`git lfs pull`)",
            path,
        )
    if head.lstrip()[:1] == b"<":
        raise WeightsError("is an HTML/XML page, not weights: a failed or redirected download?", path)
    if path.suffix == ".safetensors":
        return "safetensors"  # let the reader say what is wrong with the header
    raise WeightsError(
        f"is neither a torch checkpoint (zip or pickle) nor a safetensors file: it starts with {head[:16]!r}",
        path,
    )


def check_finite(tensors: Iterable[tuple[str, object]], path: str | Path | None, what: str) -> None:
    """Refuse NaN or infinite values in floating tensors, naming the first bad key (and the file).

    A NaN in a LoRA or an embedding spreads through every image it touches (black or noise images, no error),
    so such a file is refused when it is read. One pass over the tensors: cheap at LoRA and embedding sizes.
    """
    for key, tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        bad = tensor[~finite]
        counts = (
            ("NaN", int(torch.isnan(bad).sum())),
            ("+inf", int((bad == float("inf")).sum())),
            ("-inf", int((bad == float("-inf")).sum())),
        )
        kinds = ", ".join(f"{n} {name}" for name, n in counts if n)
        raise WeightsError(
            f"{what} tensor `{key}` {tuple(tensor.shape)} holds non-finite values ({kinds}): the file is damaged "
            "or comes from a diverged training run, and would turn every image it touches black or into noise",
            path,
        )


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
        raise WeightsError(
            f"weights in {source} do not match {type(model).__name__}: " + "; ".join(problems), source
        )


def _sample(items: list[str], n: int = 8) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")
