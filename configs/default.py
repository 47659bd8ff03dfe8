"""Transformer-base on WMT14 En-De with Admin: the defaults every other config starts from.

Each config file exposes `get_config(arg)`; keys are locked, so a mistyped
`--config.a.b=v` override is refused before any work starts.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f'this config takes no argument, got {arg!r}')
  config = ml_collections.ConfigDict()

  # What the model is: its parameters' shapes, the residual that wires them, and its dropout. A resume keeps it.
  config.model = model = ml_collections.ConfigDict()
  model.residual = 'admin'  # one of admin_jax.model.residual.RESIDUALS
  model.num_encoder_layers = 6
  model.num_decoder_layers = 6
  model.d_model = 512
  model.ffn_dim = 2048
  model.num_heads = 8
  model.dropout = 0.1  # on embeddings and on every branch output before the residual add
  model.attention_dropout = 0.1
  model.activation_dropout = 0.1  # after the ReLU of the FFN
  model.share_embeddings = True

  # How the model is computed: the checkpoints are the same whatever these are, and a resume may change
  # them. docs/PERF.md measures each.
  config.perf = perf = ml_collections.ConfigDict()
  # The compute dtype (and the logits', as fairseq fp16): float32 | bfloat16 | float16 (with a loss scale in the
  # train state, which a resume cannot add or drop). Parameters, softmax, LayerNorm, omega and loss stay float32.
  perf.dtype = 'bfloat16'
  # The residual stream x_k between sublayers (LayerNorm outputs and the shortcut) and its gradient:
  # float32 | bfloat16. float32 is what autocast keeps; bfloat16, as fairseq's fp16 recipes keep it in
  # fp16, halves the bytes every residual LayerNorm moves (docs/PERF.md). Statistics stay float32.
  perf.stream_dtype = 'float32'
  # Unrolled layers trained base6 at 1.38x the tokens/s of one lax.scan per stack on an H200
  # (docs/PERF.md) and use less memory; a scan compiles in about half the time, flat in depth.
  perf.scan_layers = False
  # With scan_layers: the first layers of each stack run unrolled before its scan, each faster than a
  # scanned layer and adding an unrolled layer's compile time. Scans of unequal lengths on the two sides
  # (say one encoder layer unrolled) also let XLA leave their stacks unfilled on GPUs, with
  # XLA_FLAGS=--xla_gpu_enable_dus_accumulator_zero_init_elimination=true (docs/PERF.md, "Levers").
  perf.unrolled_encoder_layers = 0
  perf.unrolled_decoder_layers = 0
  perf.remat = 'none'  # none | full | dots (save matmul and flash attention outputs, recompute the rest)
  # xla | cudnn (cuDNN flash attention on GPUs, needs attention_dropout=0) | flash (Pallas flash attention
  # with attention dropout; GPU kernel, interpreted, hence slow, elsewhere). On an H200, flash with the
  # Pallas LayerNorm below trained base6 at 1.22x the tokens/s of xla (docs/PERF.md).
  perf.attention_impl = 'xla'
  # xla | pallas: the Post-LN/Admin residual LayerNorm as one Pallas kernel each way (Triton on GPUs,
  # interpreted, hence slow, elsewhere), which reads the float32 residual stream fewer times.
  perf.layer_norm_impl = 'xla'

  config.data = data = ml_collections.ConfigDict()
  data.source = 'tfds'  # synthetic | text | tfds
  data.src_lang = 'en'
  data.tgt_lang = 'de'
  data.train = 'train'  # path prefix for `text`, split name for `tfds`
  data.valid = 'validation'
  data.test = 'test'
  data.tfds_name = 'wmt14_translate/de-en'
  data.tfds_data_dir = ''  # '' = TFDS default
  data.vocab_size = 32000
  data.spm_model_type = 'bpe'  # bpe | unigram
  data.spm_model = ''  # an existing SentencePiece model; '' = train one into the workdir
  data.spm_max_sentences = 2_000_000  # sentences sampled from the training data to fit SentencePiece
  data.max_len = 256  # tokens per packed row and per sentence; longer pairs are dropped and counted
  data.tokens_per_batch = 32768  # global token budget per optimizer micro-batch (fairseq --max-tokens x GPUs)
  data.eval_batch_size = 64  # sentences per eval/translate batch
  data.prefetch = 2  # packed windows (pipeline.WINDOW_BATCHES batches each) kept ready, per worker
  # Worker processes packing batches, per data shard this process serves (Grain's mp_prefetch); 0: a thread of
  # the training process. The batches are the same for any number (docs/PERF.md, "Input pipeline").
  data.workers = 0
  # A local directory where the tokenized training corpus is written once per vocabulary and corpus, and read
  # (memory-mapped) by later runs instead of tokenizing at every start; '' = tokenize at every start.
  data.token_cache = ''
  data.shards = 0  # data shards packed independently (0 = one per process); fix it to change process counts
  data.synthetic_train_size = 20000
  data.synthetic_eval_size = 500
  data.lowercase = False  # IWSLT14 is scored lowercased
  data.pretokenized = False  # corpus already Moses-tokenized and BPE'd (fairseq style, `@@ ` joins)

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 500_000
  train.num_epochs = 0  # >0: also stop once every data shard has finished this many epochs (fairseq --max-epoch)
  train.optimizer = 'radam'  # radam | adam | adamw
  train.lr = 1e-3
  train.warmup_init_lr = 1e-7
  train.warmup_steps = 8000
  train.b1 = 0.9
  train.b2 = 0.98
  train.eps = 1e-8
  train.weight_decay = 0.0
  train.clip_norm = 0.0  # 0 = no clipping, as the paper
  train.label_smoothing = 0.1
  train.loss_chunk_tokens = 0  # >0: project onto the vocabulary this many tokens at a time (saves memory)
  train.grad_accum = 1
  train.seed = 1111
  train.prng_impl = 'threefry2x32'  # the dropout keys: threefry2x32 | rbg | unsafe_rbg (masks are hashed from them)
  train.log_every_steps = 100
  train.max_bad_steps = 20  # consecutive non-finite steps before the run stops
  # perf.dtype='float16': fairseq's dynamic loss scale. A gradient overflow halves it and skips the step (not a
  # bad step); it doubles after this many steps without one (--fp16-scale-window); the run stops when an
  # overflow takes it below the threshold (--threshold-loss-scale).
  train.loss_scale_window = 256
  train.loss_scale_threshold = 0.03125
  train.trace_steps = 0  # >0: a jax.profiler trace of this many steps into DIR/trace (TensorBoard, XProf)
  train.trace_first_step = 10  # steps left untraced before it: compilation and warm-up

  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  checkpoint.every_steps = 5000
  checkpoint.keep = 10  # the latest checkpoints kept, and (with every_epochs) the last epochs' checkpoints kept
  checkpoint.every_epochs = 0  # >0: also save when every Nth epoch ends; avg:N then averages the last N epochs

  config.eval = eval_config = ml_collections.ConfigDict()
  eval_config.every_steps = 5000  # validation BLEU every N steps; 0: only the final test pass; -1: neither
  eval_config.beam_size = 4
  eval_config.length_penalty = 0.6
  eval_config.max_len_a = 1.2  # decode at most a * source_length + b tokens
  eval_config.max_len_b = 10
  eval_config.max_sentences = 0  # 0 = the whole valid set for in-training BLEU

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1

  config.admin = admin = ml_collections.ConfigDict()
  admin.profile_path = ''  # omega.json or profile.ratio.init to reuse instead of profiling
  admin.mask_padding = False  # exclude padding from the profiling variances (deviation from the reference)
  # Profile on this many tokens of the first batch (its first profile_tokens // data.max_len packed rows), as
  # the authors profile one --max-tokens batch on one GPU; the same rows on any mesh. 0: the whole micro-batch.
  admin.profile_tokens = 0

  return config
