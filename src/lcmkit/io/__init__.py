"""The lowest layer: helpers every other layer may use, importing nothing else from lcmkit.

`errors` (the model-file error type and its messages), `weights` (reading and writing weight files), `paging`
(handing weight pages back to the OS), `images` (converting between PIL, numpy and tensors) and `png` (reading
input images, writing PNGs with their A1111 `parameters` chunk without overwriting).
"""
