"""Hand the memory pages of file-backed weights back to the operating system between pipeline stages.

safetensors files are memory-mapped, so a loaded model's weights are pages of the file: they enter the process's
resident set when a stage first reads them and stay there. A text-to-image call reads the text encoder, then the UNet
(SD1.5: 3.4 GB in fp32), then the VAE decoder, whose activations at 512x512 are the largest of the call. Without
paging, every model's weights are resident during the decode; with it, each model's clean file pages are released
after its stage (`madvise(MADV_DONTNEED)`), so the peak is the largest single stage. Released pages stay in the
kernel's page cache, and the next call reads them back from there (`docs/performance.md` has the cost).

Only pages that are present *and* still the file's own pages are released, read from `/proc/self/pagemap` (bit 63:
present, bit 61: file page or shared). A page the process has written (a fused LoRA, any in-place edit: private
copy-on-write pages), a swapped page, or plain anonymous memory is never touched, so releasing cannot lose data;
tensors that are not file-backed (moved, cast, trained) are skipped. On systems without `/proc/self/pagemap` or
`madvise` (not Linux) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import sys
from collections.abc import Iterable

import numpy as np
import torch

logger = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux
_PRESENT = np.uint64(1 << 63)
_FILE_OR_SHARED = np.uint64(1 << 61)
_libc: ctypes.CDLL | None = None


def _madvise() -> ctypes._CFuncPtr | None:
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def weight_ranges(modules: Iterable[object]) -> list[tuple[int, int]]:
    """The page-aligned address ranges of the CPU parameters and buffers of `modules` (merged, sorted).

    Non-modules (None, compiled stand-ins) are ignored.
    """
    spans = []
    seen = set()
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type != "cpu" or tensor.is_sparse:
                continue
            storage = tensor.untyped_storage()
            start, size = storage.data_ptr(), storage.nbytes()
            if start == 0 or size == 0 or start in seen:
                continue
            seen.add(start)
            spans.append((start - start % _PAGE, -(-(start + size) // _PAGE) * _PAGE))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _entries(pagemap: object, start: int, end: int) -> np.ndarray:
    """The pagemap's 64-bit entries of the pages in [start, end) (page-aligned)."""
    pagemap.seek(start // _PAGE * 8)
    return np.frombuffer(pagemap.read((end - start) // _PAGE * 8), dtype=np.uint64)


def _clean_runs(pagemap: object, start: int, end: int) -> list[tuple[int, int]]:
    """Runs [a, b) of pages in [start, end) that are present and file-backed (or shared), from the pagemap."""
    entries = _entries(pagemap, start, end)
    if entries.size != (end - start) // _PAGE:  # a range the kernel would not describe: leave it alone
        return []
    clean = ((entries & _PRESENT) != 0) & ((entries & _FILE_OR_SHARED) != 0)
    if not clean.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], clean.view(np.int8), [0]))))
    return [(start + int(a) * _PAGE, start + int(b) * _PAGE) for a, b in edges.reshape(-1, 2)]


def resident_weight_bytes(*modules: object) -> int | None:
    """Bytes of these modules' weight pages that are resident now (None where `/proc/self/pagemap` is missing)."""
    return resident_bytes(weight_ranges(modules))


def resident_bytes(ranges: list[tuple[int, int]]) -> int | None:
    """Bytes of the pages within `ranges` (page-aligned) that are resident now (None without `/proc/self/pagemap`)."""
    total = 0
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for start, end in ranges:
                total += int(np.count_nonzero(_entries(pagemap, start, end) & _PRESENT)) * _PAGE
    except OSError:
        return None
    return total


def release_weight_pages(*modules: object) -> int:
    """Release the resident, unmodified file pages of these modules' weights; returns the bytes released.

    The weights stay valid: the next read of a released page maps it again from the page cache (or the file).
    Safe to call on anything: modules with in-memory weights, None, or on a system without pagemap return 0.
    """
    return _release(weight_ranges(modules))


def _release(ranges: list[tuple[int, int]]) -> int:
    """madvise(DONTNEED) the present, file-backed pages within `ranges`; returns the bytes released."""
    madvise = _madvise()
    if madvise is None or not ranges:
        return 0
    released = 0
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for start, end in ranges:
                for a, b in _clean_runs(pagemap, start, end):
                    if madvise(a, b - a, _MADV_DONTNEED) == 0:
                        released += b - a
                    else:
                        logger.debug("madvise failed on %#x-%#x: %s", a, b, os.strerror(ctypes.get_errno()))
    except OSError as e:  # no pagemap (some sandboxes): paging is an optimisation, never an error
        logger.debug("page release unavailable: %s", e)
        return 0
    return released


def mapped_file_ranges(folder: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of files under `folder` (from `/proc/self/maps`)."""
    prefix = os.path.join(os.path.realpath(folder), "")
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").startswith(prefix):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def release_file_pages(folder: str | os.PathLike[str]) -> int:
    """Release the resident, unmodified pages of every file under `folder` that this process has mapped; returns the
    bytes released. OpenVINO maps a cached compiled model (its blob) to import it, then keeps its own packed copy of
    the weights, so the blob's pages only cost memory afterwards; a later read maps them again from the page cache.
    """
    return _release(mapped_file_ranges(folder))
