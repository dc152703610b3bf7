"""`lcmkit serve`: check the model spec and the limits, then listen while the worker loads the model.

The server takes the same `ModelSpec` as the CLI (folder, single file or hub id, LoRAs, tiny VAE, FreeU, VAE tiling,
OpenVINO, device, dtype) and loads it with the same `load_pipeline`, so a served image and a `lcmkit generate` image
of the same seed are the same image with the same infotext. Everything that can be checked without loading the
model is checked before the port opens: a bad spec or limit is one error, not a server that answers 503 forever.
The model itself loads in the worker thread (`JobQueue`'s factory), so `/health` answers "loading" meanwhile.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from typing import Any

from lcmkit.spec import ModelSpec, check_runtime, load_pipeline

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


SETTINGS_FROM_SPEC = {
    "api_key",
    "model_name",
    "vae_name",
    "controlnets",
}  # Settings fields serve fills itself


def spec_and_limits(
    model: ModelSpec | str | None, options: dict[str, Any]
) -> tuple[ModelSpec, dict[str, Any]]:
    """Split `serve`'s keyword options into the model spec's fields and the server's `Settings` fields."""
    from lcmkit.server.jobs import Settings

    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"model"}
    limit_fields = {f.name for f in dataclasses.fields(Settings)} - SETTINGS_FROM_SPEC
    unknown = sorted(set(options) - spec_fields - limit_fields)
    if unknown:
        raise ValueError(
            f"unknown server limits {unknown}; allowed: {sorted(limit_fields)} (and the model options "
            f"{sorted(spec_fields)})"
        )
    spec_options = {k: v for k, v in options.items() if k in spec_fields}
    limits = {k: v for k, v in options.items() if k in limit_fields}
    if isinstance(model, ModelSpec):
        if spec_options:
            raise ValueError(f"give {sorted(spec_options)} inside the ModelSpec, not beside it")
        return model, limits
    return ModelSpec(model=model, **spec_options), limits


def serve(
    model: ModelSpec | str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    **options: Any,
) -> None:
    """Serve `model` over HTTP until interrupted.

    `model` is a `ModelSpec`, or what its `model` field takes (a diffusers folder, a .safetensors/.ckpt file, a hub
    id, None for the model shipped with lcmkit) with the other spec fields (`loras`, `tiny_vae`, `freeu`,
    `vae_tiling`, `openvino`, `device`, `dtype`, `controlnets`) as keywords. The remaining keywords are `Settings` fields (limits
    such as max_steps, queue_size). `api_key` falls back to the environment variable LCMKIT_API_KEY.

    Raises `ValueError` (a `SpecError` for the model) before listening when an option is wrong or the requested
    device or OpenVINO is not there. The served model name is the one the CLI writes into its infotexts.
    """
    import uvicorn

    from lcmkit.server.app import create_app, uvicorn_options
    from lcmkit.server.jobs import Settings

    spec, limits = spec_and_limits(model, options)
    api_key = api_key or os.environ.get("LCMKIT_API_KEY") or None
    settings = Settings(
        api_key=api_key,
        model_name=spec.model_name,
        vae_name=spec.tiny_vae,
        controlnets=spec.controlnets,
        **limits,
    )
    check_runtime(spec)

    def load() -> Any:  # runs in the worker thread: /health says "loading" meanwhile, "error" if it fails
        logger.info("loading %s", spec.describe())
        pipe, _ = load_pipeline(spec)
        logger.info("model loaded: %s", spec.model_name)
        return pipe

    if not _is_loopback(host) and not api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can generate", host)
    # With ControlNets the model loads before the port opens: a net that does not fit the UNet (or a file that is
    # not a ControlNet) is then one error at start, not a server whose /health says "error".
    app = create_app(load() if spec.controlnets else load, settings)
    uvicorn.run(app, host=host, port=port, log_level="info", **uvicorn_options(settings))
