"""The verdict: does the answer name a car of the catalogue, another car, or no car at all?

The classifier always names one of its 196 classes; its confidence is only
calibrated for photos of those classes. The verdict rests on scores the
pipeline computes anyway, so it costs no model call of its own:

- not a car: the localiser's evidence of a car is its ImageNet-1k head's
  probability mass on the car classes, over the whole photo or over the crop
  that was classified (the router shows it the crop too), whichever is larger:
  a small car in a wide scene has little mass over the whole photo, and a box
  found on a non-car photo crops no car. Below the fitted bar, the photo is
  answered VERDICT_NOT_A_CAR. The box score itself is not used: the box head,
  trained on composites, also fires on some non-car textures.
- not in the catalogue: 1 - the classifier's confidence, on the crop that was
  classified. The catalogue's cars are answered confidently; cars it lacks
  spread their probability over lookalikes. The confidence read is that of the
  ensemble member the policy names (`score_member`), when the model serves its
  members' confidences: the default ensemble's member 0 never trained on val,
  so a threshold fitted on val flags as many unseen catalogue photos as it
  says. The ensemble's own answer is surer of val (its other member learnt
  val), so its val threshold flagged 7.5 % of test crops instead of 1.5 %.
- which unknown: when the make's summed probability stays high, the make is
  probably right though the model is not in the catalogue (VERDICT_UNKNOWN_MODEL);
  otherwise VERDICT_UNKNOWN_CAR.

Because the unknown score is read on the crop of the car, not on the photo as
sent, a catalogue car in a wide scene scores like its tight crop: the verdict
does not key on framing. The thresholds are fitted on val and on the `fit` half
of open_set_dev by builders/open_set.py, into open_set.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from carrecog.v1 import recognition_service_pb2 as pb

if TYPE_CHECKING:  # settings imports this module before logs are JSON lines: no TensorFlow at import time
    from router_service.tf_serving import Prediction


@dataclass(frozen=True)
class OpenSetPolicy:
    not_a_car_threshold: float   # VERDICT_NOT_A_CAR when 1 - car evidence >= this
    unknown_threshold: float     # VERDICT_UNKNOWN_* when 1 - unknown_confidence(...) >= this
    known_make_threshold: float  # ... and VERDICT_UNKNOWN_MODEL when make_confidence >= this
    source: str                  # the file and how it was fitted, for ListModels and the start-up log
    score_member: int | None = None  # the unknown score reads this ensemble member's confidence (None: the answer's)

    @classmethod
    def load(cls, path: Path) -> OpenSetPolicy:
        """Raises OSError, ValueError or KeyError when the file is missing or incomplete."""
        fitted = json.loads(path.read_text())
        thresholds = [float(fitted[key]) for key in ("not_a_car_threshold", "unknown_threshold",
                                                     "known_make_threshold")]
        if not all(0.0 <= t <= 1.01 for t in thresholds):
            raise ValueError(f"thresholds must lie in [0, 1.01], got {thresholds}")
        member = fitted.get("score_member")
        score = f"1 - member {member}'s confidence" if member is not None else "1 - the answer's confidence"
        return cls(*thresholds, source=f"{path} ({fitted.get('fitted_on', 'fitted by builders.open_set')}; "
                                       f"unknown score: {score})",
                   score_member=None if member is None else int(member))

    def to_proto(self, not_a_car_model: str) -> pb.OpenSetPolicy:
        return pb.OpenSetPolicy(not_a_car_model=not_a_car_model, not_a_car_threshold=self.not_a_car_threshold,
                                unknown_threshold=self.unknown_threshold,
                                known_make_threshold=self.known_make_threshold, source=self.source)


def not_a_car_score(car_probability: float, box_car_probability: float) -> float:
    return 1.0 - max(car_probability, box_car_probability)


def unknown_confidence(policy: OpenSetPolicy, prediction: Prediction, answer_confidence: float) -> tuple[float, str]:
    """The confidence the unknown score reads and its name for route_detail: the policy's member's own top
    probability when the model serves its members' confidences, otherwise the answer's confidence."""
    members, member = prediction.member_confidences, policy.score_member
    if member is not None and members is not None and member < len(members):
        return float(members[member]), f"member {member}'s confidence"
    return answer_confidence, "confidence"


def decide(policy: OpenSetPolicy, response: pb.RecognizeResponse, localised: bool, confidence: float,
           make_confidence: float, confidence_name: str = "confidence") -> str:
    """Fills the response's verdict, verdict_score and verdict_threshold; returns the sentence route_detail
    gives for it. `localised`: the localiser looked at this photo (its evidence of a car is known);
    `confidence` (unknown_confidence, named `confidence_name`) and `make_confidence`: the global model's, before
    a logo restricted its answer (a restricted answer is renormalised, so its confidence no longer says whether
    the model knows the car).
    A logo that matched gives the make of a car the catalogue lacks."""
    if localised:
        score = not_a_car_score(response.car_probability, response.box_car_probability)
        if score >= policy.not_a_car_threshold:
            _set(response, pb.VERDICT_NOT_A_CAR, score, policy.not_a_car_threshold)
            return (f"not a car (the localiser's car evidence {1 - score:.3f} < "
                    f"{1 - policy.not_a_car_threshold:.3f})")
    score = 1.0 - confidence
    if score < policy.unknown_threshold:
        _set(response, pb.VERDICT_RECOGNIZED, score, policy.unknown_threshold)
        return f"recognised ({confidence_name} {confidence:.3f} > {1 - policy.unknown_threshold:.3f})"
    unsure = f"{confidence_name} {confidence:.3f} <= {1 - policy.unknown_threshold:.3f}"
    if response.logo_matched:
        _set(response, pb.VERDICT_UNKNOWN_MODEL, score, policy.unknown_threshold)
        return f"a model the catalogue lacks ({unsure}); the {response.logo.brand} logo gives the make"
    if make_confidence >= policy.known_make_threshold:
        _set(response, pb.VERDICT_UNKNOWN_MODEL, score, policy.unknown_threshold)
        return (f"a model the catalogue lacks ({unsure}), probably a {response.make} "
                f"(make confidence {make_confidence:.3f} >= {policy.known_make_threshold:.3f})")
    _set(response, pb.VERDICT_UNKNOWN_CAR, score, policy.unknown_threshold)
    return f"a car the catalogue lacks ({unsure}, make confidence {make_confidence:.3f} < " \
           f"{policy.known_make_threshold:.3f})"


def doubts(policy: OpenSetPolicy | None, prediction: Prediction, confidence: float) -> bool:
    """The global model's answer would not be called recognised: worth asking the logo stage for the make."""
    return policy is not None and \
        1.0 - unknown_confidence(policy, prediction, confidence)[0] >= policy.unknown_threshold


def _set(response: pb.RecognizeResponse, verdict: int, score: float, threshold: float) -> None:
    response.verdict, response.verdict_score, response.verdict_threshold = verdict, score, threshold
