"""When a step should take waiting prompts: the expert-aware scheduler's decision, apart from vLLM.

With experts offloaded, a step that carries a prompt needs nearly every expert of every layer, so
it pays a round of loads (or host work) that a decode step of a few tokens does not, and every
decoding request in that step waits for it. The loads are about the same whether the step carries
one prompt or five, so holding prompts back a little and taking them together pays them once;
host work is also paid per token, and only its fixed part is shared.

Holding is paid in lost throughput: a held request's batch slot idles while the others decode.
With ``n`` requests decoding and ``k`` prompts waiting, holding for ``h`` seconds idles
``k·h`` slot-seconds; releasing costs every one of the ``n + k`` slots the prompt step's expert
cost ``c``, and holding saves that ``c`` once for each prompt that arrives meanwhile and shares
the step (``λ·h`` of them at arrival rate ``λ``, not counting the arrival that raised the
question: ``ArrivalRate.after_first``). So holding pays while ``λ·c·(n + k) > k``, and is a
rent-or-buy decision beyond that (ski rental, 2-competitive): once the held prompts' waits
add up to ``c·(n + k)`` they all go at once. A prompt is never held past ``max_hold_s`` (the
TTFT bound: a held step lasts a decode step, so a prompt is not held into a step that would end
past it), never when nothing decodes (there is nobody to delay), and a prompt whose chunks
have started is never paused. With every expert resident ``c`` is 0 and nothing is held: stock
vLLM's behaviour.

The expert cost of a prompt step (``PromptStepCost``): the expert traffic time of prompt steps
above that of decode steps (the layers' stall + host seconds per step, as the workers report
them), fitted as a fixed part + a part per prompt token; the decision weighs the fixed part
(``c`` above). Before both kinds of step were seen, or without reports, the plan's prior: the
experts a prompt step must load × one load's time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field


@dataclass
class AdmissionStats:
    steps: int = 0
    prompt_steps: int = 0          # steps that carried prompt tokens
    prompt_tokens: int = 0         # prompt tokens over those steps
    held_steps: int = 0            # steps run with waiting prompts held back
    requests_held: int = 0         # distinct requests held at least one step
    held_s: float = 0.0            # total time requests were held (until admitted or gone)
    held_max_s: float = 0.0        # the longest one request was held
    prompt_step_cost_s: float = 0.0  # the current estimate of a prompt step's expert cost
    prompt_step_shared_cost_s: float = 0.0  # the part of it one more prompt in the step saves

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class PromptStepCost:
    """A prompt step's expert cost in seconds, and the part of it that sharing a step saves.

    ``seconds``: the prior until both kinds of step were seen with a traffic meter, then the
    prompt steps' traffic at their mean size − the decode steps' (EWMA). ``shared_s``: what
    one more prompt in the step would *not* add. Loads are paid per distinct expert, nearly the
    same for one prompt or five; host work (hybrid) is paid per token too, and a consolidated
    step carries all of it. So prompt steps' traffic is fitted as ``fixed + per_token·tokens``
    (exponentially weighted least squares over the last ~1/``fit_decay`` prompt steps), and
    ``shared_s`` = fixed − decode traffic, within [0, ``seconds``]. Where the prompt steps'
    sizes barely differ (spread under 10%) the split cannot be seen and all of it counts as
    fixed, as does the prior (loads)."""

    def __init__(self, prior_s: float, decay: float = 0.2, fit_decay: float = 0.05) -> None:
        self.prior_s = prior_s
        self.decay, self.fit_decay = decay, fit_decay
        self._decode: float | None = None
        # weighted sums of 1, tokens, traffic, tokens², tokens·traffic over prompt steps
        self._sums = [0.0] * 5

    def observe(self, traffic_s: float, prompt_tokens: int) -> None:
        """One step's expert traffic and the prompt tokens it carried (0: a decode step)."""
        if traffic_s < 0:  # the counters were reset mid-step: nothing to learn
            return
        if prompt_tokens > 0:
            x, y = float(prompt_tokens), traffic_s
            keep = 1.0 - self.fit_decay
            self._sums = [keep * s + v for s, v in zip(self._sums, (1.0, x, y, x * x, x * y))]
        else:
            self._decode = _ewma(self._decode, traffic_s, self.decay)

    @property
    def measured(self) -> bool:
        return self._sums[0] > 0 and self._decode is not None

    def _fit(self) -> tuple[float, float, float]:
        """(mean prompt-step traffic, its fixed part, per token) from the weighted sums."""
        w, sx, sy, sxx, sxy = self._sums
        mx, my = sx / w, sy / w
        var = sxx / w - mx * mx
        per_token = (sxy / w - mx * my) / var if var > (0.1 * mx) ** 2 else 0.0
        per_token = min(max(per_token, 0.0), my / mx)
        return my, my - per_token * mx, per_token

    @property
    def seconds(self) -> float:
        if not self.measured:
            return self.prior_s
        return max(self._fit()[0] - self._decode, 0.0)

    @property
    def shared_s(self) -> float:
        if not self.measured:
            return self.prior_s
        mean, fixed, _ = self._fit()
        return min(max(fixed - self._decode, 0.0), max(mean - self._decode, 0.0))

    @property
    def per_token_s(self) -> float:
        return self._fit()[2] if self.measured else 0.0


