"""The lowest layer: helpers every other layer may use, importing nothing else from lcmkit.

`errors` (the model-file error type and its messages), `weights` (reading and writing weight files), `paging`
(handing weight pages back to the OS) and `images` (converting between PIL, numpy and tensors).
"""
