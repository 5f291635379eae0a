"""Step-time prediction, fitted to a measured profile (`kairos profile`).

    prefill step = a + b * new tokens + c * sum over prompts of (new tokens x context tokens)
    decode step  = alpha + beta * batch size + gamma * sum of context lengths

The prefill terms are the fixed launch cost, the per-token work (projections, MLP) and the
causal attention work; with a cached prefix a prompt's new tokens attend to the whole context.
The decode terms are the fixed cost (weights read once per step), the per-sequence work and the
KV bytes read. Fitted by least squares with non-negative coefficients; pure Python, so the
simulator shares it.
"""

from __future__ import annotations

from dataclasses import dataclass


def solve_normal_equations(gram: list[list[float]], rhs: list[float]) -> list[float]:
    """Solves gram @ x = rhs, scaled to a unit diagonal for conditioning."""
    n = len(rhs)
    scale = [gram[j][j] ** 0.5 or 1.0 for j in range(n)]
    a = [[gram[i][j] / (scale[i] * scale[j]) for j in range(n)] + [rhs[i] / scale[i]] for i in range(n)]
    for col in range(n):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            raise ValueError("the profile does not vary enough to fit the cost model")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] / scale[i] for i in range(n)]


def nonnegative_solve(gram: list[list[float]], rhs: list[float]) -> list[float]:
    """Least squares from its normal equations, with every coefficient >= 0 (a negative step
    cost means the fit is explaining noise): the most negative term is dropped and the rest
    refitted, until none is."""
    active = list(range(len(rhs)))
    while True:
        coef = solve_normal_equations([[gram[i][j] for j in active] for i in active], [rhs[i] for i in active])
        worst = min(range(len(active)), key=lambda i: coef[i])
        if coef[worst] >= 0 or len(active) == 1:
            full = [0.0] * len(rhs)
            for j, c in zip(active, coef):
                full[j] = max(0.0, c)
            return full
        del active[worst]


def normal_equations(rows: list[list[float]], targets: list[float]) -> tuple[list[list[float]], list[float]]:
    n = len(rows[0])
    if len(rows) < n:
        raise ValueError(f"need at least {n} measurements to fit {n} coefficients, got {len(rows)}")
    return ([[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)],
            [sum(r[i] * t for r, t in zip(rows, targets)) for i in range(n)])


def nonnegative_least_squares(rows: list[list[float]], targets: list[float]) -> list[float]:
    return nonnegative_solve(*normal_equations(rows, targets))


def mape(predicted: list[float], measured: list[float]) -> float:
    return sum(abs(p - m) / m for p, m in zip(predicted, measured)) / len(measured)


def prefill_features(prompts: list[tuple[int, int]]) -> list[float]:
    """prompts: (new tokens, context tokens incl. the new ones) per prompt in the step."""
    return [1.0, float(sum(n for n, _ in prompts)), float(sum(n * k for n, k in prompts))]


def decode_features(context_lens: list[int]) -> list[float]:
    return [1.0, float(len(context_lens)), float(sum(context_lens))]


@dataclass(frozen=True)
class CostModel:
    prefill: tuple[float, float, float]  # a, b, c (seconds)
    decode: tuple[float, float, float]  # alpha, beta, gamma (seconds)

    def prefill_time(self, prompts: list[tuple[int, int]]) -> float:
        return max(0.0, sum(c * f for c, f in zip(self.prefill, prefill_features(prompts))))

    def prefill_marginal(self, new_tokens: int, context_tokens: int) -> float:
        """What one prompt adds to a prefill step, without the step's fixed cost."""
        _, b, c = self.prefill
        return max(0.0, b * new_tokens + c * new_tokens * context_tokens)

    def decode_time(self, batch_size: int, total_context: int) -> float:
        alpha, beta, gamma = self.decode
        return max(0.0, alpha + beta * batch_size + gamma * total_context)

    @classmethod
    def fit(cls, profile: dict) -> CostModel:
        prefill = profile["prefill"]
        decode = profile["decode"]
        p = nonnegative_least_squares([prefill_features(m["prompts"]) for m in prefill], [m["seconds"] for m in prefill])
        d = nonnegative_least_squares([decode_features(m["context_lens"]) for m in decode], [m["seconds"] for m in decode])
        return cls(tuple(p), tuple(d))

    @classmethod
    def from_profile(cls, profile: dict) -> CostModel:
        """Fitted to a profile's measurements; a profile without any (derived from a roofline,
        say) gives its coefficients directly under "fit"."""
        if profile.get("prefill") and profile.get("decode"):
            return cls.fit(profile)
        fit = profile["fit"]
        return cls(tuple(fit["prefill"]), tuple(fit["decode"]))

    @classmethod
    def fit_with_holdout(cls, profile: dict, every: int = 4) -> tuple[CostModel, dict]:
        """Fits on all but every `every`-th point, reports MAPE on those, then refits on all."""
        report = {}
        for kind, predict in (("prefill", lambda m, pts: m.prefill_time(pts["prompts"])),
                              ("decode", lambda m, pts: m.decode_time(len(pts["context_lens"]),
                                                                     sum(pts["context_lens"])))):
            points = profile[kind]
            held = points[every - 1 :: every]
            train = [pt for i, pt in enumerate(points) if i % every != every - 1]
            model = cls.fit({**profile, kind: train})
            report[f"{kind}_mape"] = mape([predict(model, pt) for pt in held], [pt["seconds"] for pt in held])
        return cls.fit(profile), report

    def to_dict(self) -> dict:
        return {"prefill": list(self.prefill), "decode": list(self.decode)}

    def scaled(self, prefill_factor: float, decode_factor: float) -> CostModel:
        return CostModel(tuple(c * prefill_factor for c in self.prefill), tuple(c * decode_factor for c in self.decode))


