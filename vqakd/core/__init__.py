"""Foundations every other layer stands on; nothing here knows about videos, questions or training.

  errors.py       one-line errors (`UserError`, `run_cli`, `require_file`), clean Ctrl-C
  files.py        atomic writes, JSON/pickle I/O, sha256, the disk-full message, output-path checks
  safe_pickle.py  unpickling question files and GloVe pickles without running code
  locks.py        one run per output (folder locks naming the holder's pid)
  script.py       the preamble of every entry script: threads, requirements, shared flags
  progress.py     the one progress bar
  distributed.py  devices, torchrun process groups and the collectives the runs use
  config.py       the YAML config, `--set` overrides and their checks
"""
