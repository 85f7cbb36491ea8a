import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests run on CPU with one thread: results stay bit-identical, and on the 2-core CI machine
# extra threads only contend with each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
