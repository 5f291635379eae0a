"""Scheduling policies. Pure Python with no torch import, so that workers and the simulator run
the very same policy objects."""

from scheduler.policy import AdmissionPolicy, FCFSPolicy, get_admission_policy

__all__ = ["AdmissionPolicy", "FCFSPolicy", "get_admission_policy"]
