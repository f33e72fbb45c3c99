"""compare.html: one self-contained page (inline CSS and JS, no network) showing A and B side by side.

    html = render_html(meta, rows, summary)   # rows/summary as sft.evaluate.compare writes them

Top: the verdict, win/loss/tie counts per kind with the sign test, metric deltas, the judge's tally. Then one
card per prompt: the prompt, the reference, A's and B's answers in two columns with the words that differ
highlighted, each side's check result. Filters: kind, and outcome (B wins / A wins / ties); the page opens
with the filters of its URL fragment, e.g. compare.html#outcome=A&kind=identity.
"""
from __future__ import annotations

import difflib
import html
import re

CSS = """
*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,"Noto Sans CJK SC",
"PingFang SC","Microsoft YaHei","WenQuanYi Micro Hei",sans-serif;margin:0;
background:#f4f5f7;color:#1d2330}header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{font-size:20px;margin:0 0 6px}header .sides{display:flex;gap:28px;flex-wrap:wrap;font-size:13px;opacity:.9}
header code{background:#2e3648;padding:1px 5px;border-radius:4px}
main{max-width:1400px;margin:0 auto;padding:18px 28px}
.verdict{font-size:17px;font-weight:600;margin:4px 0 14px}
.tables{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;background:#fff;border-radius:8px;overflow:hidden;box-shadow:0 1px 2px #0002}
th,td{padding:5px 12px;text-align:right;border-bottom:1px solid #e6e8ec;font-size:13px}
th:first-child,td:first-child{text-align:left}th{background:#eef0f4}
.pos{color:#0a7a3b;font-weight:600}.neg{color:#b3261e;font-weight:600}
.filters{position:sticky;top:0;z-index:2;background:#f4f5f7;padding:12px 0;display:flex;gap:10px;flex-wrap:wrap;
align-items:center;border-bottom:1px solid #dde0e6;margin:18px 0 12px}
.filters button{border:1px solid #c5cad3;background:#fff;border-radius:16px;padding:4px 12px;cursor:pointer;font-size:13px}
.filters button.on{background:#1d2330;color:#fff;border-color:#1d2330}
.filters select{padding:4px 8px;border-radius:6px;border:1px solid #c5cad3;font-size:13px}
.count{font-size:13px;color:#5b6475;margin-left:auto}
.card{background:#fff;border-radius:10px;box-shadow:0 1px 3px #0002;margin:0 0 16px;padding:14px 16px;
border-left:5px solid #c5cad3}
.card.B{border-left-color:#0a7a3b}.card.A{border-left-color:#b3261e}
.meta{font-size:12px;color:#5b6475;display:flex;gap:10px;align-items:center;margin-bottom:6px}
.badge{font-weight:700;border-radius:10px;padding:1px 9px;font-size:12px;background:#e6e8ec;color:#1d2330}
.badge.B{background:#d7f0e1;color:#0a5e2e}.badge.A{background:#f8dcda;color:#8c1d16}
.prompt{white-space:pre-wrap;overflow-wrap:anywhere;font-weight:600;margin:2px 0 6px}
.ref{white-space:pre-wrap;overflow-wrap:anywhere;font-size:13px;color:#5b6475;margin-bottom:10px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:14px}
.col{border:1px solid #e6e8ec;border-radius:8px;padding:8px 10px;min-width:0;background:#fbfbfc}
.col h3{margin:0 0 6px;font-size:13px;display:flex;justify-content:space-between;gap:8px}
.answer{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,SFMono-Regular,Menlo,monospace,
"Noto Sans Mono CJK SC","WenQuanYi Micro Hei Mono";
font-size:13px;max-height:320px;overflow:auto}
.answer .d{background:#fbe3e1}.answer .i{background:#dcf3e5}
.check{font-size:12px;margin-top:6px;color:#5b6475}.check.pass{color:#0a7a3b}.check.fail{color:#b3261e}
.judge{font-size:12px;color:#5b6475;margin-top:8px}
@media (max-width:800px){.cols{grid-template-columns:1fr}}
"""

