"""The training stages: precompute features, train the probes (and the router classifier), train the
hybrid layer end to end."""
