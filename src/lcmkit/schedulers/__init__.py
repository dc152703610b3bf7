"""Schedulers: the LCM sampler (`LCMScheduler`) and its pure math (`lcm_math`)."""

from lcmkit.schedulers.lcm import LCMScheduler, LCMSchedulerConfig, LCMSchedulerOutput

__all__ = ["LCMScheduler", "LCMSchedulerConfig", "LCMSchedulerOutput"]
