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


def least_squares(rows: list[list[float]], targets: list[float]) -> list[float]:
    """Solves the normal equations, columns scaled to unit size for conditioning."""
    n = len(rows[0])
    if len(rows) < n:
        raise ValueError(f"need at least {n} measurements to fit {n} coefficients, got {len(rows)}")
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(n)]
    xs = [[r[j] / scale[j] for j in range(n)] for r in rows]
    a = [[sum(x[i] * x[j] for x in xs) for j in range(n)] + [sum(x[i] * t for x, t in zip(xs, targets))]
         for i in range(n)]
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


def nonnegative_least_squares(rows: list[list[float]], targets: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (a negative step cost means the fit is
    explaining noise): the most negative term is dropped and the rest refitted, until none is."""
    active = list(range(len(rows[0])))
    while True:
        coef = least_squares([[r[j] for j in active] for r in rows], targets)
        worst = min(range(len(active)), key=lambda i: coef[i])
        if coef[worst] >= 0 or len(active) == 1:
            full = [0.0] * len(rows[0])
            for j, c in zip(active, coef):
                full[j] = max(0.0, c)
            return full
        del active[worst]


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

    def decode_limit_keeping(self, slo, share):
        """The step limit at which decoding keeps `share` of the sequences a second that a limit
        of `slo` seconds allows (floats or arrays). A limit L holds a batch of about
        (L - alpha) / c sequences, c being a sequence's cost, so the batch decodes
        (1 - alpha / L) / c sequences a second whatever c is; this solves
        (1 - alpha / L) = share * (1 - alpha / slo) for L."""
        alpha = self.decode[0]
        return alpha / (1 - share * (1 - alpha / slo))

    @classmethod
    def fit(cls, profile: dict) -> CostModel:
        prefill = profile["prefill"]
        decode = profile["decode"]
        p = nonnegative_least_squares([prefill_features(m["prompts"]) for m in prefill],
                                      [m["seconds"] for m in prefill])
        d = nonnegative_least_squares([decode_features(m["context_lens"]) for m in decode],
                                      [m["seconds"] for m in decode])
        return cls(tuple(p), tuple(d))

    @classmethod
    def from_profile(cls, profile: dict) -> CostModel:
        """Fitted to a profile's measurements; a profile without any (derived from a roofline,
        say) gives its coefficients directly under "fit". ValueError for anything else."""
        try:
            if profile.get("prefill") and profile.get("decode"):
                return cls.fit(profile)
            prefill, decode = (tuple(float(c) for c in profile["fit"][phase]) for phase in ("prefill", "decode"))
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"not a step-time profile as `kairos profile` writes one ({type(e).__name__}: {e})") \
                from None
        if len(prefill) != 3 or len(decode) != 3:
            raise ValueError("not a step-time profile: its fit has three coefficients per phase")
        return cls(prefill, decode)

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


class CalibratedCostModel:
    """A cost model that follows the step times a worker actually sees. A profile is measured on
    a quiet machine; serving adds interference (a co-located worker, the transport's own CPU
    work, a warmer or cooler GPU), and a policy that trusts stale predictions admits work that
    then misses its SLO. Each phase keeps a running mean of observed over predicted step time,
    and of how far single steps stray from it; predictions use the mean plus that spread, so a
    policy packing work up to a deadline keeps a margin for the step-to-step jitter. Policies
    read it like a CostModel."""

    prefill_time = CostModel.prefill_time
    prefill_marginal = CostModel.prefill_marginal
    decode_time = CostModel.decode_time
    decode_limit_keeping = CostModel.decode_limit_keeping

    def __init__(self, base: CostModel, weight: float = 0.05, bounds: tuple[float, float] = (0.25, 4.0)):
        self.base = base
        self.weight = weight  # of each new step: the means span some 1 / weight steps
        self.bounds = bounds
        self.drift = {"prefill": [1.0, 0.0], "decode": [1.0, 0.0]}  # phase -> [mean ratio, mean deviation]
        # phase -> [observed, predicted] seconds of every step so far: over any stretch of
        # serving, the difference of two readings gives its time-weighted ratio.
        self.totals = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}
        self.prefill, self.decode = base.prefill, base.decode
        # The latest step as observed, with the profile's prediction, the calibrated one (the
        # running mean's, without the margin) and, for a decode step, its shape: step logs carry
        # it, so serving's own step times can be fitted afterwards and the calibration judged.
        self.last_step: dict = {}

    def _observe(self, phase: str, predicted: float, seconds: float, **shape: int) -> None:
        stats = self.drift[phase]
        calibrated = predicted * stats[0]  # what the running mean predicted, before this step
        self.last_step = {"predicted_s": predicted, "calibrated_s": calibrated, "observed_s": seconds, **shape}
        self.totals[phase][0] += seconds
        self.totals[phase][1] += predicted
        if predicted > 0.0:
            lo, hi = self.bounds
            ratio = min(hi, max(lo, seconds / predicted))
            stats[1] += self.weight * (abs(ratio - stats[0]) - stats[1])
            stats[0] += self.weight * (ratio - stats[0])
        current = self.base.scaled(*(sum(self.drift[p]) for p in ("prefill", "decode")))
        self.prefill, self.decode = current.prefill, current.decode

    def observe_prefill(self, prompts: list[tuple[int, int]], seconds: float) -> None:
        self._observe("prefill", self.base.prefill_time(prompts), seconds)

    def observe_decode(self, batch_size: int, total_context: int, seconds: float) -> None:
        self._observe("decode", self.base.decode_time(batch_size, total_context), seconds,
                      batch=batch_size, context_tokens=total_context)
