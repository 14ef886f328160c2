"""Render a comparison :class:`~dist_robust.analysis.compare.Table` as a terminal table, Markdown, CSV or JSON.

The text formats show percentages with two decimals; CSV and JSON keep the logged fractions (0..1)
so they can be read back exactly. A metric a run did not log is ``n/a`` in text, an empty CSV field
and ``null`` in JSON.
"""

from __future__ import annotations

import csv
import io
import json

from dist_robust.analysis.compare_table import Cell, Row, Table, short_key

MISSING = "n/a"
FORMATS = ("table", "markdown", "csv", "json")


def render(table: Table, fmt: str) -> str:
    """``table`` in one of :data:`FORMATS`."""
    renderers = {"table": to_text, "markdown": to_markdown, "csv": to_csv, "json": to_json}
    if fmt not in renderers:
        raise ValueError(f"--format {fmt!r}: accepted formats: {', '.join(FORMATS)}")
    return renderers[fmt](table)


def cell_text(cell: Cell, row: Row, plus_minus: str = "+-") -> str:
    """``84.10 +- 0.50* (+1.20)``: mean, std, partial-row mark, difference from the baseline."""
    if cell.mean is None:
        return MISSING
    text = f"{100 * cell.mean:.2f}"
    if cell.std is not None:
        text += f" {plus_minus} {100 * cell.std:.2f}"
    if cell.n < row.samples:
        text += "*"
    if cell.delta is not None:
        text += f" ({100 * cell.delta:+.2f})"
    return text


def _label_header(table: Table) -> str:
    return " ".join(short_key(k) for k in table.group_by) if table.group_by else "run"


def _label(row: Row, table: Table | None = None) -> str:
    """The row's label, its split added when the table's rows were evaluated on different splits."""
    label = f"{row.label} (baseline)" if row.is_baseline else row.label
    return f"{label} [{row.split}]" if table is not None and len(table.splits) > 1 else label


def title(table: Table) -> str:
    """One line saying what the table holds."""
    text = f"experiment {table.experiment!r}: {table.run_count} run(s)"
    if table.group_by:
        text += f" in {len(table.rows)} group(s) by {', '.join(short_key(k) for k in table.group_by)}"
    splits = table.splits
    text += f"; {next(iter(splits))} accuracy (%)" if len(splits) == 1 and "?" not in splits else "; accuracy (%)"
    if table.baseline is not None:
        text += f"; differences in points against the baseline {table.baseline.label!r}"
    return text


def notes(table: Table) -> list[str]:
    """Footnotes for the marks that actually appear in the table."""
    cells = [(row, cell) for row in table.rows for cell in row.cells.values()]
    out = []
    if any(cell.std is not None for _, cell in cells):
        out.append("mean +- sample standard deviation over the row's runs (seeds); n: runs in the row "
                   "(reruns of one config and seed counted once)")
    if any(cell.mean is None for _, cell in cells):
        out.append(f"{MISSING}: not logged by the run(s) (failed, still running, or evaluated without it)")
    if any(cell.mean is not None and cell.n < row.samples for row, cell in cells):
        out.append("*: mean over fewer runs than the row has (some did not log this metric)")
    if len(table.splits) > 1:
        out.append("[dev], [test]: the split each row's runs were evaluated on; rows on different splits are not "
                   "comparable (a task without labelled test sets in every language reports dev)")
    if table.parents_left_out:
        out.append(f"{table.parents_left_out} sweep parent run(s) left out; their trials are listed")
    return out


def _text_grid(table: Table, plus_minus: str) -> list[list[str]]:
    grid = [[_label_header(table), "n", *table.headers]]
    for row in table.rows:
        grid.append([_label(row, table), str(row.samples), *(cell_text(row.cells[c], row, plus_minus)
                                                      for c in table.columns)])
    return grid


def paired_note(table: Table) -> str:
    """The paired table's legend, with the smallest Wilcoxon p its number of seeds allows.

    The exact two-sided signed-rank test over n nonzero pairs cannot go below 2 / 2**n: all
    signs alike is the most extreme of the 2**n equally likely sign patterns, on either side.
    """
    n = max((p.n for cells in table.paired.values() for p in cells.values() if p is not None), default=0)
    floor = f"; with {n} seeds it cannot go below {2 / 2 ** n:.4g}" if n > 1 else ""
    return ("paired by seed against the baseline, in points: mean difference [95% t interval] seeds won/paired "
            f"p=Wilcoxon signed-rank (two-sided{floor})")


