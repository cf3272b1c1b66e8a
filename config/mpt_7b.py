# MPT-7B: d_model 4096, 32 heads of 128, 32 layers -> 6.65B parameters (6,648,762,368, vocab 50304, tied).
# Schedule from llm-foundry's mpt-7b.yaml: 63900 steps x 1024 sequences x 2048 tokens = 134.0B tokens
# (about 20 tokens per parameter), warmup 100 steps, cosine to 10% of the peak, grad clip 1.0.
# Lion: peak lr = MPT's AdamW lr (1.2e-4) / 3, the Lion paper's "3-10x smaller"; weight decay = lr, i.e.
# each step at the peak shrinks weights by lr (the paper's lambda = 1 for language models).
#   torchrun --standalone --nproc_per_node=8 train.py config/mpt_7b.py
out_dir = 'out-mpt-7b'
sampling_ckpt = False  # no ckpt.pt: it gathers the fp32 model (27 GB) on rank 0's host at each best val loss;
# sample an export instead: python export.py --out_dir=out-mpt-7b --hf_dir=DIR
data_dir = 'data/c4'  # python prepare.py c4 (MPT's pretraining mix started from C4)

# model
d_model = 4096
n_heads = 32
n_layers = 32
max_seq_len = 2048

# batch: 1024 sequences per step = batch_size x gradient_accumulation_steps (over all GPUs)
batch_size = 8  # micro-batch per GPU (llm-foundry's device_train_microbatch_size)
gradient_accumulation_steps = 128
activation_checkpointing = True

# schedule and optimizer
max_iters = 63900
lr_decay_iters = 63900
warmup_iters = 100
learning_rate = 4e-5
min_lr = 4e-6
weight_decay = 4e-5
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
eval_interval = 5000
eval_iters = 100