class ArrivalRate:
    """Requests per second reaching the scheduler, counted over the last ``window_s``: after a
    quiet spell it is low at once, in a burst high at once."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()

    def arrived(self, now: float) -> None:
        self._times.append(now)

    def per_s(self, now: float, excluding: int = 0) -> float:
        """Arrivals per second over the window, less ``excluding`` of them (``after_first``)."""
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        return max(len(self._times) - excluding, 0) / self.window_s

    def after_first(self, now: float, waiting: list[Waiting]) -> float:
        """The rate with the first waiting prompt's arrival left out. The question is asked
        because a prompt arrived, so the window always holds that one: counting it, a prompt
        arriving alone would read as 1 / ``window_s`` requests per second, and at a few
        requests a minute every lone prompt would be held in vain. Later arrivals, waiting or
        not, are evidence of the rate."""
        first = min((w.since for w in waiting), default=None)
        return self.per_s(now, int(first is not None and first >= now - self.window_s))


class DecodeStepTime:
    """How long a decode-only step runs (EWMA, from its scheduling to its output): a prompt held
    now waits at least that long, and the TTFT bound must count it."""

    def __init__(self, decay: float = 0.2) -> None:
        self.decay = decay
        self._seconds: float | None = None

    def observe(self, seconds: float) -> None:
        self._seconds = _ewma(self._seconds, seconds, self.decay)

    @property
    def seconds(self) -> float:
        return self._seconds or 0.0


@dataclass
class Waiting:
    """A prompt waiting to be admitted, as the policy sees it."""
    request_id: str
    since: float           # when the scheduler first saw it waiting (monotonic seconds)


@dataclass
class PromptAdmission:
    """The hold-or-release decision, one call per step, and its counters."""

    cost: PromptStepCost
    max_hold_s: float
    stats: AdmissionStats = field(default_factory=AdmissionStats)
    arrivals: ArrivalRate = field(default_factory=ArrivalRate)
    decode_step: DecodeStepTime = field(default_factory=DecodeStepTime)
    _held: dict[str, float] = field(default_factory=dict)   # request → first held at

    def hold(self, now: float, waiting: list[Waiting], decoding: int,
             prompt_in_progress: bool) -> bool:
        """Whether this step should leave the waiting prompts where they are."""
        if not waiting or decoding == 0 or prompt_in_progress:
            return False
        slots = decoding + len(waiting)
        # slot-seconds a prompt step costs that the next prompt sharing it does not add
        release_cost = self.cost.shared_s * slots
        if self.arrivals.after_first(now, waiting) * release_cost <= len(waiting):
            return False                               # too few arrivals to share it with
        waits = [now - w.since for w in waiting]
        if max(waits) + self.decode_step.seconds >= self.max_hold_s or sum(waits) >= release_cost:
            return False
        for w in waiting:
            if w.request_id not in self._held:
                self._held[w.request_id] = now
                self.stats.requests_held += 1
        self.stats.held_steps += 1
        return True

    def scheduled(self, admitted: list[str], gone: list[str], prompt_tokens: int,
                  now: float) -> None:
        """After a step was scheduled: which held requests it admitted (or were finished or
        aborted meanwhile), and how many prompt tokens it carries."""
        for request_id in (*admitted, *gone):
            start = self._held.pop(request_id, None)
            if start is not None:
                self.stats.held_s += now - start
                self.stats.held_max_s = max(self.stats.held_max_s, now - start)
        self.stats.steps += 1
        if prompt_tokens:
            self.stats.prompt_steps += 1
            self.stats.prompt_tokens += prompt_tokens
        self.stats.prompt_step_cost_s = self.cost.seconds
        self.stats.prompt_step_shared_cost_s = self.cost.shared_s

    @property
    def held(self) -> set[str]:
        return set(self._held)


def _ewma(current: float | None, sample: float, decay: float) -> float:
    return sample if current is None else current + decay * (sample - current)
