"""Command-line options of the settings, and the one place where user errors become one line.

A setting's flag, ``FEDSILO_*`` variable, help text and help panel derive from its pydantic field
(:func:`setting`), whose name is also its YAML key, and a flag or variable value is parsed by that
field (:func:`fedsilo.config.parse_setting`): one validator checks a value whichever layer it comes
from, and a bad one is the same one line. Click puts a flag over its variable; then
:func:`fedsilo.config.load_settings` puts both over the ``--config`` file: an option left unset is
``None``, so the file (or the field's default) decides.

Why the options are written out in :func:`settings_options` rather than built from the models:
Typer makes options only from a function's signature, and since 0.26 it vendors Click and no
longer accepts Click parameters or types from outside; pydantic-settings would layer variables and
YAML, but parses flags with argparse, outside Typer and its help panels. So each setting is one
typed parameter of that one signature, which :class:`SettingsCommand` adds to every command that
takes settings; tests/test_options.py checks that it lists every field, typed as the field.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo
from typer._click.core import Context as ClickContext  # what Typer's classes are called with
from typer.core import TyperCommand, TyperGroup
from typer.models import OptionInfo

from fedsilo.config import (
    SECTIONS,
    Accountant,
    Backend,
    Device,
    HeadInit,
    LocalOptimizer,
    LrSchedule,
    OnExhausted,
    Partition,
    Peft,
    ServerOptimizer,
    Settings,
    TransferDtype,
    Transport,
    UpdatePolicy,
    load_settings,
    parse_setting,
)
from fedsilo.errors import ConfigError, FedsiloError

_FIELDS: dict[str, tuple[str, FieldInfo]] = {
    key: (section_name, field)
    for section_name, section in SECTIONS.items()
    for key, field in section.model_fields.items()
}


def parse_as(key: str) -> Callable[[Any], Any]:
    """A Typer ``parser`` that reads an option as the setting ``key``: a bad value raises
    ConfigError, whose line names the setting and quotes the value as typed."""

    def parse(value: Any) -> Any:
        return parse_setting(key, value)

    return parse


def setting(key: str) -> OptionInfo:
    """The option of one setting: flag, variable, help and panel from its field.

    On/off settings are ``--x/--no-x`` flags, which Typer reads itself (also from the variable);
    every other value goes through the field (:func:`parse_as`).
    """
    section_name, field = _FIELDS[key]
    flag = "--" + key.replace("_", "-")
    is_flag = field.annotation is bool
    return typer.Option(
        f"{flag}/--no-{flag[2:]}" if is_flag else flag,
        envvar=f"FEDSILO_{key.upper()}",
        parser=None if is_flag else parse_as(key),
        help=f"{field.description} [default: {'none' if field.default is None else field.default}]",
        show_default=False,  # the option's own default is None (unset, so the file can decide)
        rich_help_panel=section_name.capitalize(),
    )


def settings_options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="FEDSILO_CONFIG",
            rich_help_panel="Settings",
            help="YAML file of settings (keys as the options below, with underscores); flags and FEDSILO_* "
            "variables win over it.",
        ),
    ] = None,
    model: Annotated[str | None, setting("model")] = None,
    max_length: Annotated[int | None, setting("max_length")] = None,
    attention_mask: Annotated[bool | None, setting("attention_mask")] = None,
    peft: Annotated[Peft | None, setting("peft")] = None,
    lora_r: Annotated[int | None, setting("lora_r")] = None,
    lora_alpha: Annotated[int | None, setting("lora_alpha")] = None,
    lora_dropout: Annotated[float | None, setting("lora_dropout")] = None,
    # One comma-separated value (query,value), which the field splits into the list.
    lora_target_modules: Annotated[str | None, setting("lora_target_modules")] = None,
    dataset: Annotated[str | None, setting("dataset")] = None,
    test_dataset: Annotated[str | None, setting("test_dataset")] = None,
    text_column: Annotated[str | None, setting("text_column")] = None,
    label_column: Annotated[str | None, setting("label_column")] = None,
    # One comma-separated value (neg,pos), which the field splits into the list.
    labels: Annotated[str | None, setting("labels")] = None,
    partition: Annotated[Partition | None, setting("partition")] = None,
    dirichlet_alpha: Annotated[float | None, setting("dirichlet_alpha")] = None,
    eval_fraction: Annotated[float | None, setting("eval_fraction")] = None,
    max_examples: Annotated[int | None, setting("max_examples")] = None,
    local_epochs: Annotated[int | None, setting("local_epochs")] = None,
    batch_size: Annotated[int | None, setting("batch_size")] = None,
    lr: Annotated[float | None, setting("lr")] = None,
    optimizer: Annotated[LocalOptimizer | None, setting("optimizer")] = None,
    weight_decay: Annotated[float | None, setting("weight_decay")] = None,
    lr_schedule: Annotated[LrSchedule | None, setting("lr_schedule")] = None,
    warmup_ratio: Annotated[float | None, setting("warmup_ratio")] = None,
    fedprox_mu: Annotated[float | None, setting("fedprox_mu")] = None,
    head_init: Annotated[HeadInit | None, setting("head_init")] = None,
    seed: Annotated[int | None, setting("seed")] = None,
    device: Annotated[Device | None, setting("device")] = None,
    eval_batch_size: Annotated[int | None, setting("eval_batch_size")] = None,
    group_by_length: Annotated[bool | None, setting("group_by_length")] = None,
    fast_paths: Annotated[bool | None, setting("fast_paths")] = None,
    gradient_checkpointing: Annotated[bool | None, setting("gradient_checkpointing")] = None,
    server_optimizer: Annotated[ServerOptimizer | None, setting("server_optimizer")] = None,
    server_lr: Annotated[float | None, setting("server_lr")] = None,
    server_momentum: Annotated[float | None, setting("server_momentum")] = None,
    # One comma-separated value (0.9,0.99), which the field splits into the pair.
    server_betas: Annotated[str | None, setting("server_betas")] = None,
    server_tau: Annotated[float | None, setting("server_tau")] = None,
    dp_epsilon: Annotated[float | None, setting("dp_epsilon")] = None,
    dp_delta: Annotated[float | None, setting("dp_delta")] = None,
    dp_noise_multiplier: Annotated[float | None, setting("dp_noise_multiplier")] = None,
    dp_max_grad_norm: Annotated[float | None, setting("dp_max_grad_norm")] = None,
    dp_accountant: Annotated[Accountant | None, setting("dp_accountant")] = None,
    dp_on_exhausted: Annotated[OnExhausted | None, setting("dp_on_exhausted")] = None,
    silos: Annotated[int | None, setting("silos")] = None,
    rounds: Annotated[int | None, setting("rounds")] = None,
    aggregator: Annotated[str | None, setting("aggregator")] = None,
    backend: Annotated[Backend | None, setting("backend")] = None,
    join_timeout: Annotated[float | None, setting("join_timeout")] = None,
    round_timeout: Annotated[float | None, setting("round_timeout")] = None,
    token_file: Annotated[Path | None, setting("token_file")] = None,
    update_policy: Annotated[UpdatePolicy | None, setting("update_policy")] = None,
    transfer_dtype: Annotated[TransferDtype | None, setting("transfer_dtype")] = None,
    norm_factor: Annotated[float | None, setting("norm_factor")] = None,
    transport: Annotated[Transport | None, setting("transport")] = None,
    secure_aggregation: Annotated[bool | None, setting("secure_aggregation")] = None,
    tls_cert: Annotated[Path | None, setting("tls_cert")] = None,
    tls_key: Annotated[Path | None, setting("tls_key")] = None,
    tls_ca: Annotated[Path | None, setting("tls_ca")] = None,
    tls_revoked: Annotated[Path | None, setting("tls_revoked")] = None,
    tls_server_name: Annotated[str | None, setting("tls_server_name")] = None,
    tracking_uri: Annotated[str | None, setting("tracking_uri")] = None,
    experiment: Annotated[str | None, setting("experiment")] = None,
    register_model: Annotated[str | None, setting("register_model")] = None,
    log_merged_model: Annotated[bool | None, setting("log_merged_model")] = None,
    system_metrics: Annotated[bool | None, setting("system_metrics")] = None,
    checkpoint_dir: Annotated[Path | None, setting("checkpoint_dir")] = None,
) -> None:
    """Never called: its signature declares ``--config`` and the option of every setting, in the
    order of the sections, for :class:`SettingsCommand` to add to a command."""


def settings_parameters() -> list[Any]:
    """Typer's parameters for :func:`settings_options`, new for each command that takes them."""
    return _parameters_of(settings_options)


