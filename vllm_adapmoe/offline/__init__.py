"""Offline tools behind the `adapmoe` command: calibration, profiles, traces, the simulator."""
