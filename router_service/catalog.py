"""The models the router can send photos to, discovered from TF Serving at start.

The global model, one model per brand plugin that names one, and the extra
models named in the settings (reachable with force_model only). Discovery
reads each signature with GetModelMetadata and each model's labels with one
warm-up Predict; a brand model that is not served is kept as unavailable, so
requests routed to it fall back to the global model and say why.
"""
from __future__ import annotations

import logging

import grpc

from common.logs import log_event
from common.plugins import BrandPlugin
from router_service.tf_serving import ModelInfo, ModelSignatureError, TfServingClient

logger = logging.getLogger("carrecog.router.catalog")


class ModelCatalog:
    def __init__(self, client: TfServingClient, global_model: str, plugins: dict[str, BrandPlugin],
                 global_signature: str = "serving_default", extra_models: tuple[str, ...] = ()) -> None:
        self.client = client
        self.global_name = global_model
        self.plugins = plugins
        self.models: dict[str, ModelInfo] = {global_model: ModelInfo(global_model, global_signature)}
        for plugin in plugins.values():
            if plugin.model is not None:
                key = self.key(plugin.model.name, plugin.model.signature)
                self.models.setdefault(key, ModelInfo(plugin.model.name, plugin.model.signature))
        for key in extra_models:  # "name" or "name:signature", forced by clients only
            name, _, signature = key.partition(":")
            signature = signature or "serving_default"
            self.models.setdefault(self.key(name, signature), ModelInfo(name, signature))

    @staticmethod
    def key(name: str, signature: str) -> str:
        return name if signature == "serving_default" else f"{name}:{signature}"

    @property
    def global_model(self) -> ModelInfo:
        return self.models[self.global_name]

    def for_brand(self, slug: str) -> ModelInfo | None:
        plugin = self.plugins.get(slug)
        if plugin is None or plugin.model is None:
            return None
        return self.models[self.key(plugin.model.name, plugin.model.signature)]

    def brand_of(self, model: ModelInfo) -> str:
        for plugin in self.plugins.values():
            if plugin.model and (plugin.model.name, plugin.model.signature) == (model.name, model.signature):
                return plugin.slug
        return ""

    def find(self, name: str) -> ModelInfo | None:
        return self.models.get(name)

    async def refresh(self, timeout: float, only_unavailable: bool = False) -> bool:
        """(Re)discover models; returns True when the global model is available."""
        for model in self.models.values():
            if only_unavailable and model.available:
                continue
            was = (model.available, model.error)
            try:
                await self.client.discover(model, timeout)
                log_event(logger, "model discovered", model=model.name, version=model.version,
                          signature=model.signature, classes=len(model.labels), input=model.input_key)
            except grpc.aio.AioRpcError as exc:
                model.available, model.error = False, f"{exc.code().name}: {exc.details()}"
                if (model.available, model.error) != was:  # say it once, not on every re-check
                    log_event(logger, "model unavailable", logging.WARNING, model=model.name, error=model.error)
            except ModelSignatureError as exc:
                model.available, model.error = False, str(exc)
                log_event(logger, "model rejected", logging.ERROR, model=model.name, error=model.error)
        return self.global_model.available
