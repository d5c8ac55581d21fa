"""The configuration contract: TOML text in, validated immutable values out.

This module is pure on purpose. Every command (``run``, ``check``, ``plan``, ``apply``,
``status``, ``explain``, ``flush``) and the daemon's reload path must agree on what a config
file means, and an invalid file must be refused before anything touches the kernel. With no
logging and no side effects (only :func:`load` reads one file) validation is deterministic,
cheap enough to run on every reload, and testable from strings alone.

Validation collects every problem before raising, one line per problem naming the key path
(``uplinks.wan2.mark: ...``, ``policy[1] (ssh).uplinks[0]: ...``), so that an administrator
fixes a broken file in one pass instead of one error per restart. Unknown keys are errors:
a typo must never be silently ignored.

Whatever the input, the outcome is a Config or a ConfigError, never another exception or
a wait: :func:`load` reads only a regular file of at most MAX_FILE_SIZE bytes, the
parser's own limits (nesting depth, digits of an integer) become error lines, integers
must fit in 64 bits, and every count and duration has a range. A value echoed in a
message goes through :func:`markrouted.text.quote` (escaped, cut short), so no config can
forge a line on a terminal or in the journal. Strings that end up inside nft's quotes
(interface names, cgroup paths) are held to what the kernel and nft accept, so they can
neither end the quotes nor turn into a wildcard or a name template.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias, TypeVar

from .model import IP_PROTOCOLS, PORT_PROTOCOLS, PRIORITY_SPAN, RESERVED_TABLES, Interval
from . import sets as _sets

from . import text as _text

__all__ = [
    "DEFAULT_PATH",
    "MAX_FILE_SIZE",
    "AddressSet",
    "Check",
    "Config",
    "ConfigError",
    "Gateway",
    "IdRange",
    "IPAddress",
    "IPNetwork",
    "Policy",
    "PortRange",
    "Settings",
    "Uplink",
    "from_dict",
    "load",
    "parse",
    "parse_duration",
]

DEFAULT_PATH: Final = "/etc/markrouted.toml"
MAX_FILE_SIZE: Final = 1024 * 1024
"""The largest config file :func:`load` reads, in bytes (1 MiB)."""

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange: TypeAlias = tuple[int, int]
"""Inclusive ``(lo, hi)``; a single port ``p`` is ``(p, p)``."""
IdRange: TypeAlias = tuple[int, int]
"""Inclusive ``(lo, hi)`` of uids or gids."""

# The string choices of the config, as types: mypy --strict then checks every
# comparison and every construction against the values the file may hold.
OnStop: TypeAlias = Literal["flush", "keep"]
GatewayKind: TypeAlias = Literal["auto", "none", "address"]
ProbeMethod: TypeAlias = Literal["icmp", "tcp", "http", "https", "dns"]
Success: TypeAlias = Literal["any", "all"]
Family: TypeAlias = Literal["ipv4", "ipv6", "any"]
Fallback: TypeAlias = Literal["main", "drop"]
Action: TypeAlias = Literal["main", "drop"]
Failback: TypeAlias = Literal["new-flows", "migrate"]
Sticky: TypeAlias = Literal["flow", "source"]
Tier: TypeAlias = tuple[tuple[str, int], ...]
"""One tier of a policy: ``(uplink, weight)`` in the order written."""

STICKY_TIMEOUT_DEFAULT: Final = 600.0
"""``sticky_timeout`` when not given (10 minutes), in seconds."""
MIGRATE_LABELS_MAX: Final = 128
"""At most this many ``failback = "migrate"`` policies: one conntrack label bit each."""


class ConfigError(Exception):
    """An invalid configuration, with every problem found (not only the first).

    ``errors`` holds one line per problem, in file order; ``str(exc)`` is those lines
    joined by newlines, ready for stderr, the journal and ``STATUS=``.
    """

    errors: tuple[str, ...]

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        # The tuple as the single argument keeps the exception picklable.
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Settings:
    """The ``[settings]`` table: which fwmark bits and rule priorities markrouted owns."""

    mark_mask: int = 0x00FF0000
    rule_priority: int = 10000
    resync: float = 30.0
    """Seconds between full re-reads of the kernel."""
    keep_main_routes: bool = True
    on_stop: OnStop = "flush"
    """``"flush"`` or ``"keep"``."""
    metrics: tuple[str, int] | None = None
    """Where the Prometheus endpoint listens: (IP address, port); None: off."""
    hooks: str | None = None
    """The directory of hook programs; None: no hooks."""
    hook_timeout: float = 10.0
    """Seconds a hook may run before it is killed."""

    @property
    def shift(self) -> int:
        """Index of the lowest bit of ``mark_mask``: where uplink marks start."""
        return (self.mark_mask & -self.mark_mask).bit_length() - 1

    @property
    def mark_max(self) -> int:
        """The largest uplink mark that fits in ``mark_mask``."""
        return self.mark_mask >> self.shift

    def mark_value(self, mark: int) -> int:
        """The fwmark bits for an uplink's ``mark`` (its value inside the mask)."""
        if not 0 <= mark <= self.mark_max:
            raise ValueError(f"mark {mark} does not fit in mark_mask 0x{self.mark_mask:08x}")
        return mark << self.shift


@dataclass(frozen=True)
class Gateway:
    """An uplink's next hop for one address family.

    ``kind`` is ``"auto"`` (learnt from the main table's default route on the uplink's
    interface), ``"none"`` (point-to-point for IPv4; IPv6 disabled for ``gateway6``) or
    ``"address"`` with ``address`` set.
    """

    kind: GatewayKind
    address: IPAddress | None = None


@dataclass(frozen=True)
class Check:
    """An uplink's health check; durations are in seconds."""

    targets: tuple[IPAddress, ...]
    method: ProbeMethod = "icmp"
    """``"icmp"`` or ``"tcp"`` (then ``port`` is set)."""
    port: int | None = None
    interval: float = 1.0
    timeout: float = 1.0
    down_after: int = 3
    up_after: int = 3
    success: Success = "any"
    """A round succeeds when ``"any"`` target answers (default), or only when ``"all"`` do."""
    # quality over a window, flap damping, and the web and DNS probe methods
    window: int = 10
    """Rounds kept per target: loss and RTT are judged over them."""
    max_loss: float | None = None
    """Fraction (0..1) of lost probes above which a target is unhealthy; None: not judged."""
    max_rtt: float | None = None
    """Mean RTT (seconds) above which a target is unhealthy; None: not judged."""
    recover_loss: float | None = None
    """A target is healthy again at or below this loss; None: half of ``max_loss``."""
    recover_rtt: float | None = None
    """A target is healthy again at or below this mean RTT; None: half of ``max_rtt``."""
    min_targets: int = 1
    """How many targets must answer (a round) and be healthy (the window); ``success = "all"``
    sets it to the number of targets."""
    url_host: str | None = None
    """http/https: the Host header and TLS server name; dns: the name asked for."""
    url_path: str = "/"
    """http/https: the path (and query) of the GET."""
    tls_verify: bool = True
    tls_ca: str | None = None
    """https: a PEM file of trusted CAs instead of the system store."""
    damp_flaps: int = 3
    """Downs within ``damp_within`` that hold the uplink down; 0 turns damping off."""
    damp_within: float = 600.0
    damp_hold: float = 300.0
    """The first hold; each further flap doubles it, up to an hour."""

    @property
    def needed(self) -> int:
        """Targets that must answer a round, and be healthy over the window."""
        return len(self.targets) if self.success == "all" else self.min_targets

    @property
    def recover_loss_or_default(self) -> float | None:
        if self.recover_loss is not None or self.max_loss is None:
            return self.recover_loss
        return self.max_loss / 2

    @property
    def recover_rtt_or_default(self) -> float | None:
        if self.recover_rtt is not None or self.max_rtt is None:
            return self.recover_rtt
        return self.max_rtt / 2


@dataclass(frozen=True)
class Uplink:
    """One ``[uplinks.NAME]`` table."""

    name: str
    interface: str
    table: int
    mark: int
    """The value inside ``mark_mask`` (1 .. mark_max), not shifted: see Settings.mark_value."""
    gateway: Gateway = Gateway("auto")
    gateway6: Gateway = Gateway("auto")
    masquerade: bool = True
    check: Check | None = None


