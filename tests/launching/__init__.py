"""Tests of pipeline.launching: cluster profiles, the SLURM executor (faked and real), launching."""