JS = """
(function(){
  var outcome='all', kind='all';
  function apply(){
    var shown=0;
    document.querySelectorAll('.card').forEach(function(c){
      var ok=(outcome==='all'||c.dataset.outcome===outcome)&&(kind==='all'||c.dataset.kind===kind);
      c.style.display=ok?'':'none'; if(ok) shown++;
    });
    document.getElementById('count').textContent=shown+' of '+document.querySelectorAll('.card').length+' prompts';
  }
  document.querySelectorAll('.filters button').forEach(function(b){
    b.addEventListener('click',function(){
      document.querySelectorAll('.filters button').forEach(function(x){x.classList.remove('on');});
      b.classList.add('on'); outcome=b.dataset.outcome; apply();
    });
  });
  document.getElementById('kind').addEventListener('change',function(e){kind=e.target.value; apply();});
  // compare.html#outcome=B&kind=identity opens with those filters (links, screenshots)
  location.hash.replace(/^#/,'').split('&').forEach(function(pair){
    var kv=pair.split('='); if(kv[0]==='kind'){kind=decodeURIComponent(kv[1]); document.getElementById('kind').value=kind;}
    if(kv[0]==='outcome'){outcome=kv[1]; document.querySelectorAll('.filters button').forEach(function(x){
      x.classList.toggle('on', x.dataset.outcome===outcome);});}
  });
  apply();
})();
"""

OUTCOME_TEXT = {"B": "B wins", "A": "A wins", "tie": "tie", "unscored": "unscored"}


def _e(text) -> str:
    return html.escape("" if text is None else str(text))


