"""Evaluate the whole pipeline and every model alone on labelled photos.

    python -m training.evaluate --labels LABELS.csv --images-root DIR --out report.json
    python -m training.evaluate --out report.json        # the shared test split

LABELS has the columns of stanford_cars/labels.csv (image_id, file, class_id,
class_name, make, model, year; `file` relative to DIR). The evaluation starts
the real stack (model server, logo service, router) and sends every photo
through the router, so the pipeline is scored through exactly the code that
serves users; each model alone is scored with the router's force_model
option (a brand model on its own brand's photos only). Writes the JSON report,
and beside it a Markdown report, a confusion-matrix PNG and a reliability PNG.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import grpc

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from common.data import data_dir
from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from scripts.stack import start_logo_service, start_model_server, start_router
from training.metrics import Scores, write_reports
from training.split import load_split, read_labels

BATCH = 16


def labelled_photos(labels: Path | None, images_root: Path | None) -> list[dict]:
    if labels is None:
        return [{"image_id": p.image_id, "path": p.path, "make": p.make, "model": p.model, "year": str(p.year),
                 "class_name": p.class_name} for p in load_split() if p.split == "test"]
    return read_labels(labels, images_root or labels.parent)


def recognise_all(stub: pb_grpc.RecognitionServiceStub, rows: list[dict], **options) -> list[pb.RecognizeResult]:
    results = []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        requests = [pb.RecognizeRequest(image=Path(r["path"]).read_bytes(), image_id=r["image_id"],
                                        options=pb.RecognizeOptions(top_k=5, **options)) for r in chunk]
        results.extend(stub.RecognizeBatch(pb.RecognizeBatchRequest(requests=requests), timeout=600).results)
        print(f"  {min(start + BATCH, len(rows))}/{len(rows)}", end="\r", flush=True)
    print()
    return results


def evaluate(rows: list[dict], router_address: str) -> dict:
    plugins = load_plugins(DEFAULT_PLUGINS_DIR, data_dir(), check_logos=False)
    with grpc.insecure_channel(router_address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                        ("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        served = {m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models if m.available}
        print(f"pipeline on {len(rows)} photos")
        pipeline = Scores("pipeline", plugins)
        pipeline.add_all(rows, recognise_all(stub, rows))
        models = {}
        for name in sorted(served):
            makes = None if name == "global" else {m for p in plugins.values()
                                                   if p.model and p.model.name == name for m in p.makes}
            subset = [r for r in rows if makes is None or r["make"] in makes]
            if not subset:
                continue
            print(f"model {name} alone on {len(subset)} photos")
            models[name] = Scores(name, plugins)
            models[name].add_all(subset, recognise_all(stub, subset, force_model=name))
    return {"pipeline": pipeline, "models": models}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=Path, help="labels CSV (default: the shared test split)")
    parser.add_argument("--images-root", type=Path, help="folder the CSV's `file` column is relative to")
    parser.add_argument("--out", type=Path, required=True, help="JSON report path (Markdown and PNGs go beside it)")
    parser.add_argument("--router", help="evaluate a running router at host:port instead of starting the stack")
    args = parser.parse_args(argv)
    rows = labelled_photos(args.labels, args.images_root)
    if args.router:
        scores = evaluate(rows, args.router)
    else:
        logs = Path(tempfile.mkdtemp(prefix="carrecog-eval-"))
        services = [start_model_server(logs), start_logo_service(logs)]
        try:
            for service in services:
                service.wait_healthy()
            services.append(start_router(services[0].address, services[1].address, logs))
            services[-1].wait_healthy()
            scores = evaluate(rows, services[-1].address)
        finally:
            for service in reversed(services):
                service.stop()
    report = write_reports(scores, args.out, n=len(rows))
    print(json.dumps({"n": report["n"], "pipeline": report["pipeline"],
                      "models": {k: {m: v[m] for m in ("n", "top1", "top5", "make_top1")}
                                 for k, v in report["models"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