@dataclass(frozen=True)
class AddressSet:
    """One ``[sets.NAME]``: addresses (inline and from files) and domains dnsmasq fills in."""

    name: str
    v4: tuple[Interval, ...] = ()
    """Merged, sorted inclusive intervals of the IPv4 addresses (inline and from files)."""
    v6: tuple[Interval, ...] = ()
    files: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    """Lower case, without a trailing dot."""
    dns_timeout: int = 3600
    """Seconds an address dnsmasq added stays in the set."""
    entries: int = 0
    """Addresses and CIDRs as written (before merging)."""

    @property
    def versions(self) -> frozenset[int]:
        """The IP versions the set can hold now (both when dnsmasq fills it)."""
        if self.domains:
            return frozenset({4, 6})
        return frozenset(v for v, items in ((4, self.v4), (6, self.v6)) if items)

    def intervals(self, version: int) -> tuple[Interval, ...]:
        return self.v4 if version == 4 else self.v6


@dataclass(frozen=True)
class SetRef:
    """A ``"@NAME"`` item of a policy's daddr or saddr, with the versions that set holds."""

    name: str
    versions: frozenset[int]


@dataclass(frozen=True)
class Policy:
    """One ``[[policy]]``: given matchers are ANDed, the items of each list ORed.

    An empty tuple or ``None`` means the matcher was not given (matches anything).
    """

    index: int
    """Position in the file, 0-based; policies match in this order."""
    name: str
    proto: int | None = None
    """IP protocol number."""
    dport: tuple[PortRange, ...] = ()
    sport: tuple[PortRange, ...] = ()
    daddr: tuple[IPNetwork, ...] = ()
    saddr: tuple[IPNetwork, ...] = ()
    iif: str | None = None
    daddr_sets: tuple[SetRef, ...] = ()
    """The ``"@NAME"`` items of daddr, ORed with its literal networks."""
    saddr_sets: tuple[SetRef, ...] = ()
    uid: tuple[IdRange, ...] = ()
    gid: tuple[IdRange, ...] = ()
    cgroup: str | None = None
    """cgroup v2 path relative to the root, without leading or trailing '/'."""
    family: Family = "any"
    """``"ipv4"``, ``"ipv6"`` or ``"any"``."""
    uplinks: tuple[str, ...] = ()
    """Failover order; empty when ``balance`` is used."""
    balance: tuple[tuple[str, int], ...] = ()
    """``(uplink, weight)`` in the order written; empty when ``uplinks`` is used."""
    fallback: Fallback = "main"
    """``"main"`` or ``"drop"``."""
    tiers: tuple[Tier, ...] = ()
    """Set when ``uplinks`` holds an inline table of weights; see :attr:`tier_list`."""
    action: Action | None = None
    """``"main"`` or ``"drop"``: a bypass policy (no uplinks, no later policy sees the traffic)."""
    failback: Failback = "new-flows"
    sticky: Sticky = "flow"
    sticky_timeout: float = STICKY_TIMEOUT_DEFAULT
    """Seconds a source stays on its uplink after its last new flow (``sticky = "source"``)."""
    label: int | None = None
    """The conntrack label bit marking this policy's flows (``failback = "migrate"`` only)."""

    @functools.cached_property
    def tier_list(self) -> tuple[Tier, ...]:
        """The policy's tiers, tried in order: ``balance`` is one tier, a plain
        ``uplinks`` list one single-uplink tier per name. Empty for an ``action`` policy."""
        if self.tiers:
            return self.tiers
        if self.balance:
            return (self.balance,)
        return tuple(((name, 1),) for name in self.uplinks)

    @functools.cached_property
    def members(self) -> tuple[str, ...]:
        """Every uplink of every tier, in order."""
        return tuple(name for tier in self.tier_list for name, _ in tier)

    @functools.cached_property
    def families(self) -> tuple[int, ...]:
        """The address families (``socket.AF_INET``/``AF_INET6``) this policy can match.

        Narrowed by ``family``, by ``proto`` icmp (IPv4 only) or icmpv6 (IPv6 only) and by
        the address families present in ``daddr`` and in ``saddr``.
        """
        allowed = {4, 6}
        for _, versions in _family_constraints(self.family, self.proto, self.daddr, self.saddr,
                                               self.daddr_sets, self.saddr_sets):
            allowed &= versions
        return tuple(af for version, af in ((4, socket.AF_INET), (6, socket.AF_INET6)) if version in allowed)


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration."""

    settings: Settings = Settings()
    uplinks: tuple[Uplink, ...] = ()
    """In file order."""
    policies: tuple[Policy, ...] = ()
    """In file order, which is match order."""
    sets: tuple[AddressSet, ...] = ()
    """``[sets.NAME]`` in file order."""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """Valid but probably not what was meant; ``check`` prints them."""

    def uplink(self, name: str) -> Uplink:
        """The uplink called ``name``; KeyError if there is none."""
        for uplink in self.uplinks:
            if uplink.name == name:
                return uplink
        raise KeyError(name)


# --------------------------------------------------------------------------- entry points


def parse(text: str) -> Config:
    """Parse and validate TOML text; raises ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"toml: {_text.escape(str(exc))}"]) from None
    except RecursionError:
        # tomllib descends once per level of nested arrays and inline tables
        raise ConfigError(["toml: arrays or tables nested too deeply"]) from None
    except ValueError:
        # tomllib's int() refuses a decimal integer of more than 4300 digits
        # (sys.int_info.default_max_str_digits) with a plain ValueError
        raise ConfigError(["toml: a number has too many digits"]) from None
    return from_dict(data)


def load(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the config file at ``path``; raises ConfigError.

    Only a regular file of at most MAX_FILE_SIZE bytes is read: a FIFO would block,
    a device such as /dev/zero never ends, and a directory is not a config. The
    file is opened non-blocking and checked again once open, so a file swapped for
    a FIFO in between cannot block either.
    """
    try:
        before = os.stat(path)
    except (OSError, ValueError) as exc:
        raise ConfigError([_os_error(exc)]) from None
    if not stat.S_ISREG(before.st_mode):
        raise ConfigError([f"not a regular file ({_file_kind(before.st_mode)})"])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise ConfigError([_os_error(exc)]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([f"not a regular file ({_file_kind(info.st_mode)})"])
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_SIZE:
            chunk = os.read(fd, MAX_FILE_SIZE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError([_os_error(exc)]) from None
    finally:
        os.close(fd)
    if size > MAX_FILE_SIZE:
        raise ConfigError([f"larger than {MAX_FILE_SIZE} bytes (1 MiB), the most a config may have"])
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"toml: invalid UTF-8 at byte {exc.start}"]) from None
    return parse(text)


def _os_error(exc: OSError | ValueError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _text.escape(str(exc))  # ValueError: a NUL byte in the path


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "of an unknown kind"


def from_dict(data: Mapping[str, Any], read: SetReader | None = None) -> Config:
    """Validate already-decoded TOML data; raises ConfigError listing every problem.

    ``read`` reads a set file (``read_set_file`` when not given).
    """
    errors = _Errors()
    if not isinstance(data, Mapping):
        errors.add("config", _type_error("a table", data))
        raise ConfigError(errors.lines)
    for key in data:
        if key not in ("settings", "uplinks", "policy", "sets"):
            errors.add(_key(key), "unknown key")
    settings, mask_ok = _parse_settings(data.get("settings", {}), errors)
    uplinks, uplink_names = _parse_uplinks(data.get("uplinks", {}), settings, mask_ok, errors)
    address_sets = _parse_sets(data.get("sets", {}), read or read_set_file, errors)
    by_name: dict[str, AddressSet | None] = {}
    if isinstance(data.get("sets"), Mapping):
        by_name = dict.fromkeys(data["sets"])  # a set with errors: its references say nothing more
    by_name.update((s.name, s) for s in address_sets)
    policies = _parse_policies(data.get("policy", []), uplink_names, errors, by_name)
    if errors.lines:
        raise ConfigError(errors.lines)
    return Config(settings=settings, uplinks=uplinks, policies=policies, sets=address_sets,
                  warnings=tuple(errors.warnings))


_DURATION_RE: Final = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(ms|s|m|h)")
_DURATION_TEXT_MAX: Final = 32
_DURATION_UNITS: Final = MappingProxyType(
    {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
)


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"250ms"``, ``"1.5s"``, ``"1m"``, ``"1h"``.

    A unit is required: a bare number is ambiguous. Raises ValueError with a message that
    can follow a key path.
    """
    # a duration of more characters than this is a mistake or an attack; either way the
    # regular expression and Decimal need not see it (and the message cuts it short)
    match = _DURATION_RE.fullmatch(text) if len(text) <= _DURATION_TEXT_MAX else None
    if match is None:
        raise ValueError(f'expected a duration with a unit such as "2s", got {_q(text)}')
    # Decimal keeps "250ms" exactly 0.25 rather than 250 * 0.001.
    seconds = float(Decimal(match[1]) * _DURATION_UNITS[match[2]])
    if not seconds > 0:
        raise ValueError(f"{text} must be greater than 0")
    if not math.isfinite(seconds):
        raise ValueError(f"{text} is too long")
    return seconds


# --------------------------------------------------------------------------- constants

_UPLINK_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
_POLICY_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_ADDRESS_TEXT_RE: Final = re.compile(r"[0-9A-Fa-f.:/]+")
_RANGE_RE: Final = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_TCP_METHOD_RE: Final = re.compile(r"tcp:([0-9]+)")

_IFNAMSIZ: Final = 16
_U32_MAX: Final = 0xFFFFFFFF
_RULE_SPAN: Final = PRIORITY_SPAN
_KERNEL_RULES: Final = (32766, 32767)  # main and default
_RESERVED_TABLES: Final = RESERVED_TABLES
_ID_MAX: Final = 0xFFFFFFFE  # (uid_t)-1 means "no id"
_WEIGHT_MAX: Final = 1000
_INT64: Final = (-(2**63), 2**63 - 1)  # TOML's integers
_DIGITS_MAX: Final = 20  # more decimal digits than any 64-bit number has
_COUNT_MAX: Final = 1000  # down_after, up_after
_TARGETS_MAX: Final = 16
_WINDOW_MAX: Final = 1000
_DAMP_FLAPS_MAX: Final = 100
_PERCENT_RE: Final = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3})?) ?%")
_DNS_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_URL_HOST_RE: Final = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_URL_PATH_RE: Final = re.compile(r"/[!-~]{0,2047}")  # printable ASCII: no space, CR or LF in the request line
_UPLINKS_MAX: Final = 256
_POLICIES_MAX: Final = 10000
_CGROUP_DEPTH_MAX: Final = 255  # the kernel refuses "socket cgroupv2 level" above 255
_CGROUP_NAME_MAX: Final = 255  # NAME_MAX: the longest directory name
_CGROUP_PATH_MAX: Final = 4000  # PATH_MAX (4096) less room for the cgroup mount point
# seconds: (minimum, maximum, and both as messages and the manual write them)
_DURATION_LIMITS: Final = MappingProxyType(
    {
        "resync": (1.0, 86400.0, "1s", "24h"),
        "interval": (0.05, 3600.0, "50ms", "1h"),
        "timeout": (0.01, 3600.0, "10ms", "1h"),
        "max_rtt": (0.001, 3600.0, "1ms", "1h"),
        # seconds are allowed so that damping can be tried (and tested) quickly
        "damp_within": (1.0, 86400.0, "1s", "24h"),
        "damp_hold": (1.0, 3600.0, "1s", "1h"),
        "dns_timeout": (1.0, 7 * 86400.0, "1s", "7d"),
        "sticky_timeout": (1.0, 7 * 86400.0, "1s", "168h"),
        "hook_timeout": (0.1, 3600.0, "100ms", "1h"),
    }
)

