"""Every command the README and docs/ show is accepted by its tool's own parser, argument for
argument: a renamed or removed option breaks this test, not a reader's first try."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBCOMMANDS = {"register": "register", "apply": "apply_transform", "segment": "segment", "finetune": "finetune",
               "pretrain": "pretrain", "cohort": "cohort"}
SCRIPT = re.compile(r"(?:.*/)?GVSLTrainer/(\w+)\.py")


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(where, tool, arguments) for each tool command in the docs: in fenced or indented code blocks
    and in inline code (there only with an option: `gvsl apply` alone names the tool). A usage summary counts too, read as its first choices: [--tta] is --tta,
    --mode rigid|affine is --mode rigid, and a bracketed PLACEHOLDER is left out."""
    found = []
    for doc in DOCS:
        in_code, pending = False, ""
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_code = not in_code
                continue
            if in_code or line.startswith("    "):
                line, pending = pending + line, ""
                if line.rstrip().endswith("\\"):
                    pending = line.rstrip()[:-1] + " "
                    continue
                texts = [line]
            else:
                texts = re.findall(r"`([^`]*(?:GVSLTrainer/\w+\.py|gvsl \w+)[^`]*)`", line)
            for text in texts:
                for part in re.split(r"&&|;", text):
                    found += [(f"{doc.name}:{number}", tool, argv) for tool, argv in _command(part)
                              if in_code or line.startswith("    ") or any(a.startswith("--") for a in argv)]
    return found


def _command(text: str) -> list[tuple[str, list[str]]]:
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return []
    for i, word in enumerate(words):
        match = SCRIPT.fullmatch(word)
        tool = match.group(1) if match else SUBCOMMANDS.get(words[i + 1]) if (word == "gvsl" and i + 1 < len(words)) \
            else None
        if tool:
            argv = []
            for w in words[i + 1 + (word == "gvsl"):]:
                bracketed, w = w.startswith("[") or w.endswith("]"), w.strip("[]").split("|")[0]
                if w and not (bracketed and w.isupper()):
                    argv.append(w)
            return [(tool, argv)]
    return []


def parse(tool: str, argv: list[str]) -> None:
    if tool in ("pretrain", "finetune"):
        from gvsl.config import build_parser

        config = importlib.import_module(f"gvsl.{tool}")
        build_parser(config.PretrainConfig if tool == "pretrain" else config.FinetuneConfig, "").parse_args(argv)
        return
    command = importlib.import_module(f"gvsl.commands.{tool}")
    parsed = command.parse(argv)
    if tool == "cohort":  # the rest goes to register.py or segment.py for every subject
        args, options = parsed
        registers = args.command in ("register", "label-fusion")
        inner = importlib.import_module(f"gvsl.commands.{'register' if registers else 'segment'}")
        inner.parse(["--fixed", "f", "--moving", "m", *options] if registers else
                    ["--model", "m", "--input", "i", "--output", "o.nii.gz", *options])


COMMANDS = shown_commands()


def test_the_docs_show_every_tool():
    assert {tool for _, tool, _ in COMMANDS} == {"register", "apply_transform", "segment", "finetune", "pretrain",
                                                 "cohort"}
    assert len(COMMANDS) > 25


@pytest.mark.parametrize("where, tool, argv", COMMANDS, ids=[f"{w} {t}" for w, t, _ in COMMANDS])
def test_a_shown_command_parses(where, tool, argv):
    try:
        parse(tool, argv)
    except SystemExit as e:
        if e.code == 0 and "--help" in argv:
            return
        pytest.fail(f"{where}: {tool} refused {' '.join(argv)} (exit {e.code})")
