"""Merge the parts of a feature extraction made by separate runs into its one HDF5 feature file.

    # machine i of S (no shared disk), the same command everywhere but the index:
    python preprocess/preprocess_features.py ... --out data/msvd-qa/msvd-qa_appearance_feat.h5 \\
        --num-shards S --shard-index i
    # then, with every machine's data/msvd-qa/msvd-qa_appearance_feat.h5.parts copied into that
    # same folder on one machine (the chunk files have distinct names):
    python preprocess/merge_features.py --out data/msvd-qa/msvd-qa_appearance_feat.h5
    # or name the copied folders one by one:
    python preprocess/merge_features.py --out data/msvd-qa/msvd-qa_appearance_feat.h5 \\
        machine0/msvd-qa_appearance_feat.h5.parts machine1/msvd-qa_appearance_feat.h5.parts

The parts must hold every chunk exactly once, all made with the same settings; otherwise nothing is
written. Writes `<out>` and `<out>.failures.json`, then removes the parts folders (unless
--keep-parts). Exit status: 0, or 1 when some video failed (0 with --allow-failures), 2 for an input error.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))     # the repository root
from vqakd.core.errors import interruptible_imports, run_cli  # noqa: E402
from vqakd.core.script import prepare_script  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the feature file to write (the --out of the shards)")
    parser.add_argument("parts", nargs="*",
                        help="parts folders (default: <out>.parts, holding every shard's chunks)")
    parser.add_argument("--keep-parts", action="store_true", help="leave the parts folders in place")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out made otherwise")
    parser.add_argument("--allow-failures", action="store_true",
                        help="exit with status 0 even when some videos could not be used")
    return parser


if __name__ == "__main__":
    prepare_script(build_parser())      # --help and flag errors answer before torch loads

with interruptible_imports():       # h5py and torch take seconds to import: Ctrl-C there is a clean exit too
    from vqakd.core.locks import guard_outputs
    from vqakd.extraction import merge_into_output
    from vqakd.extraction.parts import failures_report
    from preprocess.preprocess_features import written_line


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    parts = args.parts or [args.out + ".parts"]
    outputs = {"--out": args.out, "its failure report": failures_report(args.out)}
    with guard_outputs([(f"parts folder {path}", path) for path in parts], outputs, file_what="feature output"):
        result = merge_into_output(parts, args.out, overwrite=args.overwrite, keep_parts=args.keep_parts)
    if result.already_complete:
        print(f"{args.out} already holds these features ({result.written} videos, {len(result.failures)} "
              "failed); nothing to merge")
    else:
        print(f"{written_line(result)}; {len(parts)} parts folder(s) {'kept' if args.keep_parts else 'removed'}")
    return 1 if result.failures and not args.allow_failures else 0


if __name__ == "__main__":
    run_cli(main)