_PROTOCOLS: Final = IP_PROTOCOLS
_PROTOCOL_NAMES: Final = MappingProxyType({number: name for name, number in _PROTOCOLS.items()})
_PORT_PROTOCOLS: Final = frozenset(PORT_PROTOCOLS)
_PROTOCOL_FAMILY: Final = MappingProxyType({1: 4, 58: 6})  # icmp, icmpv6

_SETTINGS_DEFAULTS: Final = Settings()


# --------------------------------------------------------------------------- helpers


class _Errors:
    """Collects error lines in the order they are found."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.warnings: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}")

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")


def _q(text: str) -> str:
    """A string quoted for a message: escaped, on one line, long ones cut short."""
    return _text.quote(text)


def _address_text(text: str) -> str:
    """An address as written, for a message: bare when it is plainly one, else quoted.

    The parser accepts more than hex digits, dots and colons around an address: an IPv6
    zone ("fe80::1%anything") and a prefix length of any number of digits.
    """
    return text if len(text) <= 64 and _ADDRESS_TEXT_RE.fullmatch(text) else _q(text)


def _int_text(number: int) -> str:
    """An integer for a message; one beyond 64 bits is described, not printed in full."""
    if _INT64[0] <= number <= _INT64[1]:
        return str(number)
    return f"an integer of {number.bit_length()} bits"


def _decimal(digits: str) -> int | None:
    """The value of a string of ASCII digits; None when it has more digits than 64 bits need."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > _DIGITS_MAX:
        return None
    return int(digits)


def _key(name: str) -> str:
    """A table key as it appears in a key path, quoted when it is not a bare TOML key."""
    return name if len(name) <= _text.ECHO_MAX and _BARE_KEY_RE.fullmatch(name) else _q(name)


def _type_name(value: object) -> str:
    """The TOML name of a decoded value's type."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, datetime.datetime):
        return "datetime"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def _type_error(expected: str, value: object) -> str:
    return f"expected {expected}, got {_type_name(value)}"


def _is_int(value: object) -> bool:
    """True for integers; TOML booleans are not numbers."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_array(value: object) -> bool:
    return isinstance(value, (list, tuple))


def _int(value: object, path: str, errors: _Errors) -> int | None:
    if _is_int(value):
        assert isinstance(value, int)
        if not _INT64[0] <= value <= _INT64[1]:
            errors.add(path, f"{_int_text(value)} is out of range (TOML integers have 64 bits)")
            return None
        return value
    errors.add(path, _type_error("an integer", value))
    return None


def _str(value: object, path: str, errors: _Errors) -> str | None:
    if isinstance(value, str):
        return value
    errors.add(path, _type_error("a string", value))
    return None


def _bool(value: object, path: str, errors: _Errors) -> bool | None:
    if isinstance(value, bool):
        return value
    errors.add(path, _type_error("a boolean", value))
    return None


def _table(value: object, path: str, errors: _Errors) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    errors.add(path, _type_error("a table", value))
    return None


def _array(value: object, path: str, errors: _Errors) -> Sequence[Any] | None:
    if not _is_array(value):
        errors.add(path, _type_error("an array", value))
        return None
    assert isinstance(value, (list, tuple))
    if not value:
        errors.add(path, "must not be empty")
        return None
    return value


def _items(value: object, path: str, errors: _Errors) -> list[tuple[str, Any]] | None:
    """The items of a list-valued matcher with their key paths.

    A single item stands for a one-element list, so ``dport = 22`` means ``[22]``.
    """
    if not _is_array(value):
        return [(path, value)]
    assert isinstance(value, (list, tuple))
    if not value:
        errors.add(path, "must not be empty")
        return None
    return [(f"{path}[{i}]", item) for i, item in enumerate(value)]


def _int_in(value: object, path: str, lo: int, hi: int, errors: _Errors) -> int | None:
    number = _int(value, path, errors)
    if number is None:
        return None
    if not lo <= number <= hi:
        errors.add(path, f"{number} is out of range {lo}-{hi}")
        return None
    return number


def _count(value: object, path: str, lo: int, hi: int, errors: _Errors) -> int | None:
    number = _int(value, path, errors)
    if number is None:
        return None
    if number < lo:
        errors.add(path, f"{number} is less than {lo}")
        return None
    if number > hi:
        errors.add(path, f"{number} is more than {hi}, the maximum")
        return None
    return number


_Choice = TypeVar("_Choice", bound=str)


def _choice(value: object, path: str, choices: tuple[_Choice, ...], errors: _Errors) -> _Choice | None:
    text = _str(value, path, errors)
    if text is None:
        return None
    for choice in choices:
        if text == choice:
            return choice
    wanted = ", ".join(_q(c) for c in choices[:-1]) + f" or {_q(choices[-1])}"
    errors.add(path, f"expected {wanted}, got {_q(text)}")
    return None


def _duration(value: object, path: str, key: str, errors: _Errors) -> tuple[float, str] | None:
    """Seconds and the text as written (messages quote durations as the user wrote them).

    ``key`` names the limits in _DURATION_LIMITS the duration must lie within.
    """
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            errors.add(path, str(exc))
            return None
        lo, hi, lo_text, hi_text = _DURATION_LIMITS[key]
        if seconds < lo:
            errors.add(path, f"{value} is shorter than {lo_text}, the minimum")
            return None
        if seconds > hi:
            errors.add(path, f"{value} is longer than {hi_text}, the maximum")
            return None
        return seconds, value
    if _is_int(value):
        assert isinstance(value, int)
        shown = _int_text(value)
    elif isinstance(value, float):
        shown = str(value)
    else:
        shown = _type_name(value)
    errors.add(path, f'expected a duration with a unit such as "2s", got {shown}')
    return None


