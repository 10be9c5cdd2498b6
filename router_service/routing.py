"""One recognition: logo gate, route, predict, explain.

This is the router's whole decision, kept apart from gRPC server plumbing so
`make evaluate` scores the pipeline through exactly this code.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

import grpc
import numpy as np

from carrecog.v1 import logo_service_pb2, logo_service_pb2_grpc
from carrecog.v1 import recognition_service_pb2 as pb
from common.channels import outgoing_metadata
from common.errors import ServiceError, client_message
from common.images import InvalidImage, validate_image
from common.logs import REQUEST_ID, log_event
from router_service.admission import DEADLINE_MARGIN_S, AdmissionGate
from router_service.breaker import CircuitBreaker
from router_service.catalog import ModelCatalog, ModelNotReady
from router_service.localizer import WHOLE, Localizer, box_problem, covers_photo, crop_encoded, with_margin
from router_service.open_set import OpenSetPolicy, decide, doubts, unknown_confidence
from router_service.settings import ALWAYS
from router_service.tf_serving import ModelInfo, Prediction

logger = logging.getLogger("carrecog.router")
DEFAULT_TOP_K = 5
MAX_TOP_K = 50
# Strings a client sends are bounded: an image id is echoed in every answer, and nothing
# unbounded may be echoed into a response or an error (it would break the message limit).
MAX_IMAGE_ID_CHARS = 256
MAX_MODEL_NAME_CHARS = 128
# TF Serving's answer when its batching queue is full (max_enqueued_batches): UNAVAILABLE with this text.
QUEUE_FULL = "batch scheduling queue to which this task was submitted is full"
# Retry hints (grpc-retry-pushback-ms): an overloaded model server frees up within about one batch;
# one that is down or restarting (it reloads its models) takes longer.
OVERLOADED_RETRY_S = 0.5
UNAVAILABLE_RETRY_S = 2.0


class RecognitionError(ServiceError):
    """A failure the client should see as a gRPC status (code first, as the router always wrote it)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message, code, retry_after_s)


@dataclass(frozen=True)
class RoutingSettings:
    """The part of RouterSettings the recognition uses; the defaults live there, once."""

    logo_timeout_s: float
    predict_timeout_s: float
    max_image_bytes: int
    max_image_pixels: int
    breaker_failures: int  # logo calls failed in a row that open the breaker
    breaker_reset_s: float  # then the logo stage is skipped this long before one probe call
    logo_policy: str  # ALWAYS or UNCERTAIN (router_service.settings.LOGO_POLICIES)
    uncertain_below: float  # UNCERTAIN: the logo stage runs when the make confidence is below this
    localize_timeout_s: float = 3.0
    crop_margin: float = 0.05  # the car's box grows by this share of its size on every side before the crop
    whole_photo_share: float = 0.9  # a box (with margin) spanning this share of width and height: no crop
    open_set: OpenSetPolicy | None = None  # None: no verdict (VERDICT_UNSPECIFIED)
    max_active: int = 0  # recognitions working downstream at once (router_service.admission); 0 = no gate


def check_request(request: pb.RecognizeRequest) -> None:
    """Bounds on the strings of a request, checked before any work; never echoes what it refuses."""
    if len(request.image_id) > MAX_IMAGE_ID_CHARS:
        raise RecognitionError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"image_id is {len(request.image_id)} characters, over the limit of "
                               f"{MAX_IMAGE_ID_CHARS}: send a shorter id")
    if len(request.options.force_model) > MAX_MODEL_NAME_CHARS:
        raise RecognitionError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"force_model is {len(request.options.force_model)} characters, over the limit "
                               f"of {MAX_MODEL_NAME_CHARS}: ListModels names the models it can be")


