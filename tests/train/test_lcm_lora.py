"""LCM-LoRA distillation on a tiny random teacher (the `quick` architecture, 32 px), end to end.

What it proves:
- the student is the teacher plus an adapter that starts at B = 0, so at initialisation it equals the teacher
  bit for bit; a few LCD steps give a finite, falling loss, move only adapter tensors (the UNet's own weights stay
  bit-identical and get no gradient), and the teacher's guided DDIM step ignores the adapter it carries;
- the saved `pytorch_lora_weights.safetensors` loads in lcmkit and in diffusers 0.42 (+ peft): lcmkit's
  `LatentConsistencyModelPipeline`, diffusers' `StableDiffusionPipeline` with its scheduler swapped for diffusers'
  `LCMScheduler`, both from the same teacher folder, give the same 2-step image at guidance_scale 1.0 (max abs
  difference <= 1e-4 in [0, 1]), unfused and fused; the LoRA changes that image by more than 100x the tolerance,
  so an adapter that is silently dropped fails; at LoRA scale 0, or unloaded, the image is exactly the teacher's.
  diffusers' `LatentConsistencyModelPipeline` loads the file too, and its UNet then predicts what ours does
  (<= 1e-5); it cannot sample with it, because diffusers 0.42 always embeds w, which needs a UNet with
  `time_cond_proj_dim` (LCM-LoRA is documented with the SD pipelines for that reason);
- checkpoints hold only the adapter, and a run resumed from its step-2 checkpoint ends with exactly the adapter
  of the uninterrupted 3-step run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.reference import assert_close_to_reference, max_abs_diff
from safetensors import safe_open

from lcmkit.loading.weights import load_state_dict
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.nn.lora import lora_layers
from lcmkit.schedulers import LCMScheduler
from lcmkit.train.distill import DistillConfig, LCDObjective, distill
from lcmkit.train.distill_lora import (
    LCM_LORA_TARGETS,
    LORA_WEIGHT_NAME,
    LoraStudent,
    adapter_tensors,
    add_lcm_lora,
    target_modules,
)
from lcmkit.train.loop import LoopConfig
from lcmkit.train.teacher import build_random_teacher

TOL = 1e-4
PROMPT = "a red circle on a blue background"
RANK = 4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_teacher(tmp_path_factory.mktemp("lcm_lora") / "teacher", "quick", seed=0)


def lora_config(teacher: Path, root: Path, steps: int, resume: bool = False) -> DistillConfig:
    # lr 1e-2 so that three steps move the adapter far enough to change the image well beyond the tolerance
    return DistillConfig(
        teacher=teacher,
        save_dir=root / "lora",
        w_min=1.0,
        w_max=3.0,
        lora_rank=RANK,
        lora_alpha=2.0,
        loop=LoopConfig(
            output_dir=root / "work",
            max_steps=steps,
            batch_size=2,
            learning_rate=1e-2,
            checkpoint_every=2,
            log_every=1,
            progress=False,
            resume=resume,
            seed=3,
        ),
    )


@pytest.fixture(scope="module")
def trained(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three LCM-LoRA steps through `distill` (checkpoints at steps 2 and 3); the run's root folder."""
    root = tmp_path_factory.mktemp("lcm_lora_run")
    distill(lora_config(teacher, root, steps=3))
    return root


def plain_unet(teacher: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(teacher / "unet").eval()


def test_targets_default_to_the_published_lcm_lora_set_and_bad_ones_fail(teacher):
    unet = plain_unet(teacher)
    names = target_modules(unet, LCM_LORA_TARGETS)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in names
    assert "down_blocks.0.downsamplers.0.conv" in names and "up_blocks.1.resnets.0.time_emb_proj" in names
    assert not any(n.endswith(("conv_in", "conv_out", "linear_1", "linear_2")) for n in names)
    assert all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in target_modules(unet, "attention"))
    with pytest.raises(ValueError, match=r"to_out \(ModuleList\)"):
        target_modules(unet, ["to_out"])
    with pytest.raises(ValueError, match="no Linear or Conv2d layer"):
        target_modules(unet, "nothing_here")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        add_lcm_lora(unet, 0)
    with pytest.raises(ValueError, match="lora_rank"):
        DistillConfig(lora_rank=0)


def test_student_starts_as_teacher_and_training_moves_only_the_adapter(teacher):
    """B = 0 at init (student == teacher exactly); 5 steps on one batch lower the loss and touch only adapters."""
    unet, reference = plain_unet(teacher), plain_unet(teacher)
    frozen = {k: v.clone() for k, v in unet.state_dict().items()}
    params = add_lcm_lora(unet, RANK, generator=torch.Generator().manual_seed(0))
    student = LoraStudent(unet)
    assert {id(p) for p in params} == {id(p) for p in student.parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in params)
    ups = [p for k, p in adapter_tensors(unet).items() if k.endswith("lora_up")]
    assert all(torch.count_nonzero(p) == 0 for p in ups)

    g = torch.Generator().manual_seed(1)
    z0, c, uncond = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 6, 32, generator=g),
        torch.randn(1, 6, 32, generator=g),
    )
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([19, 799])
    with torch.no_grad():
        assert torch.equal(student(x, t, c).sample, reference(x, t, c).sample)

    objective = LCDObjective(unet, unet, LCMScheduler(), num_ddim_timesteps=10, w_min=1.0, w_max=3.0)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(5):
        loss, _ = objective.loss(student, z0, c, uncond, generator=torch.Generator().manual_seed(2))
        loss.backward()
        assert all(p.grad is None for p in unet.state_dict(keep_vars=True).values())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert all(torch.count_nonzero(p) > 0 for p in ups)
    assert all(torch.equal(v, frozen[k]) for k, v in unet.state_dict().items())
    with torch.no_grad():
        assert (student(x, t, c).sample - reference(x, t, c).sample).abs().max() > 1e-4
        # The teacher's solver step runs with the adapter off: the same as a plain teacher's, exactly.
        plain = LCDObjective(reference, reference, LCMScheduler(), num_ddim_timesteps=10)
        args = (x, torch.tensor([199, 999]), torch.tensor([99, 899]), c, uncond, torch.tensor([1.5, 2.5]))
        assert torch.equal(objective.teacher_solver_step(*args), plain.teacher_solver_step(*args))