def _ifname_problem(name: str) -> str | None:
    """Why ``name`` cannot be an interface markrouted matches, or None.

    The kernel's own rules (dev_valid_name: 1-15 bytes, not "." or "..", no '/', ':'
    or whitespace; "all" and "default" are its sysctl directories), and ours on top:
    printable ASCII only, and none of the characters that mean something else to nft
    ('*' makes "eth*" match every eth interface), to the kernel ('%' in "eth%d" is a
    template for the next free number) or inside quoted nft text and messages
    ('"', "'" and '\\').
    """
    if not name:
        return "empty"
    if len(name.encode("utf-8", "surrogatepass")) >= _IFNAMSIZ:
        return f"longer than {_IFNAMSIZ - 1} bytes"
    if name in (".", ".."):
        return "'.' and '..' are not allowed"
    if name in ("all", "default"):
        return "the kernel keeps the names 'all' and 'default' for its settings"
    for char in name:
        if char in _IFNAME_WHITESPACE or unicodedata.category(char) == "Zs":
            return "contains whitespace"
        if char in _IFNAME_FORBIDDEN:
            return f"contains {_IFNAME_FORBIDDEN[char]}"
        if not " " < char <= "~":
            if unicodedata.category(char) == "Cc":
                return "contains a control character"
            return "contains a character that is not printable ASCII"
    return None


_IFNAME_WHITESPACE: Final = frozenset(" \t\n\v\f\r")  # the kernel's isspace()
_IFNAME_FORBIDDEN: Final = MappingProxyType(
    {
        "/": "'/'",
        ":": "':'",
        "*": "'*', a wildcard to nft",
        "%": "'%', a name template to the kernel",
        '"': "a quote",
        "'": "a quote",
        "\\": "a backslash",
    }
)


def _ifname(value: object, path: str, errors: _Errors) -> str | None:
    name = _str(value, path, errors)
    if name is None:
        return None
    problem = _ifname_problem(name)
    if problem is not None:
        errors.add(path, f"{_q(name)} is not a valid interface name ({problem})")
        return None
    return name


def _address(value: object, path: str, errors: _Errors) -> IPAddress | None:
    text = _str(value, path, errors)
    if text is None:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        errors.add(path, f"{_q(text)} is not an IP address")
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        errors.add(path, f"{_q(text)} has a zone index; leave it out, the uplink's interface is used")
        return None
    return address


def _network(value: object, path: str, errors: _Errors) -> IPNetwork | None:
    text = _str(value, path, errors)
    if text is None:
        return None
    try:
        # the class at once: ip_network tries IPv4 first, and an IPv6 network pays for the failure
        network: IPNetwork = (ipaddress.IPv6Network if ":" in text else ipaddress.IPv4Network)(text)
    except ValueError:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            errors.add(path, f"{_q(text)} is not an IP address or CIDR")
        else:
            errors.add(path, f"{_address_text(text)} has host bits set")
        return None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.scope_id is not None:
        errors.add(path, f"{_q(text)} has a zone index, which cannot be matched")
        return None
    return network


def _range(value: object, path: str, lo: int, hi: int, what: str, errors: _Errors) -> tuple[int, int] | None:
    """An inclusive range from an integer or a ``"lo-hi"`` (or ``"n"``) string."""
    if _is_int(value):
        assert isinstance(value, int)
        first = last = value
    elif isinstance(value, str):
        match = _RANGE_RE.fullmatch(value)
        if match is None:
            errors.add(path, f'{_q(value)} is not {what} or a range "lo-hi"')
            return None
        low = _decimal(match[1])
        high = _decimal(match[2]) if match[2] is not None else low
        if low is None or high is None:
            errors.add(path, f"{_q(value)} is out of range {lo}-{hi}")
            return None
        first, last = low, high
    else:
        errors.add(path, _type_error('an integer or a "lo-hi" string', value))
        return None
    bad = [n for n in (first, last) if not lo <= n <= hi]
    if bad:
        errors.add(path, f"{_int_text(bad[0])} is out of range {lo}-{hi}")
        return None
    if first > last:
        errors.add(path, f"range {first}-{last} is reversed")
        return None
    return (first, last)


def _unknown(path: str, errors: _Errors) -> None:
    errors.add(path, "unknown key")


# --------------------------------------------------------------------------- settings


def _parse_settings(data: object, errors: _Errors) -> tuple[Settings, bool]:
    """The settings, and whether mark_mask is valid (uplink marks are checked against it)."""
    defaults = _SETTINGS_DEFAULTS
    table = _table(data, "settings", errors)
    if table is None:
        return defaults, False
    mark_mask = defaults.mark_mask
    rule_priority = defaults.rule_priority
    resync = defaults.resync
    keep_main_routes = defaults.keep_main_routes
    on_stop = defaults.on_stop
    metrics, hooks, hook_timeout = defaults.metrics, defaults.hooks, defaults.hook_timeout
    mask_ok = True
    for key, value in table.items():
        path = f"settings.{_key(key)}"
        match key:
            case "mark_mask":
                mask = _mark_mask(value, path, errors)
                mask_ok = mask is not None
                if mask is not None:
                    mark_mask = mask
            case "rule_priority":
                priority = _rule_priority(value, path, errors)
                if priority is not None:
                    rule_priority = priority
            case "resync":
                duration = _duration(value, path, "resync", errors)
                if duration is not None:
                    resync = duration[0]
            case "keep_main_routes":
                flag = _bool(value, path, errors)
                if flag is not None:
                    keep_main_routes = flag
            case "on_stop":
                choice: OnStop | None = _choice(value, path, ("flush", "keep"), errors)
                if choice is not None:
                    on_stop = choice
            case "metrics":
                metrics = _listen_address(value, path, errors)
            case "hooks":
                hooks = _hooks_dir(value, path, errors)
            case "hook_timeout":
                duration = _duration(value, path, "hook_timeout", errors)
                if duration is not None:
                    hook_timeout = duration[0]
            case _:
                _unknown(path, errors)
    settings = Settings(
        mark_mask=mark_mask,
        rule_priority=rule_priority,
        resync=resync,
        keep_main_routes=keep_main_routes,
        on_stop=on_stop,
        metrics=metrics,
        hooks=hooks,
        hook_timeout=hook_timeout,
    )
    return settings, mask_ok


def _listen_address(value: object, path: str, errors: _Errors) -> tuple[str, int] | None:
    """``"ADDR:PORT"`` (``"[ADDR6]:PORT"`` for IPv6): an IP address, never a name to resolve."""
    text = _str(value, path, errors)
    if text is None:
        return None
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        errors.add(path, f"{_q(text)}: write an IPv6 address in brackets, as [::1]:9826")
        return None
    if not sep or not host:
        errors.add(path, f"{_q(text)} is not ADDRESS:PORT (for example 127.0.0.1:9826)")
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        errors.add(path, f"{_q(host)} is not an IP address")
        return None
    port = _decimal(port_text) if port_text.isascii() and port_text.isdigit() else None
    if port is None or not 1 <= port <= 65535:
        errors.add(path, f"port {_q(port_text)} is not a number in 1-65535")
        return None
    return str(address), port


def _hooks_dir(value: object, path: str, errors: _Errors) -> str | None:
    text = _str(value, path, errors)
    if text is None:
        return None
    if not text.startswith("/") or "\0" in text or len(text.encode()) > 4096:
        errors.add(path, f"{_q(text)} is not an absolute path")
        return None
    return text


def _mark_mask(value: object, path: str, errors: _Errors) -> int | None:
    mask = _int(value, path, errors)
    if mask is None:
        return None
    if mask == 0:
        errors.add(path, "0x00000000 has no bits set")
        return None
    if not 0 < mask <= _U32_MAX:
        errors.add(path, f"{mask:#x} does not fit in 32 bits")
        return None
    low = mask & -mask
    if (mask + low) & mask:
        # Adding the lowest set bit carries through a contiguous run and clears it.
        errors.add(path, f"0x{mask:08x} is not contiguous")
        return None
    return mask


def _rule_priority(value: object, path: str, errors: _Errors) -> int | None:
    first = _int(value, path, errors)
    if first is None:
        return None
    last = first + _RULE_SPAN - 1
    if first < 0 or last > _U32_MAX:
        errors.add(path, f"{first} is out of range 1-{_U32_MAX - _RULE_SPAN + 1}")
        return None
    if first == 0:
        errors.add(path, f"range {first}-{last} overlaps the kernel's rule at 0")
        return None
    low, high = _KERNEL_RULES
    if first <= high and last >= low:
        errors.add(path, f"range {first}-{last} overlaps the kernel's rules at {low}-{high}")
        return None
    return first


# --------------------------------------------------------------------------- uplinks


@dataclass
class _Used:
    """Marks, tables and interfaces already taken, each by the first uplink's name."""

    marks: dict[int, str]
    tables: dict[int, str]
    interfaces: dict[str, str]


