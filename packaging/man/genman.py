#!/usr/bin/python3
"""Render markrouted(8) and markrouted.toml(5) from one source.

The prose lives in ``manpages.md`` beside this file; the command and option
reference is taken from ``markrouted.cli.build_parser()``, the parser that
``--help`` prints, so the man page and the program cannot drift apart. The same
source renders to Markdown (``--markdown``) for the README.

    PYTHONPATH=. packaging/man/genman.py --outdir build/man     # roff pages
    PYTHONPATH=. packaging/man/genman.py --markdown             # Markdown on stdout

Only the small Markdown subset described at the top of ``manpages.md`` is
understood; anything else is an error rather than silently mis-rendered.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "manpages.md")
PAGE_RE = re.compile(r"# (?P<name>[\w.-]+)\((?P<section>\d)\) (?P<title>.+)")
INLINE_RE = re.compile(r"`([^`]+)`|\*([^*\s][^*]*)\*")


@dataclass
class Page:
    """One man page: its name, section, title line and source lines."""

    name: str
    section: str
    title: str
    lines: list[str] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"


def parse_source(text: str) -> list[Page]:
    """Split the source into pages, dropping the leading HTML comment."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    pages: list[Page] = []
    for line in text.splitlines():
        m = PAGE_RE.fullmatch(line)
        if m:
            pages.append(Page(m["name"], m["section"], m["title"]))
        elif pages:
            pages[-1].lines.append(line.rstrip())
        elif line.strip():
            raise ValueError(f"text before the first page: {line!r}")
    return pages


# ------------------------------------------------------------------ blocks


@dataclass
class Block:
    """A unit of layout: heading, paragraph, tagged item, literal example or generated part."""

    kind: str  # "h2" | "h3" | "para" | "item" | "literal" | "commands" | "options"
    text: str = ""
    body: str = ""
    lines: list[str] = field(default_factory=list)


def blocks(lines: list[str]) -> Iterator[Block]:
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("### "):
            yield Block("h3", line[4:])
            i += 1
        elif line.startswith("## "):
            yield Block("h2", line[3:])
            i += 1
        elif line.strip() == "@COMMANDS@":
            yield Block("commands")
            i += 1
        elif line.strip() == "@OPTIONS@":
            yield Block("options")
            i += 1
        elif line.startswith("    "):
            literal = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                literal.append(lines[i][4:])
                i += 1
            while literal and not literal[-1]:
                literal.pop()
            yield Block("literal", lines=literal)
        elif line.startswith("* "):
            term = line[2:]
            body = []
            i += 1
            while i < len(lines) and lines[i].startswith("  ") and not lines[i].startswith("    "):
                body.append(lines[i].strip())
                i += 1
            yield Block("item", term, " ".join(body))
        elif line.startswith((" ", "#")):
            raise ValueError(f"unsupported markup: {line!r}")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith((" ", "#", "* ", "@")):
                para.append(lines[i].strip())
                i += 1
            yield Block("para", " ".join(para))


# ------------------------------------------------------------------ the parser


@dataclass
class Option:
    """A command line option or argument, as argparse knows it."""

    names: list[str]
    metavar: str | None
    help: str
    required: bool


@dataclass
class Command:
    name: str
    help: str
    options: list[Option]


def _options(parser: argparse.ArgumentParser, skip: set[str]) -> list[Option]:
    out = []
    for action in parser._actions:  # argparse offers no public introspection
        if isinstance(action, argparse._SubParsersAction) or not action.option_strings:
            continue
        if skip & set(action.option_strings):
            continue
        metavar = None
        if action.nargs != 0:
            if action.choices:
                metavar = "{" + ",".join(map(str, action.choices)) + "}"
            else:
                metavar = action.metavar or action.dest.upper()
        help_text = (action.help or "") % {"default": action.default} if action.help else ""
        out.append(Option(list(action.option_strings), metavar, help_text, bool(action.required)))
    return out


def introspect(parser: argparse.ArgumentParser) -> tuple[list[Option], list[Command]]:
    """The top-level options and each command with its own options (not -h, not -c)."""
    top = _options(parser, set())
    commands = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                commands.append(Command(name, helps.get(name, ""), _options(sub, {"-h", "-c"})))
    return top, commands


# ------------------------------------------------------------------ roff


def roff_escape(text: str) -> str:
    return text.replace("\\", "\\e")


