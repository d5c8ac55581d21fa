"""The shared results file of the health benchmarks, ``bench/results-health.md``.

Each benchmark owns one ``## `` section of it and replaces only that one, so
either can be re-run alone without losing the other's figures.
"""

from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results-health.md")
ORDER = ("## CPU:", "## Failover:", "## Quality:")  # the sections' order in the file


def replace_section(section: str) -> None:
    """Put ``section`` (starting with one of ORDER) in place of the section of the same heading."""
    heading = next(h for h in ORDER if section.startswith(h))
    try:
        with open(RESULTS) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Health-check benchmarks\n\nWritten by `bench/health_cpu.py --write` and `bench/health_failover.py --write`.\n"
    parts = text.split("\n## ")
    head, rest = parts[0], ["## " + p for p in parts[1:]]
    rest = [p.rstrip("\n") + "\n" for p in rest if not p.startswith(heading)]
    rest.append(section.rstrip("\n") + "\n")
    rest.sort(key=lambda p: next((i for i, h in enumerate(ORDER) if p.startswith(h)), len(ORDER)))
    with open(RESULTS, "w") as f:
        f.write(head.rstrip("\n") + "\n\n" + "\n".join(rest))
