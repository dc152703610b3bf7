"""Weight paging: memory-mapped weight pages are released between stages, never anything the process wrote."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
import torch

from lcmkit import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline
from lcmkit.loading.paging import release_weight_pages, resident_weight_bytes, weight_ranges
from lcmkit.models.unet import UNet2DConditionModel

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="paging uses /proc/self/pagemap")


def touch(module: torch.nn.Module) -> float:
    """Read every weight (maps every page), returning a checksum."""
    with torch.no_grad():
        return sum(float(p.double().sum()) for p in module.parameters())


def mapped(module: torch.nn.Module) -> int:
    """Bytes of the pages that hold the module's weights."""
    return sum(end - start for start, end in weight_ranges([module]))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(module: torch.nn.Module, ref: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, ref[k]) for k, v in module.state_dict().items())


@pytest.fixture
def unet(tiny_folders):
    return UNet2DConditionModel.from_pretrained(tiny_folders["sd15"] / "unet")


def test_release_drops_file_pages_and_keeps_the_weights(unet):
    ref = snapshot(unet)
    touch(unet)
    total = mapped(unet)
    assert resident_weight_bytes(unet) == total  # every page mapped after a full read
    released = release_weight_pages(unet)
    assert released >= total * 0.9  # all but pages the snapshot's reads may share with non-weight data
    assert resident_weight_bytes(unet) <= total - released
    assert same(unet, ref)  # read back from the page cache, identical
    assert resident_weight_bytes(unet) == total


def test_pages_the_process_wrote_are_never_released(unet):
    touch(unet)
    weight = unet.conv_in.weight
    with torch.no_grad():
        weight.add_(1.0)  # copy-on-write: these pages are the process's own now
    edited = weight.detach().clone()
    ref = snapshot(unet)
    release_weight_pages(unet)
    assert torch.equal(unet.conv_in.weight, edited)
    assert same(unet, ref)
    # the edited pages stay resident: they are the only copy of the edit
    start = weight.untyped_storage().data_ptr()
    page = np.uint64(1 << 63)
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        f.seek(start // mmap.PAGESIZE * 8)
        assert np.frombuffer(f.read(8), dtype=np.uint64)[0] & page


def test_in_memory_weights_are_left_alone():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Conv2d(8, 8, 3))
    ref = snapshot(module)
    assert release_weight_pages(module) == 0  # anonymous memory: nothing to release
    assert same(module, ref)
    assert release_weight_pages(None, "not a module") == 0


def test_pipeline_pages_out_each_model_after_its_stage(tiny_folders):
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    pipe.set_progress_bar_config(disable=True)
    pipe.set_conv_prepacking(
        "off"
    )  # packed convs never read their plain weights again (tests/nn/test_conv.py)
    assert pipe.weight_paging  # the default
    kw = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    paged = pipe("a cat", **kw).images
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert resident_weight_bytes(model) < 0.1 * mapped(model)
    pipe.disable_weight_paging()
    kw["generator"] = torch.Generator().manual_seed(0)
    resident = pipe("a cat", **kw).images
    assert np.array_equal(paged, resident)
    assert resident_weight_bytes(pipe.unet) == mapped(pipe.unet)
    pipe.enable_weight_paging()
    assert pipe.weight_paging


def test_img2img_pages_out_too(tiny_folders):
    pipe = LatentConsistencyModelImg2ImgPipeline.from_pretrained(tiny_folders["sd15"])
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64)
    kw = dict(image=image, num_inference_steps=2, strength=0.6, output_type="np")
    paged = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert resident_weight_bytes(pipe.unet) < 0.1 * mapped(pipe.unet)
    pipe.disable_weight_paging()
    resident = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.array_equal(paged, resident)


def test_release_file_pages_drops_only_mappings_under_the_folder(tmp_path):
    from lcmkit.io.paging import mapped_file_ranges, release_file_pages, resident_bytes

    inside, outside = tmp_path / "cache" / "blob.bin", tmp_path / "other.bin"
    inside.parent.mkdir()
    data = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
    for path in (inside, outside):
        path.write_bytes(data.tobytes())
    with open(inside, "rb") as f_in, open(outside, "rb") as f_out:
        m_in = mmap.mmap(f_in.fileno(), 0, access=mmap.ACCESS_READ)
        m_out = mmap.mmap(f_out.fileno(), 0, access=mmap.ACCESS_READ)
        a, b = np.frombuffer(m_in, dtype=np.float32), np.frombuffer(m_out, dtype=np.float32)
        assert float(a.sum()) == float(b.sum())  # every page read: resident
        ranges_in = mapped_file_ranges(tmp_path / "cache")
        assert len(ranges_in) == 1 and resident_bytes(ranges_in) >= data.nbytes
        released = release_file_pages(tmp_path / "cache")
        assert released >= data.nbytes
        assert resident_bytes(ranges_in) == 0
        assert (
            resident_bytes(mapped_file_ranges(tmp_path)) >= data.nbytes
        )  # the file outside the folder stays
        np.testing.assert_array_equal(a, data)  # read back from the page cache, unchanged
        del a, b
        m_in.close()
        m_out.close()
    assert mapped_file_ranges(tmp_path / "cache") == []
