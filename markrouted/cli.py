"""Command line: check, plan, apply, status, explain, flush, run.

Exit codes (markrouted(8)): 0 ok / in sync, 1 error or invalid config, 3 changes
pending (plan). Failures the user can act on are one sentence on stderr, never
a traceback.

Each command imports what it uses when it runs, and nothing at module level
beyond argparse: ``status`` next to a running daemon reads one file, ``check``
loads the kernel adapters only with ``--kernel``, and pyroute2 (explain's
route lookup), structlog and systemd (logging) only where they are used. ``bench/startup.py`` measures it; ``docs/design.md`` says why.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .text import escape, path as shown_path

if TYPE_CHECKING:
    from .collisions import Finding
    from .config import Config

DEFAULT_CONFIG = "/etc/markrouted.toml"
EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 3


class Fatal(Exception):
    """A failure to report in one line and exit 1."""


def _load(args: argparse.Namespace) -> Config:
    from .config import ConfigError, load

    try:
        return load(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{shown_path(args.config)}: {line}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None


def _kernel(args: argparse.Namespace, need_nft: bool = True) -> Any:
    """The kernel adapter, closed when the command ends (main's exit stack).

    Closing matters: ``explain`` opens pyroute2 for its route lookup, and
    pyroute2 0.9 keeps an event loop per socket; one left to the garbage
    collector at exit prints a traceback.
    """
    from .kernel import Kernel

    kernel = Kernel(need_nft=need_nft)
    args.exit_stack.callback(kernel.close)
    return kernel


# ------------------------------------------------------------------ commands


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    for line in config.warnings:
        print(f"{shown_path(args.config)}: warning: {line}", file=sys.stderr)
    if not args.kernel:
        print(f"{shown_path(args.config)}: valid ({len(config.uplinks)} uplinks, {len(config.policies)} policies)")
        return EXIT_OK
    from .collisions import Finding, analyse, networkd_findings, nm_findings
    from .kernel.networkd import networkd_state
    from .kernel.nm import nm_state

    kernel = _kernel(args, need_nft=False)
    findings: list[Finding] = []
    try:
        kernel.nft.probe()
        ruleset = kernel.nft.ruleset()
    except Exception as exc:  # reported as a finding, not a traceback
        from .kernel.errors import KernelError

        if not isinstance(exc, KernelError):
            raise
        findings.append(Finding("error", str(exc)))
        ruleset = {"nftables": []}
    findings += analyse(config, ruleset, kernel.netlink.foreign_rules(), kernel.netlink.foreign_route_tables())
    findings += networkd_findings(*networkd_state())
    findings += nm_findings(config, *nm_state())
    findings += _observe_findings(config)
    for f in findings:
        print(escape(str(f)))  # foreign table and chain names are anyone's text
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    print(f"{shown_path(args.config)}: valid; kernel: {errors} errors, {warnings} warnings")
    return EXIT_ERROR if errors else EXIT_OK


def _down(config: Config, text: str | None) -> list[str]:
    """The uplinks of ``--down A[,B]``, each checked against the config."""
    if not text:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {u.name for u in config.uplinks}
    for name in names:
        if name not in known:
            raise Fatal(f"--down: unknown uplink {escape(name)!s} (known: {', '.join(sorted(known)) or 'none'})")
    return names


def _health_down(down: list[str]) -> dict[str, Any] | None:
    """The running daemon's verdicts, with the ``--down`` uplinks' checks failing."""
    from .model import Health

    health = _live_health()
    if not down:
        return health
    out = dict(health or {})
    for name in down:
        out[name] = Health(False, "what-if: --down")
    return out


def cmd_what_if(args: argparse.Namespace, config: Config, down: list[str]) -> int:
    """``plan --down``: what the daemon would do if those uplinks went down now. Writes nothing."""
    from .derive import derive
    from .diff import diff
    from .kernel import conntrack
    from .model import Actual, Plan
    from .reconcile import compute
    from .explain import what_if

    kernel = _kernel(args)
    now = compute(config, kernel, _live_health())
    then = derive(config, now.observed, _health_down(down))
    plan: Plan = diff(then, Actual(now.desired.rules, now.desired.routes, now.desired.nft))
    mask = config.settings.mark_mask
    counts = {u.name: conntrack.count(u.mark, mask) for u in now.desired.uplinks if u.name in down}
    print(f"what if {', '.join(down)} went down now (as a failing health check would take "
          f"{'it' if len(down) == 1 else 'them'} down); nothing is changed:")
    for line in what_if(now.desired, then, plan, mask, counts):
        print(line)
    return EXIT_OK


def _observe_findings(config: Config) -> list[Finding]:
    """The metrics endpoint's address (free? local?) and the hook directory (trusted?)."""
    from .collisions import Finding

    s = config.settings
    out: list[Finding] = []
    if s.metrics is not None:
        from .metrics import listen_problem
        from .status import read_live

        problem = listen_problem(s.metrics)
        if problem and "in use" in problem and read_live() is not None:
            out.append(Finding("warning", problem + " (by the running daemon itself, if it serves metrics there)"))
        elif problem:
            out.append(Finding("error", problem))
    if s.hooks is not None:
        from .hooks import listing

        for name, why in listing(s.hooks)[1]:
            out.append(Finding("warning", f"hooks: {name} refused: {why}"))
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    from .reconcile import compute

    config = _load(args)
    down = _down(config, args.down)
    if down:
        return cmd_what_if(args, config, down)
    kernel = _kernel(args)
    result = compute(config, kernel, _live_health())
    if result.plan.empty:
        print("in sync: nothing to change")
        return EXIT_OK
    for line in result.plan.lines():
        print(line)
    return EXIT_PENDING


def cmd_apply(args: argparse.Namespace) -> int:
    from .log import setup
    from .reconcile import reconcile

    config = _load(args)
    log = setup("quiet" if args.quiet else "console")
    kernel = _kernel(args)
    result = reconcile(config, kernel, _live_health(), log=log)
    if not args.quiet:
        up = sum(1 for u in result.desired.uplinks if u.state == "up")
        what = f"{result.writes} changes" if result.writes else "already in sync, nothing written"
        print(f"applied: {what}; uplinks up {up}/{len(result.desired.uplinks)}")
    return EXIT_OK


def cmd_flush(args: argparse.Namespace) -> int:
    from .log import setup
    from .reconcile import flush

    config = _load(args)
    log = setup("quiet" if args.quiet else "console")
    kernel = _kernel(args)
    writes = flush(config, kernel, log=log)
    if not args.quiet:
        print(f"flushed: {writes} objects removed" if writes else "flushed: nothing of markrouted's was installed")
    return EXIT_OK


def _live_health() -> dict[str, Any] | None:
    """Health verdicts of a running daemon, so plan/apply agree with it."""
    from .model import Health
    from .status import read_live

    doc = read_live()
    if not doc:
        return None
    out = {}
    for name, u in doc.get("health", {}).items():
        out[name] = Health(bool(u.get("up")), str(u.get("reason", "")))
    return out


def cmd_status(args: argparse.Namespace) -> int:
    from .status import document, read_live, render, with_counters

    doc = read_live()
    if doc is None:
        from .reconcile import compute

        config = _load(args)
        kernel = _kernel(args)
        result = compute(config, kernel)
        doc = document(result.desired, result.plan.empty, mark_mask=f"{config.settings.mark_mask:#010x}")
    if doc.get("sets"):
        from .status import with_dnsmasq_counts

        names = [name for name, item in doc["sets"].items() if item.get("dnsmasq")]
        with_dnsmasq_counts(doc, {name: len(values) for name, values in _dns_held(names).items()})
    doc = with_counters(doc)
    if args.json:
        import json

        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render(doc))
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    import ipaddress

    from .derive import derive, needs
    from .explain import Packet, address_match, classify, proto_number

    config = _load(args)
    try:
        pkt = Packet(
            daddr=ipaddress.ip_address(args.daddr),
            proto=proto_number(args.proto) if args.proto else None,
            dport=args.dport,
            sport=args.sport,
            saddr=ipaddress.ip_address(args.saddr) if args.saddr else None,
            iif=args.iif,
            uid=args.uid,
            gid=args.gid,
            cgroup=args.cgroup,
        )
    except ValueError as exc:
        raise Fatal(str(exc)) from None
    down = _down(config, args.down)
    kernel = _kernel(args, need_nft=False)
    observed = kernel.observe(needs(config))
    desired = derive(config, observed, _health_down(down))
    if down:
        print(f"what if: {', '.join(down)} down (nothing is changed)")
    where = f"forwarded, in on {pkt.iif}" if pkt.iif else "generated on this host"
    desc = f"{args.proto or 'ip'} to {pkt.daddr}" + (f" port {pkt.dport}" if pkt.dport else "")
    print(f"packet:  {desc} ({where})")
    uplink_by_if = {u.interface: u for u in config.uplinks}
    mark = 0
    local = {a.address for a in observed.addresses}
    if pkt.iif in uplink_by_if:
        u = uplink_by_if[pkt.iif]
        print(f"policy:  none: a new connection arriving on uplink {u.name} is pinned to it, replies leave by it")
    elif str(pkt.daddr) in local or pkt.daddr.is_multicast or pkt.daddr.is_loopback:
        print("policy:  none: addressed to this host (or multicast), never classified")
    else:
        from .sets import nft_names

        dns = _dns_held([nft_names(s.name)[k] for s in config.sets if s.domains for k in ("dns_v4", "dns_v6")])
        policy = classify(config, pkt, frozenset(observed.cgroup_ids), dns)
        if policy is None:
            print("policy:  none matches: the packet is not marked and follows the main table")
        else:
            status = next(p for p in desired.policies if p.name == policy.name)
            print(f"policy:  {policy.name} (policy[{policy.index}])")
            by_name = {s.name: s for s in config.sets}
            for field, address, nets, refs in (("daddr", pkt.daddr, policy.daddr, policy.daddr_sets),
                                               ("saddr", pkt.saddr, policy.saddr, policy.saddr_sets)):
                if refs and address is not None:
                    found = address_match(address, nets, refs, by_name, dns)
                    if found and found != "listed":
                        print(f"{field}:   {address} is in {found}")
            if policy.action == "drop":
                print("action:  drop: the packet is dropped, no later policy sees it")
                return EXIT_OK
            if policy.action == "main":
                print("action:  main: the packet is not marked and follows the main table; no later policy sees it")
            elif len(status.tiers) > 1:
                from .status import tiers_text

                print(f"tiers:   {tiers_text([list(t) for t in status.tiers], status.tier)}"
                      + (f' (failback = "migrate")' if policy.failback == "migrate" else ""))
            if policy.sticky == "source" and status.active:
                print(f"sticky:  a source address keeps the uplink of its first flow while it opens a new "
                      f"flow at least every {policy.sticky_timeout:g}s and that uplink carries the policy")
            if policy.action is not None:
                pass  # unmarked: the route below is the main table's
            elif not status.active:
                if policy.fallback == "drop":
                    print("uplink:  none usable: fallback = drop, the packet is dropped")
                    return EXIT_OK
                print("uplink:  none usable: fallback = main, the packet is not marked")
            else:
                ups = {u.name: u for u in desired.uplinks}
                chosen = [n for n in status.active if pkt.family in ups[n].families] or list(status.active)
                name = chosen[0]
                if len(chosen) > 1:
                    weights = {n: w for tier in policy.tier_list for n, w in tier}
                    total = sum(weights[n] for n in chosen)
                    share = ", ".join(f"{n} {weights[n]}/{total}" for n in chosen)
                    print(f"balance: new flows split {share}; showing {name}")
                carrier = ups[name]
                mark = carrier.mark
                print(f"uplink:  {name} (mark {carrier.mark:#010x}/{config.settings.mark_mask:#010x}, "
                      f"table {carrier.table})")
    iif_index = None
    if pkt.iif:
        link = observed.link(pkt.iif)
        if link is None:
            raise Fatal(f"interface {pkt.iif} does not exist")
        iif_index = link.index
    try:
        route = kernel.netlink.route_get(
            str(pkt.daddr), mark=mark, src=str(pkt.saddr) if pkt.saddr else None, iif=iif_index, uid=pkt.uid
        )
    except Exception as exc:
        from .kernel.errors import KernelError

        if not isinstance(exc, KernelError):
            raise
        print(f"route:   the kernel finds no route: {exc}")
        return EXIT_OK
    names = {link.index: link.name for link in observed.links}
    table = {254: "main", 255: "local", 253: "default"}.get(route["table"], str(route["table"]))
    text = f"{pkt.daddr}"
    if route["type"] != 1:
        text = f"{'unreachable' if route['type'] == 7 else 'type ' + str(route['type'])} {pkt.daddr}"
    if route["gateway"]:
        text += f" via {route['gateway']}"
    if route["oif"]:
        text += f" dev {names.get(route['oif'], route['oif'])}"
    text += f" table {table}"
    if route["prefsrc"]:
        text += f" src {route['prefsrc']}"
    print(f"route:   {text}")
    return EXIT_OK


