"""The documentation runs as written: README commands and example, config overrides, file paths, and
a configuration reference that matches transformer/config.py."""

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_blocks(path: Path, language: str) -> list[str]:
    """The fenced code blocks of one language in a markdown file."""
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def shell_commands(path: Path) -> list[list[str]]:
    """Every command of the file's bash blocks, split into words (comments dropped, `&&` splits)."""
    commands = []
    for block in code_blocks(path, "bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return [c for c in commands if c]


def test_configuration_reference_is_current():
    make_config_docs = load_script("make_config_docs")
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == make_config_docs.render(), (
        f"docs/configuration.md is out of date with transformer/config.py: run "
        f"`{make_config_docs.COMMAND}` and commit the result"
    )


def test_every_config_key_is_documented_with_its_default():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert "| `train.max_steps` | int | `100000` |" in text
    assert "| `data.local_dir` | str or null | `null` |" in text
    assert text.count("\n| `") == sum(len(vars(section)) for section in vars(load_config(None)).values())


def test_readme_starts_with_install_and_quick_start():
    head = README.read_text(encoding="utf-8").splitlines()[:40]
    assert any(line.startswith("## Install") for line in head)
    for command in (
        "pip install torch==2.13.0 && pip install -e . && transformer-train --config configs/multi30k_de_en.yaml "
        "&& transformer-evaluate --checkpoint runs/multi30k_de_en/checkpoints/final.pt --split test",
        'pip install torch==2.13.0 && pip install -e ".[test]" && pytest',
    ):
        assert command in head, f"the set-up command is not in the README's first 40 lines: {command}"


def test_readme_names_no_commit():
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", README.read_text(encoding="utf-8"))
              if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert not hashes, f"the README is for users; versions belong in docs/: {hashes}"


def test_readme_help_commands_run():
    commands = [c for c in shell_commands(README) if "--help" in c]
    assert len(commands) >= 5
    running = [(c, subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
               for c in commands]
    for command, process in running:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0 and "usage:" in out, f"{' '.join(command)} failed:\n{out}"


def test_readme_python_example_runs():
    blocks = code_blocks(README, "python")
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_training_commands_name_real_configs_and_valid_overrides(path):
    for command in shell_commands(path):
        if "--config" not in command or not any(w in ("transformer-train", "transformer.train") for w in command):
            continue
        config = command[command.index("--config") + 1]
        overrides = [w for w in command[command.index("--config") + 2:] if "=" in w and not w.startswith("-")]
        assert (ROOT / config).is_file(), f"{path.name}: no config {config}"
        load_config(ROOT / config, overrides)  # raises ConfigError naming a bad key or value


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_files_named_in_the_docs_exist(path):
    text = path.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:transformer|configs|scripts|tests)/[\w./*-]*\.(?:py|yaml))`", text))
    missing = [n for n in sorted(named) if not list(ROOT.glob(n))]
    assert not missing, f"{path.name} names files that do not exist: {missing}"


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the file's headings: lowercased, punctuation dropped, spaces as
    hyphens, and -1, -2, ... after a repeated one. Lines in fenced code blocks are not headings."""
    anchors: set[str] = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_links_between_the_docs_resolve(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(target)
    assert not broken, f"{path.name} links to files or headings that do not exist: {broken}"
