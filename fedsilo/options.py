"""CLI options generated from the settings models, so a flag, its ``FEDSILO_*`` variable, its
help text and its YAML key can never drift apart.

Every generated option defaults to ``None``: a value counts only when the user gave it (by flag
or environment variable), and then it wins over the ``--config`` file.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic.fields import FieldInfo

from fedsilo.config import SECTIONS, Settings, load_settings
from fedsilo.errors import ConfigError, FedsiloError


def _cli_type(annotation: Any) -> Any:
    """What Typer parses: bool for on/off flags, text for everything else.

    Values arrive as text so that pydantic validates a flag exactly as the same value from YAML
    or a ``FEDSILO_*`` variable: ``--rounds many`` then gets the one-line "invalid setting
    'rounds'" error instead of Click's multi-line usage box.
    """
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return bool if annotation is bool or args == [bool] else str


def _metavar(annotation: Any) -> str:
    """The placeholder shown in --help, named after the type pydantic will check."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    scalar = args[0] if typing.get_origin(annotation) is not typing.Literal and args else annotation
    names = {int: "INTEGER", float: "FLOAT", Path: "PATH"}
    return names.get(scalar, "TEXT")


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    annotation = field.annotation
    choices = [a for a in typing.get_args(annotation)] if typing.get_origin(annotation) is typing.Literal else []
    if choices:
        text += f" [choices: {', '.join(choices)}]"
    if not field.is_required():
        default = field.default
        text += f" [default: {'none' if default is None else default}]"
    return text


def settings_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per settings field, plus ``--config``."""
    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[Path], typer.Option(
                "--config", envvar="FEDSILO_CONFIG", rich_help_panel="Settings",
                help="YAML file of settings (keys as the options below, with underscores); "
                     "flags and FEDSILO_* variables win over it.")],
        )
    ]
    for section_name, section in SECTIONS.items():
        for key, field in section.model_fields.items():
            flag = "--" + key.replace("_", "-")
            cli_type = _cli_type(field.annotation)
            decls = [f"{flag}/--no-{key.replace('_', '-')}"] if cli_type is bool else [flag]
            option = typer.Option(
                *decls, envvar=f"FEDSILO_{key.upper()}", help=_help(field), show_default=False,
                rich_help_panel=section_name.capitalize(),
                metavar=None if cli_type is bool else _metavar(field.annotation),
            )
            params.append(inspect.Parameter(
                key, inspect.Parameter.KEYWORD_ONLY, default=None,
                annotation=Annotated[Optional[cli_type], option],
            ))
    return params


def with_settings(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command(settings, **own)`` every settings option; resolve them into ``Settings``."""
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints[name])
           for name, p in inspect.signature(command).parameters.items() if name != "settings"]
    generated = settings_parameters()
    keys = [p.name for p in generated if p.name != "config"]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        config = kwargs.pop("config")
        overrides = {key: kwargs.pop(key) for key in keys}
        return command(load_settings(config, overrides), **kwargs)

    # Typer reads the signature and the annotations: give it the generated ones.
    signature = inspect.Signature([*own, *generated])
    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    del wrapper.__wrapped__
    return user_errors(wrapper)


def whole_number(value: str | None, flag: str, minimum: int | None = None) -> int | None:
    """A command's own integer option, read as the settings are: a bad value is one line that
    names the flag (Typer's own int parsing would print Click's usage box instead)."""
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise ConfigError(f"invalid option '{flag}': expected a whole number (got {value!r})") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"invalid option '{flag}': must be at least {minimum} (got {value!r})")
    return number


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (KeyboardInterrupt) inside the block.

    ``kill`` and Kubernetes stop a process with SIGTERM, which by default ends Python on the spot:
    no ``finally`` runs, so an MLflow run would stay RUNNING for ever. For the in-process commands
    (simulate, sweep), whose time goes to Python and torch operators that return often; a rank
    blocked inside a collective would see it only when the collective returns.
    """
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Errors a user can fix become one line on stderr and exit code 1; bugs keep a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FedsiloError as exc:
            typer.echo(f"fedsilo: error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("fedsilo: interrupted", err=True)
            raise typer.Exit(130) from None

    del wrapper.__wrapped__
    hints = typing.get_type_hints(command, include_extras=True)
    wrapper.__signature__ = inspect.signature(command).replace(  # type: ignore[attr-defined]
        parameters=[p.replace(annotation=hints.get(n, p.annotation)) for n, p in inspect.signature(command).parameters.items()]
    )
    wrapper.__annotations__ = hints
    return wrapper


__all__ = ["Settings", "settings_parameters", "stop_on_sigterm", "user_errors", "whole_number", "with_settings"]
