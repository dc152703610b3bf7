"""Weight-file I/O; it lives in `lcmkit.io.weights` (the lowest layer) and is re-exported here."""

from lcmkit.io.weights import (  # noqa: F401
    PICKLE_NAMES,
    SAFETENSORS_NAMES,
    MissingWeightsError,
    WeightsError,
    check_finite,
    check_keys,
    find_weights_file,
    load_state_dict,
    save_state_dict,
    sniff_weights_file,
)

__all__ = [
    "PICKLE_NAMES",
    "SAFETENSORS_NAMES",
    "MissingWeightsError",
    "WeightsError",
    "check_finite",
    "check_keys",
    "find_weights_file",
    "load_state_dict",
    "save_state_dict",
    "sniff_weights_file",
]