class Recognizer:
    def __init__(self, catalog: ModelCatalog, logo: logo_service_pb2_grpc.LogoServiceStub | None,
                 settings: RoutingSettings, localizer: Localizer | None = None) -> None:
        self.catalog = catalog
        self.logo = logo
        self.localizer = localizer
        self.settings = settings
        self.logo_breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self.localizer_breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self.gate = AdmissionGate(settings.max_active) if settings.max_active else None

    async def recognize(self, request: pb.RecognizeRequest, time_left: float | None = None) -> pb.RecognizeResponse:
        """Recognise one image; raises RecognitionError with a status a client can act on."""
        started = time.perf_counter()
        # Answer a little before the caller's deadline: our own status, not the caller's (or a proxy's) timeout.
        deadline = None if time_left is None else started + time_left - DEADLINE_MARGIN_S
        check_request(request)
        response = pb.RecognizeResponse(image_id=request.image_id, request_id=REQUEST_ID.get())
        try:
            info = validate_image(request.image, max_bytes=self.settings.max_image_bytes,
                                  max_pixels=self.settings.max_image_pixels)
        except InvalidImage as exc:
            raise RecognitionError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        options = request.options
        top_k = options.top_k or DEFAULT_TOP_K
        if not 0 < top_k <= MAX_TOP_K:
            raise RecognitionError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"top_k must be between 1 and {MAX_TOP_K}, got {options.top_k}")
        caller_box = None
        if request.HasField("car_box"):
            b = request.car_box
            caller_box = (b.x_min, b.y_min, b.x_max, b.y_max)
            problem = box_problem(caller_box, info.width, info.height)
            if problem:
                raise RecognitionError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.gate is None:
            return await self._recognize(request, caller_box, response, started, deadline)
        async with self.gate.slot(deadline):  # refused here (RESOURCE_EXHAUSTED) if it cannot make its deadline
            return await self._recognize(request, caller_box, response, started, deadline)

    async def _recognize(self, request: pb.RecognizeRequest, caller_box: tuple[float, float, float, float] | None,
                         response: pb.RecognizeResponse, started: float, deadline: float | None,
                         ) -> pb.RecognizeResponse:
        """The downstream work of one checked request: frame, classify, explain."""
        options = request.options
        top_k = options.top_k or DEFAULT_TOP_K
        image, framing_detail = await self._frame(request.image, caller_box, options.skip_localization, response,
                                                  deadline)
        # The verdict needs the localiser's car mass on the crop itself: asked beside the classifier.
        crop_seen = (asyncio.create_task(self._car_mass_of_crop(image, response, deadline))
                     if response.framing == pb.FRAMING_CROPPED and self.settings.open_set is not None else None)
        try:
            model, prediction, unrestricted = await self._classify(image, options, response, deadline)
        except BaseException:
            if crop_seen is not None:
                crop_seen.cancel()
            raise
        response.route_detail = f"{framing_detail}; {response.route_detail}"
        self._fill_prediction(response, model, prediction, top_k)
        if self.settings.open_set is not None:
            crop_detail = await crop_seen if crop_seen is not None else ""
            if unrestricted is prediction:  # the answer filled above is the global model's own
                confidence, make_confidence = response.confidence, response.make_confidence
            else:
                best, make_confidence = choose_answer(unrestricted)
                confidence = float(unrestricted.probabilities[best])
            confidence, confidence_name = unknown_confidence(self.settings.open_set, unrestricted, confidence)
            localised = response.framing in (pb.FRAMING_CROPPED, pb.FRAMING_ALREADY_TIGHT, pb.FRAMING_NO_CAR_FOUND)
            verdict = decide(self.settings.open_set, response, localised, confidence, make_confidence, confidence_name)
            response.route_detail += f"; verdict: {verdict}{crop_detail}"
        response.timings.add(stage="total", ms=_ms_since(started))
        return response

    async def _classify(self, image: bytes, options: pb.RecognizeOptions, response: pb.RecognizeResponse,
                        deadline: float | None) -> tuple[ModelInfo, Prediction, Prediction]:
        """The route and the answering model's prediction; also the global model's own (unrestricted) one."""
        if options.force_model:
            model = self.catalog.find(options.force_model)
            if model is None:
                raise RecognitionError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"unknown model {options.force_model!r}; served: {sorted(self.catalog.models)}")
            if not model.available and model is not self.catalog.global_model:
                raise RecognitionError(grpc.StatusCode.UNAVAILABLE, f"model {model.name!r} is not being served "
                                       f"({model.error or 'not discovered yet'})")
            response.route = pb.ROUTE_FORCED_MODEL
            response.route_detail = f"model {model.name} forced by the caller"
            prediction = await self._predict(model, image, response, deadline)
            return model, prediction, prediction
        if options.skip_logo or self.logo is None:
            response.route = pb.ROUTE_GLOBAL_MODEL
            response.route_detail = ("logo stage skipped by the caller" if options.skip_logo
                                      else "no logo service configured") + " -> global model"
            prediction = await self._predict_global(image, response, deadline)
            return self.catalog.global_model, prediction, prediction
        return await self._with_logo_stage(image, response, deadline)

    async def _car_mass_of_crop(self, crop: bytes, response: pb.RecognizeResponse, deadline: float | None) -> str:
        """Sets box_car_probability to the localiser's car mass on the crop seen whole; on failure it stays
        the whole photo's, and the returned note says so."""
        started = time.perf_counter()
        try:
            found = await self.localizer.locate(crop, _timeout(self.settings.localize_timeout_s, deadline))
        except (grpc.aio.AioRpcError, ValueError) as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "unusable"
            return f" (the localiser failed on the crop ({code}): the whole photo's car mass used)"
        finally:
            response.timings.add(stage="localize:crop", ms=_ms_since(started))
        response.box_car_probability = found.car_probability
        return ""

    async def _frame(self, image: bytes, caller_box: tuple[float, float, float, float] | None, skip: bool,
                     response: pb.RecognizeResponse, deadline: float | None) -> tuple[bytes, str]:
        """The bytes to classify (the photo, or a crop of its most prominent car) and a sentence saying why;
        fills the response's box, framing, cars_found and car_probability."""
        margin = self.settings.crop_margin
        if caller_box is not None:
            crop = crop_encoded(image, with_margin(caller_box, margin))
            if crop is None:
                raise RecognitionError(grpc.StatusCode.INVALID_ARGUMENT,
                                       "the image could not be decoded to crop car_box: send a valid JPEG or PNG")
            _set_box(response, caller_box, 0.0, pb.FRAMING_CALLER_BOX)
            return crop, "the caller's car_box cropped, localisation skipped"
        _set_box(response, WHOLE, 0.0, pb.FRAMING_WHOLE_PHOTO)
        if skip or self.localizer is None:
            return image, ("localisation skipped by the caller" if skip else "no localiser configured") + \
                ": whole photo classified"
        if not self.localizer_breaker.allow():
            return image, (f"localisation skipped: the localiser failed {self.localizer_breaker.failures} calls in "
                           f"a row (next try in {self.localizer_breaker.seconds_until_probe():.1f} s): whole photo "
                           "classified")
        started = time.perf_counter()
        try:
            found = await self.localizer.locate(image, _timeout(self.settings.localize_timeout_s, deadline))
        except asyncio.CancelledError:
            self.localizer_breaker.record_ignored()
            raise
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:  # the image's fault: the classifier would refuse it too
                self.localizer_breaker.record_ignored()
                raise RecognitionError(code, f"the model could not read the image: {client_message(exc.details())}") \
                    from None
            self.localizer_breaker.record_failure()
            self.localizer.error = code.name
            log_event(logger, "localiser call failed", logging.WARNING, code=code.name, details=exc.details(),
                      breaker=self.localizer_breaker.state)
            return image, f"localiser failed ({code.name}): whole photo classified"
        except ValueError as exc:  # a model under that name that is not a localiser
            self.localizer_breaker.record_failure()
            self.localizer.error = str(exc)
            return image, f"localiser unusable ({exc}): whole photo classified"
        finally:
            response.timings.add(stage="localize", ms=_ms_since(started))
        self.localizer_breaker.record_success()
        self.localizer.error = ""
        response.cars_found, response.car_probability = found.cars, found.car_probability
        response.box_car_probability = found.car_probability  # the photo is the box, unless cropped below
        if not found.cars:
            response.framing = pb.FRAMING_NO_CAR_FOUND
            return image, "the localiser found no car: whole photo classified"
        box, score = tuple(float(v) for v in found.boxes[0]), float(found.scores[0])
        which = (f"the largest of {found.cars} cars" if found.cars > 1 else "one car") + f" (score {score:.2f})"
        padded = with_margin(box, margin)
        if covers_photo(padded, self.settings.whole_photo_share):
            _set_box(response, WHOLE, score, pb.FRAMING_ALREADY_TIGHT)
            return image, f"the localiser found {which} filling the photo: classified as sent"
        crop_started = time.perf_counter()
        crop = crop_encoded(image, padded)
        response.timings.add(stage="crop", ms=_ms_since(crop_started))
        if crop is None:
            return image, f"the localiser found {which} but the photo could not be cropped: whole photo classified"
        _set_box(response, box, score, pb.FRAMING_CROPPED)
        return crop, f"the localiser found {which}: its box cropped"

    async def _with_logo_stage(self, image: bytes, response: pb.RecognizeResponse,
                               deadline: float | None) -> tuple[ModelInfo, Prediction, Prediction]:
        """The global model and the logo stage as the policy says; then the route the logo evidence picks.
        Returns the answering model, its prediction, and the global model's own prediction."""
        global_model, prediction, slug = await self._global_and_logo(image, response, deadline)
        model, answer = await self._route_by_logo(slug, global_model, prediction, image, response, deadline)
        return model, answer, prediction

    async def _global_and_logo(self, image: bytes, response: pb.RecognizeResponse,
                               deadline: float | None) -> tuple[ModelInfo, Prediction, str | None]:
        """The global prediction and the slug of the brand whose logo matched (None: none, or not asked)."""
        global_model = self.catalog.global_model
        if self.settings.logo_policy == ALWAYS:  # both at once: the slower of the two, not their sum
            logo = asyncio.create_task(self._logo_stage(image, response, deadline))
            try:
                prediction = await self._predict_global(image, response, deadline)
            except BaseException:
                logo.cancel()
                raise
            slug = await logo
        else:
            prediction = await self._predict_global(image, response, deadline)
            best, make_confidence = choose_answer(prediction)
            if make_confidence >= self.settings.uncertain_below:
                if not doubts(self.settings.open_set, prediction, float(prediction.probabilities[best])):
                    response.route = pb.ROUTE_GLOBAL_MODEL
                    response.route_detail = (f"logo stage skipped: the global model is sure of the make "
                                             f"({make_confidence:.3f} >= {self.settings.uncertain_below:.3f}) "
                                             "-> global model")
                    return global_model, prediction, None
            slug = await self._logo_stage(image, response, deadline)
        return global_model, prediction, slug

    async def _route_by_logo(self, slug: str | None, global_model: ModelInfo, prediction: Prediction, image: bytes,
                             response: pb.RecognizeResponse, deadline: float | None) -> tuple[ModelInfo, Prediction]:
        """The brand model, the global answer restricted to the logo's make, or the global answer."""
        if slug is None:
            return global_model, prediction
        brand_model = self.catalog.for_brand(slug)
        if brand_model is not None:
            if not brand_model.available:
                self._fall_back(response, pb.FALLBACK_REASON_BRAND_MODEL_NOT_FOUND,
                                f"brand model {brand_model.name!r} is not served "
                                f"({brand_model.error or 'not discovered yet'})")
                return global_model, prediction
            brand_prediction = await self._predict(brand_model, image, response, deadline)
            if brand_prediction is not None:
                return brand_model, brand_prediction
            return global_model, prediction  # the brand model failed: the global answer, and why
        makes = set(self.catalog.plugins[slug].makes)
        restricted = restrict(prediction, makes)
        if restricted is None:
            self._fall_back(response, pb.FALLBACK_REASON_BRAND_WITHOUT_MODEL,
                            f"logo matched {slug} but the global model knows no class of {sorted(makes)}")
            return global_model, prediction
        response.route = pb.ROUTE_LOGO_RESTRICTED
        response.route_detail = (f"logo matched {slug} ({response.logo.inliers} inliers), no model of its own "
                                 f"-> global model restricted to {', '.join(sorted(makes))}")
        return global_model, restricted

    async def _predict_global(self, image: bytes, response: pb.RecognizeResponse,
                              deadline: float | None) -> Prediction:
        prediction = await self._predict(self.catalog.global_model, image, response, deadline)
        assert prediction is not None  # only a brand model's failure answers None
        return prediction

    async def _logo_stage(self, image: bytes, response: pb.RecognizeResponse, deadline: float | None) -> str | None:
        """Ask the logo service; returns the slug of the plugin whose logo passed the gate, else None
        (and says why in the response)."""
        if not self.logo_breaker.allow():
            self._fall_back(response, pb.FALLBACK_REASON_LOGO_SERVICE_CIRCUIT_OPEN,
                            f"logo stage skipped: the logo service failed {self.logo_breaker.failures} calls in a "
                            f"row; the next try is in {self.logo_breaker.seconds_until_probe():.1f} s")
            return None
        response.logo_consulted = True
        started = time.perf_counter()
        timeout = _timeout(self.settings.logo_timeout_s, deadline)
        try:
            match = await self.logo.MatchLogo(logo_service_pb2.MatchLogoRequest(image=image),
                                              timeout=timeout, metadata=outgoing_metadata())
        except asyncio.CancelledError:  # our caller gave up: this says nothing of the logo service,
            self.logo_breaker.record_ignored()  # and a half-open probe must not stay "in flight" for ever
            raise
        except grpc.aio.AioRpcError as exc:
            response.timings.add(stage="logo", ms=_ms_since(started))
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:  # the image's fault, not the service's
                self.logo_breaker.record_ignored()
                raise RecognitionError(code, client_message(exc.details())) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout < self.settings.logo_timeout_s:
                self.logo_breaker.record_ignored()  # the caller's own short deadline, not a slow service
            else:
                self.logo_breaker.record_failure()
            reason = {grpc.StatusCode.UNAVAILABLE: pb.FALLBACK_REASON_LOGO_SERVICE_UNAVAILABLE,
                      grpc.StatusCode.DEADLINE_EXCEEDED: pb.FALLBACK_REASON_LOGO_SERVICE_TIMEOUT,
                      }.get(code, pb.FALLBACK_REASON_LOGO_SERVICE_ERROR)
            log_event(logger, "logo service call failed", logging.WARNING, code=code.name, details=exc.details(),
                      breaker=self.logo_breaker.state)
            self._fall_back(response, reason, f"logo service failed ({code.name})")
            return None
        self.logo_breaker.record_success()
        response.timings.add(stage="logo", ms=_ms_since(started))
        if match.HasField("best"):
            response.logo.CopyFrom(match.best)
        response.logo_matched = match.matched
        if not match.matched:
            best = (f"; best candidate {match.best.brand} had {match.best.inliers} inliers"
                    if match.HasField("best") else "")
            response.route = pb.ROUTE_GLOBAL_MODEL
            response.route_detail = f"no logo passed the gate (>= {match.min_inliers} inliers){best} -> global model"
            return None
        brand = match.best.brand
        if brand not in self.catalog.plugins:
            self._fall_back(response, pb.FALLBACK_REASON_BRAND_WITHOUT_MODEL,
                            f"logo matched {brand} ({match.best.inliers} inliers) but no plugin of the router has it")
            return None
        model = self.catalog.for_brand(brand)
        response.route = pb.ROUTE_BRAND_MODEL
        response.route_detail = (f"logo matched {brand} ({match.best.inliers} inliers) -> brand model {model.name}"
                                 if model is not None else f"logo matched {brand} ({match.best.inliers} inliers)")
        return brand

    async def _predict(self, model: ModelInfo, image: bytes, response: pb.RecognizeResponse,
                       deadline: float | None) -> Prediction | None:
        """Predict with `model`; None means "brand model failed, use the global one"."""
        started = time.perf_counter()
        is_brand = model is not self.catalog.global_model and response.route != pb.ROUTE_FORCED_MODEL
        try:
            [prediction] = await self.catalog.predict(model, [image], _timeout(self.settings.predict_timeout_s, deadline))
            return prediction
        except ModelNotReady:
            if is_brand:
                self._fall_back(response, pb.FALLBACK_REASON_BRAND_MODEL_NOT_FOUND,
                                f"brand model {model.name!r} has not been discovered yet")
                return None
            raise RecognitionError(grpc.StatusCode.UNAVAILABLE,
                                   f"model {model.name!r} is not ready yet (the router has not reached the model "
                                   "server since it started); retry shortly") from None
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED):
                log_event(logger, "model server call failed", logging.WARNING, model=model.name, code=code.name,
                          details=exc.details())
            if is_brand and code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                self.catalog.mark_unavailable(model, f"{code.name}: {client_message(exc.details())}")
                self._fall_back(response, pb.FALLBACK_REASON_BRAND_MODEL_NOT_FOUND,
                                f"brand model {model.name!r} is not served ({code.name})")
                return None
            if is_brand and code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._fall_back(response, pb.FALLBACK_REASON_BRAND_MODEL_ERROR,
                                f"brand model {model.name!r} failed ({code.name})")
                return None
            raise _downstream_error(model, exc) from None
        finally:
            response.timings.add(stage=f"predict:{model.name}", ms=_ms_since(started))

    def _fall_back(self, response: pb.RecognizeResponse, reason: int, detail: str) -> None:
        response.route = pb.ROUTE_FALLBACK_GLOBAL
        response.fallback_reason = reason
        response.route_detail = f"{detail} -> global model"
        log_event(logger, "fallback", logging.WARNING, reason=pb.FallbackReason.Name(reason), detail=detail)

    def _fill_prediction(self, response: pb.RecognizeResponse, model: ModelInfo, prediction: Prediction,
                         top_k: int) -> None:
        order = np.argsort(-prediction.probabilities)[:top_k]
        for index in order:
            label = prediction.labels[index]
            response.top_k.add(label=label.text, make=label.make, model=label.model, year=label.year,
                               confidence=float(prediction.probabilities[index]))
        best, make_probability = choose_answer(prediction)
        label = prediction.labels[best]
        response.make, response.model, response.year = label.make, label.model, label.year
        response.label, response.confidence = label.text, float(prediction.probabilities[best])
        response.make_confidence = make_probability
        response.model_name, response.model_version = model.name, prediction.version
        response.signature_name = prediction.signature


