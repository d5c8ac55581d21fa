"""End-to-end tier: real traffic through the lab of ``lab/topology.py``."""
