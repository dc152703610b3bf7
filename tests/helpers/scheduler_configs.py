"""Foreign scheduler configs as they appear in real SD folders (shared by the scheduler tests)."""

# Stable Diffusion 1.x's scheduler/scheduler_config.json: what LCM-LoRA users pass to LCMScheduler.from_config
SD_PNDM_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
