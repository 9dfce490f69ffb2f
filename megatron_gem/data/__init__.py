"""Data: tokenizers, pre-training data, SFT data, and the chat formatting evaluation shares.

    chat.py       roles, the plain template, HF chat-template rendering (no Megatron import)
    tokenizer.py  tokenizers exactly as Megatron's training builds them; SentencePiece training
    jsonl.py      the one JSONL reader (bytes per line, path:line errors)
    text.py       JSONL text -> Megatron indexed dataset for pre-training
    sft.py        chat JSONL -> prompt-masked SFT data; packed SFT datasets for training
    cli.py        the CLIs (tools/prepare_sft_data.py, preprocess_data.py, train_tokenizer.py)

The modules are imported by name (``from megatron_gem.data.sft import prepare_sft_data``):
most of them import Megatron, which costs seconds, so this package imports none of them.
"""
