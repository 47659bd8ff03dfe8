"""Input pipeline: corpora -> joint SentencePiece vocabulary -> packed training / padded eval batches.

Modules: `corpora` (text files, TFDS, the built-in `synthetic` pair), `tokenizer`,
`packing`, `tokenized`, `pipeline` (train_iterator, eval_batches), `throughput` (`bench --input`).
"""