def highlight_diff(a: str, b: str) -> tuple[str, str]:
    """Both texts as HTML, the words only in A wrapped in <span class="d">, those only in B in <span class="i">."""
    # a word keeps its trailing whitespace: a run of changed words is one highlighted stretch
    words_a, words_b = re.findall(r"\S+\s*|\s+", a), re.findall(r"\S+\s*|\s+", b)
    out_a, out_b = [], []
    matcher = difflib.SequenceMatcher(None, words_a, words_b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        part_a, part_b = _e("".join(words_a[i1:i2])), _e("".join(words_b[j1:j2]))
        if op == "equal":
            out_a.append(part_a)
            out_b.append(part_b)
            continue
        if part_a:
            out_a.append(f'<span class="d">{part_a}</span>')
        if part_b:
            out_b.append(f'<span class="i">{part_b}</span>')
    return "".join(out_a), "".join(out_b)


def _signed(value: float) -> str:
    css = "pos" if value > 0 else "neg" if value < 0 else ""
    return f'<span class="{css}">{value:+.4g}</span>'


def _summary_tables(summary: dict) -> str:
    rows = "".join(f"<tr><td>{_e(kind)}</td><td>{c['b_wins']}</td><td>{c['a_wins']}</td><td>{c['ties']}</td>"
                   f"<td>{c['p_value']:.3g}</td></tr>"
                   for kind, c in [("all", summary), *summary["per_kind"].items()])
    counts = ("<table><tr><th>kind</th><th>B wins</th><th>A wins</th><th>ties</th><th>sign test p</th></tr>"
              f"{rows}</table>")
    metrics = "".join(f"<tr><td>{_e(key)}</td><td>{summary['metrics']['a'][key]:.4g}</td>"
                      f"<td>{summary['metrics']['b'][key]:.4g}</td><td>{_signed(delta)}</td></tr>"
                      for key, delta in summary["deltas"].items())
    deltas = f"<table><tr><th>metric</th><th>A</th><th>B</th><th>Δ B − A</th></tr>{metrics}</table>"
    extra = ""
    if "judge" in summary:
        j = summary["judge"]
        extra = (f"<table><tr><th>judge ({_e(summary.get('judge_model'))}, both orders)</th><th></th></tr>"
                 f"<tr><td>B wins</td><td>{j['b_wins']}</td></tr><tr><td>A wins</td><td>{j['a_wins']}</td></tr>"
                 f"<tr><td>ties / position-biased</td><td>{j['ties']}</td></tr>"
                 f"<tr><td>unreadable</td><td>{j['invalid']}</td></tr>"
                 f"<tr><td>sign test p</td><td>{j['p_value']:.3g}</td></tr></table>")
    return f'<div class="tables">{counts}{deltas}{extra}</div>'


def _check_line(side: dict) -> str:
    if "pass" not in side:
        return ""
    if side["pass"]:
        return '<div class="check pass">✓ check passed</div>'
    return f'<div class="check fail">✗ {_e("; ".join(side.get("reasons", [])))}</div>'


def _card(row: dict) -> str:
    a_html, b_html = highlight_diff(row["a"]["answer"], row["b"]["answer"])
    judge = ""
    if "judge" in row:
        judge = (f'<div class="judge">judge: <b>{_e(row["judge"]["verdict"])}</b> (replies: '
                 f'{_e(" | ".join(row["judge"]["replies"]))})</div>')
    reference = f'<div class="ref">reference: {_e(row["reference"])}</div>' if row.get("reference") else ""
    columns = "".join(
        f'<div class="col"><h3><span>{label}</span><span>{side["num_tokens"]} tokens'
        f'{"" if side["stopped"] else " (cut)"}</span></h3><div class="answer">{text or "<i>(empty)</i>"}</div>'
        f"{_check_line(side)}</div>"
        for label, side, text in (("A", row["a"], a_html), ("B", row["b"], b_html)))
    outcome = row["outcome"]
    return (f'<section class="card {outcome}" data-outcome="{_e(outcome)}" data-kind="{_e(row["kind"])}">'
            f'<div class="meta"><span class="badge {outcome}">{OUTCOME_TEXT[outcome]}</span>'
            f'<span>{_e(row["id"])}</span><span>{_e(row["kind"])}</span></div>'
            f'<div class="prompt">{_e(row["prompt"])}</div>{reference}<div class="cols">{columns}</div>{judge}</section>')


def render_html(meta: dict, rows: list[dict], summary: dict) -> str:
    """The whole page; `meta` = {"a": Side fields, "b": ..., "prompts", "verdict", "decoding"}."""
    kinds = "".join(f'<option value="{_e(k)}">{_e(k)}</option>' for k in summary["per_kind"])
    buttons = "".join(f'<button data-outcome="{value}"{" class=on" if value == "all" else ""}>{label}</button>'
                      for value, label in (("all", "all"), ("B", f"B wins ({summary['b_wins']})"),
                                           ("A", f"A wins ({summary['a_wins']})"), ("tie", f"ties ({summary['ties']})")))
    boot = summary.get("bootstrap")
    boot_line = (f"<p>Mean score difference B − A: {_signed(boot['mean'])} (95% bootstrap interval "
                 f"[{boot['ci95'][0]:+.3f}, {boot['ci95'][1]:+.3f}])</p>") if boot else ""
    sides = "".join(f"<div><b>{label}</b> <code>{_e(meta[key]['spec'])}</code> → <code>{_e(meta[key]['path'])}</code> "
                    f"{_e(meta[key]['note'])}</div>" for label, key in (("A", "a"), ("B", "b")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>A/B: {_e(meta['a']['spec'])} vs {_e(meta['b']['spec'])}</title><style>{CSS}</style></head>
<body><header><h1>A/B comparison</h1><div class="sides">{sides}</div>
<div class="sides"><div>prompts <code>{_e(meta['prompts'])}</code> · {_e(meta['decoding'])}</div></div></header>
<main><p class="verdict">{_e(meta['verdict'])}</p>{boot_line}{_summary_tables(summary)}
<div class="filters"><b>Show</b>{buttons}<select id="kind"><option value="all">every kind</option>{kinds}</select>
<span class="count" id="count"></span></div>
{''.join(_card(row) for row in rows)}
</main><script>{JS}</script></body></html>
"""