def _set_box(response: pb.RecognizeResponse, box: tuple[float, float, float, float], score: float,
             framing: int) -> None:
    response.box.CopyFrom(pb.Box(x_min=box[0], y_min=box[1], x_max=box[2], y_max=box[3]))
    response.box_score, response.framing = score, framing


def restrict(prediction: Prediction, makes: set[str]) -> Prediction | None:
    """The prediction restricted to the classes of `makes`, renormalised (what a brand signature of the
    model computes, done from the labels); None when the model knows no class of these makes."""
    keep = np.array([label.make in makes for label in prediction.labels])
    kept = float(prediction.probabilities[keep].sum()) if keep.any() else 0.0
    if kept <= 0.0:
        return None
    return replace(prediction, probabilities=np.where(keep, prediction.probabilities, 0.0) / kept)


def choose_answer(prediction: Prediction) -> tuple[int, float]:
    """(index of the answer's class, its make's probability).

    The make first: the probabilities of each make's classes summed, the most
    probable make kept, then its most probable class. This is the Bayes choice
    for the make, and it differs from the top class when probability is spread
    over one make's lookalike models (test split, `make evaluate`: make top-1
    0.900 -> 0.903, class top-1 0.815 -> 0.817).
    """
    probabilities, make_of_class = prediction.probabilities, prediction.make_of_class
    make_totals = np.bincount(make_of_class, weights=probabilities)
    make = int(np.argmax(make_totals))
    members = np.flatnonzero(make_of_class == make)
    return int(members[np.argmax(probabilities[members])]), float(make_totals[make])


