"""/metrics: the engine loop's state in Prometheus' text format (0.0.4)."""
from __future__ import annotations


def render(loop, model_name: str) -> str:
    engine = loop.engine
    pool = engine.pool
    total = pool.n_pages - 1  # page 0 is the scratch page
    label = '{model="%s"}' % model_name.replace("\\", "\\\\").replace('"', '\\"')
    rows = [
        ("ktjax_queue_length", "gauge", "Requests submitted and not yet running.",
         loop.queue_length),
        ("ktjax_running_requests", "gauge", "Requests being prefilled or decoded.",
         loop.running),
        ("ktjax_kv_pages_used", "gauge", "KV cache pages held by requests.",
         pool.used_pages),
        ("ktjax_kv_pages_total", "gauge", "KV cache pages in the pool.", total),
        ("ktjax_prefix_cache_hit_rate", "gauge",
         "Share of looked-up full prompt pages found in the prefix cache.",
         engine.prefix_hit_rate),
        ("ktjax_generation_tokens_per_second", "gauge",
         "Generated tokens per second over the last 10 s.", loop.tokens_per_second()),
        ("ktjax_generation_tokens_total", "counter", "Tokens generated.",
         loop.generated_tokens),
        ("ktjax_prompt_tokens_total", "counter", "Prompt tokens admitted.", loop.prompt_tokens),
        ("ktjax_requests_finished_total", "counter", "Requests that ended (any reason).",
         loop.finished_requests),
        ("ktjax_failed_steps_total", "counter", "Engine steps that raised.",
         loop.failed_steps),
    ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{label} {value}"]
    return "\n".join(out) + "\n"