def _parse_uplinks(
    data: object, settings: Settings, mask_ok: bool, errors: _Errors
) -> tuple[tuple[Uplink, ...], frozenset[str]]:
    """Valid uplinks in file order, and every uplink name written (valid or not).

    Policies are checked against all names written, so that one broken uplink does not
    also produce an "unknown uplink" error in every policy that names it.
    """
    table = _table(data, "uplinks", errors)
    if table is None:
        return (), frozenset()
    if len(table) > _UPLINKS_MAX:
        errors.add("uplinks", f"{len(table)} uplinks, more than {_UPLINKS_MAX}, the maximum")
        return (), frozenset(table)
    used = _Used(marks={}, tables={}, interfaces={})
    uplinks: list[Uplink] = []
    for name, body in table.items():
        uplink = _parse_uplink(name, body, settings, mask_ok, used, errors)
        if uplink is not None:
            uplinks.append(uplink)
    return tuple(uplinks), frozenset(table)


def _parse_uplink(
    name: str, data: object, settings: Settings, mask_ok: bool, used: _Used, errors: _Errors
) -> Uplink | None:
    prefix = f"uplinks.{_key(name)}"
    before = len(errors.lines)
    table = _table(data, prefix, errors)
    if table is None:
        return None
    if not _UPLINK_NAME_RE.fullmatch(name):
        errors.add(prefix, f"{_q(name)} is not a valid uplink name (1-32 letters, digits, '_' or '-')")
    interface: str | None = None
    table_id: int | None = None
    mark: int | None = None
    gateway = Gateway("auto")
    gateway6 = Gateway("auto")
    masquerade = True
    check: Check | None = None
    check_data: object = None
    for key, value in table.items():
        path = f"{prefix}.{_key(key)}"
        match key:
            case "interface":
                interface = _ifname(value, path, errors)
                if interface is not None:
                    _claim(used.interfaces, interface, _q(interface), name, path, errors)
            case "table":
                table_id = _table_id(value, path, errors)
                if table_id is not None:
                    _claim(used.tables, table_id, str(table_id), name, path, errors)
            case "mark":
                mark = _mark(value, path, settings, mask_ok, errors)
                if mark is not None:
                    _claim(used.marks, mark, str(mark), name, path, errors)
            case "gateway":
                gateway = _gateway(value, path, 4, errors) or gateway
            case "gateway6":
                gateway6 = _gateway(value, path, 6, errors) or gateway6
            case "masquerade":
                flag = _bool(value, path, errors)
                if flag is not None:
                    masquerade = flag
            case "check":
                check_data = value
            case _:
                _unknown(path, errors)
    if "check" in table:
        check = _parse_check(check_data, f"{prefix}.check", errors)
    for key in ("interface", "table", "mark"):
        if key not in table:
            errors.add(f"{prefix}.{key}", "required")
    if check is not None and gateway6.kind == "none":
        for i, target in enumerate(check.targets):
            if target.version == 6:
                errors.add(f"{prefix}.check.targets[{i}]", f'{target} is IPv6 but gateway6 is "none"')
    if len(errors.lines) != before or interface is None or table_id is None or mark is None:
        return None
    return Uplink(
        name=name,
        interface=interface,
        table=table_id,
        mark=mark,
        gateway=gateway,
        gateway6=gateway6,
        masquerade=masquerade,
        check=check,
    )


def _claim(owners: dict[Any, str], value: object, shown: str, name: str, path: str, errors: _Errors) -> None:
    """Record that uplink ``name`` uses ``value``, or report the uplink that already does."""
    first = owners.setdefault(value, name)
    if first != name:
        errors.add(path, f"{shown} already used by uplinks.{_key(first)}")


def _table_id(value: object, path: str, errors: _Errors) -> int | None:
    number = _int(value, path, errors)
    if number is None:
        return None
    if number in _RESERVED_TABLES:
        errors.add(path, f"{number} is a reserved table ({_RESERVED_TABLES[number]})")
        return None
    if not 1 <= number <= _U32_MAX:
        errors.add(path, f"{number} is out of range 1-{_U32_MAX}")
        return None
    return number


def _mark(value: object, path: str, settings: Settings, mask_ok: bool, errors: _Errors) -> int | None:
    mark = _int(value, path, errors)
    if mark is None:
        return None
    if mark < 0:
        errors.add(path, f"{mark} is negative")
        return None
    if mark == 0:
        errors.add(path, "mark 0 means unmarked")
        return None
    if mask_ok and mark > settings.mark_max:
        errors.add(
            path, f"{mark} does not fit in mark_mask 0x{settings.mark_mask:08x} (max {settings.mark_max})"
        )
        return None
    return mark


def _gateway(value: object, path: str, version: int, errors: _Errors) -> Gateway | None:
    text = _str(value, path, errors)
    if text is None:
        return None
    if text in ("auto", "none"):
        return Gateway("auto" if text == "auto" else "none")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        errors.add(path, f'expected "auto", "none" or an IPv{version} address, got {_q(text)}')
        return None
    if address.version != version:
        other = "gateway" if address.version == 4 else "gateway6"
        errors.add(path, f"{_address_text(text)} is an IPv{address.version} address, it belongs in {other}")
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        errors.add(path, f"{_q(text)} has a zone index; leave it out, the uplink's interface is used")
        return None
    problem = _unroutable(address)
    if problem is not None:
        errors.add(path, f"{text} cannot be a gateway: {problem}")
        return None
    return Gateway("address", address)


_THIS_NETWORK: Final = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")


def _unroutable(address: IPAddress) -> str | None:
    """Why no packet to ``address`` can go out by an uplink, or None."""
    if address.is_unspecified:
        return "it is the unspecified address"
    if isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK:
        return "0.0.0.0/8 means this host on this network, never a destination"
    if address.is_loopback:
        return "it is a loopback address"
    if address.is_multicast:
        return "it is a multicast address"
    if address == _BROADCAST:
        return "it is the broadcast address"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"it is an IPv4-mapped address; write {address.ipv4_mapped}"
    return None


def _target_problem(address: IPAddress) -> str | None:
    """Why probing ``address`` could never show whether the ISP works, or None."""
    problem = _unroutable(address)
    if problem is None and address.is_link_local:
        problem = "it is link-local, so a probe never gets past the first hop"
    return problem


def _parse_check(data: object, prefix: str, errors: _Errors) -> Check | None:
    before = len(errors.lines)
    table = _table(data, prefix, errors)
    if table is None:
        return None
    targets: list[IPAddress] = []
    method: ProbeMethod = "icmp"
    port: int | None = None
    url_host: str | None = None
    url_path = "/"
    interval, interval_text = 1.0, "1s"
    timeout: tuple[float, str] | None = (1.0, "1s")
    interval_ok = True
    down_after = 3
    up_after = 3
    success: Success = "any"
    quality: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}.{_key(key)}"
        match key:
            case "success":
                success = _choice(value, path, ("any", "all"), errors) or success
            case "targets":
                targets = _targets(value, path, errors)
            case "method":
                parsed_method = _method(value, path, errors)
                if parsed_method is not None:
                    method, port, url_host, url_path = parsed_method
            case "interval":
                duration = _duration(value, path, "interval", errors)
                interval_ok = duration is not None
                if duration is not None:
                    interval, interval_text = duration
            case "timeout":
                timeout = _duration(value, path, "timeout", errors)
            case "down_after":
                down_after = _count(value, path, 1, _COUNT_MAX, errors) or down_after
            case "up_after":
                up_after = _count(value, path, 1, _COUNT_MAX, errors) or up_after
            case "window":
                quality[key] = _count(value, path, 1, _WINDOW_MAX, errors)
            case "min_targets":
                quality[key] = _count(value, path, 1, _TARGETS_MAX, errors)
            case "damp_flaps":
                quality[key] = _count(value, path, 0, _DAMP_FLAPS_MAX, errors)
            case "max_loss" | "recover_loss":
                quality[key] = _percent(value, path, errors)
            case "max_rtt" | "recover_rtt" | "damp_within" | "damp_hold":
                quality[key] = _duration(value, path, "max_rtt" if key.endswith("rtt") else key, errors)
            case "tls_verify":
                quality[key] = _bool(value, path, errors)
            case "tls_ca":
                quality[key] = _tls_ca(value, path, errors)
            case _:
                _unknown(path, errors)
    if "targets" not in table:
        errors.add(f"{prefix}.targets", "required")
    if timeout is not None and interval_ok and timeout[0] > interval:
        errors.add(f"{prefix}.timeout", f"{timeout[1]} is longer than interval {interval_text}")
    _check_quality(table, quality, len(targets), method, prefix, errors)
    if len(errors.lines) != before or timeout is None:
        return None
    max_rtt, recover_rtt = quality.get("max_rtt"), quality.get("recover_rtt")
    damp_within, damp_hold = quality.get("damp_within"), quality.get("damp_hold")
    return Check(
        targets=tuple(targets),
        method=method,
        port=port,
        interval=interval,
        timeout=timeout[0],
        down_after=down_after,
        up_after=up_after,
        success=success,
        window=quality.get("window") or 10,
        max_loss=quality.get("max_loss"),
        max_rtt=None if max_rtt is None else max_rtt[0],
        recover_loss=quality.get("recover_loss"),
        recover_rtt=None if recover_rtt is None else recover_rtt[0],
        min_targets=quality.get("min_targets") or 1,
        url_host=url_host,
        url_path=url_path,
        tls_verify=quality.get("tls_verify", True),
        tls_ca=quality.get("tls_ca"),
        damp_flaps=quality.get("damp_flaps", 3),
        damp_within=600.0 if damp_within is None else damp_within[0],
        damp_hold=300.0 if damp_hold is None else damp_hold[0],
    )


