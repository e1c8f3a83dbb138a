"""The GPU check's report (`scripts/gpu-check.sh`, `qdora.eval.gpu.check report`): `status.jsonl`
(one line per part the script ran), `parts/*.json` and pytest's JUnit file gathered into
`report.json` and `report.md`."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from qdora.core.safetensors_io import write_text_atomic
from qdora.eval.bench import kernels as bench_kernels
from qdora.eval.bench import layer as bench_layer
from qdora.eval.bench import loss as bench_loss

PARTS = ("env", "tests", "bench-kernels", "bench-layer", "loss", "step", "long")


def format_step(res: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    lines = [f"**{res['model']}, batch {res['batch_size']} × {res['seq_len']}, r={res['r']}, dropout "
             f"{res['dropout']}, on {res['device']}** (plan tolerance ±{res['tolerance']:.0%})", "",
             "| method | predicted MiB (tensors) | measured MiB (peak allocated) | error | peak phase | "
             "step (s) | tokens/s |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {mib(r['predicted_tensor_bytes'])} | {mib(r['measured_bytes'])} | "
                     f"{r['error']:+.1%} | {r['predicted_phase']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} |")
    if "reserved_bytes" in res["rows"][0]:
        lines += ["", "| method | predicted + slack MiB | reserved MiB | error | device used MiB (context incl.) | "
                  "predicted total MiB |", "|---|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            slack = r["predicted_terms"].get("allocator_slack", 0)
            lines.append(f"| {r['method']} | {mib(r['predicted_tensor_bytes'] + slack)} | {mib(r['reserved_bytes'])} "
                         f"| {r['reserved_error']:+.1%} | {mib(r['device_used_bytes'])} | "
                         f"{mib(r['predicted_total_bytes'])} |")
    lines += ["", f"- ours qdora / ours qlora, step time: **{res['qdora_over_qlora_time']:.3f}** (target ≤ 1.10)",
              f"- ours qdora / ours qlora, peak memory: **{res['qdora_over_qlora_peak']:.3f}** (target ≤ 1.02)"]
    return "\n".join(lines)


def format_long(res: dict) -> str:
    lines = [f"**{res['model']}, QDoRA r={res['r']}, batch 1, one training step, on {res['device']}** (limit: "
             f"{res['limit']}, {res['capacity_bytes'] / 2**30:.2f} GiB)", "",
             "| variant | longest measured (tokens) | first that did not fit | planned longest | tries |",
             "|---|---:|---:|---:|---|"]
    for r in res["rows"]:
        tries = ", ".join(f"{t['tokens']:,}{'' if t['ok'] else ' ✗'}" for t in r["tries"])
        failed = "-" if r["first_failed_tokens"] is None else f"{r['first_failed_tokens']:,}"
        lines.append(f"| {r['variant']} | {r['longest_tokens']:,} | {failed} | {r['predicted_longest_tokens']:,} | "
                     f"{tries} |")
    return "\n".join(lines)


def _junit(path: Path) -> dict | None:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        tags = {child.tag for child in case}
        skip = case.find("skipped")
        if "failure" in tags or "error" in tags:
            counts["failed"] += 1
            failures.append(name)
        elif skip is not None:
            counts["xfailed" if (skip.get("type") or "").endswith("xfail") else "skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def build_report(out: Path) -> dict:
    status_file = out / "status.jsonl"
    status = [json.loads(line) for line in status_file.read_text().splitlines() if line.strip()] \
        if status_file.is_file() else []
    meta_file = out / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    parts = []
    for s in status:
        figures = None
        f = out / "parts" / f"{s['part']}.json"
        if s["part"] == "tests":
            figures = _junit(out / "parts" / "tests.xml")
        elif f.is_file():
            figures = json.loads(f.read_text())
        parts.append({**s, "ok": s["rc"] == 0, "figures": figures})
    failed = [p for p in parts if not p["ok"]]
    expected = meta.get("parts", list(PARTS))
    ran = [p["part"] for p in parts]
    not_run = [p for p in expected if p not in ran]
    if failed:
        verdict = f"failed: {failed[0]['part']} (log: {failed[0]['log']})"
    elif not_run:
        verdict = f"incomplete: not run: {', '.join(not_run)}"
    else:
        verdict = "passed"
    return {**meta, "verdict": verdict, "parts": parts, "not_run": not_run,
            "seconds": round(sum(p["seconds"] for p in parts), 1)}


def format_report(rep: dict) -> str:
    lines = ["# GPU check", "",
             f"**{rep['verdict']}** — mode {rep.get('mode', '?')}, device {rep.get('device', '?')}, "
             f"{rep['seconds']:.0f} s of parts, started {rep.get('started', '?')}", "",
             "| part | result | seconds | budget (s) | log |", "|---|---|---:|---:|---|"]
    for p in rep["parts"]:
        result = "ok" if p["ok"] else ("timed out" if p["rc"] in (124, 137) else f"failed (rc {p['rc']})")
        lines.append(f"| {p['part']} | {result} | {p['seconds']:.1f} | {p['budget_s']} | {p['log']} |")
    for name in rep["not_run"]:
        lines.append(f"| {name} | not run | | | |")
    for p in rep["parts"]:
        fig = p["figures"]
        if not fig:
            continue
        lines += ["", f"## {p['part']}", ""]
        if p["part"] == "env":
            lines += [f"- {k}: {v}" for k, v in fig.items()]
        elif p["part"] == "tests":
            lines.append(", ".join(f"{fig[k]} {k}" for k in ("passed", "failed", "skipped", "xfailed")))
            lines += [f"- failed: `{f}`" for f in fig["failures"]]
        elif p["part"] == "bench-kernels":
            lines += [bench_kernels.format_markdown(res, res["copy_gbps"]) for res in fig]
        elif p["part"] == "bench-layer":
            lines.append(bench_layer.format_markdown(fig))
        elif p["part"] == "loss" and fig:
            lines.append(bench_loss.format_markdown(fig))
        elif p["part"] == "step":
            lines.append(format_step(fig))
        elif p["part"] == "long":
            lines.append(format_long(fig))
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> dict:
    rep = build_report(out)
    write_text_atomic(out / "report.json", json.dumps(rep, indent=1) + "\n")
    write_text_atomic(out / "report.md", format_report(rep))
    return rep
