"""Token ids fixed across the tokenizer, the model and decoding (fairseq-style: EOS doubles as BOS)."""

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
