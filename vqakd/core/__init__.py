"""Foundations every other layer stands on (errors, files, locks, safe unpickling, the script
preamble, progress bars, process groups, the config); nothing here knows about videos,
questions or training. docs/architecture.md maps the modules.
"""
