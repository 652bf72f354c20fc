"""What every command line shares: its Hydra entry, a check of the overrides' keys before
Hydra composes, and one exit path for bad settings and for SIGTERM.

A command is `@command("<config>")` on a function of the composed config. It exits with
`dpdit: <message>` and status 1 on a `ConfigError` (before any work: the run directory Hydra
made for it is removed again, so a refused run writes nothing), and with status 143 and a
line saying what was written when SIGTERM stops it.
"""

from __future__ import annotations

import difflib
import functools
import logging
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpdit.logs import log_into_run

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
EXIT_SIGTERM = 128 + signal.SIGTERM

log = logging.getLogger(__name__)
Result = TypeVar("Result")


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and the fix."""


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The config `name` (train, evaluate) with `overrides`, inside a running Hydra app or outside one."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@contextmanager
def settings_checked() -> Iterator[None]:
    """What bad settings raise (a wrong value, a missing or existing file, a config that does
    not instantiate) as a `ConfigError`, with the message that names the setting."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError, FileExistsError, InstantiationException) as error:
        raise ConfigError(str(error)) from error


class Interrupted(SystemExit):
    """SIGTERM stopped the command; the message says what was written."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


#################################################################################
#                        Overrides: the nearest valid key                       #
#################################################################################


def _keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{prefix}{key}"
            yield name
            yield from _keys(value, f"{name}.")


def unknown_setting(config_name: str, arguments: list[str]) -> str | None:
    """A message for the first `key=value` override whose key the composed config lacks,
    with the nearest valid key; None when all are known (or composition fails in another
    way, which Hydra then reports itself)."""
    if any(argument.startswith("-") and argument not in ("-m", "--multirun") for argument in arguments):
        return None  # --cfg, --config-name, ... : Hydra's own flags
    # what fails to parse or compose here, Hydra reports itself
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in arguments if not a.startswith("-")])
    except HydraException:
        return None
    groups, settings = [], []
    for override in overrides:
        key = override.key_or_group
        if (
            override.is_add()
            or override.is_delete()
            or override.is_force_add()
            or override.package
            or key.startswith("hydra")
        ):
            continue
        if (CONFIG_DIR / key).is_dir():
            value = override.value()
            choice = value.list[0] if override.is_sweep_override() and hasattr(value, "list") else value
            groups.append(f"{key}={choice}")
        else:
            settings.append(override)
    if not settings:
        return None
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            composed = OmegaConf.to_container(compose(config_name=config_name, overrides=groups))
    except (HydraException, OmegaConfBaseException):
        return None
    known = set(_keys(composed))
    for override in settings:
        key = override.key_or_group
        if key in known:
            continue
        nearest = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {nearest[0]}?" if nearest else "it is not a setting of this command"
        return (
            f"{key} is not a setting of {config_name}.yaml with these config choices: {hint} "
            f"(to add a new key, write +{override.input_line})"
        )
    return None


#################################################################################
#                          One exit path for every command                      #
#################################################################################


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Interrupted` where the command is (training notes it instead and
    stops after the step: `dpdit.cluster.RequeueOnSignal`)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_refused_run_directory() -> None:
    """Remove the run directory Hydra made for a job refused before any work, when it holds
    nothing but Hydra's own files (`.hydra/`, the job's log), and the empty folders above it
    up to the working directory."""
    if not HydraConfig.initialized():
        return
    runtime = HydraConfig.get()
    directory = Path(runtime.runtime.output_dir)
    own = {".hydra", f"{runtime.job.name}.log"}
    if not directory.is_dir() or {entry.name for entry in directory.iterdir()} - own:
        return
    logging.shutdown()  # the job's log file is open
    shutil.rmtree(directory)
    here = Path.cwd().resolve()
    for parent in directory.resolve().parents:
        if parent == here or here not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def run(task: Callable[[DictConfig], Result], cfg: DictConfig) -> Result:
    """Run a command's work: a bad setting ends the process with its message, SIGTERM with
    status 143 and what was written."""
    log_into_run()
    try:
        with sigterm_raises():
            return task(cfg)
    except ConfigError as error:
        remove_refused_run_directory()
        sys.exit(f"dpdit: {error}")
    except Interrupted as stop:
        log.error(stop.message)  # on the terminal and in the run's log
        sys.exit(EXIT_SIGTERM)


def command(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], None]]:
    """The `main` of a command line: its overrides' keys checked (a typo gets the nearest
    valid key), then Hydra, then `task` through `run`."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], None]:
        @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
        @functools.wraps(task)
        def hydra_main(cfg: DictConfig) -> None:
            run(task, cfg)

        @functools.wraps(task)
        def main() -> None:
            problem = unknown_setting(config_name, sys.argv[1:])
            if problem is not None:
                sys.exit(f"dpdit: {problem}")
            hydra_main()

        return main

    return decorate
