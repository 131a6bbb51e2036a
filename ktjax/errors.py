"""Errors ktjax raises. Every user-facing problem is a KtjaxError that names its cause."""


class KtjaxError(Exception):
    """Base class of all ktjax errors."""


class GGUFError(KtjaxError):
    """A GGUF file is truncated, corrupt, or holds something ktjax cannot load."""


class UnsupportedModelError(KtjaxError):
    """The architecture, quant type or configuration is not supported."""


class TensorError(GGUFError):
    """A tensor is missing, unexpected, duplicated or of the wrong shape."""


class RequestError(KtjaxError, ValueError):
    """A prompt or sampling parameter is invalid (empty, too long, out of range)."""


class OutOfMemoryError(KtjaxError):
    """The KV page pool cannot hold the requested sequences."""


class RulesError(KtjaxError):
    """A placement rules file is invalid or does not fit the model (names the rule)."""


class KernelError(KtjaxError):
    """A native kernel rejected its inputs (shape, dtype, handle, values)."""


class ArtifactError(KtjaxError):
    """Exported artifacts (ktjax export) are corrupt, truncated or unusable here."""


class ArtifactMismatchError(ArtifactError):
    """Exported artifacts were made for another model, rules, engine settings, software or
    machine (the message names each field that differs)."""
