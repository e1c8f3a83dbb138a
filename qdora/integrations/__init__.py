"""Integrations: qdora inside PEFT and transformers' `Trainer`.

Owns `patch_peft` (PEFT's DoRA layers computed by qdora, `peft`) and `AdapterCheckpoints` /
`QDoRATrainer` (`trainer`). It may import every wing below it (`core`, `models`, `data`, `train`,
`export`).
"""
