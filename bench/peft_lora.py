"""
The peer of `train.py --lora_rank=R` in bench/vs_nanogpt.py --mode=lora: LoRA fine-tuning of a Hugging Face
MPT the way most people write it, with transformers' MptForCausalLM, PEFT's LoraConfig on the same four linear
layers, torch's AdamW, random windows of a prepared train.bin (uint16 tokens, as nanoGPT reads them). It logs
as nanoGPT does ("iter N: loss X", then "step N: val loss Y") so that the benchmark reads both alike.

    python bench/peft_lora.py --base=path/to/hf_mpt --data_dir=data/my_data --steps=100
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
base = ''  # a Hugging Face MPT directory (save_pretrained)
data_dir = ''  # train.bin / val.bin of that model's tokens
steps = 100
eval_interval = 100  # evaluate at the end (and every this many steps)
eval_iters = 20
log_interval = 10
batch_size = 4
seq_len = 256
learning_rate = 1e-3
lora_rank = 8
lora_alpha = 16.0
seed = 1337
configure(globals(), sys.argv[1:], verbose=False)
# -----------------------------------------------------------------------------

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import MptForCausalLM  # noqa: E402

torch.manual_seed(seed)
rng = np.random.default_rng(seed)
model = MptForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                         target_modules=['Wqkv', 'out_proj', 'up_proj', 'down_proj']))
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
data = {split: np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r') for split in ('train', 'val')}


def get_batch(split):
    tokens = data[split]
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
    rows = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def loss_of(x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def val_loss():
    model.eval()
    loss = sum(loss_of(*get_batch('val')).item() for _ in range(eval_iters)) / eval_iters
    model.train()
    return loss


model.train()
t0 = time.time()
for it in range(steps + 1):
    if it > 0 and (it % eval_interval == 0 or it == steps):
        print(f"step {it}: val loss {val_loss():.4f}", flush=True)
    if it == steps:
        break
    loss = loss_of(*get_batch('train'))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if it % log_interval == 0:
        t1 = time.time()
        print(f"iter {it}: loss {loss.item():.4f}, time {(t1 - t0) * 1000:.1f}ms", flush=True)
        t0 = t1
