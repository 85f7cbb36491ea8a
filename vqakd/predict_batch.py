"""predict.py's many-questions mode: reading (video, question) rows, writing the answers."""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any, Optional

from vqakd.core.errors import UserError
from vqakd.core.files import atomic_open, read_text
from vqakd.predict import Answerer

QUESTION_COLUMNS = ("video", "question")
ID_COLUMNS = ("id", "question_id")


def read_question_rows(path: str) -> list[dict[str, str]]:
    """(video, question[, id]) rows of a CSV file with a header, or of a JSON-lines file
    (.jsonl/.json); relative video paths are taken from the file's folder. Rows are named by the
    physical line they start on; a byte-order mark (Excel's "CSV UTF-8") is skipped."""
    import csv

    if not os.path.isfile(path):
        raise UserError(f"questions file not found: {path}")
    rows: list[dict[str, Any]] = []
    handle = io.StringIO(read_text(path, newline=""), newline="")
    if path.lower().endswith((".jsonl", ".json")):
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{path}: line {number}: not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}: line {number}: expected an object with video and question")
            rows.append({"_where": f"line {number}", **record})
    else:
        reader = csv.reader(handle)
        columns = next(reader, None) or []
        missing = [name for name in QUESTION_COLUMNS if name not in columns]
        if missing:
            raise UserError(f"{path}: no {' or '.join(missing)} column (header: {', '.join(columns) or 'none'}); "
                            "the first line must name the columns video,question[,id]")
        end = reader.line_num
        for cells in reader:
            # The record starts on the line after the previous one ends (a quoted field may span lines).
            number, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) > len(columns):       # a comma inside an unquoted question
                raise UserError(f"{path}: line {number}: {len(cells)} fields where the header names "
                                f"{len(columns)} ({', '.join(columns)}); put a question that contains a "
                                'comma in double quotes: video.avi,"what is it, the small one?"')
            rows.append({"_where": f"line {number}", **dict(zip(columns, cells))})
    folder = os.path.dirname(os.path.abspath(path))
    checked = []
    for record in rows:
        row = {"where": record["_where"], "id": next((str(record[k]) for k in ID_COLUMNS if record.get(k) not in
                                                      (None, "")), ""),
               "video": record.get("video"), "question": record.get("question"), "problem": None}
        for key in QUESTION_COLUMNS:
            if not isinstance(row[key], str) or not row[key].strip():
                row["problem"] = f"no {key}"
        if row["problem"] is None:
            row["video"] = os.path.join(folder, os.path.expanduser(row["video"]))
        checked.append(row)
    if not checked:
        raise UserError(f"{path}: no questions in it")
    return checked


def answer_rows(answerer: Answerer, rows: list[dict], questions: str, out: Optional[str], as_json: bool) -> int:
    """Answer the rows of the file `questions`: each failing row reported on stderr, the answers written
    to `out` (else printed, one line each). Returns the exit status: 1 when a row failed."""
    usable = [row for row in rows if row["problem"] is None]
    results = iter(answerer.answer_many(usable))
    records = []
    for row in rows:
        result = row["problem"] or next(results)
        answer = {"error": result} if isinstance(result, str) else {**result, "error": None}
        records.append({"id": row["id"], "video": row["video"], "question": row["question"], **answer,
                        "where": row["where"]})
    failed = [record for record in records if record["error"]]
    for record in failed:
        ident = f" (id {record['id']})" if record["id"] else ""
        print(f"error: {questions}: {record['where']}{ident}: {record['error']}", file=sys.stderr)
    if out:
        write_records(out, records, answerer.top_k)
        print(f"{len(records) - len(failed)} of {len(records)} questions answered -> {out}", file=sys.stderr)
    else:
        for record in records:
            if as_json:
                print(json.dumps({key: value for key, value in record.items() if key != "where"}))
            elif not record["error"]:
                best = record["answers"][0]
                print(f"{record['id'] or record['where']}\t{record['video']}\t{record['question']}\t"
                      f"{best['answer']}\t{best['probability']:.4f}")
    return 1 if failed else 0


def write_records(path: str, records: list[dict[str, Any]], top_k: int) -> None:
    """JSON lines (.jsonl/.json) or CSV (answer_1, probability_1, ... columns), written atomically."""
    import csv

    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        if path.lower().endswith((".jsonl", ".json")):
            handle.writelines(json.dumps(record) + "\n" for record in records)
            return
        writer = csv.writer(handle, lineterminator="\n")
        ranks = [f"{what}_{rank}" for rank in range(1, top_k + 1) for what in ("answer", "probability")]
        writer.writerow(["id", "video", "question", *ranks, "unknown_words", "warnings", "error"])
        for record in records:
            cells = []
            for answer in (record.get("answers") or [])[:top_k]:
                cells += [answer["answer"], f"{answer['probability']:.6f}"]
            cells += [""] * (2 * top_k - len(cells))
            writer.writerow([record["id"], record["video"], record["question"], *cells,
                             " ".join(record.get("unknown_words") or []), " | ".join(record.get("warnings") or []),
                             record.get("error") or ""])
