"""Policy registries: one per phase, so that the command line, the workers and the simulator
offer and build the very same policies. A policy class names itself (`name`), says whether it
predicts step times (`needs_cost_model`) and builds itself from `PolicySettings`; adding one
takes the class and its line in the registry."""

from __future__ import annotations

from dataclasses import dataclass

from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.defaults import MAX_BATCH, TOKEN_BUDGET


@dataclass(frozen=True)
class PolicySettings:
    """Everything a policy may need to be built."""

    cost: CostModel | None = None  # step-time predictions, for the policies that need them
    token_budget: int = TOKEN_BUDGET  # prompt tokens per prefill step
    max_batch: int = MAX_BATCH  # sequences per decode step
    # A prompt a prefill policy demoted goes first once it has waited this long (None: no limit).
    max_prefill_wait_s: float | None = None


class PolicyRegistry(dict):
    """Policy classes of one phase by name, in the order they were listed."""

    def __init__(self, phase: str, *classes: type):
        super().__init__((cls.name, cls) for cls in classes)
        self.phase = phase

    def register(self, cls: type) -> None:
        """Adds a policy defined beside the phase's own module (it imports that module)."""
        self[cls.name] = cls

    def needs_cost_model(self, name: str) -> bool:
        return self.policy_class(name).needs_cost_model

    def build(self, name: str, settings: PolicySettings):
        cls = self.policy_class(name)
        if cls.needs_cost_model and settings.cost is None:
            raise ValueError(f"the {name} {self.phase} policy needs a cost model (a step-time profile)")
        return cls.build(settings)

    def describe(self) -> str:
        """One line per policy, for the command line's help."""
        return "; ".join(f"{name}: {cls.summary}" for name, cls in self.items())

    def policy_class(self, name: str) -> type:
        """The class registered under name; a clear error naming the choices if none is."""
        if name not in self:
            raise ValueError(f"unknown {self.phase} policy {name!r}; available: {', '.join(self)}")
        return self[name]
