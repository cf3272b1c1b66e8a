# MPT-30B (29,956,283,392 parameters), stage 2: context 2048 -> 8192 from a stage-1 checkpoint.
# MosaicML trained MPT-30B at 2k and adapted it to 8k at the end of pretraining; ALiBi needs no new
# position table, only training at the new length. A stage keeps the checkpoint's architecture and weights;
# Lion's state, the step count, the data order and the schedule start afresh (train.py, load_weights).
# Tokens per step as in stage 1 (2048 x 2048 = 512 x 8192 = 4.2M); 7,150 steps = 30B tokens, 5% of
# stage 1's 600B, and a peak lr of 30% of stage 1's: both our choices, not MosaicML's published recipe.
#   torchrun --nnodes=... --nproc_per_node=8 train.py config/mpt_30b_8k.py --init_from=out-mpt-30b/ckpt-143100
# Each evaluation also reports val loss at 2k (stage 1's length) and 16k (past it).
out_dir = 'out-mpt-30b-8k'
sampling_ckpt = False  # no ckpt.pt: it gathers the fp32 model (120 GB) on rank 0's host at each best val loss;
# sample an export instead: python export.py --out_dir=out-mpt-30b-8k --hf_dir=DIR
data_dir = 'data/c4'
init_from = 'out-mpt-30b/ckpt-143100'  # stage 1's last checkpoint (config/mpt_30b.py)

# model: the shape comes from the checkpoint; these match it
d_model = 7168
n_heads = 64
n_layers = 48
max_seq_len = 8192
eval_seq_lens = [2048, 8192, 16384]

# batch: 512 sequences of 8192 per step = batch_size x gradient_accumulation_steps (over all GPUs)
batch_size = 2
gradient_accumulation_steps = 256
activation_checkpointing = True

# schedule and optimizer
max_iters = 7150
lr_decay_iters = 7150
warmup_iters = 100
learning_rate = 1e-5
min_lr = 1e-6
weight_decay = 1e-5
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
eval_interval = 1000
eval_iters = 100
