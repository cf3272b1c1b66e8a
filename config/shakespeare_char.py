# Character-level MPT on tiny Shakespeare: 10.6M parameters (10,646,784): 6 layers, 6 heads of 64,
# d_model 384, 256-character context. nanoGPT's classic first run; a few minutes on one GPU.
# Schedule: 5000 steps x 64 x 256 = 82M characters (about 80 passes over the 1M-character corpus).
#   python prepare.py shakespeare_char && python train.py config/shakespeare_char.py
out_dir = 'out-shakespeare-char'
data_dir = 'data/shakespeare_char'
eval_interval = 250  # it overfits: evaluate often, keep the best
eval_iters = 200
log_interval = 10

# model
vocab_size = 65  # the corpus' characters (prepare.py's meta.json)
d_model = 384
n_heads = 6
n_layers = 6
max_seq_len = 256
resid_pdrop = 0.2
emb_pdrop = 0.2

# 64 sequences of 256 characters per step
batch_size = 64
gradient_accumulation_steps = 1

# Lion: nanoGPT's AdamW lr 1e-3 / 3; weight decay = lr (see config/mpt_125m.py)
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 100
learning_rate = 3e-4
min_lr = 3e-5
weight_decay = 3e-4
beta2 = 0.99
grad_clip = 1.0
