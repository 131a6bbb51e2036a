"""Batch evaluation: many requests through continuous batching (batch), multiple-choice
log-likelihood (choices), perplexity with llama.cpp's protocol (perplexity)."""
