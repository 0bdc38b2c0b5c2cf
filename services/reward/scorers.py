"""The scorer registry: names in reward.weights and reward.eval -> scorer classes, and
what each needs. Names are checked once, by the configuration (RewardConfig.SCORER_NAMES,
which a test keeps equal to this registry's keys).

    build_scorer(name, config)   the scorer for `name`: a RemoteScorer when
                                 reward.endpoints names it, else the in-process one
    local_scorer(name, config)   always the in-process one (what the gRPC service runs)
    scorer_needs(name, config)   ScorerNeeds(num_gpus, num_cpus, pip) for placing the
                                 worker and, when asked, building its Ray runtime_env

A remote scorer needs nothing locally beyond grpcio and protobuf (project dependencies):
its GPU and engine live with the service.
"""
from __future__ import annotations

from common.config import RewardConfig
from services.reward.aesthetic import AestheticScorer
from services.reward.base import Scorer, ScorerNeeds
from services.reward.geneval import GenevalScorer
from services.reward.image_rewards import Brightness, JpegCompressibility
from services.reward.ocr import OcrScorer
from services.reward.pickscore import PickScoreScorer
from services.reward.remote import RemoteScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (OcrScorer, GenevalScorer, PickScoreScorer, AestheticScorer, JpegCompressibility, Brightness)
}


def local_scorer(name: str, config: RewardConfig) -> Scorer:
    return SCORERS[name](config)


def build_scorer(name: str, config: RewardConfig) -> Scorer:
    if name in config.endpoints:
        return RemoteScorer(name, config.endpoints[name], config)
    return local_scorer(name, config)


def scorer_needs(name: str, config: RewardConfig) -> ScorerNeeds:
    if name in config.endpoints:
        return ScorerNeeds(num_gpus=0.0, num_cpus=config.num_cpus, pip=[])
    return SCORERS[name].needs(config)
