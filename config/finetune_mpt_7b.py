# LoRA fine-tuning of MPT-7B (6,649,286,656 parameters, vocab 50432) on your own prompt/response data
# (.jsonl records {"prompt": ..., "response": ...}, llm-foundry's format). Hardware: one 48 GB GPU (or 80 GB):
# train.py's memory plan at start estimates 21.9 GB for batch_size=4 at 2048 tokens (frozen base in bf16 13.3 GB,
# adapters + Lion 0.4 GB, activations 7.4 GB, gathered blocks 0.8 GB); on a 24 GB GPU use --batch_size=1
# --gradient_accumulation_steps=64 (16.4 GB), or QLoRA with --quantize_base=nf4 (12.2 GB at batch_size=4).
# Estimates from the shapes, not yet measured on a GPU. Loading reads only each process's rows of mpt-7b, tensor
# by tensor: host memory beyond the process's shards is about one tensor (under 0.5 GB).
#   python prepare.py --input=my_data.jsonl --tokenizer=mpt-7b --out_dir=data/my_data
#   python train.py config/finetune_mpt_7b.py --data_dir=data/my_data
#   python export.py --out_dir=out-mpt-7b-lora --hf_dir=mpt-7b-mine    # then: python sample.py --init_from=mpt-7b-mine
# mpt-7b is a downloaded Hugging Face MPT-7B directory (e.g. `huggingface-cli download mosaicml/mpt-7b --local-dir
# mpt-7b`): its weights are the frozen base, its tokenizer.json (gpt-neox-20b's) tokenizes the data.
# The hyperparameters are the usual LoRA ones, the learning rate AdamW's 2e-4 divided by 4 for Lion; not tuned here.
init_from = 'mpt-7b'
data_dir = 'data/my_data'
out_dir = 'out-mpt-7b-lora'

# model: MPT-7B's shape (init_from's config.json sets it; here for the record)
vocab_size = 50432
d_model = 4096
n_heads = 32
n_layers = 32

# LoRA: rank-16 adapters on every linear layer (Wqkv, out_proj, up_proj, down_proj); 33.6M trainable parameters
lora_rank = 16
lora_alpha = 32.0
lora_dropout = 0.05

# batch: 64 sequences of 2048 tokens per step = batch_size x gradient_accumulation_steps (over all GPUs)
max_seq_len = 2048
batch_size = 4
gradient_accumulation_steps = 16
activation_checkpointing = True
dtype = 'bfloat16'
compile = False  # not yet measured with LoRA adapters; try --compile=True

# schedule: set max_iters to about one or two passes over your data (meta.json's train_tokens / (64 x 2048))
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 50
learning_rate = 5e-5
min_lr = 5e-6
weight_decay = 0.0  # on the adapters only; the base is frozen
grad_clip = 1.0
eval_interval = 100
eval_iters = 20
