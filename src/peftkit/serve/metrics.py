"""Server counters and gauges, rendered in the Prometheus text exposition format (version 0.0.4).

Counters only grow (requests by endpoint and outcome, prompt and generated tokens, adapter loads
and evictions, engine steps); gauges are read when ``/metrics`` is scraped (running and waiting
requests, adapters loaded). ``peftkit_generation_tokens_per_second`` is the generated-token rate
over the last ``window`` seconds: tokens emitted in the window divided by the window's length.
"""

from __future__ import annotations

import threading
import time
from collections import deque


class Metrics:
    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.requests: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.started = time.time()

    def request(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            key = (endpoint, outcome)
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        now = time.monotonic()
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated
            if generated:
                self._recent.append((now, generated))
            self._expire(now)

    def step(self) -> None:
        with self._lock:
            self.steps += 1

    def _expire(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            return sum(n for _, n in self._recent) / self.window

    def render(self, gauges: dict[str, tuple[str, float]], counters: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges``/``counters``: extra ``{name: (help, value)}`` read by the caller."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {_num(value)}")

        with self._lock:
            reqs = sorted(self.requests.items())
            prompt, generated, steps = self.prompt_tokens, self.generated_tokens, self.steps
        metric("peftkit_requests_total", "counter", "Requests by endpoint and outcome (ok, client_error, rate_limited, "
               "server_error, cancelled).", [(f'{{endpoint="{e}",outcome="{o}"}}', n) for (e, o), n in reqs] or [("", 0)])
        metric("peftkit_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", prompt)])
        metric("peftkit_generation_tokens_total", "counter", "Tokens generated.", [("", generated)])
        metric("peftkit_engine_steps_total", "counter", "Batched forward passes (prefill and decode).", [("", steps)])
        metric("peftkit_generation_tokens_per_second", "gauge",
               f"Generated tokens per second over the last {self.window:g} s.", [("", self.tokens_per_second())])
        metric("peftkit_uptime_seconds", "gauge", "Seconds since the server started.", [("", time.time() - self.started)])
        for name, (help_, value) in counters.items():
            metric(name, "counter", help_, [("", value)])
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [("", value)])
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


