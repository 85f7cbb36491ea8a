"""The demo's results table, rendered from its summary.json: what `make demo` prints at the end
and what README.md shows (generated from docs/demo_summary.json, the committed summary).

    python -m vqakd.demo.table                          # the table of docs/demo_summary.json
    python -m vqakd.demo.table results/demo/summary.json
    python -m vqakd.demo.table results/demo/summary.json --save docs/demo_summary.json --readme README.md
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from vqakd.core.errors import UserError, run_cli
from vqakd.core.files import REPO_ROOT, atomic_open, read_json, write_json
from vqakd.data.questions import QUESTION_TYPES

ARMS = ("teacher", "student-none", "student-feature")
# The paired differences (against student-none, seed by seed) the table shows: the paper's claim first.
PAIRED_ARMS = ("student-feature", "teacher")
COMMITTED_SUMMARY = os.path.join(REPO_ROOT, "docs", "demo_summary.json")
# README.md holds the table, indented 4 spaces, between these two lines.
README_BEGIN = "<!-- demo table: generated from docs/demo_summary.json by python -m vqakd.demo.table -->"
README_END = "<!-- end of demo table -->"
# A question type on which the teacher is not this far above the question-only guesser is one whose
# answer the short training did not learn or the random-weight features do not carry (the table marks it).
CARRIED_MARGIN = 0.05


def not_carried(summary: dict) -> list[str]:
    """Question types on which the teacher is less than CARRIED_MARGIN above the question-only guesser."""
    teacher = summary["arms"]["teacher"]["per_type"]
    blind = summary["question_only_per_type"]
    return [qtype for qtype in QUESTION_TYPES
            if qtype in teacher and qtype in blind and teacher[qtype] - blind[qtype] < CARRIED_MARGIN]


def paired_line(summary: dict, arm: str) -> Optional[str]:
    """`<arm> − <baseline>, paired by seed: ... points; mean ± std`, or None without that pair."""
    paired = (summary.get("paired") or {}).get(arm)
    if not paired or paired["mean"] is None:
        return None
    seeds = ", ".join(f"{100 * value:+.1f}" for value in paired["seeds"].values())
    spread = f" ± {100 * paired['std']:.1f}" if paired["std"] is not None else ""
    interval = paired.get("interval")
    ci = f" (95% interval {100 * interval[0]:+.1f} to {100 * interval[1]:+.1f})" if interval else ""
    return (f"{arm} − {paired['baseline']}, paired by seed: {seeds} points; "
            f"mean {100 * paired['mean']:+.1f}{spread}{ci}")


def format_table(summary: dict) -> str:
    arms = [arm for arm in ARMS if arm in summary["arms"]]
    entries = [summary["arms"][arm] for arm in arms]
    weak = set(summary.get("not_carried", not_carried(summary)))

    def pct(value: Optional[float], std: Optional[float] = None) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}%" if std is not None else "%")

    rows = [("", *arms, "majority answer", "question only"),
            ("graph layers", *(str(e["graph_layers"]) for e in entries), "", ""),
            ("parameters", *(f"{e['params']:,}" for e in entries), "", ""),
            ("test accuracy, all", *(pct(e["accuracy"], e.get("accuracy_std")) for e in entries),
             pct(summary["majority_rate"]), pct(summary["question_only_rate"]))]
    for qtype in QUESTION_TYPES:
        count = entries[0]["per_type_counts"].get(qtype, 0)
        label = f"  {qtype} ({count})" + (" *" if qtype in weak else "")
        rows.append((label, *(pct(e["per_type"].get(qtype), e.get("per_type_std", {}).get(qtype)) for e in entries),
                     pct(summary["majority_per_type"].get(qtype)), pct(summary["question_only_per_type"].get(qtype))))
    rows.append(("inference ms/question", *(f"{e['ms_per_question']:.2f}" if e.get("ms_per_question") is not None
                                            else "-" for e in entries), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    seeds = summary["seeds"]
    origin = "; features from random-weight networks" if summary.get("features", {}).get("random_weights") else ""
    lines = [f"demo results on the test split ({summary['test_questions']} questions; mean ± std over "
             f"{len(seeds)} training seeds, {', '.join(map(str, seeds))}{origin})"]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in
                                                             zip(row[1:], widths[1:])]).rstrip())
    for key, name in (("above_question_only", "question-only guesser"),
                      ("above_majority", "majority answer")):
        above = ", ".join(f"{arm} {100 * summary[key][arm]:+.1f}" for arm in arms)
        lines.append(f"above the {name} (means): {above} points")
    paired = [line for line in (paired_line(summary, arm) for arm in PAIRED_ARMS) if line]
    if paired:
        lines += paired
        lines.append("a difference smaller than its paired ± std is seed-to-seed noise, not an effect of the "
                     "method: other seeds can reverse its sign")
    if weak:
        lines.append(f"* the teacher is less than {100 * CARRIED_MARGIN:.0f} points above the question-only "
                     "guesser: too short a training, or random-weight features do not carry what this type asks")
    timing = summary["timing"]
    lines.append(f"ms/question: best.pt on {timing['device']}, batch {timing['batch_size']}, median of "
                 f"{timing['passes']} passes over the test split after a warm-up, mean over seeds")
    return "\n".join(lines)


def readme_block(summary: dict) -> str:
    return "\n".join(("    " + line).rstrip() for line in format_table(summary).splitlines())


def readme_table(readme_text: str, path: str = "README.md") -> tuple[str, str, str]:
    """The README's text up to README_BEGIN, the table lines, and the text from README_END on."""
    head, begin, rest = readme_text.partition(README_BEGIN)
    table, end, tail = rest.partition(README_END)
    if not begin or not end:
        raise UserError(f"{path}: no demo table (the lines {README_BEGIN!r} ... {README_END!r})")
    return head + begin, table.strip("\n"), end + tail


def update_readme(path: str, summary: dict) -> bool:
    """Rewrite the table in README `path`; returns whether it changed."""
    with open(path, encoding="utf-8") as handle:
        head, old, tail = readme_table(handle.read(), path)
    new = readme_block(summary)
    if old == new:
        return False
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(head + "\n" + new + "\n" + tail)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqakd.demo.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", nargs="?", default=os.path.relpath(COMMITTED_SUMMARY),
                        help="a demo summary.json (default %(default)s)")
    parser.add_argument("--readme", help="rewrite the demo table in this README.md instead of printing it")
    parser.add_argument("--save", metavar="JSON", help="write the summary's figures (no provenance) to this file, "
                                                      "e.g. docs/demo_summary.json after a new `make demo`")
    args = parser.parse_args(argv)
    summary = read_json(args.summary)
    if not isinstance(summary, dict) or "arms" not in summary:
        raise UserError(f"{args.summary}: not a demo summary (no 'arms'); run `make demo` to write one")
    if args.save:       # the figures, not the provenance
        figures = {key: value for key, value in summary.items() if key != "provenance"}
        write_json(args.save, {**figures, "code_version": (summary.get("provenance") or {}).get("code")})
        print(f"wrote {args.save}")
    if args.readme:
        changed = update_readme(args.readme, summary)
        print(f"{args.readme}: demo table {'updated' if changed else 'already up to date'}")
    elif not args.save:
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    run_cli(main)
