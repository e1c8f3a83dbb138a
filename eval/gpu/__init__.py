"""The GPU check (`scripts/gpu-check.sh`): every CUDA path against its oracle, and its report
(`check`, `report`). It may import the library and every other folder of `qdora.eval`.
"""
