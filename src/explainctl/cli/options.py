"""Turning command-line values into validated contracts, with one-line errors; the CLI
options of the method parameters, derived from the method table (explainctl.spec.methods)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ValidationError

from explainctl.config import Settings, describe
from explainctl.spec.contracts import ModelSpec
from explainctl.spec.errors import InvalidInput
from explainctl.spec.methods import ALL_NAMES, ExplainParams, default_help, flag_of


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
    """ExplainParams from the method flags that were given (not None), then `--param
    KEY=VALUE` pairs; a key that names no parameter is an error, never dropped."""
    values = {key: value for key, value in flags.items() if value is not None}
    values.update(parse_extra(extra))
    unknown = sorted(set(values) - set(ExplainParams.model_fields))
    if unknown:
        raise InvalidInput(f"unknown parameter {unknown[0]!r}")
    return validated(ExplainParams, values)


def _option_type(name: str) -> Any:
    """The CLI type of parameter `name`: its field type without None; a tuple is a
    repeatable option; the method takes its aliases too."""
    if name == "method":
        return Literal[ALL_NAMES]  # type: ignore[valid-type]
    annotation = ExplainParams.model_fields[name].annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def method_flag_names() -> tuple[str, ...]:
    return tuple(name for name in ExplainParams.model_fields if flag_of(name))


def with_method_options(command: Callable) -> Callable:
    """Give `command` one option per method parameter that has a flag (declared in
    explainctl.spec.methods), with its help and each method's default; the command receives
    the given values as `method_flags` (a dict), and `--param KEY=VALUE` as `param`."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()]
    own = [p for p in own if p.name != "method_flags"]
    names = method_flag_names()
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                _option_type(name) | None,
                typer.Option(
                    flag_of(name),
                    help=f"{ExplainParams.model_fields[name].description}. {default_help(name)}",
                    rich_help_panel="Method",
                ),
            ],
        )
        for name in names
    ]
    added.append(
        inspect.Parameter(
            "param",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                list[str] | None,
                typer.Option(
                    "--param",
                    help="Any other method parameter as KEY=VALUE (repeatable).",
                    rich_help_panel="Method",
                ),
            ],
        )
    )

    @functools.wraps(command)
    def wrapper(**values: Any) -> Any:
        flags = {name: values.pop(name) for name in names}
        flags["param"] = values.pop("param")
        return command(**values, method_flags=flags)

    parameters = [*own, *added]
    wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def params_from(method_flags: dict[str, Any]) -> ExplainParams:
    """The ExplainParams a command's method options ask for."""
    flags = dict(method_flags)
    extra = flags.pop("param", None)
    if flags.get("areas") is not None:
        flags["areas"] = tuple(flags["areas"]) or None
    return build_params(flags, extra)


def build_model_spec(
    name: str, weights: str | None, mean: str | None, std: str | None
) -> ModelSpec:
    """The ModelSpec of `--model/--weights/--mean/--std` as typed."""
    return model_spec_of(name, weights, parse_triple(mean, "--mean"), parse_triple(std, "--std"))


def model_spec_of(
    name: str, weights: str | None, mean: tuple | None, std: tuple | None
) -> ModelSpec:
    """A checked ModelSpec; a mean or std left None is the model's own."""
    values: dict[str, Any] = {"name": name, "weights": weights}
    values.update(
        {key: value for key, value in (("mean", mean), ("std", std)) if value is not None}
    )
    return validated(ModelSpec, values)


def setting_option(name: str) -> Any:
    """The CLI option of setting `name` (explainctl.config), help and variable from it."""
    flag = next(item for item in dataclasses.fields(Settings) if item.name == name).metadata["flag"]
    return typer.Option(flag, help=describe(name) + ".")
