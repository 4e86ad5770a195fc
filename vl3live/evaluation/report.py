"""Results: appended one line per scored probe (so a killed run resumes), and summarized.

Accuracy is per task, then per category as the mean of its tasks (as OVO-Bench's scorer averages),
and overall as the mean of the categories. Proactive items report the share answered within the
window with the expected output (recall), the share with a false alarm, the answers' precision, the
false alarms per minute and the delay distribution (:func:`proactive_figures`). Unparsable answers count
as wrong and are counted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

CATEGORIES = ("realtime", "backward", "forward", "proactive")


class Results:
    """The results file of one run: read what is there, append what is scored."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if self.path.exists():
            lines = [x for x in self.path.read_text().splitlines() if x.strip()]
            for line in lines:
                try:
                    self.rows.append(json.loads(line))
                except ValueError:  # a line cut short when a run was killed: scored again
                    continue
            if len(self.rows) != len(lines):  # drop it, so the next line is appended whole
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.done = {r["key"] for r in self.rows}

    def add(self, row: dict) -> None:
        if row["key"] in self.done:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.done.add(row["key"])


def proactive_figures(rows: list[dict]) -> dict:
    """What :func:`~.formats.score_proactive` rows add up to: ``false_alarms`` (% of items with one),
    ``precision`` (% of the answers that were recalls), ``false_alarms_per_min`` (over the time watched
    with an instruction standing) and the recalled answers' delay after the event (p50, p90, max)."""
    recalls = sum(bool(r["correct"]) for r in rows)
    alarms = sum(int(r.get("false_alarms", r.get("false_alarm", 0))) for r in rows)
    minutes = sum(float(r.get("watched_s", 0.0)) for r in rows) / 60
    delays = sorted(r["delay"] for r in rows if r.get("delay") is not None)
    return {"false_alarms": round(100 * np.mean([bool(r["false_alarm"]) for r in rows]), 2),
            "precision": round(100 * recalls / (recalls + alarms), 2) if recalls + alarms else None,
            "false_alarms_per_min": round(alarms / minutes, 2) if minutes else None,
            "delay_s": {"p50": round(float(np.percentile(delays, 50)), 2), "p90": round(float(np.percentile(delays, 90)), 2),
                        "max": delays[-1]} if delays else None}


def summarize(rows: list[dict]) -> dict:
    """Accuracy per task and category, unparsable answers, latency and tokens kept, proactive timing."""
    by_task: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_task[(r["category"], r["task"])].append(r)
    tasks = {}
    for (category, task), rs in sorted(by_task.items()):
        t = {"category": category, "items": len(rs), "accuracy": round(100 * np.mean([r["correct"] for r in rs]), 2)}
        if category == "proactive":
            t.update(proactive_figures(rs))
        else:
            t["unparsable"] = sum(bool(r.get("unparsable")) for r in rs)
        ttft = [r["ttft_ms"] for r in rs if r.get("ttft_ms") is not None]
        t["ttft_ms_p50"] = round(float(np.percentile(ttft, 50)), 2) if ttft else None
        kept = [r["tokens_kept"] for r in rs if r.get("tokens_kept") is not None]
        t["tokens_kept_mean"] = round(float(np.mean(kept)), 1) if kept else None
        tasks[task] = t
    categories = {}
    for c in CATEGORIES:
        accs = [t["accuracy"] for t in tasks.values() if t["category"] == c]
        if accs:
            categories[c] = round(float(np.mean(accs)), 2)
    return {"items": len(rows), "tasks": tasks, "categories": categories,
            "overall": round(float(np.mean(list(categories.values()))), 2) if categories else None,
            "unparsable": sum(bool(r.get("unparsable")) for r in rows)}


def markdown(summary: dict, protocol: str) -> str:
    """The summary as a markdown table, a row per task and one per category."""
    lines = [f"| {protocol} | category | items | accuracy % | unparsable | false alarms % | TTFT p50 ms | tokens kept |",
             "|---|---|---|---|---|---|---|---|"]
    for task, t in summary["tasks"].items():
        lines.append(f"| {task} | {t['category']} | {t['items']} | {t['accuracy']:.1f} | {t.get('unparsable', '-')} | "
                     f"{t.get('false_alarms', '-')} | {t['ttft_ms_p50'] if t['ttft_ms_p50'] is not None else '-'} | "
                     f"{t['tokens_kept_mean'] if t['tokens_kept_mean'] is not None else '-'} |")
    for c, acc in summary["categories"].items():
        lines.append(f"| **{c}** | | | **{acc:.1f}** | | | | |")
    if summary["overall"] is not None:
        lines.append(f"| **overall** | | {summary['items']} | **{summary['overall']:.1f}** | {summary['unparsable']} | | | |")
    return "\n".join(lines)
