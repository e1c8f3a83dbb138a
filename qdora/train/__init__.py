"""Training: one run of `qdora train`, from its settings to its last checkpoint.

Owns the run's settings (`config`), the checks made before anything slow (`preflight`), the run's
data (`run_data`), setting up the model, optimizer and run folder (`setup`), sharding over
processes (`fsdp`), the loop (`loop`: `train`), checkpoints (`checkpoint`), the health checks
(`health`), the logs (`run_log`) and the host allocator the command runs on (`allocator`).
It may import `qdora.core`, `qdora.models` and `qdora.data`.
"""