def _paired_grid(table: Table) -> list[list[str]]:
    from dist_robust.analysis.paired import paired_text

    grid = [[_label_header(table), *table.headers]]
    for label, cells in table.paired.items():
        grid.append([label, *(paired_text(cells[c]) for c in table.columns)])
    return grid


def _aligned(grid: list[list[str]]) -> list[str]:
    widths = [max(len(line[k]) for line in grid) for k in range(len(grid[0]))]
    lines = []
    for i, line in enumerate(grid):
        cells = [line[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def to_text(table: Table) -> str:
    """An aligned plain-ASCII table for the terminal, with its title and footnotes."""
    lines = [title(table), "", *_aligned(_text_grid(table, "+-"))]
    if table.paired:
        lines += ["", paired_note(table), "", *_aligned(_paired_grid(table))]
    return "\n".join(lines + [""] + notes(table)).rstrip() + "\n"


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table, its title above and footnotes below."""
    grid = _text_grid(table, "±")
    esc = [[value.replace("|", "\\|") for value in line] for line in grid]
    lines = [title(table), "", "| " + " | ".join(esc[0]) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(esc[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in esc[1:]]
    if table.paired:
        grid = _paired_grid(table)
        lines += ["", paired_note(table), "", "| " + " | ".join(grid[0]) + " |",
                  "|" + "|".join([":---"] + ["---:"] * (len(grid[0]) - 1)) + "|"]
        lines += ["| " + " | ".join(line) + " |" for line in grid[1:]]
    foot = notes(table)
    return "\n".join(lines + ([""] + [f"- {n.replace('+-', '±')}" for n in foot] if foot else [])) + "\n"


def _csv_fields(table: Table) -> list[tuple[str, str, str]]:
    """(CSV column, metric key, part) in order: each metric, then its std and delta when present."""
    with_std = any(row.samples > 1 for row in table.rows)
    fields = []
    for column, head in zip(table.columns, table.headers):
        fields.append((head, column, "mean"))
        if with_std:
            fields.append((f"{head}_std", column, "std"))
        if table.baseline is not None:
            fields.append((f"{head}_delta", column, "delta"))
    return fields


def to_csv(table: Table) -> str:
    """One line per row: label, n, run ids (``;``-separated), then fractions with 6 decimals."""
    fields = _csv_fields(table)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    extra = ["baseline"] if table.baseline is not None else []
    writer.writerow([_label_header(table), "n", "split", "run_ids", *extra, *(name for name, _, _ in fields)])
    for row in table.rows:
        flags = (["yes" if row.is_baseline else ""] if extra else [])
        values = [getattr(row.cells[column], part) for _, column, part in fields]
        writer.writerow([row.label, row.samples, row.split, ";".join(row.run_ids), *flags,
                         *("" if v is None else f"{v:.6f}" for v in values)])
    return out.getvalue()


def to_dict(table: Table) -> dict:
    """The table as JSON-ready data: fractions, ``None`` for what was not logged."""
    return {
        "experiment": table.experiment,
        "group_by": table.group_by,
        "columns": table.headers,
        "baseline": None if table.baseline is None else table.baseline.label,
        "rows": [{
            "label": row.label,
            "baseline": row.is_baseline,
            "n": row.samples,
            "split": row.split,
            "run_ids": row.run_ids,
            "seeds": row.seeds,
            "values": {head: {"mean": cell.mean, "std": cell.std, "n": cell.n, "delta": cell.delta}
                       for head, cell in zip(table.headers, (row.cells[c] for c in table.columns))},
        } for row in table.rows],
        "paired": {label: {head: None if p is None else vars(p) for head, p in zip(table.headers,
                                                                                   (cells[c] for c in table.columns))}
                   for label, cells in table.paired.items()},
        "notes": notes(table),
    }


def to_json(table: Table) -> str:
    return json.dumps(to_dict(table), indent=2) + "\n"