def _timeout(stage_limit: float, deadline: float | None) -> float:
    """The stage's own limit, cut to what is left of the caller's deadline."""
    if deadline is None:
        return stage_limit
    left = deadline - time.perf_counter()
    if left <= 0:
        raise RecognitionError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline expired before the model ran")
    return min(stage_limit, left)


def _downstream_error(model: ModelInfo, exc: grpc.aio.AioRpcError) -> RecognitionError:
    """What our client sees when the model server fails: the code and a sentence, never its internals
    (addresses, graph node names); the full details are in the router's log under the request id."""
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return RecognitionError(code, f"the model could not read the image: {client_message(exc.details())}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RecognitionError(code, f"model {model.name!r} did not answer within the deadline")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or (code == grpc.StatusCode.UNAVAILABLE
                                                      and QUEUE_FULL in (exc.details() or "")):
        # Load, not an outage: a proxy must not take this router out of rotation for it (UNAVAILABLE would).
        return RecognitionError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the model server is overloaded; retry with "
                                "backoff", retry_after_s=OVERLOADED_RETRY_S)
    return RecognitionError(grpc.StatusCode.UNAVAILABLE,
                            f"the model server cannot serve model {model.name!r} now ({code.name}); retry later",
                            retry_after_s=UNAVAILABLE_RETRY_S)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
