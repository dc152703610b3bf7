"""Schedulers: the LCM sampler (`LCMScheduler`) and its pure math (`lcm_math`); DDIM for teachers (`ddim`)."""

from lcmkit.schedulers.ddim import DDIMScheduler, DDIMSchedulerConfig
from lcmkit.schedulers.lcm import LCMScheduler, LCMSchedulerConfig, LCMSchedulerOutput

__all__ = ["DDIMScheduler", "DDIMSchedulerConfig", "LCMScheduler", "LCMSchedulerConfig", "LCMSchedulerOutput"]
