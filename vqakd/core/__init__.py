"""Foundations every other layer stands on; nothing here knows about videos, questions or training.

  errors.py       one-line errors (`UserError`, `run_cli`, `require_file`), clean Ctrl-C
  files.py        atomic writes, JSON/pickle I/O, sha256, the disk-full message, output-path checks
  safe_pickle.py  unpickling question files and GloVe pickles without running code
  locks.py        one run per output (locks naming the holder's pid); `guard_outputs`, the output
                  checks every writing command starts with
  script.py       `prepare_script`, the preamble of every entry script: threads, --help before
                  torch, requirements; train.py's flags the config shares
  progress.py     the one progress bar
  distributed.py  devices, torchrun process groups and the collectives the runs use
  config.py       the YAML config, `--set` overrides and their checks
"""
