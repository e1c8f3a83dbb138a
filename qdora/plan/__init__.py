"""The memory planner (`qdora plan`): the peak GPU memory of a training step, term by term.

Owns the plan's settings and result (`config`), the model of each term (`memory`; a mixture of
experts' own terms in `moe`; the sizes and resident weights of each kind of decoder layer in `sizes`)
and the report (`report`). It may import every wing below it; it reads
`qdora.models.shapes` and `qdora.core.config`.
"""
