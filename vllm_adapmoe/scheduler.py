"""The expert-aware scheduler (``"scheduling": "expert-aware"``): vLLM's own scheduler, with when
to admit waiting prompts decided by what a prompt step costs in expert traffic.

The plugin's engine-config hook installs it as vLLM's ``scheduler_cls``, subclassing the class
vLLM would have used (``AsyncScheduler`` where async scheduling is on, ``Scheduler`` otherwise, as
on CPU), so everything else of stock's stays. It only ever turns on vLLM's own prefill deferral
(``schedule(throttle_prefills=True)``: running decodes fill the step, waiting prompts and
unstarted chunks stay queued), and only where ``PromptAdmission`` (``engine/admission.py``) says
so; vLLM itself ignores the deferral after a step that could not admit every waiting prompt, so
a prompt is never starved.

Inputs, and how they reach this process (vLLM's engine core): the plan's prior (the experts a
prompt step has to load × one load's time) is computed by the engine-config hook in the main
process and travels in ``additional_config["adapmoe_scheduling"]``; live expert traffic (the
layers' stall + host seconds per step) comes from the workers on this machine through
``traffic.py``, else the prior stands. The counters
(``AdmissionStats``) go to the metrics owner's directory, like the layers': ``/metrics`` shows
them as ``adapmoe_scheduler_<name>`` and ``vllm_adapmoe.scheduler_stats(llm)`` returns them.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_adapmoe import metrics
from vllm_adapmoe.config import AdapMoEConfig
from vllm_adapmoe.engine.admission import PromptAdmission, PromptStepCost, Waiting
from vllm_adapmoe.traffic import TrafficReader

SCHEDULING_KEY = "adapmoe_scheduling"  # additional_config entry the hook fills for this class


class ExpertAwareMixin:
    """The admission decision around ``Scheduler.schedule``; mixed into vLLM's classes below."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        additional = self.vllm_config.additional_config or {}
        cfg = AdapMoEConfig.from_additional_config(additional)
        prior = float(additional.get(SCHEDULING_KEY, {}).get("prompt_step_prior_s", 0.0))
        self.admission = PromptAdmission(PromptStepCost(prior), cfg.max_prompt_hold_ms / 1000)
        self._first_seen: dict[str, float] = {}
        # id(scheduler output) → (its prompt tokens, when it was scheduled)
        self._in_flight: dict[int, tuple[int, float]] = {}
        self._traffic = TrafficReader()
        self._traffic_mark = self._traffic.seconds()
        self._report = metrics.SchedulerReport.for_this_process()
        if self._report is not None:
            self._report.publish(self.admission.stats, force=True)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        now = time.monotonic()
        waiting = self._waiting_prompts(now)  # (also counts arrivals)
        # vLLM ignores the deferral after a step that could not admit every waiting prompt
        hold = not self.prefill_capacity_bound and self.admission.hold(
            now, waiting, sum(not r.is_prefill_chunk for r in self.running),
            any(r.is_prefill_chunk for r in self.running))
        out = super().schedule(throttle_prefills or hold)
        admitted = [rid for rid in out.num_scheduled_tokens if rid in self._first_seen]
        gone = [rid for rid in self._first_seen if rid not in self.requests]
        for rid in (*admitted, *gone):  # every held request is among the first seen
            self._first_seen.pop(rid, None)
        prompt_tokens = self._prompt_tokens(out)
        self.admission.scheduled(admitted, gone, prompt_tokens, time.monotonic())
        self._in_flight[id(out)] = (prompt_tokens, now)
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        step = self._in_flight.pop(id(scheduler_output), None)
        seconds = self._traffic.seconds()
        if step is not None:
            carried, scheduled_at = step
            decode_only = scheduler_output.total_num_scheduled_tokens > 0 and not carried
            if decode_only:  # how long a held prompt waits for the next decision
                self.admission.decode_step.observe(time.monotonic() - scheduled_at)
            if seconds is not None and self._traffic_mark is not None:
                self.admission.cost.observe(seconds - self._traffic_mark, carried)
        self._traffic_mark = seconds
        if self._report is not None:
            # not has_requests(): that stays true until the next step hands the finished ids
            # to the workers, and an engine stepped by its caller (in-process) takes no next step
            self._report.publish(self.admission.stats, force=not self.has_unfinished_requests())
        return outputs

    def _waiting_prompts(self, now: float) -> list[Waiting]:
        waiting = []
        for request in self.waiting:
            if request.request_id not in self._first_seen:
                self._first_seen[request.request_id] = now
                self.admission.arrivals.arrived(now)
            since = self._first_seen[request.request_id]
            waiting.append(Waiting(request.request_id, since))
        return waiting

    def _prompt_tokens(self, out: SchedulerOutput) -> int:
        """Prompt tokens the step carries (vLLM has already advanced ``num_computed_tokens``)."""
        total = 0
        for rid, n in out.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            if request is None:
                continue
            after = request.num_computed_tokens
            total += max(0, min(request.num_prompt_tokens, after) - (after - n))
        return total


class ExpertAwareScheduler(ExpertAwareMixin, Scheduler):
    """Synchronous scheduling (CPU, where vLLM turns async scheduling off)."""


class ExpertAwareAsyncScheduler(ExpertAwareMixin, AsyncScheduler):
    """Async scheduling (GPU): steps overlap by one, so a step's traffic reading may include a
    little of the next one's host work."""


def scheduler_class(async_scheduling: bool) -> type:
    return ExpertAwareAsyncScheduler if async_scheduling else ExpertAwareScheduler
