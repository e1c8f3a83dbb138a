"""Serving: fine-tunes answered unmerged, many adapters over one base.

Owns `AdapterBank` (adapters held unmerged over one model's frozen layers, a batch's rows routed to any
of them, `bank`), the generation `Engine` (requests decoded together, `engine`), loading a base with its
adapters (`load`), `qdora chat` (`chat`) and `qdora serve`, the OpenAI-compatible HTTP server (`server`,
`command`). It may import every wing below it (`core`, `models`, `data`, `train`, `export`,
`integrations`).
"""
