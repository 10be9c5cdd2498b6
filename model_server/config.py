"""TF Serving's model configuration: models.config, base paths, version folders.

`--model_config_file` is a text-format `tensorflow.serving.ModelServerConfig`,
exactly the file the real `tensorflow/serving` container reads. Its base paths
are paths inside that container (`/models/<name>`); `--model_base_path_prefix_map
/models=serving_models` rewrites them to where the same tree lies on this machine.

What is checked follows TF Serving (tensorflow_serving/model_servers/server_core.cc,
sources/storage_path/file_system_storage_path_source.cc): unique model names,
absolute base paths, the "tensorflow" platform, version folders named by a
number, and the version policies `latest` (default, 1 version), `all`, `specific`.
This module does not import TensorFlow.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

from google.protobuf import message, text_format
from tensorflow_serving.config import model_server_config_pb2

from common.logs import log_event

logger = logging.getLogger("carrecog.model_server")

TENSORFLOW_PLATFORM = "tensorflow"


class ConfigError(ValueError):
    """The model server cannot start with this configuration."""


@dataclass(frozen=True)
class ModelPlan:
    """One configured model: where it lies here and which versions to load."""

    name: str
    base_path: Path  # local directory holding the version folders
    versions: dict[int, Path]  # version -> SavedModel directory, the ones the policy aspires to
    labels: dict[str, int] = field(default_factory=dict)


def read_text_proto(path: str | Path, proto: message.Message) -> message.Message:
    """Parse a text-format protobuf file; a bad file is a ConfigError naming it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        # TF Serving: "Invalid protobuf file: '<file>'" (model_servers/server.cc)
        raise ConfigError(f"Invalid protobuf file: '{path}': {exc}") from exc


def load_model_server_config(path: str | Path) -> model_server_config_pb2.ModelServerConfig:
    return read_text_proto(path, model_server_config_pb2.ModelServerConfig())


def only_models(config: model_server_config_pb2.ModelServerConfig,
                names: Sequence[str]) -> model_server_config_pb2.ModelServerConfig:
    """A copy of `config` serving only the models `names` (each must be configured)."""
    kept = [m for m in config.model_config_list.config if m.name in names]
    missing = set(names) - {m.name for m in kept}
    if missing:
        raise ConfigError(f"no model(s) {sorted(missing)} in the config")
    subset = model_server_config_pb2.ModelServerConfig()
    subset.model_config_list.config.extend(kept)
    return subset


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """What `--model_name/--model_base_path` mean to TF Serving (BuildSingleModelConfig)."""
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    model.base_path = base_path
    model.model_platform = TENSORFLOW_PLATFORM
    return config


def validate_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """The checks TF Serving's ServerCore makes before loading anything."""
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError("only a model_config_list is supported (custom_model_config is not)")
    names: set[str] = set()
    for model in config.model_config_list.config:
        if model.name in names:
            raise ConfigError(f"Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
        if not PurePosixPath(model.base_path).is_absolute():
            raise ConfigError(f"Expected model {model.name} to have an absolute path or URI; "
                              f"got base_path()={model.base_path}")
        if not model.model_platform:
            raise ConfigError("Illegal setting neither ModelServerConfig::model_type (deprecated) "
                              "nor ModelServerConfig::model_platform.")
        if model.model_platform != TENSORFLOW_PLATFORM:
            raise ConfigError(f"PlatformConfigMap has no entry for platform {model.model_platform}")


def parse_prefix_map(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """`/models=serving_models` (several: comma-separated or repeated) -> [(prefix, local dir)]."""
    pairs = []
    for spec in specs:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            prefix, sep, local = item.partition("=")
            if not sep or not prefix or not local:
                raise ConfigError(f"bad --model_base_path_prefix_map entry {item!r}; expected PREFIX=LOCAL_DIR")
            pairs.append((prefix.rstrip("/") or "/", Path(local)))
    return sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)  # longest prefix wins


def local_base_path(base_path: str, prefix_map: Sequence[tuple[str, Path]]) -> Path:
    """Rewrite a container base path to a local absolute one (whole path components only)."""
    for prefix, local in prefix_map:
        if base_path == prefix or base_path.startswith(prefix.rstrip("/") + "/"):
            rest = base_path[len(prefix):].lstrip("/")
            return (local / rest).resolve()
    return Path(base_path).resolve()


def find_versions(base_path: Path) -> dict[int, Path]:
    """Version folders under a base path: child directories whose name is a number."""
    if not base_path.is_dir():
        raise ConfigError(f"Could not find base path {base_path}")
    versions = {}
    for child in base_path.iterdir():
        if child.is_dir() and child.name.isascii() and child.name.isdigit():
            versions[int(child.name)] = child
    return versions


def aspired_versions(model: model_server_config_pb2.ModelConfig, found: dict[int, Path]) -> dict[int, Path]:
    """Apply the model's version policy (default: the latest one) to the versions found."""
    policy = model.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return dict(found)
    if choice == "specific":
        wanted = set(policy.specific.versions)
        missing = sorted(wanted - set(found))
        if missing:
            log_event(logger, "specific versions not found", logging.WARNING, model=model.name, versions=missing)
        return {v: p for v, p in found.items() if v in wanted}
    num_versions = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions > 0 else 1
    return {v: found[v] for v in sorted(found, reverse=True)[:num_versions]}


def plan_models(config: model_server_config_pb2.ModelServerConfig,
                prefix_map: Sequence[tuple[str, Path]] = (),
                allow_labels_for_unavailable: bool = False) -> list[ModelPlan]:
    """Validate the config and decide, per model, which SavedModel folders to load."""
    validate_config(config)
    plans = []
    for model in config.model_config_list.config:
        base = local_base_path(model.base_path, prefix_map)
        try:
            found = find_versions(base)
        except ConfigError as exc:
            raise ConfigError(f"{exc} for servable {model.name}") from None
        versions = aspired_versions(model, found)
        if not versions:
            # TF Serving only warns and keeps polling; a stand-in that loads once must fail instead.
            raise ConfigError(f"No versions of servable {model.name} found under base path {base}. "
                              "Did you forget to name your leaf directory as a number (eg. '/1/')?")
        labels = dict(model.version_labels)
        for label, version in labels.items():
            # Labels are checked before loading, so at start-up they fail unless allowed,
            # as in TF Serving (ServerCore::UpdateModelVersionLabelMap).
            if not allow_labels_for_unavailable:
                raise ConfigError(f"Request to assign label to version {version} of model {model.name}, "
                                  "which is not currently available for inference "
                                  f"(label {label!r}; start with --allow_version_labels_for_unavailable_models)")
        plans.append(ModelPlan(model.name, base, versions, labels))
    return plans
