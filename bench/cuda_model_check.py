"""One-shot CUDA check of model/ on a CUDA machine.

Run from the repo root:  python bench/cuda_model_check.py
Checks: CPU vs CUDA forward agreement, question_len on CPU or CUDA, bf16 autocast forward+backward
(all grads finite), losses stay float32, torch.compile forward, then exits 0/1.
"""
import sys, os, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import torch
from test_model import tiny_config, make_model, make_inputs
from model.losses import hard_loss, feature_distill_loss

assert torch.cuda.is_available(), "no CUDA"
dev = torch.device("cuda")
cfg = tiny_config()
model = make_model(cfg).eval()
inputs = make_inputs(cfg, [3, 5, 2, 4])
labels = torch.tensor([1, 2, 3, 4])
with torch.no_grad():
    cpu_logits = model(*inputs).logits
model.to(dev)
cuda_inputs = [t.to(dev) for t in inputs]
with torch.no_grad():
    a = model(*cuda_inputs).logits
    b = model(*cuda_inputs[:3], inputs[3]).logits          # lengths left on the CPU
print("cpu vs cuda max diff", (a.cpu() - cpu_logits).abs().max().item(), "lengths-on-cpu diff", (a - b).abs().max().item())
assert torch.allclose(a.cpu(), cpu_logits, atol=1e-3)
model.train()
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = model(*cuda_inputs)
total, parts = hard_loss(out, labels.to(dev))
app, mo = feature_distill_loss(out, out._replace(visual=torch.randn_like(out.visual)))
(total + app + mo).backward()
print("bf16 logits dtype", out.logits.dtype, "loss dtypes", {k: v.dtype for k, v in parts.items()}, app.dtype)
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
model.eval()
t = time.time()
with torch.no_grad():
    c = torch.compile(model)(*cuda_inputs).logits
print("compile diff", (c - a).abs().max().item(), "compile s", round(time.time() - t, 1))
assert torch.allclose(c, a, atol=1e-4)
print("CUDA model check OK")
