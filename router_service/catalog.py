"""The models the router can send photos to, and the one owner of what it knows about them.

The global model, one model per brand plugin that names one, and the extra
models named in the settings (reachable with force_model only). Discovery
reads each signature with GetModelMetadata and each model's labels with one
warm-up Predict, for all models at once; a brand model that is not served is
kept as unavailable, so requests routed to it fall back to the global model and
say why.

Only this class changes a model's state, and only by replacing its immutable
ModelMeta snapshot: a request in flight keeps the snapshot it started with, so
a rediscovery after a model-server outage never hands it labels that belong to
another version, or none at all.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from common.errors import client_message
from common.logs import log_event
from common.plugins import BrandPlugin
from router_service.tf_serving import ModelInfo, ModelSignatureError, Prediction, TfServingClient

logger = logging.getLogger("carrecog.router.catalog")


class ModelNotReady(Exception):
    """The model has not been discovered (yet): no labels to answer with."""


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
        self._answered_at = float("-inf")  # time.monotonic() of the last Predict the model server answered

    def answered_since(self, moment: float) -> bool:
        """Whether the model server answered a Predict after `moment` (time.monotonic()): evidence that it is
        alive however long its status call takes (router_service.health)."""
        return self._answered_at > moment

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

    async def predict(self, model: ModelInfo, images: list[bytes], timeout: float | None) -> list[Prediction]:
        """Probabilities for each image, labelled from one snapshot of the model's metadata.

        Labels are learned at discovery rather than on every call; they are
        fetched again only when the server answers with another version, since
        a new version may have new classes.
        """
        meta = model.meta
        if meta is None:
            raise ModelNotReady(model.name)
        reply = await self.client.predict(model.name, model.signature, meta, images, timeout)
        self._answered_at = time.monotonic()
        if reply.version != meta.version:
            reply = await self.client.predict(model.name, model.signature, meta, images, timeout, with_labels=True)
            meta = meta.with_labels(reply.labels or meta.labels, reply.version)
            model.meta = meta
            log_event(logger, "model version changed", model=model.name, version=meta.version)
        members = reply.member_confidences if reply.member_confidences is not None else [None] * len(reply.probabilities)
        return [Prediction(probabilities=row, labels=meta.labels, version=meta.version, signature=model.signature,
                           make_of_class=meta.make_of_class, member_confidences=member)
                for row, member in zip(reply.probabilities, members)]

    def mark_unavailable(self, model: ModelInfo, error: str) -> None:
        """A call found the model gone (NOT_FOUND / FAILED_PRECONDITION): route around it until rediscovered."""
        if model.error != error:
            log_event(logger, "model unavailable", logging.WARNING, model=model.name, error=error)
        model.error = error

    async def refresh(self, timeout: float, only_unavailable: bool = False) -> bool:
        """(Re)discover models, all at once; returns True when the global model is available."""
        wanted = [m for m in self.models.values() if not (only_unavailable and m.available)]
        await asyncio.gather(*(self._discover(model, timeout) for model in wanted))
        return self.global_model.available

    async def _discover(self, model: ModelInfo, timeout: float) -> None:
        was = model.error
        try:
            meta = await self.client.discover(model.name, model.signature, timeout)
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {client_message(exc.details())}"
            if model.meta is None or exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                model.error = error
            if error != was:  # say it once, not on every re-check
                log_event(logger, "model unavailable", logging.WARNING, model=model.name, error=exc.details())
            return
        except ModelSignatureError as exc:
            model.error = str(exc)
            log_event(logger, "model rejected", logging.ERROR, model=model.name, error=model.error)
            return
        model.meta, model.error = meta, ""
        log_event(logger, "model discovered", model=model.name, version=meta.version, signature=model.signature,
                  classes=len(meta.labels), input=meta.input_key)
