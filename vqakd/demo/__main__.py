"""`python -m vqakd.demo`: the whole pipeline on a generated dataset."""

from vqakd.core.errors import run_cli
from vqakd.demo.pipeline import main

if __name__ == "__main__":
    run_cli(main)