def _dns_held(names: Sequence[str]) -> dict[str, frozenset[int]]:
    """The addresses dnsmasq holds now in the named domain sets (those that cannot be read left out)."""
    if not names:
        return {}
    from .kernel.errors import KernelError
    from .kernel.nftdump import NftDumper

    out: dict[str, frozenset[int]] = {}
    try:
        dumper = NftDumper()
    except (KernelError, OSError):
        return out
    try:
        for name in names:
            try:
                out[name] = frozenset(value for value, _w, _left in dumper.timed(name))
            except KernelError:
                continue
    finally:
        dumper.close()
    return out


def cmd_dnsmasq_config(args: argparse.Namespace) -> int:
    from .sets import nft_names

    config = _load(args)
    lines = []
    for item in config.sets:
        if not item.domains:
            continue
        names = nft_names(item.name)
        lines.append(f"# [sets.{item.name}] of {shown_path(args.config)}")
        lines.append(f"nftset=/{'/'.join(item.domains)}/"
                     f"4#inet#markrouted#{names['dns_v4']},6#inet#markrouted#{names['dns_v6']}")
    if not lines:
        print(f"# no set in {shown_path(args.config)} has domains", file=sys.stderr)
        return EXIT_OK
    print("\n".join(lines))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import run

    return run(args.config, log_mode=args.log)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    default = os.environ.get("MARKROUTED_CONFIG", DEFAULT_CONFIG)
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("-c", "--config", default=default, help=f"config file (default {DEFAULT_CONFIG})")
    # in each command too, so "-c" may come before or after it; SUPPRESS keeps a
    # value given before the command from being reset to the default
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=f"config file (default {DEFAULT_CONFIG})")
    p = argparse.ArgumentParser(
        prog="markrouted",
        description="fwmark policy routing: per-uplink tables, ip rules and one nftables table, kept true "
                    "while the network changes.",
        epilog="exit codes: 0 ok, 1 error or invalid config, 3 changes pending (plan)",
        parents=[top],
    )
    p.add_argument("--version", action="version", version=f"markrouted {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("check", parents=[common], help="validate the config (--kernel: and the running kernel)")
    s.add_argument("--kernel", action="store_true",
                   help="also check nf_tables, foreign users of mark_mask, table ids and rule priorities")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("plan", parents=[common], help="print what apply would change; exit 3 if anything")
    s.add_argument("--down", metavar="UPLINK[,UPLINK]",
                   help="instead: what would change if these uplinks went down now (changes nothing; exit 0)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("apply", parents=[common], help="reconcile once and exit")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    s.set_defaults(func=cmd_apply)

    s = sub.add_parser("status", parents=[common], help="uplinks, policies and whether the kernel is in sync")
    s.add_argument("--json", action="store_true", help="one JSON object, for machines")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("explain", parents=[common], help="which policy, mark, table and route a packet gets")
    s.add_argument("--daddr", required=True, help="destination address")
    s.add_argument("--proto", help="tcp, udp, icmp, icmpv6, sctp or a number")
    s.add_argument("--dport", type=int, help="destination port")
    s.add_argument("--sport", type=int, help="source port")
    s.add_argument("--saddr", help="source address (required by the kernel with --iif)")
    s.add_argument("--iif", help="the interface a forwarded packet comes in on (omit: generated here)")
    s.add_argument("--uid", type=int, help="owner of the local socket")
    s.add_argument("--gid", type=int, help="group of the local socket")
    s.add_argument("--cgroup", help="cgroup v2 path of the local socket")
    s.add_argument("--down", metavar="UPLINK[,UPLINK]", help="answer as if these uplinks were down")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("dnsmasq-config", parents=[common],
                       help="print dnsmasq nftset= lines for the sets with domains (for /etc/dnsmasq.d/)")
    s.set_defaults(func=cmd_dnsmasq_config)

    s = sub.add_parser("flush", parents=[common], help="remove everything markrouted owns, nothing else")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    s.set_defaults(func=cmd_flush)

    s = sub.add_parser("run", parents=[common], help="the daemon, in the foreground")
    s.add_argument("--log", choices=["auto", "journal", "console"], default="auto",
                   help="where logs go (auto: the journal under systemd, else the terminal)")
    s.set_defaults(func=cmd_run)
    return p


def _kernel_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a KernelError, without loading the kernel package for it:
    a command that never imported the package cannot have raised one."""
    errors = sys.modules.get(f"{__package__}.kernel.errors")
    return errors is not None and isinstance(exc, errors.KernelError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is not cmd_run:
        # a one-shot command allocates much and frees little before it exits: the
        # cycle collector would only walk the config and the derived state again
        import gc

        gc.disable()
    try:
        with contextlib.ExitStack() as stack:
            args.exit_stack = stack
            rc: int = args.func(args)
        return rc
    except Fatal as exc:
        print(f"markrouted: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (markrouted plan | head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if not _kernel_error(exc):
            raise
        print(f"markrouted: {exc}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
