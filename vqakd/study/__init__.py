"""The paper's study: several arms (teacher, students with and without distillation) over several
seeds, trained and evaluated with the library's own run functions, then one report.

  runner.py  which runs a study needs, training and evaluating them, timing inference
  report.py  the report's tables, figures and paired differences
"""
