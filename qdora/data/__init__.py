"""Data: training records in every supported format, turned into token ids and labels.

Owns reading records from JSON/JSONL/Parquet/Arrow/`datasets` folders (`records`), chat
templates (`chat`), tokenizing and collating examples (`examples`), packing (`packing`), the
on-disk token cache (`token_cache`) and scoring multiple-choice answers with a model (`scoring`).
It may import `qdora.core` and `qdora.models`.
"""
