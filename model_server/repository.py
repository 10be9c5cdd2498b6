"""The loaded servables (model name, version) and lookups that fail like TF Serving.

A servable is one SavedModel version folder loaded with TensorFlow: its
SignatureDefs exactly as stored in saved_model.pb (what GetModelMetadata
returns) and its callable signatures (what Predict runs). Every configured
version is loaded at start; a version that fails to load stops the server, as
TF Serving's initial load does. Lookups raise the typed errors of
`model_server.errors` with TF Serving's messages.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from google.protobuf import text_format
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2, model_pb2

from common.logs import log_event
from model_server.config import ModelPlan
from model_server.errors import InvalidArgument, NotFound

logger = logging.getLogger("carrecog.model_server")

State = get_model_status_pb2.ModelVersionStatus.State


class LoadError(RuntimeError):
    """A configured model version could not be loaded."""


@dataclass(frozen=True)
class Servable:
    name: str
    version: int
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    functions: Mapping[str, Callable[..., Mapping[str, tf.Tensor]]]
    module: Any  # the loaded SavedModel object; keeps the variables the functions use alive


@dataclass
class VersionState:
    state: int = State.START
    error: str = ""  # why loading failed (state END)


def read_meta_graph(path: Path, tags: Sequence[str]) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef whose tag set is `tags`, read from saved_model.pb."""
    saved_model = saved_model_pb2.SavedModel()
    if (path / "saved_model.pb").is_file():
        saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    elif (path / "saved_model.pbtxt").is_file():
        text_format.Parse((path / "saved_model.pbtxt").read_text(), saved_model)
    else:
        raise LoadError(f"SavedModel file does not exist at: {path}/{{saved_model.pbtxt|saved_model.pb}}")
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == set(tags):
            return meta_graph
    raise LoadError(f"Could not find meta graph def matching supplied tags: {{ {' '.join(tags)} }}. "
                    "To inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
                    "`saved_model_cli`")


def load_servable(name: str, version: int, path: Path, tags: Sequence[str]) -> Servable:
    meta_graph = read_meta_graph(path, tags)
    module = tf.saved_model.load(str(path), tags=list(tags))
    return Servable(name=name, version=version, signature_defs=dict(meta_graph.signature_def),
                    functions=dict(module.signatures), module=module)


class ModelRepository:
    """Servables by (name, version), their load states, and version labels."""

    def __init__(self, plans: Sequence[ModelPlan], tags: Sequence[str] = ("serve",),
                 warmup: Callable[[Servable, Path], object] | None = None) -> None:
        self._plans = {plan.name: plan for plan in plans}
        self._tags = list(tags)
        self._warmup = warmup  # run on each version after loading, before it is AVAILABLE
        self._lock = threading.Lock()
        self._servables: dict[tuple[str, int], Servable] = {}
        self._states = {plan.name: {v: VersionState() for v in plan.versions} for plan in plans}

    @property
    def model_names(self) -> list[str]:
        return list(self._plans)

    def load_all(self) -> None:
        """Load every aspired version, several at once (blocking; run it off the event loop).

        As TF Serving's initial load (ServerCore::Options.num_initial_load_threads,
        4 threads per CPU): a version that fails stops the start once the others
        have been tried.
        """
        jobs = [(plan, version) for plan in self._plans.values() for version in sorted(plan.versions)]
        threads = max(1, min(len(jobs), 4 * (os.cpu_count() or 1)))
        with ThreadPoolExecutor(threads, thread_name_prefix="load") as pool:
            for future in [pool.submit(self._load, plan, version) for plan, version in jobs]:
                future.result()

    def _load(self, plan: ModelPlan, version: int) -> None:
        state = self._states[plan.name][version]
        state.state = State.LOADING
        started = time.perf_counter()
        try:
            servable = load_servable(plan.name, version, plan.versions[version], self._tags)
            if self._warmup is not None:
                self._warmup(servable, plan.versions[version])
        except Exception as exc:
            state.state, state.error = State.END, f"{type(exc).__name__}: {exc}"
            raise LoadError(f"1 model(s) did not become available: {{{{name: {plan.name} version: {version}}} "
                            f"due to error: {state.error}}}") from exc
        with self._lock:
            self._servables[(plan.name, version)] = servable
            state.state = State.AVAILABLE
        log_event(logger, "servable loaded", model=plan.name, version=version, path=str(plan.versions[version]),
                  signatures=sorted(servable.signature_defs), seconds=round(time.perf_counter() - started, 2))

    def resolve(self, spec: model_pb2.ModelSpec) -> Servable:
        """The servable a request's ModelSpec names (ServerCore::GetServableHandle)."""
        if not spec.name:
            raise InvalidArgument("ModelSpec has no name specified.")
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            plan = self._plans.get(spec.name)
            if plan is None or spec.version_label not in plan.labels:
                raise InvalidArgument(f"Unrecognized servable version label: {spec.version_label}")
            version: int | None = plan.labels[spec.version_label]
        elif choice == "version":
            version = spec.version.value
        else:
            version = None
        with self._lock:
            if version is None:
                versions = [v for (name, v) in self._servables if name == spec.name]
                if not versions:
                    raise NotFound(f"Servable not found for request: Latest({spec.name})")
                version = max(versions)
            servable = self._servables.get((spec.name, version))
        if servable is None:
            raise NotFound(f"Servable not found for request: Specific({spec.name}, {version})")
        return servable

    def version_states(self, name: str) -> dict[int, VersionState]:
        """Load state of each version of a model, newest first (empty for an unknown model)."""
        with self._lock:
            states = self._states.get(name, {})
            return {v: VersionState(s.state, s.error) for v, s in sorted(states.items(), reverse=True)}
