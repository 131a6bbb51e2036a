"""What a program does after forward, as `ktjax export --kinds` names it (kept apart from
program_set so the command line builds its parser without importing jax)."""

SAMPLER_KINDS = ("greedy", "greedy-logprobs", "sample", "score")
DEFAULT_KINDS = ("greedy", "sample")
