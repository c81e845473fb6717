"""The engine's refusals, as protocol.OpenAIError (the one OpenAI error type)."""

from __future__ import annotations

from engines.protocol import OpenAIError


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        404, f"The model {name!r} does not exist or is not loaded.", param="model", code="model_not_found"
    )


def unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message, type="service_unavailable", code="unavailable")


def timed_out() -> OpenAIError:
    return OpenAIError(504, "the engine did not answer in time", type="timeout")
