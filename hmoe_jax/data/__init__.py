"""The data the pipeline runs on: the synthetic CRE data set and its scoring, the router negatives,
prompts as model inputs, and the feature store."""
