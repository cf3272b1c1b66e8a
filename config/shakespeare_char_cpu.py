# config/shakespeare_char.py shrunk for a laptop CPU: 0.8M parameters (795,904): 4 layers, 4 heads of
# 32, d_model 128, 64-character context. Shows learning (val loss falling well below the 3.3-nat
# unigram entropy of the characters) within a few minutes.
# Schedule: 2000 steps x 12 x 64 = 1.5M characters.
#   python prepare.py shakespeare_char && python train.py config/shakespeare_char_cpu.py
out_dir = 'out-shakespeare-char-cpu'
data_dir = 'data/shakespeare_char'
device = 'cpu'
dtype = 'float32'
compile = False
eval_interval = 100
eval_iters = 20
log_interval = 20

# model
vocab_size = 65  # the corpus' characters (prepare.py's meta.json)
d_model = 128
n_heads = 4
n_layers = 4
max_seq_len = 64

batch_size = 12
gradient_accumulation_steps = 1

# Lion (see config/shakespeare_char.py)
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 1e-4
beta2 = 0.99
grad_clip = 1.0