def test_run_writes_a_kohya_file_loss_log_and_adapter_only_checkpoints(trained):
    log = (trained / "work" / "distill_loss.csv").read_text().splitlines()
    losses = [float(line.split(",")[1]) for line in log[1:]]
    assert len(losses) == 3 and np.isfinite(losses).all()
    path = trained / "lora" / LORA_WEIGHT_NAME
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert "lcmkit_lcm_lora" in f.metadata()
    layers = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}
    assert keys == {f"{n}.{s}" for n in layers for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in layers
    sd = load_state_dict(path)
    assert all(float(sd[f"{n}.alpha"]) == 2.0 for n in layers)
    assert sd["lora_unet_mid_block_resnets_0_conv1.lora_down.weight"].shape[:2] == (RANK, 64)
    state = torch.load(trained / "work/checkpoints/step_0000003/state.pt", weights_only=True)
    assert len(state["model"]) == 2 * len(layers) and all(
        k.endswith(("lora_down", "lora_up")) for k in state["model"]
    )
    assert state["extra"] == {}


def images(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, generator=generator, output_type="np",
                **kwargs).images  # fmt: skip


def test_lora_file_gives_the_same_image_in_lcmkit_and_diffusers(teacher, trained):
    import diffusers

    import lcmkit

    lora = trained / "lora"
    ours = lcmkit.LatentConsistencyModelPipeline.from_pretrained(
        teacher, scheduler=lcmkit.LCMScheduler.from_pretrained(lora / "scheduler"), safety_checker=None
    )
    ref_sd = diffusers.StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None)
    ref_sd.scheduler = diffusers.LCMScheduler.from_config(ref_sd.scheduler.config)
    ref_lcm = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        teacher, scheduler=diffusers.LCMScheduler.from_pretrained(lora / "scheduler"), safety_checker=None
    )
    pipes = (ours, ref_sd, ref_lcm)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    plain = images(ours)
    assert_close_to_reference(plain, images(ref_sd), atol=TOL, what="image without the LoRA")
    for pipe in pipes:
        pipe.load_lora_weights(lora)
    with_lora = images(ours)
    assert max_abs_diff(with_lora, plain) > 100 * TOL, "the LoRA did not change the image"
    assert_close_to_reference(with_lora, images(ref_sd), atol=TOL, what="image with the LoRA")
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 32, 32, generator=g)
    with torch.no_grad():
        ours_eps, ref_eps = ours.unet(x, 499, c).sample, ref_lcm.unet(x, 499, c).sample
        assert (ours_eps - plain_unet(teacher)(x, 499, c).sample).abs().max() > 1e-3
        assert_close_to_reference(ours_eps, ref_eps, atol=1e-5, what="UNet eps with the LoRA")
    ref_sd.fuse_lora()
    assert_close_to_reference(
        with_lora, images(ref_sd), atol=TOL, what="image with the LoRA fused in diffusers"
    )

    # At scale 0, or unloaded, the student is the teacher again (exactly: the adapter path is skipped).
    assert max_abs_diff(images(ours, cross_attention_kwargs={"scale": 0.0}), plain) == 0.0
    ours.unload_lora_weights()
    assert not list(lora_layers(ours.unet))
    assert max_abs_diff(images(ours), plain) == 0.0


def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_does(teacher, trained, tmp_path):
    work = tmp_path / "work" / "checkpoints"
    work.mkdir(parents=True)
    shutil.copytree(trained / "work/checkpoints/step_0000002", work / "step_0000002")
    shutil.copy(trained / "work/distill_loss.csv", tmp_path / "work")
    distill(lora_config(teacher, tmp_path, steps=3, resume=True))
    resumed = load_state_dict(tmp_path / "lora" / LORA_WEIGHT_NAME)
    uninterrupted = load_state_dict(trained / "lora" / LORA_WEIGHT_NAME)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    # A checkpoint of another rank is refused with a message that says why; so is a UNet without the adapter.
    state = torch.load(work / "step_0000002" / "state.pt", weights_only=True)["model"]
    unet = plain_unet(teacher)
    add_lcm_lora(unet, RANK + 1)
    with pytest.raises(ValueError, match="another --lora-rank"):
        LoraStudent(unet).load_state_dict(state)
    with pytest.raises(ValueError, match="no adapter named"):
        LoraStudent(plain_unet(teacher))
