"""Scheduling: SLO-aware prefill and decode policies, the step-time cost model and output-length
prediction. Pure Python with no torch import, so that workers and the simulator run the very
same policy objects."""

from scheduler.cost_model import CostModel
from scheduler.decode import ContinuousBatching, DecodePolicy, SlackBatching, get_decode_policy
from scheduler.output_length import OutputLengthEstimator
from scheduler.prefill import (EDFPolicy, FCFSPolicy, KairosPolicy, MooreHodgsonPolicy, PrefillPolicy,
                               get_prefill_policy)

__all__ = ["CostModel", "ContinuousBatching", "DecodePolicy", "SlackBatching", "get_decode_policy",
           "OutputLengthEstimator", "EDFPolicy", "FCFSPolicy", "KairosPolicy", "MooreHodgsonPolicy",
           "PrefillPolicy", "get_prefill_policy"]
