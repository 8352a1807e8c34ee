"""What every ``lifealign-lite`` command shares: the consoles, the options several commands take, the paths,
and error handling. Imports nothing heavy (``--help`` must not import torch).

Errors: a command lets a :class:`~lifealign_lite.errors.LifeAlignError` (anything the user can cause) propagate;
:class:`App` prints it as one line (invalid data: one line per problem) and exits 2. Any other exception is a bug
and shows its traceback.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from typer.core import TyperGroup

from lifealign_lite.errors import LifeAlignError

# Plain (click-style) help: a flag shows no type placeholder, an option shows what it takes; -h works everywhere.
HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 120}
PIPE_WIDTH = 1000  # a table written to a file or a pipe is as wide as its content, up to this


class WideWhenPiped(Console):
    """A console that, writing to a file or a pipe (and without COLUMNS set), is not cut at the terminal's 80 columns:
    a table there is as wide as its content, so paths and times are shown whole (`memory show NAME | cat`)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width is None and not self.is_terminal and "COLUMNS" not in self._environ:
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)


err = WideWhenPiped(stderr=True)
out = WideWhenPiped()


def home_dir() -> Path:
    """Where models, caches and the default bank live: $LIFEALIGN_HOME, else ~/.lifealign-lite."""
    return Path(os.environ.get("LIFEALIGN_HOME") or Path.home() / ".lifealign-lite")


def default_bank() -> Path:
    return home_dir() / "bank"


def error_line(message: str) -> None:
    """``error: MESSAGE`` on stderr (the message is printed as it is, never read as markup)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    error_line(message)
    raise typer.Exit(code)


def status(message: str) -> None:
    """A one-line status message on stderr (what a silent phase is doing)."""
    err.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)


def report_error(exc: LifeAlignError) -> None:
    """A user error on stderr: invalid data as one ``FILE:LINE: what; what to do`` per line (at most
    errors.MAX_SHOWN_PROBLEMS, then how many more), anything else as one ``error:`` line. In a data-parallel run
    only the main process prints it (the others stop with the same exit code, silently)."""
    from lifealign_lite.data import DataError
    from lifealign_lite.distributed import is_main_process

    if not is_main_process():
        return
    if isinstance(exc, DataError):
        for line in str(exc).splitlines():
            if line.startswith("... and "):  # the count of problems not shown
                err.print(line, highlight=False, soft_wrap=True, markup=False)
            else:
                error_line(line)
    else:
        error_line(str(exc))


# click's usage error (a mistyped flag or command, a missing argument), reached through typer's public BadParameter
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class App(TyperGroup):
    """The command group that turns a user error into one line and exit code 2 (sub-apps run inside it): a
    :class:`LifeAlignError`, and a usage mistake in a command's flags (``error: No such option: --lrr (Possible
    options: --lr); see `lifealign-lite align --help``` instead of click's four-line usage block)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LifeAlignError as exc:
            report_error(exc)
            raise typer.Exit(2) from None
        except _USAGE_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group (`lifealign-lite memory`): its help, as asked
                raise
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            error_line(f"{exc.format_message().rstrip('.')}; see `{where} --help`")
            raise typer.Exit(exc.exit_code) from None


def relaunch_args(ctx, drop: set[str] = frozenset()) -> list[str]:
    """The arguments that run ``ctx``'s command again with the values the user gave (defaults left out, so the
    new process resolves them the same way), less the parameters in ``drop``: what a launcher starts N times.
    ``ctx`` is a click context (typer's own copy of click or click itself: only their shared attributes are read)."""
    names, c = [], ctx
    while c.parent is not None:
        names.insert(0, c.info_name)
        c = c.parent
    positional, options = [], []
    for param in ctx.command.params:
        value, source = ctx.params.get(param.name), ctx.get_parameter_source(param.name)
        if param.name in drop or value is None or getattr(source, "name", "DEFAULT") in ("DEFAULT", "DEFAULT_MAP"):
            continue
        values = list(value) if param.multiple or param.nargs == -1 else [value]
        if param.param_type_name == "argument":
            positional += [str(v) for v in values]
        elif getattr(param, "is_flag", False):
            options += [param.opts[0]] if value else param.secondary_opts[:1]
        else:
            for v in values:
                options += [param.opts[0], str(v)]
    return names + positional + options


