"""raywatch tune: Ray Tune search spaces and tuner entry points."""
