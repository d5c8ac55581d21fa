"""The daemon tier: `markrouted run` in network namespaces, one test per trigger it must handle."""
