"""Speed, memory and training-quality benchmarks of multitask_optim against textbook and
third-party implementations. Run ``python -m benchmarks.speed --help``."""
