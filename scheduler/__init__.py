"""Scheduling: what requests ask for (sampling and SLOs), the step-time cost model, the prefill
and decode policies (one registry each), output-length prediction, worker placement, SLO
metrics and the discrete-event simulator. Pure Python with no torch import, so that workers and
the simulator run the very same policy objects."""

from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.decode import DECODE_POLICIES, ContinuousBatching, DecodePolicy, SlackBatching
from kairos.scheduler.output_length import OutputLengthEstimator
from kairos.scheduler.prefill import (
                                      PREFILL_POLICIES,
                                      EDFPolicy,
                                      FCFSPolicy,
                                      KairosPolicy,
                                      MooreHodgsonPolicy,
                                      PrefillPolicy,
)
from kairos.scheduler.registry import PolicySettings
from kairos.scheduler.request import RequestSLO, SamplingParams
from kairos.scheduler.tempo import TempoDecode, TempoPrefill

__all__ = ["CostModel", "DECODE_POLICIES", "ContinuousBatching", "DecodePolicy", "SlackBatching",
           "OutputLengthEstimator", "PREFILL_POLICIES", "EDFPolicy", "FCFSPolicy", "KairosPolicy",
           "MooreHodgsonPolicy", "PrefillPolicy", "PolicySettings", "RequestSLO", "SamplingParams", "TempoDecode",
           "TempoPrefill"]
