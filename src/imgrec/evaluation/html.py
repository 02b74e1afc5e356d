"""The run report as one self-contained HTML page: styles inline, figures embedded as base64 PNGs.

render_report() is a pure function of plain values (metrics, summary, config, results rows) and PNG bytes;
the page needs no server, no script and no network, so it opens from disk and can be mailed as one file.
Imports: the standard library only.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

SECTIONS = (("data", "Data"), ("curves", "Training curves"), ("per-class", "Per-class metrics"),
            ("confusion", "Confusion matrices"), ("mistakes", "Most confident mistakes"), ("samples", "Sample predictions"),
            ("calibration", "Calibration"), ("timings", "Timings"), ("config", "Configuration"))

STYLE = """
:root{--ink:#1f2430;--muted:#5d6677;--line:#e3e6ec;--bg:#f6f7f9;--card:#fff;--accent:#2f5fa7;--good:#1b7f3b;--bad:#c62828}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 color:var(--ink);background:var(--bg)}
header{background:linear-gradient(120deg,#1d3557,#2f5fa7);color:#fff;padding:28px 0 22px}
.wrap{max-width:1120px;margin:0 auto;padding:0 24px}
h1{margin:0;font-size:26px;font-weight:650;letter-spacing:-.01em}
header p{margin:6px 0 0;color:#d7e2f4}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line)}
nav .wrap{display:flex;flex-wrap:wrap;gap:4px 18px;padding-top:10px;padding-bottom:10px}
nav a{color:var(--accent);text-decoration:none;font-size:14px}
nav a:hover{text-decoration:underline}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(128px,1fr));gap:12px;margin:22px 0 6px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .k{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .v{font-size:22px;font-weight:650;margin-top:2px}
.card .h{font-size:12px;color:var(--muted)}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;margin:18px 0;padding:6px 22px 18px}
h2{font-size:19px;margin:16px 0 10px}
p.note{color:var(--muted);margin:4px 0 12px;font-size:14px}
table{border-collapse:collapse;width:100%;font-size:14px;margin:6px 0 10px}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{font-weight:600;color:var(--muted);background:#fafbfc}
tbody tr:nth-child(even){background:#fbfbfd}
tr.avg td{font-weight:600;background:#f1f4f9}
table.kv td{text-align:left;white-space:normal}
table.kv td:first-child{color:var(--muted);width:34%}
.bar{display:inline-block;height:9px;border-radius:5px;background:var(--accent);vertical-align:middle;margin-left:8px}
.low{color:var(--bad);font-weight:600}
figure{margin:10px 0}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:8px;background:#fff}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px}
.settings{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:0 24px;margin:4px 0 8px}
.settings div{display:flex;justify-content:space-between;gap:10px;padding:5px 2px;border-bottom:1px solid var(--line);
 font-size:14px}
.settings span{color:var(--ink);text-align:right;overflow-wrap:anywhere}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;background:#f1f3f6;
 padding:1px 5px;border-radius:4px}
footer{color:var(--muted);font-size:13px;padding:8px 0 30px}
"""


def render_report(report: Mapping[str, Any], images: Mapping[str, bytes | None]) -> str:
    """The page for one evaluated run.

    report: {"title", "metrics" (metrics.json), "summary" (summary.json or None), "config" (dict or None),
    "results" (results.csv rows or None)}; images: PNG bytes by name (results, confusion_matrix,
    confusion_matrix_normalized, mistakes, samples, calibration), None where missing.
    """
    m = report["metrics"]
    body = [_header(report), _nav(), '<main class="wrap">', _cards(m, report.get("summary")),
            _data(m, report.get("summary")), _curves(report.get("results"), images.get("results")), _per_class(m), _confusion(m, images),
            _mistakes(m, images.get("mistakes")), _samples(m, images.get("samples")),
            _calibration(m, images.get("calibration")), _timings(m, report.get("summary"), report.get("results")),
            _config(report.get("config")), _footer(m, report.get("summary")), "</main>"]
    title = _e(f"imgrec report: {report['title']}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _img(png: bytes | None, alt: str, caption: str = "") -> str:
    if not png:
        return f'<p class="note">No {_e(alt)} figure was written for this run.</p>'
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _section(key: str, inner: str) -> str:
    title = dict(SECTIONS)[key]
    return f'<section id="{key}"><h2>{_e(title)}</h2>\n{inner}\n</section>'


def _kv(rows: Sequence[tuple[str, str]], escape: bool = True) -> str:
    cells = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v) if escape else v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{cells}</tbody></table>'


def _header(report: Mapping[str, Any]) -> str:
    m, s = report["metrics"], report.get("summary") or {}
    model = s.get("model") or (report.get("config") or {}).get("model", "")
    what = " · ".join(_e(x) for x in (m.get("data", ""), model, f"{m.get('split', 'test')} split",
                                       f"{m.get('count', 0):,} images") if x)
    return (f'<header><div class="wrap"><h1>imgrec report: {_e(report["title"])}</h1>'
            f"<p>{what}</p></div></header>")


def _nav() -> str:
    links = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title in SECTIONS)
    return f'<nav><div class="wrap">{links}</div></nav>'


def _cards(m: Mapping[str, Any], summary: Mapping[str, Any] | None) -> str:
    cal = m.get("calibration") or {}
    cards = [("accuracy", _pct(m["accuracy"]), f"{m['split']} split, top-1")]
    if "top5_accuracy" in m:
        cards.append(("top-5 accuracy", _pct(m["top5_accuracy"]), "target among the 5 highest scores"))
    balanced = [("macro F1", _num(m["macro_f1"], 3), f"weighted F1 {_num(m['weighted_f1'], 3)}"),
                ("balanced accuracy", _pct(m["balanced_accuracy"]), "mean recall over classes")]
    if m.get("imbalanced"):  # accuracy is mostly the large classes': balanced accuracy and macro F1 lead
        cards = [(k, v, f"{h}; the {m['split']} split is imbalanced") for k, v, h in balanced[::-1]] + cards
    else:
        cards += balanced
    cards += [("ECE", _pct(m["ece"]), f"after temperature scaling {_pct(cal['ece_after'])}"
               if cal.get("ece_after") is not None else "no temperature fitted"),
              ("loss", _num(m["loss"]), "mean cross-entropy")]
    if summary and summary.get("train_seconds") is not None:
        cards.append(("training time", f"{summary['train_seconds']:.1f}s",
                      f"{_epochs(summary.get('epochs'))}, {summary.get('images_per_second', 0):,.0f} img/s"))
    inner = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
                    f'<div class="h">{_e(h)}</div></div>' for k, v, h in cards)
    return f'<div class="cards">{inner}</div>'


def _data(m: Mapping[str, Any], summary: Mapping[str, Any] | None) -> str:
    d = m.get("dataset") or {}
    classes = d.get("classes") or list(m["per_class"])
    sizes = d.get("split_sizes") or {}
    rows = [("data set", str(m.get("data", d.get("name", "")))), ("classes", f"{len(classes)}: {', '.join(classes)}")]
    if d:
        rows += [("images", f"{d['channels']} x {d['image_size'][0]} x {d['image_size'][1]} "
                            f"({'grey' if d['channels'] == 1 else 'colour'})"),
                 ("normalisation", f"mean {_fmt_list(d['mean'])}, std {_fmt_list(d['std'])}")]
    rows += [(f"{name} split", f"{count:,} images") for name, count in sizes.items() if count is not None]
    if summary and summary.get("train_images") is not None:
        rows.append(("trained on", f"{summary['train_images']:,} images"))
    rows.append(("evaluated", f"{m.get('split', 'test')} split, {m['count']:,} images"))
    return _section("data", _kv(rows))


def _epochs(count: int | None) -> str:
    return "? epochs" if count is None else f"{count} epoch" + ("" if count == 1 else "s")


def _fmt_list(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _curves(results: Sequence[Mapping[str, float]] | None, png: bytes | None) -> str:
    if not results:
        return _section("curves", '<p class="note">No results.csv beside these weights: no training curves.</p>')
    head = "<tr><th>epoch</th><th>train loss</th><th>train acc</th><th>val loss</th><th>val acc</th><th>lr</th><th>seconds</th></tr>"
    body = "".join(
        f"<tr><td>{int(r['epoch'])}</td><td>{_num(r.get('train_loss'))}</td><td>{_pct(r.get('train_acc'))}</td>"
        f"<td>{_num(r.get('val_loss'))}</td><td>{_pct(r.get('val_acc'))}</td><td>{r.get('lr', math.nan):.3g}</td>"
        f"<td>{_num(r.get('seconds'), 2)}</td></tr>" for r in results)
    return _section("curves", _img(png, "training curves", "Loss and accuracy per epoch (results.png).")
                    + f"<table><thead>{head}</thead><tbody>{body}</tbody></table>")


def _per_class(m: Mapping[str, Any]) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    rows = []
    for name, r in m["per_class"].items():
        low = ' class="low"' if r["support"] and r["f1"] < m["macro_f1"] - 0.1 else ""
        bar = f'<span class="bar" style="width:{round(60 * r["f1"])}px"></span>'
        rows.append(f"<tr><td>{_e(name)}</td><td>{_num(r['precision'], 3)}</td><td>{_num(r['recall'], 3)}</td>"
                    f"<td{low}>{_num(r['f1'], 3)}{bar}</td><td>{r['support']:,}</td></tr>")
    for kind in ("macro", "weighted"):
        rows.append(f'<tr class="avg"><td>{kind} average</td><td>{_num(m[f"{kind}_precision"], 3)}</td>'
                    f'<td>{_num(m[f"{kind}_recall"], 3)}</td><td>{_num(m[f"{kind}_f1"], 3)}</td><td>{m["count"]:,}</td></tr>')
    note = ('<p class="note">F1 in red: more than 0.1 below the macro average. Macro averages are over the classes '
            "present in the split; weighted averages weigh each class by its support.</p>")
    return _section("per-class", f"{note}<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>")


def _confusion(m: Mapping[str, Any], images: Mapping[str, bytes | None]) -> str:
    classes = list(m["per_class"])
    pairs = sorted(((count, t, p) for t, row in enumerate(m["confusion_matrix"]) for p, count in enumerate(row)
                    if t != p and count), reverse=True)[:5]
    confused = "".join(f"<li><b>{_e(classes[t])}</b> taken for <b>{_e(classes[p])}</b>: {count:,} times</li>"
                       for count, t, p in pairs) or "<li>none: every image was classified correctly</li>"
    figures = (_img(images.get("confusion_matrix"), "confusion matrix", "Counts: rows are true classes, columns predictions.")
               + _img(images.get("confusion_matrix_normalized"), "normalised confusion matrix",
                      "Each row divided by its class count: the diagonal is each class's recall."))
    return _section("confusion", f'<p class="note">Most confused pairs:</p><ul>{confused}</ul><div class="grid2">{figures}</div>')


def _mistakes(m: Mapping[str, Any], png: bytes | None) -> str:
    wrong = m["count"] - round(m["accuracy"] * m["count"])
    note = (f'<p class="note">{wrong:,} of {m["count"]:,} images are misclassified. These are the ones with the highest '
            "loss: the model gave the true class the lowest probability. Each shows the true label, the prediction "
            f"and its probability{_temperature_words(m)}.</p>")
    return _section("mistakes", note + _img(png, "most confident mistakes"))


def _samples(m: Mapping[str, Any], png: bytes | None) -> str:
    note = (f'<p class="note">A random sample of the {m.get("split", "test")} split with the predicted class and its '
            f"probability{_temperature_words(m)}; wrong predictions are framed in red with the true class.</p>")
    return _section("samples", note + _img(png, "sample predictions"))


def _temperature_words(m: Mapping[str, Any]) -> str:
    t = (m.get("calibration") or {}).get("temperature")
    return f" (after temperature scaling, T = {t:.3f})" if t else ""


def _calibration(m: Mapping[str, Any], png: bytes | None) -> str:
    cal = m.get("calibration") or {}
    t = cal.get("temperature")
    rows = [("expected calibration error (ECE)", _pct(m["ece"])), ("bins", f"{len(m.get('reliability', []))} equal-width")]
    if t:
        rows = [("temperature T (fitted on the validation split)", f"{t:.4f}"),
                ("ECE before / after", f"{_pct(cal['ece_before'])} → {_pct(cal['ece_after'])}"),
                ("loss before / after", f"{_num(cal['loss_before'])} → {_num(cal['loss_after'])}")] + rows[1:]
    note = ('<p class="note">A calibrated model is right 80% of the time when it says 80%. ECE is the mean gap '
            "between confidence and accuracy over confidence bins. " + (
                "Temperature scaling divides the logits by T before the softmax: the predictions do not change, "
                "only their probabilities.</p>" if t else "No temperature was fitted for these weights "
                "(training had no validation split).</p>"))
    return _section("calibration", note + _kv(rows) + _img(png, "reliability diagram"))


def _timings(m: Mapping[str, Any], summary: Mapping[str, Any] | None, results: Sequence[Mapping[str, float]] | None) -> str:
    rows = []
    if summary:
        rows += [("training", f"{summary['train_seconds']:.1f}s over {_epochs(summary['epochs'])} "
                              f"({summary['images_per_second']:,.0f} images/s)")]
        if results:
            per_epoch = [r["seconds"] for r in results if not math.isnan(r.get("seconds", math.nan))]
            if per_epoch:
                rows.append(("per epoch", f"{min(per_epoch):.2f}s fastest, {sum(per_epoch) / len(per_epoch):.2f}s mean"))
        if summary.get("total_seconds") is not None:
            rows.append(("whole run", f"{summary['total_seconds']:.1f}s (data loading, training, testing)"))
    timing = m.get("timing") or {}
    if timing:
        rows.append((f"evaluation ({m.get('split', 'test')} split)",
                     f"{timing['seconds']:.2f}s ({timing['images_per_second']:,.0f} images/s on {timing['device']})"))
    return _section("timings", _kv(rows) if rows else '<p class="note">No timings recorded.</p>')


def _config(config: Mapping[str, Any] | None) -> str:
    if not config:
        return _section("config", '<p class="note">No configuration recorded with these weights.</p>')
    items = "".join(f"<div><code>{_e(k)}</code><span>{_e(v)}</span></div>" for k, v in config.items())
    return _section("config", f'<p class="note">Rerun with <code>imgrec train --config config.yaml</code>.</p>'
                              f'<div class="settings">{items}</div>')


def _footer(m: Mapping[str, Any], summary: Mapping[str, Any] | None) -> str:
    versions = (summary or {}).get("versions") or {}
    stamp = ", ".join(f"{k} {v}" for k, v in versions.items())
    commit = (summary or {}).get("git_commit")
    parts = [f"weights: {m.get('weights', '')}", stamp, f"commit {commit[:12]}" if commit else ""]
    return f"<footer>{_e(' · '.join(p for p in parts if p))}</footer>"
