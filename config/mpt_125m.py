# MPT-125M: d_model 768, 12 heads of 64, 12 layers -> 123.6M parameters (123,587,328, vocab 50304, tied).
# Schedule from llm-foundry's mpt-125m.yaml: 4800 steps x 256 sequences x 2048 tokens = 2.5B tokens
# (about 20 tokens per parameter), warmup 100 steps, cosine to 10% of the peak, grad clip 1.0.
# Lion: peak lr = MPT's AdamW lr (6e-4) / 3, the Lion paper's "3-10x smaller"; weight decay = lr, i.e.
# each step at the peak shrinks weights by lr (the paper's lambda = 1 for language models).
#   torchrun --standalone --nproc_per_node=8 train.py config/mpt_125m.py
out_dir = 'out-mpt-125m'
data_dir = 'data/c4'  # python prepare.py c4 (MPT's pretraining mix started from C4)

# model
d_model = 768
n_heads = 12
n_layers = 12
max_seq_len = 2048

# batch: 256 sequences per step = batch_size x gradient_accumulation_steps (over all GPUs)
batch_size = 16  # micro-batch per GPU (llm-foundry's device_train_microbatch_size)
gradient_accumulation_steps = 16
activation_checkpointing = False

# schedule and optimizer
max_iters = 4800
lr_decay_iters = 4800
warmup_iters = 100
learning_rate = 2e-4
min_lr = 2e-5
weight_decay = 2e-4
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
eval_interval = 500
eval_iters = 100