def roff_inline(text: str) -> str:
    out = []
    pos = 0
    for m in INLINE_RE.finditer(text):
        out.append(roff_escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append("\\fB" + roff_escape(m.group(1)).replace("-", "\\-") + "\\fR")
        else:
            out.append("\\fI" + roff_escape(m.group(2)) + "\\fR")
        pos = m.end()
    out.append(roff_escape(text[pos:]))
    return "".join(out)


def roff_line(text: str) -> str:
    """A text line that roff will not take for a request."""
    return "\\&" + text if text.startswith((".", "'")) else text


def _roff_option(opt: Option) -> str:
    names = ", ".join("\\fB" + n.replace("-", "\\-") + "\\fR" for n in opt.names)
    return names + (f" \\fI{roff_escape(opt.metavar)}\\fR" if opt.metavar else "")


def _roff_synopsis(cmd: Command) -> str:
    parts = [f"\\fBmarkrouted {cmd.name}\\fR"]
    for opt in cmd.options:
        first = "\\fB" + opt.names[-1].replace("-", "\\-") + "\\fR"
        arg = first + (f" \\fI{roff_escape(opt.metavar)}\\fR" if opt.metavar else "")
        parts.append(arg if opt.required else f"[{arg}]")
    return " ".join(parts)


def _sentence(text: str) -> str:
    """argparse help is a lowercase fragment; a man page wants a sentence."""
    text = text.strip()
    if not text:
        return ""
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def roff_commands(commands: list[Command]) -> list[str]:
    out = []
    for cmd in commands:
        out += [".TP", _roff_synopsis(cmd), roff_line(roff_escape(_sentence(cmd.help)))]
        if cmd.options:
            out.append(".RS")
            for opt in cmd.options:
                out += [".TP", _roff_option(opt), roff_line(roff_escape(_sentence(opt.help)))]
            out.append(".RE")
    return out


def roff_options(options: list[Option]) -> list[str]:
    out = []
    for opt in options:
        out += [".TP", _roff_option(opt), roff_line(roff_escape(_sentence(opt.help)))]
    return out


def render_roff(page: Page, options: list[Option], commands: list[Command], version: str, date: str) -> str:
    out = [
        f'.\\" Generated by packaging/man/genman.py from packaging/man/manpages.md; do not edit.',
        f'.TH "{page.name.upper()}" "{page.section}" "{date}" "markrouted {version}" "{page.title}"',
    ]
    after_heading = False
    section = ""
    for b in blocks(page.lines):
        if b.kind == "h2":
            section = b.text.upper()
            out.append(f".SH {section}")
        elif b.kind == "h3":
            out.append(f'.SS "{b.text}"')
        elif b.kind == "para":
            if not after_heading:
                out.append(".PP")
            text = roff_line(roff_inline(b.text))
            if section == "NAME":  # whatis(1) and mandb expect "name \- description"
                text = text.replace(" - ", " \\- ", 1)
            out.append(text)
        elif b.kind == "item":
            out += [".TP", roff_line(roff_inline(b.text)), roff_line(roff_inline(b.body))]
        elif b.kind == "literal":
            out += [".PP", ".RS 4", ".nf"] + [roff_line(roff_escape(x)) for x in b.lines] + [".fi", ".RE"]
        elif b.kind == "commands":
            out += roff_commands(commands)
        elif b.kind == "options":
            out += roff_options(options)
        after_heading = b.kind in ("h2", "h3")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ markdown


def _md_option(opt: Option) -> str:
    names = ", ".join(f"`{n}`" for n in opt.names)
    return names + (f" *{opt.metavar}*" if opt.metavar else "")


def render_markdown(page: Page, options: list[Option], commands: list[Command], level: int) -> str:
    h = "#" * level
    out = [f"{h} {page.name}({page.section}): {page.title}", ""]
    for b in blocks(page.lines):
        if b.kind == "h2":
            out += [f"{h}# {b.text.capitalize()}", ""]
        elif b.kind == "h3":
            out += [f"{h}## {b.text}", ""]
        elif b.kind == "para":
            out += [b.text, ""]
        elif b.kind == "item":
            out += [f"* {b.text} — {b.body}" if b.body else f"* {b.text}"]
        elif b.kind == "literal":
            if out and out[-1].startswith("* "):
                out.append("")
            out += ["```"] + b.lines + ["```", ""]
        elif b.kind == "commands":
            for cmd in commands:
                synopsis = " ".join([f"markrouted {cmd.name}"] + [
                    (o.names[-1] + (f" {o.metavar}" if o.metavar else "")) if o.required
                    else f"[{o.names[-1]}{' ' + o.metavar if o.metavar else ''}]" for o in cmd.options])
                out.append(f"* `{synopsis}` — {cmd.help}")
                for opt in cmd.options:
                    out.append(f"  * {_md_option(opt)}" + (f": {opt.help}" if opt.help else ""))
            out.append("")
        elif b.kind == "options":
            for opt in options:
                out.append(f"* {_md_option(opt)}: {opt.help}")
            out.append("")
        if b.kind != "item" and out and out[-1] != "" and out[-1].startswith("* "):
            out.append("")
    text = "\n".join(out)
    return re.sub(r"\n(\* [^\n]*)\n(?=[^*\n ])", r"\n\1\n\n", text).rstrip() + "\n"


# ------------------------------------------------------------------ main


def build_date() -> str:
    """The changelog's date under dpkg-buildpackage (reproducible builds), else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
            else datetime.datetime.now(datetime.timezone.utc))
    return when.strftime("%Y-%m-%d")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=SOURCE, help="the Markdown source (default: manpages.md beside this script)")
    ap.add_argument("--outdir", help="write the roff pages here")
    ap.add_argument("--markdown", action="store_true", help="print the pages as Markdown")
    ap.add_argument("--heading-level", type=int, default=2, help="Markdown level of each page's heading")
    args = ap.parse_args(argv)
    if not args.outdir and not args.markdown:
        ap.error("give --outdir and/or --markdown")

    from markrouted import __version__
    from markrouted.cli import build_parser

    with open(args.source, encoding="utf-8") as f:
        pages = parse_source(f.read())
    options, commands = introspect(build_parser())
    if args.outdir:
        os.makedirs(args.outdir, exist_ok=True)
        date = build_date()
        for page in pages:
            with open(os.path.join(args.outdir, page.filename), "w", encoding="utf-8") as f:
                f.write(render_roff(page, options, commands, __version__, date))
    if args.markdown:
        sys.stdout.write("\n".join(render_markdown(p, options, commands, args.heading_level) for p in pages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
