"""Prometheus text metrics: requests, tokens, time to first token, queue length, loaded models.

Written by hand rather than with prometheus_client: four metric families and
one text format are less code than wiring a registry, and add no dependency.
"""

from __future__ import annotations

from collections import Counter

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# The engine threads' figures (engine/scheduler.py Scheduler.stats, summed over the loaded models).
ENGINE = (
    ("running", "gauge", "Sequences in the running batch."),
    ("waiting", "gauge", "Sequences waiting for a place in the batch."),
    ("batch_size", "gauge", "Sequences in the last step's batch."),
    ("kv_used_tokens", "gauge", "KV cache cells held by running sequences."),
    ("kv_cached_tokens", "gauge", "KV cache cells held by cached prompt prefixes."),
    ("kv_capacity_tokens", "gauge", "KV cache cells, fixed at start."),
    ("prompt_tokens", "counter", "Prompt tokens of the requests the engine admitted."),
    ("cache_hit_tokens", "counter", "Prompt tokens read from the prompt cache instead of evaluated."),
    ("preemptions", "counter", "Sequences put back in the queue to make room in the KV cache."),
)


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def generation(self, prompt_tokens: int, completion_tokens: int, ttft_s: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.ttft_sum += ttft_s
        self.ttft_count += 1
        for i, le in enumerate(TTFT_BUCKETS):
            if ttft_s <= le:
                self.ttft_buckets[i] += 1

    def render(self, queue_length: int, active: int, pool=None, engine: dict | None = None) -> str:
        """The metrics text; `pool` (serve.pool.Pool) adds the loaded models, their bytes and the loads and unloads."""
        out = [
            "# HELP phikit_requests_total HTTP requests by route and status.",
            "# TYPE phikit_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'phikit_requests_total{{route="{route}",status="{status}"}} {n}')
        out += [
            "# HELP phikit_prompt_tokens_total Prompt tokens processed.",
            "# TYPE phikit_prompt_tokens_total counter",
            f"phikit_prompt_tokens_total {self.prompt_tokens}",
            "# HELP phikit_completion_tokens_total Tokens generated.",
            "# TYPE phikit_completion_tokens_total counter",
            f"phikit_completion_tokens_total {self.completion_tokens}",
            "# HELP phikit_time_to_first_token_seconds Time from the start of a generation to its first token.",
            "# TYPE phikit_time_to_first_token_seconds histogram",
        ]
        for le, n in zip(TTFT_BUCKETS, self.ttft_buckets):
            out.append(f'phikit_time_to_first_token_seconds_bucket{{le="{le}"}} {n}')
        out += [
            f'phikit_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}',
            f"phikit_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
            f"phikit_time_to_first_token_seconds_count {self.ttft_count}",
            "# HELP phikit_queue_length Requests waiting for the generation slot.",
            "# TYPE phikit_queue_length gauge",
            f"phikit_queue_length {queue_length}",
            "# HELP phikit_generation_active Requests holding a generation slot now (at most --parallel).",
            "# TYPE phikit_generation_active gauge",
            f"phikit_generation_active {active}",
        ]
        for key, kind, text in ENGINE:
            if engine and key in engine:
                name = f"phikit_engine_{key}" + ("_total" if kind == "counter" else "")
                out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {engine[key]}"]
        if pool is not None:
            out += [
                "# HELP phikit_model_loaded_bytes Memory of each loaded model, by the name that last used it.",
                "# TYPE phikit_model_loaded_bytes gauge",
            ]
            for slot in sorted(pool.loaded(), key=lambda s: s.name):
                name = slot.name.replace("\\", "\\\\").replace('"', '\\"')
                out.append(f'phikit_model_loaded_bytes{{model="{name}"}} {slot.size}')
            out += [
                "# HELP phikit_models_loaded Models loaded now.",
                "# TYPE phikit_models_loaded gauge",
                f"phikit_models_loaded {len(pool.loaded())}",
                "# HELP phikit_model_loads_total Models loaded on demand.",
                "# TYPE phikit_model_loads_total counter",
                f"phikit_model_loads_total {pool.loads}",
                "# HELP phikit_model_unloads_total Models unloaded (keep-alive ended, evicted for room, or asked).",
                "# TYPE phikit_model_unloads_total counter",
                f"phikit_model_unloads_total {pool.unloads}",
            ]
        return "\n".join(out) + "\n"
