"""train.train_step, called directly: one optimizer step over two micro-batches equals an AdamW
step written out by hand on the gradient of the whole batch's mean loss."""
import copy

import torch
import torch.nn.functional as F

import runtime
import train
from model import GPT, GPTConfig


def reference_step(model, x, y, lr, weight_decay, grad_clip, betas=(0.9, 0.95), eps=1e-8):
    """The first AdamW step by hand: the mean cross-entropy over every target of the whole batch
    (logits from a plain forward pass), its gradient clipped to grad_clip, then AdamW with bias
    correction and decoupled weight decay on the 2-D tensors."""
    logits, _ = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1)
    loss.backward()
    params = [p for p in model.parameters()]
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    scale = min(1.0, grad_clip / (norm + 1e-6))
    with torch.no_grad():
        for p in params:
            g = p.grad * scale
            m = (1 - betas[0]) * g / (1 - betas[0])  # the first moment after one step, bias-corrected
            v = (1 - betas[1]) * g * g / (1 - betas[1])
            if p.dim() >= 2:
                p.mul_(1 - lr * weight_decay)
            p.sub_(lr * m / (v.sqrt() + eps))
    return loss.item(), norm


def test_one_step_over_two_micro_batches_is_a_hand_computed_adamw_step():
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    ref = copy.deepcopy(model)
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    y[0, :10] = -1  # masked targets: the first micro-batch holds fewer of the step's targets
    y[1, 3:] = -1
    cfg = train.parse_args(["--dtype", "fp32", "--max_lr", "1e-3", "--weight_decay", "0.1", "--grad_clip", "0.5"])
    optimizers = train.build_optimizers(model, cfg, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rt = runtime.Runtime("cpu", "fp32")
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]

    result = train.train_step(model, batches, optimizers, scaler, cfg.grad_clip, rt)
    loss, norm = reference_step(ref, x, y, lr=1e-3, weight_decay=0.1, grad_clip=0.5)

    assert abs(result.loss - loss) < 1e-5 * loss, (result.loss, loss)
    assert abs(result.grad_norm - norm) < 1e-4 * norm, (result.grad_norm, norm)
    assert norm > 0.5, "the clip must act for this test to check it"
    assert not result.skipped
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=2e-6), (name, (p - q).abs().max().item())
    assert all(p.grad is None for p in model.parameters()), "the gradients are zeroed for the next step"
