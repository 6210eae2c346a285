"""``python -m nextstep_jax.demo [--out outputs/demo] [--miniature] [--seed 0]``: the demo's stages in order
(``nextstep_jax/demo/__init__.py`` lists them), each skipped when its output is complete.

Exit status: 0 done (the report is OUT/report.md); 1 a stage failed or was stopped (run again to resume);
2 bad input (an output folder made with other settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from nextstep_jax import host_memory
from nextstep_jax.demo import report
from nextstep_jax.demo.budget import FULL, MINIATURE
from nextstep_jax.demo.stages import STAGES, Demo, DemoError
from nextstep_jax.io.atomic import write_file

SETTINGS_JSON, STAGES_JSON = "demo.json", "stages.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    p.add_argument("--miniature", action="store_true",
                   help="every stage for a few steps at 32 px (a smoke test: seconds to minutes, scores meaningless)")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (the prompts stay the same)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _pin_settings(demo: Demo) -> None:
    """An output folder belongs to one budget and seed: resuming it with others would mix two demos."""
    path = demo.out / SETTINGS_JSON
    settings = {"seed": demo.seed, "budget": json.loads(json.dumps(dataclasses.asdict(demo.budget)))}
    if path.is_file():
        if json.loads(path.read_text()) != settings:
            raise ValueError(f"--out {demo.out}: made with other settings ({path}); choose another folder")
        return
    demo.out.mkdir(parents=True, exist_ok=True)
    write_file(path, (json.dumps(settings, indent=1) + "\n").encode())


def run(demo: Demo) -> dict:
    """Every stage not yet complete, then the report; returns the report."""
    record_path = demo.out / STAGES_JSON
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    began = time.perf_counter()
    for stage in STAGES:
        if stage.done(demo):
            _say(f"[{stage.name}] complete, skipped")
            record.setdefault(stage.name, {"wall_s": 0.0, "found_complete": True})
            continue
        _say(f"[{stage.name}] running")
        started = time.perf_counter()
        counts = stage.run(demo)
        record[stage.name] = {"wall_s": round(time.perf_counter() - started, 1), **counts}
        write_file(record_path, (json.dumps(record, indent=1) + "\n").encode())
        _say(f"[{stage.name}] done in {record[stage.name]['wall_s']:.1f} s")
    if (demo.out / report.REPORT_JSON).is_file() and "report" in record:
        _say("[report] complete, skipped")
        return json.loads((demo.out / report.REPORT_JSON).read_text())
    _say("[report] scoring the samples, the floor and the ceiling")
    started = time.perf_counter()
    scores = report.score(demo)
    report.write_grid(demo, scores["passed"])
    report.write_curves(demo)
    record["report"] = {"wall_s": round(time.perf_counter() - started, 1),
                        "images": sum(len(v) for v in scores["passed"].values())}
    write_file(record_path, (json.dumps(record, indent=1) + "\n").encode())
    result = report.build_report(demo, scores, record)
    result["this_run_s"] = round(time.perf_counter() - began, 1)
    report.write_report(demo, result)
    return result


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    demo = Demo(args.out, MINIATURE if args.miniature else FULL, args.seed, not args.no_progress)
    try:
        _pin_settings(demo)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(demo)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    g = result["geneval"]
    _say(f"mini GenEval overall: eval {g['eval']['overall']:.3f}, novel {g['novel']['overall']:.3f} "
         f"(floor {result['floor']['overall']:.3f}, ceiling {result['ceiling']['overall']:.3f}); "
         f"{result['elapsed_s']:.0f} s of stages; report {demo.out / report.REPORT_MD}, "
         f"grid {demo.out / report.GRID_PNG}")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()
    sys.exit(main())
