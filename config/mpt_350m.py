# MPT-350M: d_model 1024, 16 heads of 64, 24 layers -> 353.6M parameters (353,551,360, vocab 50304, tied).
# Schedule from llm-foundry's mpt-350m.yaml: 13400 steps x 256 sequences x 2048 tokens = 7.0B tokens
# (about 20 tokens per parameter), warmup 100 steps, cosine to 10% of the peak, grad clip 1.0.
# Lion: peak lr = MPT's AdamW lr (3e-4) / 3, the Lion paper's "3-10x smaller"; weight decay = lr, i.e.
# each step at the peak shrinks weights by lr (the paper's lambda = 1 for language models).
#   torchrun --standalone --nproc_per_node=8 train.py config/mpt_350m.py
out_dir = 'out-mpt-350m'
data_dir = 'data/c4'  # python prepare.py c4 (MPT's pretraining mix started from C4)

# model
d_model = 1024
n_heads = 16
n_layers = 24
max_seq_len = 2048

# batch: 256 sequences per step = batch_size x gradient_accumulation_steps (over all GPUs)
batch_size = 8  # micro-batch per GPU (llm-foundry's device_train_microbatch_size)
gradient_accumulation_steps = 32
activation_checkpointing = False

# schedule and optimizer
max_iters = 13400
lr_decay_iters = 13400
warmup_iters = 100
learning_rate = 1e-4
min_lr = 1e-5
weight_decay = 1e-4
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
eval_interval = 1000
eval_iters = 100
