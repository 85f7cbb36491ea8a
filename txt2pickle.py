"""GloVe text file -> pickle of {word: float32 vector} (docs/method.md#question-preprocessing).

    python txt2pickle.py --glove data/glove/glove.840B.300d.txt --out data/glove/glove.840.300d.pkl
    python txt2pickle.py ... --vocab data/msvd-qa/msvd-qa_vocab.json   # keep only the needed words

The full 840B pickle takes several GB on disk and in memory; `--vocab` (a vocab JSON or a word
list, one word a line) keeps only the words the questions use.
"""

from __future__ import annotations

import argparse
import os

from vqakd.core.errors import UserError, interruptible_imports, run_cli
from vqakd.core.script import prepare_script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glove", default="data/glove/glove.840B.300d.txt",
                        help="GloVe text file (default: %(default)s)")
    parser.add_argument("--out", default="data/glove/glove.840.300d.pkl", help="output pickle (default: %(default)s)")
    parser.add_argument("--vocab", default=None,
                        help="keep only these words: a {name}_vocab.json or a text file with one word a line")
    parser.add_argument("--dim", type=int, default=None,
                        help="vector size (default: the number of values on the first line)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


if __name__ == "__main__":
    prepare_script(build_parser(), modules=("numpy", "tqdm"))

with interruptible_imports():       # numpy and tqdm take a moment: Ctrl-C there is a clean exit too
    from vqakd.core.files import write_pickle
    from vqakd.core.locks import guard_outputs
    from vqakd.data.glove import read_glove_text, read_word_list


def _size(num_bytes: int) -> str:
    if num_bytes < 1 << 20:
        return f"{num_bytes / 1024:.1f} KiB"
    if num_bytes < 1 << 30:
        return f"{num_bytes / (1 << 20):.1f} MiB"
    return f"{num_bytes / (1 << 30):.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with guard_outputs({"--glove": args.glove, "--vocab": args.vocab}, {"--out": args.out}):
        keep = read_word_list(args.vocab) if args.vocab else None
        if keep is not None and not keep:
            raise UserError(f"{args.vocab}: the word list is empty")
        words, stats = read_glove_text(args.glove, dim=args.dim, keep=keep, progress=not args.no_progress)
        if not words and keep is None:
            raise UserError(f"{args.glove}: no word vectors kept: {stats.long_token_note()}")
        if not words:
            raise UserError(f"{args.glove}: none of the {len(keep)} words of {args.vocab} is in this GloVe file")
        write_pickle(args.out, words)
    kept = f"{len(words)} words kept"
    if keep is not None:
        kept += f" of {len(keep)} requested ({len(stats.missing)} not in GloVe)"
    duplicates = f", {stats.duplicates} repeated tokens (later line kept)" if stats.duplicates else ""
    skipped = f", {stats.long_token_note()}" if stats.long_tokens else ""
    print(f"{args.glove}: {stats.lines} lines, {kept}, dim {stats.dim}{duplicates}{skipped} -> {args.out} "
          f"({_size(os.path.getsize(args.out))})")
    return 0


if __name__ == "__main__":
    run_cli(main)
