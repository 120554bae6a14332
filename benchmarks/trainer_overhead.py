"""What kdsearch's trial engine costs over a bare PyTorch KD loop.

The same student, teacher outputs and data are trained by ``run_trial`` and by a
hand-written loop (index batching, AdamW, cosine LR, KD loss, validation each epoch), in one
process, alternated so that machine noise hits both alike. Prints samples per second for
each and their ratio (kdsearch / bare; 1.0 means no overhead); last line is one JSON object.

    python benchmarks/trainer_overhead.py [--rounds 3] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from kdsearch.spaces import PinnedSuggester, RandomSuggester, load_space
from kdsearch.trainers.trial import prepare, run_trial

STUDENT = {
    "student.family": "cnn", "student.cnn.stages": 2, "student.cnn.channels": 16, "student.cnn.blocks": 2,
    "student.cnn.kernel": 3, "student.cnn.residual": True, "distill.hint_stages": "none",
    "distill.temperature": 4.0, "distill.alpha": 0.7, "train.batch_size": 64, "train.lr": 0.005,
    "train.weight_decay": 1e-4, "compress.prune_ratio": 0.0, "compress.quantize": "none",
}


def bare_loop(space, params, context, epochs: int, seed: int) -> float:
    """A plain KD training loop, written as a PyTorch user would; returns the final val accuracy."""
    config = space.resolve(params)
    data, logits_t = context.data, context.targets.logits
    torch.manual_seed(seed)
    model = space.build_student(config, data.input_shape, data.num_classes)
    x_train, y_train = data.train.x, data.train.y
    x_val, y_val = data.val.x, data.val.y
    bs, T, alpha = config.train.batch_size, config.distill.temperature, config.distill.alpha
    steps = epochs * math.ceil(len(y_train) / bs)
    opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            out = model(x_train[idx])
            soft = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(logits_t[idx] / T, -1), reduction="batchmean", log_target=True)
            loss = alpha * T * T * soft + (1 - alpha) * F.cross_entropy(out, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.inference_mode():
            acc = (model(x_val).argmax(-1) == y_val).float().mean().item()
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Writes no files.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of each loop")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per run")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same single thread for both: a fair, quiet comparison
    space = load_space()
    params = space.sample(PinnedSuggester(STUDENT, RandomSuggester(0)))
    context = prepare(space)
    samples = args.epochs * len(context.data.train)
    rates = {"kdsearch": [], "bare": []}
    accs = {"kdsearch": [], "bare": []}
    run_trial(space, params, context=context, epochs=1)  # warm-up: allocator, kernels
    for round_ in range(args.rounds):
        for name in (("kdsearch", "bare") if round_ % 2 == 0 else ("bare", "kdsearch")):
            start = time.perf_counter()
            if name == "kdsearch":
                acc = run_trial(space, params, context=context, epochs=args.epochs)["val_acc"]
            else:
                acc = bare_loop(space, params, context, args.epochs, seed=0)
            rates[name].append(samples / (time.perf_counter() - start))
            accs[name].append(acc)
        print(f"round {round_ + 1}: kdsearch {rates['kdsearch'][-1]:,.0f} samples/s, bare {rates['bare'][-1]:,.0f} samples/s")
    kd, bare = statistics.median(rates["kdsearch"]), statistics.median(rates["bare"])
    print(f"median: kdsearch {kd:,.0f} samples/s, bare loop {bare:,.0f} samples/s, ratio {kd / bare:.3f}")
    print(json.dumps({
        "benchmark": "trainer_overhead", "rounds": args.rounds, "epochs": args.epochs, "samples_per_run": samples,
        "kdsearch_samples_per_s": round(kd, 1), "bare_samples_per_s": round(bare, 1), "ratio": round(kd / bare, 4),
        "kdsearch_val_acc": statistics.median(accs["kdsearch"]), "bare_val_acc": statistics.median(accs["bare"]),
        "threads": 1, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
