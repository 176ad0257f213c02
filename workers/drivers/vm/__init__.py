"""The vm driver. See README.md beside this file for its contract; plugin.py registers it."""
