"""Errors a user can act on. The CLI prints them as one line; the server maps them to 4xx."""


class PagodaError(Exception):
    """Base class: the message is meant for the user, without a traceback."""


class ConfigError(PagodaError):
    """An option, config file or model config is invalid or unsupported."""


class ModelLoadError(PagodaError):
    """A model file is missing, unreadable, or does not match its config."""


class InvalidRequestError(PagodaError):
    """A request's parameters are invalid; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelNotFoundError(InvalidRequestError):
    """A request names a model or LoRA adapter that is not served (or was just unloaded): HTTP 404."""


class EngineOverloadedError(PagodaError):
    """The waiting queue is full; the client should retry later (HTTP 503 with Retry-After)."""
