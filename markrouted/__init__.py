"""markrouted: fwmark policy routing kept true while the network changes."""

__version__ = "0.1.0"
