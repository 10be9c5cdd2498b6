"""Issue 25's "thread and batching settings": the model server's knobs, measured through the router.

    python -m scripts.bench_serving_settings [--requests 96] [--out reports/serving_settings.json]

For each setting below, starts a model server with the default model and the localiser only (the
batching parameters in a file of its own, the TF thread flags as TF Serving takes them) and a router
without a logo stage, then measures 1 and 8 clients on the same test photos (`scripts.bench.load`).
The current setting runs first and again last, so the drift of the machine shows in the same table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from router_service.settings import DEFAULT_GLOBAL_MODEL
from harness.stack import ROOT, start_model_server, start_router
from scripts.bench import load, test_photos

CURRENT = {"num_batch_threads": 2, "batch_timeout_micros": 5000, "max_batch_size": 32, "intra_op": 0, "inter_op": 0}
SETTINGS = {
    "current (2 batch threads, 5 ms, TF's thread choice)": CURRENT,
    "1 batch thread": {**CURRENT, "num_batch_threads": 1},
    "4 batch threads": {**CURRENT, "num_batch_threads": 4},
    "no batch timeout": {**CURRENT, "batch_timeout_micros": 0},
    "intra-op 1 (one core per batch)": {**CURRENT, "intra_op": 1},
    "intra-op 2, inter-op 1": {**CURRENT, "intra_op": 2, "inter_op": 1},
    "intra-op 1, no batch timeout": {**CURRENT, "intra_op": 1, "batch_timeout_micros": 0},
    "intra-op 1, 1 batch thread": {**CURRENT, "intra_op": 1, "num_batch_threads": 1},
    "intra-op 1, inter-op 2": {**CURRENT, "intra_op": 1, "inter_op": 2},
    "current, again": CURRENT,
}


def batching_file(setting: dict, folder: Path) -> Path:
    path = folder / "batching_parameters.txt"
    path.write_text(f"max_batch_size {{ value: {setting['max_batch_size']} }}\n"
                    f"batch_timeout_micros {{ value: {setting['batch_timeout_micros']} }}\n"
                    "max_enqueued_batches { value: 8 }\n"
                    f"num_batch_threads {{ value: {setting['num_batch_threads']} }}\n"
                    "pad_variable_length_inputs: false\n")
    return path


def measure(setting: dict, photos: list[bytes], requests: int, folder: Path) -> dict:
    folder.mkdir(parents=True)
    models = start_model_server(folder, only=(DEFAULT_GLOBAL_MODEL, "localizer"),
                                batching_parameters=batching_file(setting, folder),
                                intra_op_threads=setting["intra_op"], inter_op_threads=setting["inter_op"])
    router = None
    try:
        router = start_router(models.address, "", folder)
        models.wait_healthy()
        router.wait_healthy(timeout=120)
        return {"1 client": load(router.address, photos, requests, 1),
                "8 clients": load(router.address, photos, 2 * requests, 8)}
    finally:
        if router is not None:
            router.stop()
        models.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_serving_settings", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="calls at 1 client (x2 at 8)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "serving_settings.json")
    args = parser.parse_args(argv)
    photos = test_photos()
    folder = Path(tempfile.mkdtemp(prefix="carrecog-settings-"))
    report = {}
    print(f"{'setting':52s} {'1 client req/s':>14s} {'p50 ms':>7s} {'8 clients req/s':>15s} {'p50 ms':>7s}")
    for i, (name, setting) in enumerate(SETTINGS.items()):
        rows = measure(setting, photos, args.requests, folder / str(i))
        report[name] = {"setting": setting, **rows}
        one, eight = rows["1 client"], rows["8 clients"]
        print(f"{name:52s} {one['per_second']:14.1f} {one['ms_p50']:7.1f} {eight['per_second']:15.1f} "
              f"{eight['ms_p50']:7.1f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
