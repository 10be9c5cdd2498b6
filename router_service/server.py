"""gRPC servicer for carrecog.v1.RecognitionService and the router's lifecycle."""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from carrecog.v1 import logo_service_pb2_grpc
from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from common.channels import downstream_channel
from common.logs import log_event
from common.plugins import load_plugins
from common.server import GrpcServer
from router_service.catalog import ModelCatalog
from router_service.health import watch_downstreams
from router_service.localizer import Localizer
from router_service.model_cards import ModelCards, standing
from router_service.routing import MAX_IMAGE_ID_CHARS, RecognitionError, Recognizer, RoutingSettings
from router_service.settings import RouterSettings
from router_service.tf_serving import TfServingClient

logger = logging.getLogger("carrecog.router")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecognitionService"].full_name
BATCH_CONCURRENCY = 4


def _error_result(image_id: str, error: RecognitionError) -> pb.RecognizeResult:
    echoed = image_id if len(image_id) <= MAX_IMAGE_ID_CHARS else ""  # never echo an unbounded id
    return pb.RecognizeResult(image_id=echoed, error=pb.RecognizeError(
        code=error.code.value[0], code_name=error.code.name, message=error.message))


class RecognitionServicer(pb_grpc.RecognitionServiceServicer):
    def __init__(self, recognizer: Recognizer, catalog: ModelCatalog, batch_limit: int, cards: ModelCards) -> None:
        self.recognizer = recognizer
        self.localizer = recognizer.localizer
        self.open_set = recognizer.settings.open_set
        self.catalog = catalog
        self.batch_limit = batch_limit
        self.cards = cards

    async def Recognize(self, request: pb.RecognizeRequest, context: grpc.aio.ServicerContext) -> pb.RecognizeResponse:
        return await self.recognizer.recognize(request, context.time_remaining())  # errors: common.interceptors

    async def _one(self, request: pb.RecognizeRequest, time_left: float | None) -> pb.RecognizeResult:
        try:
            response = await self.recognizer.recognize(request, time_left)
            return pb.RecognizeResult(image_id=request.image_id, response=response)
        except RecognitionError as exc:
            return _error_result(request.image_id, exc)

    async def RecognizeBatch(self, request: pb.RecognizeBatchRequest,
                             context: grpc.aio.ServicerContext) -> pb.RecognizeBatchResponse:
        if not request.requests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the batch is empty: send at least one image")
        if len(request.requests) > self.batch_limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the batch has {len(request.requests)} images, over the limit of "
                                f"{self.batch_limit}: split it or use RecognizeStream")
        gate = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def bounded(item: pb.RecognizeRequest) -> pb.RecognizeResult:
            async with gate:
                return await self._one(item, context.time_remaining())

        results = await asyncio.gather(*(bounded(item) for item in request.requests))
        return pb.RecognizeBatchResponse(results=results)

    async def RecognizeStream(self, request_iterator: AsyncIterator[pb.RecognizeStreamRequest],
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RecognizeStreamResponse]:
        async for item in request_iterator:
            yield pb.RecognizeStreamResponse(result=await self._one(item.request, context.time_remaining()))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        response = pb.ListModelsResponse(global_model=self.catalog.global_name)
        default = self.catalog.global_model
        default_card = self.cards.summary(default.name, default.version, default.signature)
        for model in self.catalog.models.values():
            meta = model.meta  # one snapshot per model
            labels = meta.labels if meta else ()
            card = self.cards.summary(model.name, model.version, model.signature)
            brand = self.catalog.brand_of(model)
            placeholder, note = standing(card, default_card, model is default, brand)
            listed = response.models.add(
                name=model.name, version=meta.version if meta else 0, signature_name=model.signature,
                input_key=meta.input_key if meta else "", probabilities_key=meta.probabilities_key if meta else "",
                labels_key=meta.labels_key if meta else "", labels=[label.text for label in labels],
                brand=brand, available=model.available,
                makes=sorted({label.make for label in labels if label.make}),
                architecture=card.architecture, input_size=card.input_size, placeholder=placeholder, note=note,
                task="classifier")
            if card.top1 is not None:
                listed.test_scores.CopyFrom(pb.ModelScores(photos=card.photos, top1=card.top1,
                                                           make_top1=card.make_top1 or 0.0, ece=card.ece or 0.0))
        if self.localizer is not None:
            card = self.cards.summary(self.localizer.model_name, self.localizer.version, self.localizer.signature)
            response.models.add(
                name=self.localizer.model_name, version=self.localizer.version,
                signature_name=self.localizer.signature, available=bool(self.localizer.version)
                and not self.localizer.error, architecture=card.architecture, input_size=card.input_size,
                task="localizer", note="finds the cars in the photo; the largest is cropped and classified"
                + (f" (last call failed: {self.localizer.error})" if self.localizer.error else ""))
        if self.open_set is not None:
            response.open_set.CopyFrom(self.open_set.to_proto(self.localizer.model_name if self.localizer else ""))
        for plugin in self.catalog.plugins.values():
            response.brands.add(slug=plugin.slug, name=plugin.name,
                                model_name=plugin.model.name if plugin.model else "",
                                signature_name=plugin.model.signature if plugin.model else "")
        return response


async def serve(settings: RouterSettings) -> None:
    plugins = load_plugins(settings.plugins_dir, settings.data_dir, check_logos=False)
    max_bytes = settings.server.max_message_bytes
    model_channel = downstream_channel(settings.model_server, max_bytes)
    client = TfServingClient(model_channel)
    logo_stub = None
    if settings.logo_service.address:
        logo_stub = logo_service_pb2_grpc.LogoServiceStub(downstream_channel(settings.logo_service, max_bytes))
    catalog = ModelCatalog(client, settings.global_model, plugins, extra_models=settings.extra_models)
    localizer = Localizer(client, settings.localizer_model) if settings.localizer_model else None
    recognizer = Recognizer(catalog, logo_stub, RoutingSettings(
        logo_timeout_s=settings.logo_timeout_s, predict_timeout_s=settings.predict_timeout_s,
        max_image_bytes=int(settings.max_image_mb * 1024 * 1024), max_image_pixels=settings.max_image_pixels,
        breaker_failures=settings.breaker_failures, breaker_reset_s=settings.breaker_reset_s,
        logo_policy=settings.logo_policy, uncertain_below=settings.uncertain_below,
        localize_timeout_s=settings.localize_timeout_s, crop_margin=settings.crop_margin,
        whole_photo_share=settings.whole_photo_share, open_set=settings.open_set,
        max_active=settings.max_active), localizer)
    log_event(logger, "logo policy", policy=settings.logo_policy, uncertain_below=settings.uncertain_below,
              source=settings.uncertain_source)
    log_event(logger, "open-set verdict", **(vars(settings.open_set) if settings.open_set else {"policy": "none"}))

    server = GrpcServer("router", settings.server, [SERVICE_NAME])
    pb_grpc.add_RecognitionServiceServicer_to_server(
        RecognitionServicer(recognizer, catalog, settings.batch_limit, ModelCards(settings.model_cards_dir)),
        server.server)
    await server.start()
    watcher = asyncio.create_task(watch_downstreams(server, catalog, settings.health_interval_s, localizer))
    try:
        await server.wait_for_shutdown()
    finally:
        watcher.cancel()
        await model_channel.close()
