"""How much of an AdamW update survives bf16 weights at the paper's learning rate?

    python bench/bench_bf16_adamw.py

The authors keep the weights in bfloat16 (`--dtype bf16`). A bf16 number has 8 significant bits,
so an update smaller than half the spacing between neighbouring bf16 values (|w| * 2^-8 or so) is
rounded away. This applies one AdamW step with lr 1e-5 to a weight matrix drawn like Qwen2.5's
(normal, std 0.02) in fp32 and in bf16, with the same gradients, and reports the fraction of
entries the bf16 step left unchanged and how much of the intended update arrived."""

import argparse

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--std", type=float, default=0.02, help="std of the weights (Qwen2 init: 0.02)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(args.size, args.size, generator=g) * args.std
    p32 = torch.nn.Parameter(w32.clone())
    p16 = torch.nn.Parameter(w32.to(torch.bfloat16))
    start16 = p16.detach().clone()
    opt32 = torch.optim.AdamW([p32], lr=args.lr, weight_decay=0.01)
    opt16 = torch.optim.AdamW([p16], lr=args.lr, weight_decay=0.01)
    print(f"AdamW lr {args.lr:g}, weights ~ N(0, {args.std}^2), {args.size}x{args.size}")
    print("| steps | fp32 mean |update| | bf16 entries never changed | bf16 update / fp32 update |")
    print("|---|---|---|---|")
    for step in range(1, args.steps + 1):
        grad = torch.randn(args.size, args.size, generator=g)
        p32.grad, p16.grad = grad.clone(), grad.to(torch.bfloat16)
        opt32.step()
        opt16.step()
        if step in (1, 2, 5, 10, args.steps):
            d32 = (p32.detach() - w32)
            d16 = (p16.detach().float() - start16.float())
            unchanged = (p16.detach() == start16).float().mean().item()
            ratio = (d16.abs().sum() / d32.abs().sum()).item()
            print(f"| {step} | {d32.abs().mean().item():.2e} | {100 * unchanged:.1f} % | {ratio:.2f} |")


if __name__ == "__main__":
    main()
