"""Serving counters and latency histograms, rendered in the Prometheus text format (no dependency).

The engine thread records tokens and latencies; the HTTP layer records rejections; GET
/metrics renders a snapshot. One lock guards it all (a few hundred updates per second).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


@dataclass
class Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, x: float) -> None:
        self.n += 1
        self.total += x
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        lines += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return lines


class ServingMetrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished: Counter[str] = Counter()  # finish_reason -> requests
        self.rejected: Counter[str] = Counter()  # why -> requests (queue_full, bad_request, not_ready)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        # where the engine thread's time goes: rows / steps is the decode batch's occupancy
        self.decode_steps = 0
        self.decode_rows = 0  # busy slots, summed over decode steps
        self.decode_seconds = 0.0
        self.prefill_batches = 0
        self.prefill_seconds = 0.0

    def request_finished(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] += 1

    def request_rejected(self, why: str) -> None:
        with self.lock:
            self.rejected[why] += 1

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def decode_step(self, busy: int, seconds: float) -> None:
        with self.lock:
            self.decode_steps += 1
            self.decode_rows += busy
            self.decode_seconds += seconds

    def prefill(self, seconds: float) -> None:
        with self.lock:
            self.prefill_batches += 1
            self.prefill_seconds += seconds

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self.lock:
            self.tpot.observe(seconds)

    def render(self, queue_depth: int, busy_slots: int, slots: int) -> str:
        with self.lock:
            lines = [
                "# HELP gpt_requests_total Requests finished, by finish reason.",
                "# TYPE gpt_requests_total counter",
            ]
            for reason in sorted(set(self.finished) | {"stop", "length", "cancelled"}):
                lines.append(f'gpt_requests_total{{finish_reason="{reason}"}} {self.finished[reason]}')
            lines += ["# HELP gpt_requests_rejected_total Requests refused, by reason.",
                      "# TYPE gpt_requests_rejected_total counter"]  # fmt: skip
            for why in sorted(set(self.rejected) | {"queue_full", "bad_request"}):
                lines.append(f'gpt_requests_rejected_total{{reason="{why}"}} {self.rejected[why]}')
            lines += [
                "# HELP gpt_prompt_tokens_total Prompt tokens prefilled.",
                "# TYPE gpt_prompt_tokens_total counter",
                f"gpt_prompt_tokens_total {self.prompt_tokens}",
                "# HELP gpt_generation_tokens_total Tokens generated.",
                "# TYPE gpt_generation_tokens_total counter",
                f"gpt_generation_tokens_total {self.generation_tokens}",
                "# HELP gpt_queue_depth Requests waiting for a slot.",
                "# TYPE gpt_queue_depth gauge",
                f"gpt_queue_depth {queue_depth}",
                "# HELP gpt_busy_slots Slots decoding a request.",
                "# TYPE gpt_busy_slots gauge",
                f"gpt_busy_slots {busy_slots}",
                "# HELP gpt_slots Slots of the engine.",
                "# TYPE gpt_slots gauge",
                f"gpt_slots {slots}",
                "# HELP gpt_decode_steps_total Decode steps run (each computes every slot's row).",
                "# TYPE gpt_decode_steps_total counter",
                f"gpt_decode_steps_total {self.decode_steps}",
                "# HELP gpt_decode_rows_total Busy slots summed over decode steps (/ steps = occupancy).",
                "# TYPE gpt_decode_rows_total counter",
                f"gpt_decode_rows_total {self.decode_rows}",
                "# HELP gpt_decode_seconds_total Engine time in decode steps.",
                "# TYPE gpt_decode_seconds_total counter",
                f"gpt_decode_seconds_total {self.decode_seconds:.6f}",
                "# HELP gpt_prefill_batches_total Prefills run (requests admitted together share one).",
                "# TYPE gpt_prefill_batches_total counter",
                f"gpt_prefill_batches_total {self.prefill_batches}",
                "# HELP gpt_prefill_seconds_total Engine time in prefills.",
                "# TYPE gpt_prefill_seconds_total counter",
                f"gpt_prefill_seconds_total {self.prefill_seconds:.6f}",
            ]
            lines += self.ttft.render("gpt_time_to_first_token_seconds", "Arrival to first generated token.")
            lines += self.tpot.render("gpt_time_per_output_token_seconds", "Time between two tokens of a request.")
        return "\n".join(lines) + "\n"
