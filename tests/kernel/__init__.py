"""The kernel tier: the real CLI against the real kernel, in network namespaces."""
