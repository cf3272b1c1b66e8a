# MPT-30B: d_model 7168, 64 heads of 112, 48 layers -> 29.96B parameters (29,956,283,392, vocab 50304, tied).
# Schedule from llm-foundry's mpt-30b.yaml: 143100 steps x 2048 sequences x 2048 tokens = 600.2B tokens
# (about 20 tokens per parameter), warmup 100 steps, cosine to 10% of the peak, grad clip 1.0.
# Lion: peak lr = MPT's AdamW lr (1e-4) / 3, the Lion paper's "3-10x smaller"; weight decay = lr, i.e.
# each step at the peak shrinks weights by lr (the paper's lambda = 1 for language models).
# The released MPT-30B's shape: 64 heads of 112 (llm-foundry's mpt-30b.yaml has 56 of 128).
# MPT-30B also clamped q, k, v: clip_qkv = 6.0 would match it; off here like the other configs.
#   torchrun --standalone --nproc_per_node=8 train.py config/mpt_30b.py
out_dir = 'out-mpt-30b'
sampling_ckpt = False  # no ckpt.pt: it gathers the fp32 model (120 GB) on rank 0's host at each best val loss;
# sample an export instead: python export.py --out_dir=out-mpt-30b --hf_dir=DIR
data_dir = 'data/c4'  # python prepare.py c4 (MPT's pretraining mix started from C4)

# model
d_model = 7168
n_heads = 64
n_layers = 48
max_seq_len = 2048

# batch: 2048 sequences per step = batch_size x gradient_accumulation_steps (over all GPUs)
batch_size = 8  # micro-batch per GPU (llm-foundry's device_train_microbatch_size)
gradient_accumulation_steps = 256
activation_checkpointing = True

# schedule and optimizer
max_iters = 143100
lr_decay_iters = 143100
warmup_iters = 100
learning_rate = 3.3e-5
min_lr = 3.3e-6
weight_decay = 3.3e-5
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
eval_interval = 10000
eval_iters = 100
