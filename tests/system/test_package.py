"""The package and its documentation: lintian-clean, and man pages that agree with the program.

The man pages are generated from packaging/man/manpages.md plus the argument
parser; these tests make sure that the generated pages name every command and
option the parser has, every key the shipped config shows (and no other), and
the real default of every key whose default they state.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from typing import Any

import pytest

from conftest import ROOT, missing  # the suite's root conftest

sys.path.insert(0, os.path.join(ROOT, "packaging", "man"))
import genman  # noqa: E402

from markrouted import config as mconfig  # noqa: E402
from markrouted.cli import build_parser  # noqa: E402

README = os.path.join(ROOT, "packaging", "README.md")


def lintian_tags(deb: str) -> list[tuple[str, str]]:
    proc = subprocess.run(["lintian", "--info", "--display-level", ">=pedantic", deb], capture_output=True,
                          text=True, timeout=300)
    tags = re.findall(r"^([EWIPX]): markrouted: ([a-z0-9.+-]+)", proc.stdout, re.M)
    return [(sev, tag) for sev, tag in tags]


def test_lintian_has_no_errors_and_every_tag_is_explained(deb: str) -> None:
    if shutil.which("lintian") is None:
        missing("needs lintian (scripts/install-deps --test installs it)")
    tags = lintian_tags(deb)
    assert not [t for sev, t in tags if sev == "E"], tags
    with open(README) as f:
        readme = f.read()
    unexplained = sorted({t for _, t in tags if t not in readme})
    assert not unexplained, f"lintian tags not explained in packaging/README.md: {unexplained}"


# ------------------------------------------------------------------ man pages


@pytest.fixture(scope="module")
def pages() -> dict[str, genman.Page]:
    with open(genman.SOURCE) as f:
        return {p.filename: p for p in genman.parse_source(f.read())}


def item_terms(page: genman.Page) -> list[tuple[str, str, str]]:
    """(section, subsection, term) of every tagged paragraph."""
    out = []
    section = sub = ""
    for b in genman.blocks(page.lines):
        if b.kind == "h2":
            section, sub = b.text, ""
        elif b.kind == "h3":
            sub = b.text
        elif b.kind == "item":
            out.append((section, sub, b.text))
    return out


def test_roff_pages_render_without_warnings(tmp_path: Any) -> None:
    if shutil.which("man") is None:
        missing("needs man (man-db)")
    assert genman.main(["--outdir", str(tmp_path)]) == 0
    for name in ("markrouted.8", "markrouted.toml.5"):
        proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(tmp_path / name)],
                              capture_output=True, text=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_markrouted_8_documents_every_command_and_option(tmp_path: Any) -> None:
    genman.main(["--outdir", str(tmp_path)])
    text = (tmp_path / "markrouted.8").read_text().replace("\\-", "-")
    options, commands = genman.introspect(build_parser())
    assert {c.name for c in commands} >= {"check", "plan", "apply", "status", "explain", "flush", "run"}
    for cmd in commands:
        assert f"\\fBmarkrouted {cmd.name}\\fR" in text
        for opt in cmd.options:
            assert opt.names[-1] in text
    for opt in options:
        assert opt.names[-1] in text
    for heading in ("SIGNALS", "EXIT STATUS", "FILES", "EXAMPLES"):
        assert f".SH {heading}" in text


def _documented_keys(page: genman.Page) -> dict[tuple[str, str], str | None]:
    """(table, key) -> the default the page states (a TOML value), or None."""
    table_of = {("SETTINGS", ""): "settings", ("UPLINKS", ""): "uplink", ("UPLINKS", "Health check"): "check",
                ("POLICIES", ""): "policy", ("SETS", ""): "sets"}
    out: dict[tuple[str, str], str | None] = {}
    for section, sub, term in item_terms(page):
        table = table_of.get((section, sub))
        if table is None:
            continue
        m = re.fullmatch(r"(.*?)(?: = (.+))?", term)
        assert m is not None
        for key in re.findall(r"`(\w+)`", m.group(1)):
            out[(table, key)] = m.group(2)
    return out


def test_markrouted_toml_5_documents_exactly_the_shipped_keys(pages: dict[str, genman.Page]) -> None:
    documented = {key for _, key in _documented_keys(pages["markrouted.toml.5"])}
    with open(os.path.join(ROOT, "etc", "markrouted.toml")) as f:
        text = f.read()
    shipped = set(re.findall(r"^#(\w+) = ", text, re.M))
    # a set file must exist, so the example names `files` in its prose, not as a line to uncomment
    shipped |= set(re.findall(r"^# (files) = ", text, re.M))
    assert documented == shipped


MINIMAL = {
    "settings": ("", "[settings]\n{kv}\n"),
    "uplink": ("[uplinks.u]\ninterface = \"eth0\"\ntable = 101\nmark = 1\n",
               "[uplinks.u]\ninterface = \"eth0\"\ntable = 101\nmark = 1\n{kv}\n"),
    "check": ("[uplinks.u]\ninterface = \"eth0\"\ntable = 101\nmark = 1\n[uplinks.u.check]\ntargets = [\"192.0.2.1\"]\n",
              "[uplinks.u]\ninterface = \"eth0\"\ntable = 101\nmark = 1\n[uplinks.u.check]\n"
              "targets = [\"192.0.2.1\"]\n{kv}\n"),
    "sets": ("[sets.s]\nelements = [\"192.0.2.0/24\"]\n", "[sets.s]\nelements = [\"192.0.2.0/24\"]\n{kv}\n"),
    "policy": ("[uplinks.u]\ninterface = \"eth0\"\ntable = 101\nmark = 1\n[[policy]]\nname = \"p\"\nuplinks = [\"u\"]\n",
               "[uplinks.u]\ninterface = \"eth0\"\ntable = 101\nmark = 1\n[[policy]]\nname = \"p\"\n"
               "uplinks = [\"u\"]\n{kv}\n"),
}


def test_markrouted_toml_5_states_the_real_defaults(pages: dict[str, genman.Page]) -> None:
    stated = {k: v for k, v in _documented_keys(pages["markrouted.toml.5"]).items() if v is not None}
    assert len(stated) >= 12
    for (table, key), value in stated.items():
        tomllib.loads(f"x = {value}")  # a TOML value as written in the page
        without, template = MINIMAL[table]
        assert mconfig.parse(without) == mconfig.parse(template.format(kv=f"{key} = {value}")), (table, key, value)


def test_markdown_rendering_has_every_page_and_command(capsys: Any) -> None:
    assert genman.main(["--markdown"]) == 0
    out = capsys.readouterr().out
    assert "## markrouted(8)" in out and "## markrouted.toml(5)" in out
    for cmd in genman.introspect(build_parser())[1]:
        assert f"`markrouted {cmd.name}" in out
    assert "@COMMANDS@" not in out and "@OPTIONS@" not in out
