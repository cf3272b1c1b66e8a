# QLoRA fine-tuning of MPT-30B (29,957,200,896 parameters, vocab 50432) on your own prompt/response data:
# the frozen base in 4-bit NF4 (torchao: pip install torchao), rank-64 adapters on every linear layer, as in
# the QLoRA paper. Hardware: one 48 GB GPU (or 80 GB). train.py's memory plan at start estimates 33.9 GB for
# batch_size=4 at 2048 tokens with activation checkpointing: base 16.0 GB (29.6B linear weights at 4.13 bits,
# the 0.36B embedding in bf16), adapters + Lion 4.2 GB (352M parameters x 12 bytes), activations 11.8 GB,
# gathered blocks 1.9 GB (batch_size=1: 25.0 GB); the README shows the arithmetic. Estimates from the shapes, not
# yet measured on a GPU. Loading reads each process's rows of mpt-30b tensor by tensor and quantizes them on the
# GPU: host memory beyond that is about one tensor (under 1 GB), not the 60 GB checkpoint.
#   python prepare.py --input=my_data.jsonl --tokenizer=mpt-30b --out_dir=data/my_data
#   python train.py config/finetune_mpt_30b_qlora.py --data_dir=data/my_data
#   python export.py --out_dir=out-mpt-30b-qlora --hf_dir=mpt-30b-mine --peft_dir=mpt-30b-mine-adapter
# mpt-30b is a downloaded Hugging Face MPT-30B directory (`huggingface-cli download mosaicml/mpt-30b --local-dir
# mpt-30b`). Hyperparameters: QLoRA's for 33B models (r 64, alpha 16, dropout 0.05, AdamW lr 1e-4 -> Lion 3e-5,
# 16 sequences per step, max grad norm 0.3); not tuned here.
init_from = 'mpt-30b'
data_dir = 'data/my_data'
out_dir = 'out-mpt-30b-qlora'

# model: MPT-30B's shape (init_from's config.json sets it; here for the record)
vocab_size = 50432
d_model = 7168
n_heads = 64
n_layers = 48

# QLoRA
quantize_base = 'nf4'
lora_rank = 64
lora_alpha = 16.0
lora_dropout = 0.05

# batch: 16 sequences of 2048 tokens per step = batch_size x gradient_accumulation_steps
max_seq_len = 2048
batch_size = 4
gradient_accumulation_steps = 4
activation_checkpointing = True
dtype = 'bfloat16'
compile = False  # torch.compile over torchao's NF4 tensors is not measured here

# schedule: set max_iters to about one pass over your data (meta.json's train_tokens / (16 x 2048))
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 50
learning_rate = 3e-5
min_lr = 3e-6
weight_decay = 0.0
grad_clip = 0.3  # QLoRA's max grad norm
eval_interval = 100
eval_iters = 20
