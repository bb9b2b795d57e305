"""The exceptions lens-attn raises for things a user can fix.

Every one derives from ``ValueError`` (so code that caught ``ValueError`` keeps working) through
``LensAttnError``; the ``lens-attn`` command prints them as one line, ``lens-attn: error: ...``.

==================  =================================================================================
``CheckpointError``  a checkpoint file that cannot be read: truncated or corrupt safetensors, a pickle
                     refused by ``weights_only``, a weight that is NaN or infinite
``ConfigError``      a ``config.json`` / ``params.json`` value of the wrong type or sign
``InputError``       other bad input: an ``--out`` folder that cannot be used, token ids out of range,
                     thresholds that are not finite, a prompt file that is not UTF-8
==================  =================================================================================
"""


class LensAttnError(ValueError):
    """Base class of lens-attn's own errors; the message says what was wrong and what is valid."""


class CheckpointError(LensAttnError):
    """A checkpoint file is corrupt, truncated, unsafe to unpickle, or holds non-finite weights."""


class ConfigError(LensAttnError):
    """A checkpoint's config file holds a value of the wrong type, sign or range."""


class InputError(LensAttnError):
    """Input given by the user (arguments, files, tensors) is not valid."""
