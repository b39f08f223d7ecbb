"""Pipeline stages that train the hybrid model: data generation, probes, end-to-end training."""
