"""The step counter diffusers' schedulers expose (`step_index`, `begin_index`, `set_begin_index`), shared by ours."""

from __future__ import annotations


class StepCounter:
    """`_step_index` / `_begin_index` are set by the scheduler's `set_timesteps` and `step`; pipelines read them."""

    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """Index into `timesteps` of the next `step`; None until the first step (or `set_begin_index`)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first timestep, set by a pipeline through `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index
