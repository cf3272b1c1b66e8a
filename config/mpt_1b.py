# MPT-1B: d_model 2048, 16 heads of 128, 24 layers -> 1.31B parameters (1,311,082,496, vocab 50304, tied).
# Schedule from llm-foundry's mpt-1b.yaml: 24800 steps x 512 sequences x 2048 tokens = 26.0B tokens
# (about 20 tokens per parameter), warmup 100 steps, cosine to 10% of the peak, grad clip 1.0.
# Lion: peak lr = MPT's AdamW lr (2e-4) / 3, the Lion paper's "3-10x smaller"; weight decay = lr, i.e.
# each step at the peak shrinks weights by lr (the paper's lambda = 1 for language models).
#   torchrun --standalone --nproc_per_node=8 train.py config/mpt_1b.py
out_dir = 'out-mpt-1b'
data_dir = 'data/c4'  # python prepare.py c4 (MPT's pretraining mix started from C4)

# model
d_model = 2048
n_heads = 16
n_layers = 24
max_seq_len = 2048

# batch: 512 sequences per step = batch_size x gradient_accumulation_steps (over all GPUs)
batch_size = 4  # micro-batch per GPU (llm-foundry's device_train_microbatch_size)
gradient_accumulation_steps = 128
activation_checkpointing = False

# schedule and optimizer
max_iters = 24800
lr_decay_iters = 24800
warmup_iters = 100
learning_rate = 6.7e-5
min_lr = 6.7e-6
weight_decay = 6.7e-5
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
eval_interval = 2000
eval_iters = 100