def _parameters_of(signature: Callable[..., None]) -> list[Any]:
    """The Typer parameters a function's signature declares."""
    template = typer.Typer(add_completion=False)
    template.command()(signature)
    return typer.main.get_command(template).params


class SettingsCommand(TyperCommand):
    """A command that also takes every settings option: register it with ``cls=SettingsCommand``.

    Before the command's function runs, ``--config`` and the settings options are resolved into
    one :class:`Settings` for :func:`settings_of`; the function's parameters are its own options.
    A command that names the settings its users set in ``shown`` lists only those in ``--help``
    (every setting is still accepted), and all of them with ``--help-all``.
    """

    shown: frozenset[str] | None = None

    def __init__(self, name: str | None, *, params: list[Any] | None = None, **attrs: Any) -> None:
        settings = settings_parameters()
        extra: list[Any] = []
        if self.shown is not None:
            unknown = self.shown - set(_FIELDS)
            if unknown:
                raise TypeError(f"{type(self).__name__}.shown names no setting: {sorted(unknown)}")
            for param in settings:
                if param.name in _FIELDS and param.name not in self.shown:
                    param.hidden = True
            extra = _parameters_of(_help_all_option)
        super().__init__(name, params=[*(params or []), *extra, *settings], **attrs)

    def invoke(self, ctx: ClickContext) -> Any:
        overrides = {key: ctx.params.pop(key) for key in _FIELDS}
        ctx.obj = load_settings(ctx.params.pop("config"), overrides)
        return super().invoke(ctx)


