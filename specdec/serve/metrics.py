"""Prometheus metrics of one server, in its own registry (two apps in a process never share).

Names follow vLLM's with the prefix ``specdec:`` so that dashboards built for vLLM's
speculative decoding read them unchanged (prometheus_client adds ``_total`` to counters when
it exposes them, exactly as vLLM's do):

    specdec:spec_decode_num_drafts_total               speculative steps (one per request per step)
    specdec:spec_decode_num_draft_tokens_total         draft tokens proposed
    specdec:spec_decode_num_accepted_tokens_total      draft tokens accepted
    specdec:spec_decode_num_accepted_tokens_per_pos_total{position="j"}
                                                       steps whose j-th draft token was accepted
    specdec:prompt_tokens_total, specdec:generation_tokens_total
    specdec:request_success_total{finished_reason}     requests finished ("stop" | "length")
    specdec:request_rejected_total{reason}             refused: "queue_full" (429)
    specdec:request_aborted_total                      clients gone before the end
    specdec:request_failed_total                       engine errors (500)
    specdec:num_requests_running, specdec:num_requests_waiting   (gauges)
    specdec:time_to_first_token_seconds                arrival -> first committed token
    specdec:inter_token_latency_seconds                time between a request's commits (one
                                                       speculative step may commit several tokens)
    specdec:e2e_request_latency_seconds                arrival -> last token
    specdec:request_queue_time_seconds                 arrival -> its batch starts

Acceptance rate = accepted / draft tokens; mean accepted length = 1 + accepted / drafts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "specdec:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class ServerMetrics:
    """All metrics of one app; thread-safe (prometheus_client metrics are)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = PREFIX
        self.num_drafts = Counter(f"{p}spec_decode_num_drafts", "Speculative decoding steps "
                                  "(one per request per step).", registry=r)
        self.num_draft_tokens = Counter(f"{p}spec_decode_num_draft_tokens",
                                        "Draft tokens proposed.", registry=r)
        self.num_accepted_tokens = Counter(f"{p}spec_decode_num_accepted_tokens",
                                           "Draft tokens accepted.", registry=r)
        self.num_accepted_tokens_per_pos = Counter(
            f"{p}spec_decode_num_accepted_tokens_per_pos",
            "Steps whose draft token at this position was accepted.", ["position"], registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(f"{p}request_success", "Requests finished.",
                                       ["finished_reason"], registry=r)
        self.request_rejected = Counter(f"{p}request_rejected", "Requests refused.", ["reason"],
                                        registry=r)
        self.request_aborted = Counter(f"{p}request_aborted",
                                       "Requests whose client went away before the end.",
                                       registry=r)
        self.request_failed = Counter(f"{p}request_failed", "Requests failed by an engine error.",
                                      registry=r)
        self.num_requests_running = Gauge(f"{p}num_requests_running",
                                          "Requests in the engine's current batch.", registry=r)
        self.num_requests_waiting = Gauge(f"{p}num_requests_waiting",
                                          "Requests waiting in the queue.", registry=r)
        self.time_to_first_token = Histogram(f"{p}time_to_first_token_seconds",
                                             "Arrival to first committed token.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(f"{p}inter_token_latency_seconds",
                                             "Time between successive commits of a request.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(f"{p}e2e_request_latency_seconds",
                                             "Arrival to last token.", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.request_queue_time = Histogram(f"{p}request_queue_time_seconds",
                                            "Arrival to the start of its batch.",
                                            buckets=LATENCY_BUCKETS, registry=r)

    def track_queue(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        self.num_requests_running.set_function(running)
        self.num_requests_waiting.set_function(waiting)

    def record_result(self, result) -> None:
        """Counters of one finished request (a `GenerationResult`)."""
        self.request_success.labels(finished_reason=result.finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        if result.drafted:
            self.num_drafts.inc(result.steps)
            self.num_draft_tokens.inc(result.drafted)
            self.num_accepted_tokens.inc(result.accepted)
            for position, count in enumerate(result.accepted_per_position):
                self.num_accepted_tokens_per_pos.labels(position=str(position)).inc(count)
