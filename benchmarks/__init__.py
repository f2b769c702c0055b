"""airspeed velocity benchmarks of fastbn (see asv.conf.json at the repository root)."""
