"""The data the pipeline runs on: scoring a domain's predictions, prompts as model inputs, and the
feature store. (The data sets themselves are a domain's: `hmoe_jax.domains`.)"""