def sub_app(help: str) -> typer.Typer:
    """A command group under ``lifealign-lite`` (memory, bench)."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, context_settings=HELP_SETTINGS)


def existing_bank(path: Optional[Path]) -> Path:
    """The bank a reading command uses; a folder with no bank in it is an error (a mistyped --bank is not an empty bank)."""
    from lifealign_lite.memory.bank import Bank

    bank = Bank(path or default_bank())
    if not bank.exists():
        hint = "check --bank (or LIFEALIGN_BANK)" if path else "create it with `lifealign-lite align DATA --domain NAME`, or pass --bank"
        fail(f"{bank.root}: no adapter bank there (no manifest.json); {hint}")
    return bank.root


def build_recipe(recipe: Optional[str], sets: list[str], **flags):
    """The recipe: YAML preset < ``--set key=value`` < a flag given on the command line (a flag not given is None
    and overrides nothing)."""
    from lifealign_lite.recipe import RecipeError, load_recipe, parse_set_options

    try:  # checked here, before any work, by callers that are not commands too
        given = {k: v for k, v in flags.items() if v is not None}
        return load_recipe(recipe, {**parse_set_options(sets or []), **given})
    except RecipeError as exc:
        fail(str(exc))


def with_options(into: str, options: dict[str, tuple[Any, Any]]) -> Callable:
    """A decorator that puts ``options`` (name -> (type, ``typer.Option``)) into a command's signature in place of its
    parameter ``into``, and passes the command their values collected in one dict, as ``into``.

    Options several commands share are declared once this way (the recipe's flags, the benchmarks' run options),
    and a command's signature stays the list of what is its own."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        assert into in signature.parameters and not set(options) & set(signature.parameters), (into, list(options))
        params = []
        for param in signature.parameters.values():
            if param.name != into:
                params.append(param)
                continue
            params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=kind)
                       for name, (kind, option) in options.items()]

        @functools.wraps(command)
        def run(**kwargs):
            collected = {name: kwargs.pop(name) for name in options}
            return command(**kwargs, **{into: collected})

        run.__signature__ = signature.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
        return run

    return decorate


@functools.lru_cache(maxsize=1)
def _default_recipe():
    from lifealign_lite.recipe import load_recipe

    return load_recipe(None)


def _recipe_option(key: str, note: str = "") -> tuple[Any, Any]:
    """The flag of recipe field ``key``, made from its knob: ``--KEY`` (dashes) plus the knob's aliases, its metavar (the
    knob's, else its choices, else N or X by type) and its help (plus ``note``) naming the key and the default recipe's
    value (another --recipe has its own: `lifealign-lite recipes NAME`). None unless given, so it overrides nothing."""
    from lifealign_lite.recipe import describe

    info, default = describe(key), getattr(_default_recipe(), key)
    dashed, kind = key.replace("_", "-"), type(default)
    if kind is bool:
        names, metavar = (f"--{dashed}/--no-{dashed}",), None
    else:
        names = (f"--{dashed}", *info["aliases"])
        metavar = info["metavar"] or "|".join(info["choices"] or ()) or {int: "N", float: "X"}.get(kind, "TEXT")
        kind = str if kind is list else kind  # a list is given comma-separated
    shown = ",".join(default) if isinstance(default, list) else default
    return Optional[kind], typer.Option(None, *names, metavar=metavar, help=" ".join(filter(None, (info["help"], note))) + f" (recipe key {key})",
                                        show_default=f"{_default_recipe().name}: {shown}")


def recipe_options(*keys: str, into: str = "flags", notes: dict[str, str] | None = None) -> Callable:
    """Give a command the flags of these recipe fields (default: every knob marked ``flag``, :func:`recipe.flag_keys`)
    in place of its parameter ``into``, which receives them as one overrides dict for :func:`build_recipe`; ``notes``
    adds a sentence to a flag's help."""
    from lifealign_lite.recipe import flag_keys

    return with_options(into, {key: _recipe_option(key, (notes or {}).get(key, "")) for key in keys or flag_keys()})


RecipeOpt = typer.Option(None, "--recipe", "-r", metavar="NAME|PATH", help="Preset name (see `lifealign-lite recipes`) or path to a YAML file.")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override any recipe field (repeatable); `lifealign-lite recipes NAME` lists them.")
BankOpt = typer.Option(None, "--bank", envvar="LIFEALIGN_BANK", metavar="FOLDER", help="Adapter bank folder (default: $LIFEALIGN_HOME/bank).")
JsonOpt = typer.Option(False, "--json", help="Print JSON on stdout.")
EngineOpt = typer.Option("auto", "--engine", metavar="auto|torch|llama.cpp",
                         help="What generates: llama.cpp (the base GGUF with each memory as a LoRA adapter, from the xllamacpp wheel; the "
                              "default where the model has a GGUF) or torch (transformers; --quant, --unmerged and any model).")
