"""The comparison harness (`qdora eval`, `qdora analyze`): QDoRA against QLoRA, LoRA and full
fine-tuning on the same data, seeds and budget, with paired statistics (`runner`, `config`,
`comparison`, `sweep`, `tasks`, `answers`, `analyze`). It may import the library,
`qdora.eval.common` and the benchmarks.
"""