class ServedFit:
    """One phase's coefficients as serving runs them, fitted to the steps observed by
    exponentially weighted least squares. A profile is timed on the model's steps alone;
    serving adds work that scales with its own terms (the loop's scheduling and streaming per
    sequence, a co-located worker slowing the large steps most), which no single scale on the
    profile carries. The profile's coefficients, scaled by the running ratio, are the prior:
    each is held toward it with the weight of `prior_steps` typical steps, so the steps seen
    decide only the directions they vary in, and a worker that only ever runs one shape of step
    keeps the profile's shape for the others."""

    def __init__(self, base: tuple[float, ...], memory: int = 200, prior_steps: float = 2.0):
        n = len(base)
        self.base = base
        self.decay = 1.0 - 1.0 / memory
        self.prior_steps = prior_steps
        self.weight = 0.0  # decayed count of steps
        self.gram = [[0.0] * n for _ in range(n)]
        self.rhs = [0.0] * n

    def observe(self, features: list[float], seconds: float) -> None:
        d = self.decay
        self.weight = d * self.weight + 1.0
        for i, fi in enumerate(features):
            self.rhs[i] = d * self.rhs[i] + fi * seconds
            row = self.gram[i]
            for j, fj in enumerate(features):
                row[j] = d * row[j] + fi * fj

    def coefficients(self, ratio: float) -> tuple[float, ...]:
        if self.weight == 0.0:
            return tuple(c * ratio for c in self.base)
        n = len(self.base)
        # Per term, `prior_steps` pseudo-steps of its typical size that cost what the scaled
        # profile says.
        prior = [self.prior_steps * self.gram[j][j] / self.weight for j in range(n)]
        gram = [[g + (prior[i] if i == j else 0.0) for j, g in enumerate(row)] for i, row in enumerate(self.gram)]
        rhs = [r + prior[j] * ratio * c for j, (r, c) in enumerate(zip(self.rhs, self.base))]
        return tuple(nonnegative_solve(gram, rhs))


class CalibratedCostModel:
    """A cost model that follows the step times a worker actually sees. A profile is measured on
    a quiet machine; serving adds interference (a co-located worker, the transport's own CPU
    work, a warmer or cooler GPU), and a policy that trusts stale predictions admits work that
    then misses its SLO. Each phase refits its coefficients to the observed steps (ServedFit),
    and keeps a running mean of how far single steps stray from the fit's prediction made before
    them; predictions add that spread, so a policy packing work up to a deadline keeps a margin
    for the step-to-step jitter. Each phase also keeps a running mean of observed over profiled
    step time, and how far steps stray from it: the drift that `kairos status` reports. Policies
    read it like a CostModel."""

    prefill_time = CostModel.prefill_time
    prefill_marginal = CostModel.prefill_marginal
    decode_time = CostModel.decode_time

    def __init__(self, base: CostModel, weight: float = 0.05, bounds: tuple[float, float] = (0.25, 4.0)):
        self.base = base
        self.weight = weight  # of each new step: the means span some 1 / weight steps
        self.bounds = bounds
        self.drift = {"prefill": [1.0, 0.0], "decode": [1.0, 0.0]}  # phase -> [mean ratio, mean deviation]
        self.fits = {"prefill": ServedFit(base.prefill), "decode": ServedFit(base.decode)}
        self.fitted = {"prefill": base.prefill, "decode": base.decode}  # phase -> the fit's coefficients
        self.spread = {"prefill": 0.0, "decode": 0.0}  # phase -> mean relative deviation from the fit
        # phase -> [observed, predicted] seconds of every step so far: over any stretch of
        # serving, the difference of two readings gives its time-weighted ratio.
        self.totals = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}
        self.prefill, self.decode = base.prefill, base.decode
        # The latest step as observed, with the profile's prediction, the fit's before the step,
        # and (for a decode step) its shape: step logs carry it, so serving's own step times can
        # be fitted afterwards and the online fit judged.
        self.last_step: dict = {}

    def _observe(self, phase: str, features: list[float], seconds: float, **shape: int) -> None:
        predicted = max(0.0, sum(c * f for c, f in zip(getattr(self.base, phase), features)))
        fitted = sum(c * f for c, f in zip(self.fitted[phase], features))
        self.last_step = {"predicted_s": predicted, "fitted_s": fitted, "observed_s": seconds, **shape}
        self.totals[phase][0] += seconds
        self.totals[phase][1] += predicted
        if predicted <= 0.0:
            return
        lo, hi = self.bounds
        seconds = min(hi * predicted, max(lo * predicted, seconds))  # a stall is not believed
        stats = self.drift[phase]
        ratio = seconds / predicted
        stats[1] += self.weight * (abs(ratio - stats[0]) - stats[1])
        stats[0] += self.weight * (ratio - stats[0])
        if fitted > 0.0:
            self.spread[phase] += self.weight * (abs(seconds / fitted - 1.0) - self.spread[phase])
        fit = self.fits[phase]
        fit.observe(features, seconds)
        self.fitted[phase] = fit.coefficients(stats[0])
        margin = 1.0 + self.spread[phase]
        setattr(self, phase, tuple(c * margin for c in self.fitted[phase]))

    def observe_prefill(self, prompts: list[tuple[int, int]], seconds: float) -> None:
        self._observe("prefill", prefill_features(prompts), seconds)

    def observe_decode(self, batch_size: int, total_context: int, seconds: float) -> None:
        self._observe("decode", [1.0, float(batch_size), float(total_context)], seconds,
                      batch=batch_size, context_tokens=total_context)
