"""Regenerate the README's "Numbers" section from the benchmark outputs in docs/bench/.

    python -m es_merging.readme_numbers            # rewrites README.md between the markers

Every figure in that section comes from a JSON/Markdown file that an `es-merging ...` command
wrote; nothing is typed by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- numbers:begin -->", "<!-- numbers:end -->"


def _load(name: str) -> dict:
    return json.loads((REPO / "docs" / "bench" / name).read_text())


def _zoo(z: dict) -> str:
    q, t = z["quality"], z["timings_s"]
    rows = ["| model | molecule slot | protein slot | cell slot | answer (raw inputs) | answer follows own slots (raw) "
            "| answer (true descriptors) |",
            "|---|---|---|---|---|---|---|"]

    def follows(r: dict) -> str:  # zoos built before the measure have no figure
        return f"{r['answer_follows_slots']:.3f}" if "answer_follows_slots" in r else "n/a"

    for name in ("base", "molecule", "protein", "cell"):
        raw, text = q[name]["raw"], q[name]["text"]
        s = raw["slot_accuracy"]
        rows.append(f"| {name} | {s['molecule']:.3f} | {s['protein']:.3f} | {s['cell']:.3f} | "
                    f"{raw['answer_accuracy']:.3f} | {follows(raw)} | {text['answer_accuracy']:.3f} |")
    c = q["chance"]["slot_accuracy"]
    rows.append(f"| chance | {c['molecule']:.3f} | {c['protein']:.3f} | {c['cell']:.3f} | 0.500 | 0.500 | 0.500 |")
    gates = ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in z["gates"].items() if k != "all_pass")
    return (f"`es-merging zoo build --preset tiny --seed {z['seed']}` (held-out entities, n = {q['base']['raw']['n']}):\n\n"
            + "\n".join(rows)
            + f"\n\nGates: {gates}.\n\nBuild time {t['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in t.items() if k != 'total')}) "
              f"with {z.get('threads', '?')} torch thread(s) on a shared 2-core machine{_layout(z)}.\n")


def _layout(z: dict) -> str:
    """How the build used the cores (older zoo.json files do not say)."""
    training = z.get("training", {})
    ranks = training.get("base", {}).get("ranks")
    experts = training.get("expert_processes")
    parts = ([f"base data-parallel over {ranks} process(es)"] if ranks else []) + \
            ([f"experts in {experts} process(es)"] if experts else [])
    return f" ({'; '.join(parts)})" if parts else ""


def _merge_scale(m: dict) -> str:
    return (f"`es-merging bench merge-scale --mergekit-bin .../mergekit-yaml --json out.json`: three dense experts of "
            f"{m['checkpoint_gb']} GB each (float32, Llama-shaped, {m['shapes']['layers']} layers), TIES density {m['density']}:\n\n"
            "| | es-merging | mergekit 0.1.5 |\n|---|---|---|\n"
            f"| wall time | {m['wall_s']:.0f} s | {m['mergekit_wall_s']:.0f} s |\n"
            f"| peak RSS | {m['peak_rss_mb']:.0f} MB | {m['mergekit_peak_rss_mb']:.0f} MB |\n"
            f"| read throughput | {m['gb_read_per_s']} GB/s | |\n\n"
            f"Doubling the layers: peak {m['peak_rss_doubled_mb']:.0f} MB (ratio {m['peak_ratio_doubled']}); "
            f"time ratio to mergekit {m['wall_ratio_vs_mergekit']}. Targets: {m['targets']}.\n")


def _simple(inspect: dict, screen: dict, latency: dict) -> str:
    lv = inspect["smiles_detail_levels"]
    met = inspect.get("meets_target", {})

    def target(key: str) -> str:
        return "2,000/s" if met.get(key) else "2,000/s: **missed**"

    floor = inspect.get("rdkit_floor")
    floor_row = "" if not floor else (
        "| same run: RDKit's bare parse + canonical SMILES + InChIKey ("
        + ", ".join(f"{k} {v:.0f} us" for k, v in floor["cpu_us_per_molecule"].items())
        + f") | {floor['ceiling_per_cpu_s']:.0f} per CPU-s at most, before any other descriptor | |\n")
    warm = inspect.get("smiles_atom_memo_warm_per_cpu_s")
    warm_row = "" if warm is None else (
        f"| same run, the molecules again with the atom memo kept (a server that has seen them) | {warm:.0f} per CPU-s | |\n")
    return (
        "| benchmark | figure | target |\n|---|---|---|\n"
        f"| `bench inspect` SMILES, full descriptors (QED, InChIKey) | {lv['full']['per_cpu_s']:.0f} per CPU-s | {target('smiles_full')} |\n"
        + floor_row + warm_row +
        f"| `bench inspect` SMILES, `--detail basic` | {lv['basic']['per_cpu_s']:.0f} per CPU-s | {target('smiles_basic')} |\n"
        f"| `bench inspect` proteins | {inspect['proteins_per_cpu_s']:.0f} per CPU-s | {target('proteins')} |\n"
        f"| `bench screen` (3-option task, tiny zoo) | {screen['predictions_per_second']:.0f} predictions/s, "
        f"linear fit r2 = {screen['fit']['r2']:.4f} | 200/s |\n"
        f"| `bench server-latency` get_job while an ES merge runs (stdio) | median {latency['get_job_ms']['median']} ms, "
        f"p95 {latency['get_job_ms']['p95']} ms (n = {latency['get_job_ms']['n']}) | < 200 ms |\n"
        f"| ES merge of the tiny zoo in the server (signals + merge) | {latency['merge_seconds']} s | < 180 s |\n")


def render() -> str:
    bench = REPO / "docs" / "bench"
    parts = [
        "### Embedded zoo (tiny preset)\n", _zoo(_load("zoo_tiny.json")),
        "\n### Merges on the embedded world\n", (bench / "embedded_tiny.md").read_text(),
        "\n### Real data\n", (bench / "real_tiny.md").read_text(),
        "\n### Scale and speed\n", _merge_scale(_load("merge_scale.json")), "\n",
        _simple(_load("inspect.json"), _load("screen.json"), _load("server_latency.json")),
    ]
    return "".join(parts)


def main() -> int:
    readme = REPO / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the markers {BEGIN} ... {END}", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + render() + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
