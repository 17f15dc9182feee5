"""Turning command-line values into validated contracts, with one-line errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from explainctl.contracts import ExplainParams, ModelSpec
from explainctl.errors import InvalidInput


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "__root__")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{where.replace('_', '-')}: {message}" if where else message


def validated(model: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return model(**values)
    except ValidationError as error:
        raise InvalidInput(f"invalid parameter {_one_line(error)}") from None


def parse_triple(text: str | None, what: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidInput(f"{what} must be three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise InvalidInput(f"{what} must be three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def parse_extra(pairs: list[str] | None) -> dict[str, str]:
    """`--param key=value` pairs for parameters without a flag of their own."""
    extra: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidInput(f"--param takes KEY=VALUE, got {pair!r}")
        if key not in ExplainParams.model_fields:
            known = ", ".join(sorted(ExplainParams.model_fields))
            raise InvalidInput(f"unknown parameter {key!r}; known: {known}")
        extra[key] = value
    return extra


def build_params(flags: dict[str, Any], extra: list[str] | None = None) -> ExplainParams:
    """ExplainParams from the flags that name one of its fields and were given (not None),
    then `--param KEY=VALUE` pairs."""
    fields = ExplainParams.model_fields
    values = {key: value for key, value in flags.items() if key in fields and value is not None}
    values.update(parse_extra(extra))
    return validated(ExplainParams, values)


def build_model_spec(
    name: str, weights: str | None, mean: str | None, std: str | None
) -> ModelSpec:
    values: dict[str, Any] = {"name": name, "weights": weights}
    if (parsed := parse_triple(mean, "--mean")) is not None:
        values["mean"] = parsed
    if (parsed := parse_triple(std, "--std")) is not None:
        values["std"] = parsed
    return validated(ModelSpec, values)
