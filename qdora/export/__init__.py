"""Export: a trained adapter merged into a checkpoint others can load, and how far it drifts.

Owns the merge into a plain checkpoint (`merge`), the NF4 and GGUF exports (`nf4`, `gguf`) and the
drift of an export from the adapted model (`drift`). It may import `qdora.core`, `qdora.models`,
`qdora.data` and `qdora.train`.
"""