def _check_quality(table: Mapping[str, Any], quality: Mapping[str, Any], targets: int, method: ProbeMethod,
                   prefix: str, errors: _Errors) -> None:
    """The rules between the quality, damping and TLS keys of one check (each key already parsed)."""
    for kind, show in (("loss", _percent_text), ("rtt", _seconds_text)):
        worst, recover = quality.get(f"max_{kind}"), quality.get(f"recover_{kind}")
        if recover is None:
            continue
        if f"max_{kind}" not in table:
            errors.add(f"{prefix}.recover_{kind}", f"needs max_{kind} (it is the threshold to come back under)")
            continue
        if worst is None:
            continue
        worst_value = worst if kind == "loss" else worst[0]
        recover_value = recover if kind == "loss" else recover[0]
        if recover_value > worst_value:
            errors.add(f"{prefix}.recover_{kind}",
                       f"{show(recover_value)} is worse than max_{kind} {show(worst_value)}: "
                       f"an uplink would come back while still too bad to stay up")
    min_targets = quality.get("min_targets")
    if min_targets is not None:
        if table.get("success") == "all":
            errors.add(f"{prefix}.min_targets", 'give either min_targets or success = "all", not both '
                       '(success = "all" means min_targets = the number of targets)')
        elif targets and min_targets > targets:
            errors.add(f"{prefix}.min_targets", f"{min_targets} is more than the {targets} targets listed")
    if method != "https":
        for key in ("tls_verify", "tls_ca"):
            if key in table:
                errors.warn(f"{prefix}.{key}", 'has no effect: only an "https://" method uses it')
    elif quality.get("tls_verify") is False and "tls_ca" in table:
        errors.warn(f"{prefix}.tls_ca", "has no effect with tls_verify = false")


def _percent(value: object, path: str, errors: _Errors) -> float | None:
    """A fraction (0..1) from a percentage such as ``"20%"``."""
    text = _str(value, path, errors)
    if text is None:
        return None
    match = _PERCENT_RE.fullmatch(text) if len(text) <= _DURATION_TEXT_MAX else None
    if match is None:
        errors.add(path, f'expected a percentage such as "20%", got {_q(text)}')
        return None
    percent = Decimal(match[1])
    if percent > 100:
        errors.add(path, f"{text} is outside 0-100 %")
        return None
    return float(percent / 100)


