"""vqakd: VideoQA by knowledge distillation (Shao, Wan, Zong 2023), reproduced end to end.

Library code shared by the entry scripts (`train.py`, `validate.py`, `txt2pickle.py`,
`preprocess/*.py`). The network and its losses live in the top-level `model` package.
"""

__version__ = "0.1.0"
