"""Evaluate the whole pipeline and every model alone on labelled photos.

    python -m evaluation.evaluate --labels LABELS.csv --images-root DIR --out report.json
    python -m evaluation.evaluate --out report.json        # the shared test split

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
from pathlib import Path

import grpc

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from common.data import data_dir
from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from router_service.catalog import ModelCatalog
from harness.stack import router_or_stack
from training.metrics import Scores, write_reports
from dataset.split import load_split, read_labels

BATCH = 16
RESTRICT_TOP_K = 50  # the router's largest top_k: enough candidates to restrict the global answer to a brand


def labelled_photos(labels: Path | None, images_root: Path | None) -> list[dict]:
    if labels is None:
        return [{"image_id": p.image_id, "path": p.path, "make": p.make, "model": p.model, "year": str(p.year),
                 "class_name": p.class_name} for p in load_split() if p.split == "test"]
    return read_labels(labels, images_root or labels.parent)


def recognise_all(stub: pb_grpc.RecognitionServiceStub, rows: list[dict], top_k: int = 5,
                  **options) -> list[pb.RecognizeResult]:
    results = []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        requests = [pb.RecognizeRequest(image=Path(r["path"]).read_bytes(), image_id=r["image_id"],
                                        options=pb.RecognizeOptions(top_k=top_k, **options)) for r in chunk]
        results.extend(stub.RecognizeBatch(pb.RecognizeBatchRequest(requests=requests), timeout=600).results)
        print(f"  {min(start + BATCH, len(rows))}/{len(rows)}", end="\r", flush=True)
    print()
    return results


def model_key(model: pb.ServedModel) -> str:
    """The name force_model takes for a listed model (the router's catalog key)."""
    return ModelCatalog.key(model.name, model.signature_name)


def evaluate(rows: list[dict], router_address: str) -> dict:
    plugins = load_plugins(DEFAULT_PLUGINS_DIR, data_dir(), check_logos=False)
    with grpc.insecure_channel(router_address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                        ("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        listing = stub.ListModels(pb.ListModelsRequest(), timeout=30)
        print(f"pipeline on {len(rows)} photos")
        pipeline = Scores("pipeline", plugins)
        pipeline.add_all(rows, recognise_all(stub, rows))
        models, answers = {}, {}
        for model in sorted((m for m in listing.models if m.available), key=model_key):
            key = model_key(model)
            subset = [r for r in rows if r["make"] in model.makes]  # a model is scored on the makes it knows
            if not subset:
                continue
            print(f"model {key} alone on {len(subset)} photos")
            models[key] = Scores(key, plugins)
            answers[key] = (subset, recognise_all(stub, subset, top_k=RESTRICT_TOP_K, force_model=key))
            models[key].add_all(*answers[key])
    restricted = {}
    global_makes = next((m.makes for m in listing.models if model_key(m) == listing.global_model), [])
    if listing.global_model in answers:
        for model in listing.models:
            key = model_key(model)
            if key in answers and len(model.makes) < len(global_makes):  # a partial (brand) model
                restricted[key] = global_restricted(*answers[listing.global_model], model)
    return {"pipeline": pipeline, "models": models, "global_restricted": restricted}


def global_restricted(rows: list[dict], results: list[pb.RecognizeResult], model: pb.ServedModel) -> dict:
    """The global model's top-1 on the photos of `model`'s makes when its answer is restricted to
    `model`'s classes: the first of its RESTRICT_TOP_K candidates that is one of them (none = a miss)."""
    labels = set(model.labels)
    hits, missing = [], 0
    for row, result in zip(rows, results):
        if row["make"] not in model.makes or result.WhichOneof("outcome") != "response":
            continue
        choice = next((p.label for p in result.response.top_k if p.label in labels), None)
        missing += choice is None
        hits.append(choice == f"{row['make']} {row['model']} {row['year']}")
    return {"n": len(hits), "top1": round(sum(hits) / max(len(hits), 1), 4), "not_in_candidates": missing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=Path, help="labels CSV (default: the shared test split)")
    parser.add_argument("--images-root", type=Path, help="folder the CSV's `file` column is relative to")
    parser.add_argument("--out", type=Path, required=True, help="JSON report path (Markdown and PNGs go beside it)")
    parser.add_argument("--router", help="evaluate a running router at host:port instead of starting the stack")
    args = parser.parse_args(argv)
    rows = labelled_photos(args.labels, args.images_root)
    with router_or_stack(args.router, "carrecog-eval-") as router:
        scores = evaluate(rows, router)
    report = write_reports(scores, args.out, n=len(rows))
    print(json.dumps({"n": report["n"], "pipeline": report["pipeline"],
                      "models": {k: {m: v[m] for m in ("n", "top1", "top5", "make_top1")}
                                 for k, v in report["models"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
