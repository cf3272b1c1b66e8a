# MPT-760M: d_model 1536, 12 heads of 128, 24 layers -> 756.8M parameters (756,819,456, vocab 50304, tied).
# Schedule from llm-foundry's mpt-760m.yaml: 29000 steps x 256 sequences x 2048 tokens = 15.2B tokens
# (about 20 tokens per parameter), warmup 100 steps, cosine to 10% of the peak, grad clip 1.0.
# Lion: peak lr = MPT's AdamW lr (2.5e-4) / 3, the Lion paper's "3-10x smaller"; weight decay = lr, i.e.
# each step at the peak shrinks weights by lr (the paper's lambda = 1 for language models).
#   torchrun --standalone --nproc_per_node=8 train.py config/mpt_760m.py
out_dir = 'out-mpt-760m'
data_dir = 'data/c4'  # python prepare.py c4 (MPT's pretraining mix started from C4)

# model
d_model = 1536
n_heads = 12
n_layers = 24
max_seq_len = 2048

# batch: 256 sequences per step = batch_size x gradient_accumulation_steps (over all GPUs)
batch_size = 4  # micro-batch per GPU (llm-foundry's device_train_microbatch_size)
gradient_accumulation_steps = 64
activation_checkpointing = False

# schedule and optimizer
max_iters = 29000
lr_decay_iters = 29000
warmup_iters = 100
learning_rate = 8.3e-5
min_lr = 8.3e-6
weight_decay = 8.3e-5
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
eval_interval = 2000
eval_iters = 100
