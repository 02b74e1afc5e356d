"""The problems `imgrec doctor` names in its findings, each with a suggested fix, and the report as text.

find_problems() reads the findings of doctor.diagnose() (plain values) and lists the problems: files that do
not decode (by kind), duplicates across splits (leakage), duplicates across classes (conflicting labels),
redundant copies within a split, class imbalance, classes without training images, and EXIF-rotated files.
format_report() prints the whole report for people. Imports: the standard library and imgrec.errors.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from imgrec.errors import printable

LISTED = 10  # files (or groups) the text report names per problem; --json lists them all

UNREADABLE = {  # kind -> (what such a file is, suggested fix)
    "zero-byte": ("empty (0 bytes), usually from an interrupted copy or download",
                  "copy them again from the source, or delete them"),
    "not-regular": ("not regular files (named pipes, devices, sockets, links to nothing or looping links)",
                    "replace them with the image files they stand for, or remove them"),
    "not-an-image": ("not an image despite the extension (text, HTML, another format)",
                     "delete them, or move them out of the class folders"),
    "truncated": ("truncated: the file ends before the image does",
                  "copy or download them again; imgrec never decodes a truncated file"),
    "too-large": ("beyond the decompression-bomb limit (or its header claims to be)",
                  "shrink real photos (e.g. to at most 4096 px a side); delete files that only claim to be huge"),
    "corrupt": ("damaged", "re-export them from the original, or delete them"),
}
SKIPPED_NOTE = "; meanwhile `imgrec train` skips them with one warning (`--strict` refuses to start)"


def find_problems(report: dict[str, Any], imbalance_ratio: float) -> list[dict[str, Any]]:
    """Every problem in the findings: kind, severity (error: breaks or skews training; warning: worth fixing),
    message, suggested fix and the files concerned."""
    problems = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for entry in report["unreadable"]:
        by_kind.setdefault(entry["kind"], []).append(entry)
    for kind, entries in by_kind.items():
        what, fix = UNREADABLE[kind]
        problems.append(_problem(f"unreadable-{kind}", "error", f"{_n(len(entries), 'file')} {'is' if len(entries) == 1 else 'are'} {what}", fix + SKIPPED_NOTE,
                                 [f"{e['file']} [{e['split']}]: {e['reason']}" for e in entries]))
    problems += _duplicate_problems(report["duplicates"])
    problems += _balance_problems(report["counts"], imbalance_ratio)
    if report["exif_rotated"]:
        problems.append(_problem(
            "exif-rotated", "warning",
            f"{_n(len(report['exif_rotated']), 'image')} stored turned or mirrored with an EXIF orientation tag: "
            f"imgrec trains on them upright, but tools that ignore EXIF see them turned",
            "re-save them upright (e.g. PIL.ImageOps.exif_transpose, then save) so that every tool sees the same image",
            [f"{e['file']} [{e['split']}]: orientation {e['orientation']}" for e in report["exif_rotated"]]))
    return problems


def _n(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _problem(kind: str, severity: str, message: str, fix: str, files: list[str]) -> dict[str, Any]:
    return {"kind": kind, "severity": severity, "message": message, "fix": fix, "files": files}


def _describe(group: dict[str, Any]) -> str:
    mark = " = " if group["kind"] == "exact" else " ~ "
    return mark.join(f"{f} [{s}, {c}]" for f, s, c in zip(group["files"], group["splits"], group["classes"]))


def _duplicate_problems(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    problems = []
    leaks = [g for g in groups if len(set(g["splits"])) > 1]
    conflicts = [g for g in groups if len(set(g["classes"])) > 1]
    redundant = [g for g in groups if len(set(g["splits"])) == 1 and len(set(g["classes"])) == 1]
    for kind in ("exact", "near"):
        found = [g for g in leaks if g["kind"] == kind]
        if found:
            pairs = Counter("/".join(sorted(set(g["splits"]), key=("train", "val", "test").index)) for g in found)
            spread = ", ".join(f"{n} across {splits}" for splits, n in pairs.most_common())
            problems.append(_problem(
                f"leakage-{kind}", "error",
                f"{_n(len(found), kind + '-duplicate group')} across splits ({spread}): the "
                f"model is tested on images it trained on, so validation and test accuracy come out too high",
                "keep one copy of each group (in train) and delete the others, or move all copies into one split",
                [_describe(g) for g in found]))
    if conflicts:
        problems.append(_problem(
            "label-conflict", "error",
            f"{_n(len(conflicts), 'group')} of the same image with different classes: at most one label can be right",
            "decide the right class for each image and delete the copies in the other class folders",
            [_describe(g) for g in conflicts]))
    if redundant:
        problems.append(_problem(
            "duplicates", "warning",
            f"{_n(len(redundant), 'group')} of duplicate images within one split and class "
            f"({_n(sum(len(g['files']) - 1 for g in redundant), 'extra copy', 'extra copies')}): each counts several times",
            "delete the extra copies", [_describe(g) for g in redundant]))
    return problems


def _balance_problems(counts: dict[str, dict[str, int]], ratio: float) -> list[dict[str, Any]]:
    train = counts.get("train", {})
    empty = [c for c, n in train.items() if n == 0]
    if empty:
        return [_problem("empty-class", "error", f"{_n(len(empty), 'class', 'classes')} without readable training images",
                         "add images to those class folders, or remove the folders", empty)]
    if not train:
        return []
    largest, smallest = max(train, key=train.__getitem__), min(train, key=train.__getitem__)
    if train[largest] < ratio * train[smallest]:
        return []
    return [_problem(
        "imbalance", "warning",
        f"classes are imbalanced: {largest} has {train[largest]} training images, {smallest} only {train[smallest]} "
        f"({train[largest] / train[smallest]:.1f}x); accuracy then flatters the model on the large classes",
        "collect more images of the small classes (or drop some of the large ones); or train with --balance weights "
        "(class weights in the loss) or --balance sampler (each epoch draws the classes equally); judge the model by "
        "the per-class recall and balanced accuracy in metrics.json",
        [f"{c}: {n}" for c, n in sorted(train.items(), key=lambda kv: kv[1])])]


def format_report(report: dict[str, Any]) -> str:
    """The report as text for people: a summary, the counts table, and each problem with its fix."""
    kind = "image folder " + report["root"] if report["kind"] == "folder" else "named data set"
    readable = report["images"] - len(report["unreadable"])
    lines = [f"{report['data']}: {kind}, {len(report['classes'])} classes, {report['images']} images"
             f"{f' ({readable} readable)' if readable != report['images'] else ''}", ""]
    lines += _counts_table(report["counts"], report["classes"])
    lines.append("")
    for title in ("sizes", "modes", "formats"):
        values = report[title]
        if values:
            shown = ", ".join(f"{k} ({v})" for k, v in list(values.items())[:6])
            lines.append(f"{title}: {shown}{', ...' if len(values) > 6 else ''}")
    lines += [f"note: {note}" for note in report["notes"]]
    if report["ignored"]:
        lines.append(f"note: {len(report['ignored'])} files are not images by their extension and are ignored "
                     f"(e.g. {printable(report['ignored'][0])})")
    lines.append("")
    if not report["problems"]:
        lines.append("no problems found")
        return "\n".join(lines)
    lines.append(f"{_n(len(report['problems']), 'problem')}:")
    for p in report["problems"]:
        lines += ["", f"{p['severity']}: {p['message']}", f"  fix: {p['fix']}"]
        lines += [f"  {printable(f)}" for f in p["files"][:LISTED]]  # a newline in a name must not split a row
        if len(p["files"]) > LISTED:
            lines.append(f"  ... and {len(p['files']) - LISTED} more (--json lists them all)")
    return "\n".join(lines)


def _counts_table(counts: dict[str, dict[str, int]], classes: list[str]) -> list[str]:
    splits = list(counts)
    width = max([len(c) for c in classes] + [5])
    rows = [f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in splits) + f"  {'total':>7}"]
    for c in classes:
        values = [counts[s][c] for s in splits]
        rows.append(f"{c:<{width}}  " + "  ".join(f"{v:>7}" for v in values) + f"  {sum(values):>7}")
    totals = [sum(counts[s].values()) for s in splits]
    rows.append(f"{'total':<{width}}  " + "  ".join(f"{v:>7}" for v in totals) + f"  {sum(totals):>7}")
    return rows