def _percent_text(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def _seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


def _tls_ca(value: object, path: str, errors: _Errors) -> str | None:
    text = _str(value, path, errors)
    if text is None:
        return None
    if not text.startswith("/") or "\0" in text or len(text) > _CGROUP_PATH_MAX:
        errors.add(path, f"expected an absolute path to a PEM file of CA certificates, got {_q(text)}")
        return None
    return text


def _targets(value: object, path: str, errors: _Errors) -> list[IPAddress]:
    items = _array(value, path, errors)
    targets: list[IPAddress] = []
    seen: dict[IPAddress, int] = {}
    if items is not None and len(items) > _TARGETS_MAX:
        errors.add(path, f"{len(items)} targets, more than {_TARGETS_MAX}, the maximum")
        return targets
    for i, item in enumerate(items or ()):
        address = _address(item, f"{path}[{i}]", errors)
        if address is None:
            continue
        problem = _target_problem(address)
        if problem is not None:
            errors.add(f"{path}[{i}]", f"{item} cannot be a health-check target: {problem}")
            continue
        if address in seen:
            errors.add(f"{path}[{i}]", f"{address} is already listed at targets[{seen[address]}]")
            continue
        seen[address] = i
        targets.append(address)
    return targets


def _method(value: object, path: str, errors: _Errors) -> tuple[ProbeMethod, int | None, str | None, str] | None:
    """The method, its port, and for http/https/dns its host (or name) and path."""
    text = _str(value, path, errors)
    if text is None:
        return None
    if text == "icmp":
        return "icmp", None, None, "/"
    if text.startswith(("http://", "https://")):
        return _url(text, path, errors)
    if text.startswith("dns:"):
        name = _dns_name(text[4:])
        if name is None:
            what = "a name" if not text[4:] else f"a valid DNS name, got {_q(text[4:])}"
            errors.add(path, f'"dns:" needs {what} (as in "dns:example.com")')
            return None
        return "dns", 53, name, "/"
    match = _TCP_METHOD_RE.fullmatch(text)
    if match is None:
        errors.add(path, f'expected "icmp", "tcp:PORT", "http://HOST/PATH", "https://HOST/PATH" '
                         f'or "dns:NAME", got {_q(text)}')
        return None
    port = _decimal(match[1])
    if port is None or not 1 <= port <= 65535:
        shown = _q(match[1]) if port is None else str(port)
        errors.add(path, f"port {shown} is out of range 1-65535")
        return None
    return "tcp", port, None, "/"


def _url(text: str, path: str, errors: _Errors) -> tuple[ProbeMethod, int | None, str | None, str] | None:
    scheme, _, rest = text.partition("://")
    method: ProbeMethod = "https" if scheme == "https" else "http"
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        errors.add(path, f"{_q(text)}: a URL with a user or password is not supported")
        return None
    if "#" in tail:
        errors.add(path, f"{_q(text)}: a URL with a fragment is not supported")
        return None
    host, port_text = authority, ""
    if authority.startswith("["):
        host, _, after = authority.partition("]")
        host += "]"
        if after.startswith(":"):
            port_text = after[1:]
        elif after:
            host = authority  # refused below
    elif ":" in authority:
        host, _, port_text = authority.partition(":")
    if not _URL_HOST_RE.fullmatch(host):
        errors.add(path, f"{_q(text)}: expected {scheme}://HOST[:PORT]/PATH with a host name or address")
        return None
    port = 443 if method == "https" else 80
    if port_text:
        number = _decimal(port_text) if port_text.isdigit() else None
        if number is None or not 1 <= number <= 65535:
            errors.add(path, f"{_q(text)}: port {_q(port_text)} is out of range 1-65535")
            return None
        port = number
    url_path = slash + tail if slash else "/"
    if not _URL_PATH_RE.fullmatch(url_path):
        errors.add(path, f"{_q(text)}: the path must be printable ASCII without spaces (percent-encode the rest)")
        return None
    return method, port, host, url_path


def _dns_name(text: str) -> str | None:
    """``text`` as a DNS name to ask for (without a trailing dot), or None when it is not one."""
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return None
    if not all(_DNS_LABEL_RE.fullmatch(label) for label in name.split(".")):
        return None
    return name


# --------------------------------------------------------------------------- policies


def _parse_policies(
    data: object, uplink_names: frozenset[str], errors: _Errors,
    address_sets: Mapping[str, AddressSet | None] | None = None,
) -> tuple[Policy, ...]:
    if not _is_array(data):
        errors.add("policy", _type_error("an array of tables ([[policy]])", data))
        return ()
    assert isinstance(data, (list, tuple))
    if len(data) > _POLICIES_MAX:
        errors.add("policy", f"{len(data)} policies, more than {_POLICIES_MAX}, the maximum")
        return ()
    policies: list[Policy] = []
    names: dict[str, int] = {}
    for index, body in enumerate(data):
        policy = _parse_policy(index, body, uplink_names, names, errors, address_sets or {})
        if policy is not None:
            policies.append(policy)
    # one conntrack label bit per migrating policy, from the top (127) down: other
    # software that uses labels tends to start at bit 0 (docs/design.md)
    migrating = [i for i, p in enumerate(policies) if p.failback == "migrate"]
    if len(migrating) > MIGRATE_LABELS_MAX:
        errors.add("policy", f'{len(migrating)} policies with failback = "migrate", more than '
                             f"{MIGRATE_LABELS_MAX}, the maximum (one conntrack label bit each)")
        return ()
    for k, i in enumerate(migrating):
        policies[i] = dataclasses.replace(policies[i], label=127 - k)
    return tuple(policies)


def _policy_name(index: int, table: Mapping[str, Any], names: dict[str, int], errors: _Errors) -> str:
    """The policy's key-path prefix, ``policy[I] (NAME)`` or ``policy[I]`` without a valid name."""
    prefix = f"policy[{index}]"
    if "name" not in table:
        errors.add(f"{prefix}.name", "required")
        return prefix
    name = _str(table["name"], f"{prefix}.name", errors)
    if name is None:
        return prefix
    if not _POLICY_NAME_RE.fullmatch(name):
        errors.add(
            f"{prefix}.name",
            f"{_q(name)} is not a valid policy name (1-64 letters, digits, '_', '.', ':' or '-')",
        )
        return prefix
    prefix = f"{prefix} ({name})"
    first = names.setdefault(name, index)
    if first != index:
        errors.add(f"{prefix}.name", f"duplicate of policy[{first}]")
    return prefix


def _parse_policy(
    index: int, data: object, uplink_names: frozenset[str], names: dict[str, int], errors: _Errors,
    address_sets: Mapping[str, AddressSet | None] | None = None,
) -> Policy | None:
    before = len(errors.lines)
    table = _table(data, f"policy[{index}]", errors)
    if table is None:
        return None
    prefix = _policy_name(index, table, names, errors)
    proto: int | None = None
    ports: dict[str, tuple[PortRange, ...]] = {"dport": (), "sport": ()}
    addresses: dict[str, tuple[IPNetwork, ...]] = {"daddr": (), "saddr": ()}
    refs: dict[str, tuple[SetRef, ...]] = {"daddr": (), "saddr": ()}
    ids: dict[str, tuple[IdRange, ...]] = {"uid": (), "gid": ()}
    iif: str | None = None
    cgroup: str | None = None
    family: Family = "any"
    uplinks: tuple[str, ...] = ()
    balance: tuple[tuple[str, int], ...] = ()
    fallback: Fallback = "main"
    tiers: tuple[Tier, ...] = ()
    action: Action | None = None
    failback: Failback = "new-flows"
    sticky: Sticky = "flow"
    sticky_timeout = STICKY_TIMEOUT_DEFAULT
    for key, value in table.items():
        path = f"{prefix}.{_key(key)}"
        match key:
            case "name":
                pass
            case "proto":
                proto = _proto(value, path, errors)
            case "dport" | "sport":
                ports[key] = _ranges(value, path, 1, 65535, "a port", errors)
            case "daddr" | "saddr":
                addresses[key], refs[key] = _addresses(value, path, address_sets or {}, errors)
            case "iif":
                iif = _ifname(value, path, errors)
            case "uid" | "gid":
                ids[key] = _ranges(value, path, 0, _ID_MAX, f"a {key}", errors)
            case "cgroup":
                cgroup = _cgroup(value, path, errors)
            case "family":
                family = _choice(value, path, ("ipv4", "ipv6", "any"), errors) or family
            case "uplinks":
                tiers = _policy_tiers(value, path, uplink_names, errors)
                uplinks = tuple(name for tier in tiers for name, _ in tier)
                if not any(isinstance(item, Mapping) for item in (value if isinstance(value, list) else ())):
                    tiers = ()  # a plain failover list: tier_list derives it
            case "action":
                action = _choice(value, path, ("main", "drop"), errors)
            case "failback":
                failback = _choice(value, path, ("new-flows", "migrate"), errors) or failback
            case "sticky":
                sticky = _choice(value, path, ("flow", "source"), errors) or sticky
            case "sticky_timeout":
                parsed = _duration(value, path, "sticky_timeout", errors)
                if parsed is not None:
                    sticky_timeout = parsed[0]
            case "balance":
                balance = _balance(value, path, uplink_names, errors)
            case "fallback":
                fallback = _choice(value, path, ("main", "drop"), errors) or fallback
            case _:
                _unknown(path, errors)

    if proto is not None and proto not in _PORT_PROTOCOLS:
        for key in ("dport", "sport"):
            if key in table:
                errors.add(
                    f"{prefix}.{key}",
                    f"ports need proto tcp, udp, sctp or udplite, not {_proto_label(proto)}",
                )
    constraints = _family_constraints(family, proto, addresses["daddr"], addresses["saddr"],
                                      refs["daddr"], refs["saddr"])
    allowed = {4, 6}
    for i, (description, versions) in enumerate(constraints):
        if not allowed & versions:
            earlier = next(d for d, v in constraints[:i] if not v & versions)
            errors.add(prefix, f"{earlier} but {description}")
            break
        allowed &= versions
    if iif is not None and (ids["uid"] or ids["gid"] or cgroup is not None):
        # valid (the shipped example shows every key in one policy), but worth saying
        errors.warn(
            prefix,
            "iif matches forwarded traffic, uid/gid/cgroup only local sockets; no packet can match both",
        )
    given = [key for key in ("uplinks", "balance", "action") if key in table]
    if len(given) > 1:
        errors.add(prefix, f"give one of uplinks, balance or action, not {' and '.join(given)}")
    elif not given:
        errors.add(prefix, "one of uplinks, balance or action is required")
    elif given == ["action"]:
        for key in ("fallback", "failback", "sticky", "sticky_timeout"):
            if key in table:
                errors.add(f"{prefix}.{key}", "has no meaning with action: the traffic uses no uplink")

    if len(errors.lines) != before:
        return None
    return Policy(
        index=index,
        name=str(table["name"]),
        proto=proto,
        dport=ports["dport"],
        sport=ports["sport"],
        daddr=addresses["daddr"],
        saddr=addresses["saddr"],
        iif=iif,
        daddr_sets=refs["daddr"],
        saddr_sets=refs["saddr"],
        uid=ids["uid"],
        gid=ids["gid"],
        cgroup=cgroup,
        family=family,
        uplinks=uplinks,
        balance=balance,
        fallback=fallback,
        tiers=tiers,
        action=action,
        failback=failback,
        sticky=sticky,
        sticky_timeout=sticky_timeout,
    )


def _family_constraints(
    family: str, proto: int | None, daddr: Sequence[IPNetwork], saddr: Sequence[IPNetwork],
    daddr_sets: Sequence[SetRef] = (), saddr_sets: Sequence[SetRef] = (),
) -> list[tuple[str, frozenset[int]]]:
    """What narrows a policy's IP versions, each with how a message describes it."""
    constraints: list[tuple[str, frozenset[int]]] = []
    if family in ("ipv4", "ipv6"):
        constraints.append((f"family is {family}", frozenset({4 if family == "ipv4" else 6})))
    if proto is not None and proto in _PROTOCOL_FAMILY:
        version = _PROTOCOL_FAMILY[proto]
        constraints.append((f"proto {_proto_label(proto)} is IPv{version} only", frozenset({version})))
    for key, networks, refs in (("daddr", daddr, daddr_sets), ("saddr", saddr, saddr_sets)):
        versions: frozenset[int] = frozenset(n.version for n in networks)
        for ref in refs:
            versions |= ref.versions
        if len(versions) == 1:
            (version,) = versions
            what = "networks" if not refs else "networks and sets"
            constraints.append((f"{key} has only IPv{version} {what}", versions))
    return constraints


def _proto_label(proto: int) -> str:
    return _PROTOCOL_NAMES.get(proto, str(proto))


def _proto(value: object, path: str, errors: _Errors) -> int | None:
    if isinstance(value, str):
        if value in _PROTOCOLS:
            return _PROTOCOLS[value]
        known = ", ".join(_PROTOCOLS)
        errors.add(path, f"unknown protocol {_q(value)} (known: {known}; or a number 0-255)")
        return None
    if _is_int(value):
        return _int_in(value, path, 0, 255, errors)
    errors.add(path, _type_error("a protocol name or number", value))
    return None


def _ranges(
    value: object, path: str, lo: int, hi: int, what: str, errors: _Errors
) -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    for item_path, item in _items(value, path, errors) or ():
        parsed = _range(item, item_path, lo, hi, what, errors)
        if parsed is not None:
            ranges.append(parsed)
    return tuple(ranges)


def _networks(value: object, path: str, errors: _Errors) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for item_path, item in _items(value, path, errors) or ():
        network = _network(item, item_path, errors)
        if network is not None:
            networks.append(network)
    return tuple(networks)


def _addresses(
    value: object, path: str, address_sets: Mapping[str, AddressSet | None], errors: _Errors
) -> tuple[tuple[IPNetwork, ...], tuple[SetRef, ...]]:
    """daddr/saddr: literal networks and ``"@NAME"`` references to ``[sets.NAME]``."""
    networks: list[IPNetwork] = []
    refs: list[SetRef] = []
    for item_path, item in _items(value, path, errors) or ():
        if isinstance(item, str) and item.startswith("@"):
            name = item[1:]
            found = address_sets.get(name)
            if name in address_sets and found is None:
                continue
            if found is None:
                known = ", ".join(sorted(address_sets)) or "none defined"
                errors.add(item_path, f"unknown set {_q(item)} (sets: {known})")
            elif all(r.name != name for r in refs):
                refs.append(SetRef(name, found.versions))
            continue
        network = _network(item, item_path, errors)
        if network is not None:
            networks.append(network)
    return tuple(networks), tuple(refs)


# --------------------------------------------------------------------------- sets


SetReader: TypeAlias = Callable[[str], str]


def read_set_file(path: str) -> str:
    """A set file's text: a regular file of at most ``sets.MAX_FILE_SIZE`` bytes, as UTF-8.

    Raises ValueError with the reason (missing, not a regular file, too large, not UTF-8).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"not a regular file ({_file_kind(info.st_mode)})")
        limit = _sets.MAX_FILE_SIZE
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if size > limit:
        raise ValueError(f"larger than {limit} bytes (32 MiB), the most a set file may have")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None


def _parse_sets(data: object, read: SetReader, errors: _Errors) -> tuple[AddressSet, ...]:
    table = _table(data, "sets", errors)
    out: list[AddressSet] = []
    for name, body in (table or {}).items():
        prefix = f"sets.{_key(name)}"
        if not _sets.NAME_RE.fullmatch(name):
            errors.add(prefix, f"{_q(name)} is not a valid set name (a letter, then up to 31 letters, digits or '_')")
            continue
        if name.endswith("_dns"):
            # NAME_dns_v4 is the nft name of set NAME's dnsmasq part
            errors.add(prefix, f"{_q(name)}: a set name may not end in _dns")
            continue
        parsed = _parse_set(name, prefix, body, read, errors)
        if parsed is not None:
            out.append(parsed)
    return tuple(out)


def _parse_set(name: str, prefix: str, data: object, read: SetReader, errors: _Errors) -> AddressSet | None:
    table = _table(data, prefix, errors)
    if table is None:
        return None
    before = len(errors.lines)
    found: dict[int, list[Interval]] = {4: [], 6: []}
    files: list[str] = []
    domains: list[str] = []
    timeout = 3600
    entries = 0
    for key, value in table.items():
        path = f"{prefix}.{_key(key)}"
        match key:
            case "elements":
                for item_path, item in _items(value, path, errors) or ():
                    text = _str(item, item_path, errors)
                    if text is None:
                        continue
                    parsed = _sets.parse_entry(text)
                    if isinstance(parsed, str):
                        errors.add(item_path, f"{_q(text)} {parsed}")
                    else:
                        found[parsed[0]].append(parsed[1])
                        entries += 1
            case "files":
                for item_path, item in _items(value, path, errors) or ():
                    file_name = _str(item, item_path, errors)
                    if file_name is None:
                        continue
                    if not file_name.startswith("/"):
                        errors.add(item_path, f"{_q(file_name)} is not an absolute path")
                        continue
                    try:
                        content = read(file_name)
                    except ValueError as exc:
                        errors.add(item_path, f"{_text.path(file_name)}: {exc}")
                        continue
                    got, bad, nbad, count = _sets.parse_lines(content)
                    shown = _text.path(file_name)
                    errors.lines.extend(f"{shown}:{line}: {_q(entry)} {problem}" for line, entry, problem in bad)
                    if nbad > len(bad):
                        errors.lines.append(f"{shown}: {nbad - len(bad)} more bad lines")
                    entries += count
                    found[4] += got[4]
                    found[6] += got[6]
                    files.append(file_name)
                    if entries > _sets.MAX_ENTRIES:
                        break
            case "domains":
                for item_path, item in _items(value, path, errors) or ():
                    domain = _str(item, item_path, errors)
                    if domain is None:
                        continue
                    problem = _sets.domain_problem(domain)
                    if problem:
                        errors.add(item_path, f"{_q(domain)} {problem}")
                    elif _sets.normal_domain(domain) not in domains:
                        domains.append(_sets.normal_domain(domain))
            case "dns_timeout":
                parsed_timeout = _duration(value, path, "dns_timeout", errors)
                if parsed_timeout is not None:
                    timeout = max(1, int(parsed_timeout[0]))
            case _:
                _unknown(path, errors)
    if entries > _sets.MAX_ENTRIES:
        errors.add(prefix, f"more than {_sets.MAX_ENTRIES} addresses and CIDRs, the most a set may have")
    if not any(k in table for k in ("elements", "files", "domains")):
        errors.add(prefix, "give at least one of elements, files or domains")
    elif len(errors.lines) == before and not entries and not domains:
        errors.warn(prefix, "the set is empty: it matches nothing")
    if len(errors.lines) != before:
        return None
    return AddressSet(name=name, v4=_sets.merge(found[4]), v6=_sets.merge(found[6]), files=tuple(files),
                      domains=tuple(domains), dns_timeout=timeout, entries=entries)


def _cgroup(value: object, path: str, errors: _Errors) -> str | None:
    """A cgroup v2 path relative to the root; a leading or trailing '/' is dropped.

    Any printable character may name a cgroup (systemd escapes unit names with
    '\\', as in "dev-disk-by\\x2duuid.device"), except quotes (nft's quoted strings
    have no escape for '"'; "'" goes with it, as in interface names) and control
    characters. Nor what the kernel cannot hold: a name over 255 bytes, a path over
    4000 bytes, a depth over 255 (the highest "socket cgroupv2 level").
    """
    text = _str(value, path, errors)
    if text is None:
        return None
    stripped = text.strip("/")
    if not stripped:
        errors.add(path, "must not be empty")
        return None
    bad = next((c for c in stripped if c in "\"'" or not c.isprintable()), None)
    if bad is not None:
        what = "a quote" if bad in "\"'" else f"the character {_q(bad)}"
        errors.add(path, f"{_q(text)} contains {what}, which a cgroup path may not")
        return None
    parts = stripped.split("/")
    if any(part in ("", ".", "..") for part in parts):
        errors.add(path, f"{_q(text)} is not a normalized cgroup path")
        return None
    if len(parts) > _CGROUP_DEPTH_MAX:
        errors.add(path, f"{len(parts)} levels deep, more than {_CGROUP_DEPTH_MAX}, the deepest nft can match")
        return None
    long_part = next((p for p in parts if len(p.encode()) > _CGROUP_NAME_MAX), None)
    if long_part is not None:
        errors.add(path, f"the name {_q(long_part)} is longer than {_CGROUP_NAME_MAX} bytes")
        return None
    if len(stripped.encode()) > _CGROUP_PATH_MAX:
        errors.add(path, f"longer than {_CGROUP_PATH_MAX} bytes")
        return None
    return stripped


def _policy_tiers(
    value: object, path: str, uplink_names: frozenset[str], errors: _Errors
) -> tuple[Tier, ...]:
    """``uplinks``: tiers in order; a string is a one-uplink tier, an inline table a balanced one.

    An uplink may appear once across all tiers: a second place would mean two
    different answers to "where does this flow go when that uplink lives".
    """
    items = _array(value, path, errors)
    tiers: list[Tier] = []
    seen: dict[str, int] = {}

    def member(name: str, item_path: str, i: int) -> bool:
        if name not in uplink_names:
            errors.add(item_path, f"unknown uplink {_q(name)}")
        elif name in seen:
            errors.add(item_path, f"{_q(name)} is already listed at uplinks[{seen[name]}]")
        else:
            seen[name] = i
            return True
        return False

    for i, item in enumerate(items or ()):
        item_path = f"{path}[{i}]"
        if isinstance(item, Mapping):
            if not item:
                errors.add(item_path, "an empty tier: give at least one uplink with its weight")
                continue
            tier: list[tuple[str, int]] = []
            for name, weight in item.items():
                weight_path = f"{item_path}.{_key(name)}"
                number = _int_in(weight, weight_path, 1, _WEIGHT_MAX, errors)
                if member(name, weight_path, i) and number is not None:
                    tier.append((name, number))
            if tier:
                tiers.append(tuple(tier))
            continue
        if not isinstance(item, str):
            errors.add(item_path, _type_error("an uplink name or a table of weights", item))
            continue
        if member(item, item_path, i):
            tiers.append(((item, 1),))
    return tuple(tiers)


def _balance(
    value: object, path: str, uplink_names: frozenset[str], errors: _Errors
) -> tuple[tuple[str, int], ...]:
    table = _table(value, path, errors)
    if table is None:
        return ()
    if not table:
        errors.add(path, "must not be empty")
        return ()
    weights: list[tuple[str, int]] = []
    for name, weight in table.items():
        item_path = f"{path}.{_key(name)}"
        if name not in uplink_names:
            errors.add(item_path, f"unknown uplink {_q(name)}")
            continue
        number = _int_in(weight, item_path, 1, _WEIGHT_MAX, errors)
        if number is not None:
            weights.append((name, number))
    return tuple(weights)
