"""Models: reading a checkpoint or GGUF file, adapting its linear layers, and the adapter files.

Owns the checkpoint reader and the streaming NF4 loader (`reader`, `loading`, `gguf`, `hf_config`),
the model shapes the planner and loader share (`shapes`), the surgery that puts `QDoRALinear`
layers into a transformers model (`surgery`), the chunked loss in a causal LM's forward
(`head_loss`), the long-sequence parts of a decoder layer (`tiled_mlp`: its MLP, or with `tiled_layers` all its
per-token parts, over tiles of tokens;
`offload`: its checkpointed input in host memory), and the adapter files in our format and PEFT's
(`adapter_save` writes, `adapter_io` reads and loads). It may import `qdora.core` only.
"""
