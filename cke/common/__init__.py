"""Pieces shared by cke, sabakan and rivers: logging, durations, etcd connections."""
