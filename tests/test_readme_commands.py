"""Every command line the README and docs show composes as written: its config and every
override exist (the one mistyped example is refused, as the README says it is)."""

import re
import shlex
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python (train\.py|-m dpdit\.(sample|evaluate|audit|profile|inspect))\b(.*)")
# the README's example of a mistyped key and the refusal it gets
MISTYPED = "trainer.max_step=100"


def documented_commands() -> list[tuple[str, list[str]]]:
    """(config name, overrides) of every documented command; placeholders (`<run>`,
    `[overrides]`), comments and Hydra's own settings (launcher, run directory) left out,
    a sweep's first value standing for the others."""
    commands = []
    for document in DOCUMENTS:
        text = document.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            match = COMMAND.search(line)
            if not match:
                continue
            arguments = match.group(3).split("`")[0].split(" #")[0]
            words = [
                word
                for word in shlex.split(arguments)
                if "=" in word
                and not re.search(r"[<>\[\]]$|^\[|<", word.split("=", 1)[0] + word)
                and not word.startswith("hydra")
            ]
            if re.search(r"(^|\s)(-m|--multirun)(\s|$)", arguments):
                # a sweep: each of its values is one run; the first stands for them all
                words = [word if "[" in word else word.split(",")[0] for word in words]
            commands.append((match.group(2) or "train", words))
    return commands


COMMANDS = documented_commands()


def test_the_documents_show_commands_of_every_kind():
    assert len(COMMANDS) > 50
    assert {name for name, _ in COMMANDS} == {"train", "sample", "evaluate", "audit", "profile", "inspect"}


@pytest.mark.parametrize("name, overrides", sorted({(name, tuple(words)) for name, words in COMMANDS}))
def test_a_documented_command_composes(name, overrides):
    if MISTYPED in overrides:
        with pytest.raises((HydraException, OmegaConfBaseException), match="max_step"):
            compose_config(name, *overrides)
        return
    compose_config(name, *overrides)
