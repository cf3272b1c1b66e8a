# MPT-70B: d_model 8192, 64 heads of 128, 80 layers -> 64.84B parameters (64,837,918,720, vocab 50304, tied).
# Schedule from llm-foundry's mpt-70b.yaml: 333800 steps x 2048 sequences x 2048 tokens = 1.40T tokens
# (about 20 tokens per parameter), warmup 100 steps, cosine to 10% of the peak, grad clip 1.0.
# Lion: peak lr = MPT's AdamW lr (8e-5) / 3, the Lion paper's "3-10x smaller"; weight decay = lr, i.e.
# each step at the peak shrinks weights by lr (the paper's lambda = 1 for language models).
#   torchrun --standalone --nproc_per_node=8 train.py config/mpt_70b.py
out_dir = 'out-mpt-70b'
sampling_ckpt = False  # no ckpt.pt: it gathers the fp32 model (259 GB) on rank 0's host at each best val loss;
# sample an export instead: python export.py --out_dir=out-mpt-70b --hf_dir=DIR
data_dir = 'data/c4'  # python prepare.py c4 (MPT's pretraining mix started from C4)

# model
d_model = 8192
n_heads = 64
n_layers = 80
max_seq_len = 2048

# batch: 2048 sequences per step = batch_size x gradient_accumulation_steps (over all GPUs)
batch_size = 4  # micro-batch per GPU (llm-foundry's device_train_microbatch_size)
gradient_accumulation_steps = 512
activation_checkpointing = True

# schedule and optimizer
max_iters = 333800
lr_decay_iters = 333800
warmup_iters = 100
learning_rate = 2.7e-5
min_lr = 2.7e-6
weight_decay = 2.7e-5
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
eval_interval = 10000
eval_iters = 100