def _help_all(ctx: ClickContext, value: bool) -> None:
    """``--help-all``: the help with every setting shown."""
    if not value or ctx.resilient_parsing:
        return
    for param in ctx.command.params:
        param.hidden = False  # type: ignore[attr-defined]  # an Option; Arguments have none to show
    typer.echo(ctx.get_help())
    ctx.exit()


def _help_all_option(
    help_all: Annotated[
        bool,
        typer.Option(
            "--help-all",
            is_eager=True,
            expose_value=False,
            callback=_help_all,
            help="Show every setting, not only the ones listed here.",
        ),
    ] = False,
) -> None:
    """Never called: its signature declares ``--help-all``."""


def settings_of(ctx: typer.Context) -> Settings:
    """The settings resolved for the running command (a :class:`SettingsCommand`)."""
    if not isinstance(ctx.obj, Settings):
        raise TypeError(f"command {ctx.info_name!r} takes settings but is not registered with cls=SettingsCommand")
    return ctx.obj


def whole_number(flag: str, *, minimum: int | None = None, **option: Any) -> OptionInfo:
    """A command's own integer option (not a setting), ``option`` being further ``typer.Option``
    arguments. Parsed here rather than by Typer's int so that a bad value, like a bad setting, is
    a line that names the flag and quotes the value, with exit code 78 (EX_CONFIG)."""

    def parse(value: Any) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"invalid option '{flag}': expected a whole number (got {value!r})") from None
        if minimum is not None and number < minimum:
            raise ConfigError(f"invalid option '{flag}': must be at least {minimum} (got {value!r})")
        return number

    return typer.Option(flag, parser=parse, **option)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can fix become one line on stderr; bugs keep their traceback.

    A FedsiloError exits with its own code (fedsilo.errors): 78 (EX_CONFIG) for a bad setting
    from any layer, bad data or a refused join, which no restart can fix; 1 for a broken
    federation (a lost peer, a timeout), which a restart resumes. Typer's own errors, Click's
    usage errors (unknown option, missing value, unknown command) among them, keep their exit
    code (2 for usage errors). The Helm chart fails the Job at once on 2 and 78. Ctrl-C, and
    SIGTERM inside :func:`stop_on_sigterm`, exit 130.
    """
    try:
        yield
    except FedsiloError as exc:
        typer.echo(f"fedsilo: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except typer.TyperException as exc:  # the base of the Click exceptions Typer vendors
        message = " ".join(exc.format_message().split())
        typer.echo(f"fedsilo: error: {message[:1].lower()}{message[1:]}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("fedsilo: interrupted", err=True)
        raise typer.Exit(130) from None


class FedsiloGroup(TyperGroup):
    """The ``fedsilo`` command group: every user error below it passes through :func:`user_errors`.

    ``invoke`` covers each command's whole life, from parsing its options to its end; ``parse_args``
    covers the group's own options (``fedsilo --bogus``).
    """

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        if not args:  # no_args_is_help: Typer shows the help, which is not an error line
            return super().parse_args(ctx, args)
        with user_errors():
            return super().parse_args(ctx, args)

    def invoke(self, ctx: ClickContext) -> Any:
        with user_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (KeyboardInterrupt) inside the block.

    ``kill`` and Kubernetes stop a process with SIGTERM, which by default ends Python on the spot:
    no ``finally`` runs, so an MLflow run would stay RUNNING for ever. For the in-process commands
    (simulate, sweep), whose time goes to Python and torch operators that return often; a rank
    blocked inside a collective would see it only when the collective returns.
    """
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt, as Ctrl-C does
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
