"""Image-classifier training the way torchvision's reference scripts do it
(references/classification/train.py, cut to its core), ported to tricks' Loader: the images
are decoded, cropped, flipped and normalized by the Loader, straight onto the device.

    python examples/train_loader.py --data /data/imagenet --epochs 90
    torchrun --nproc_per_node 8 examples/train_loader.py --data /data/imagenet

The first run converts the ImageFolder tree into tricks' record files, once (in ~/.cache/tricks;
`tricks convert` does it ahead of time). `diff examples/train_dataloader.py examples/train_loader.py`
shows the port.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from tricks.pipeline import Engine, Loader, Sampling

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a folder with train/ and val/ class folders")
    p.add_argument("--arch", default="resnet18", help="a torchvision model name")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.1, help="for a batch of 256 images in all")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write each epoch's metrics here (JSON lines)")
    return p.parse_args(argv)


def setup_distributed():
    """(device, rank, world size); DDP when torchrun set RANK."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return torch.device("cuda" if cuda else "cpu"), 0, 1
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def make_loaders(args, device, distributed):
    # per-process batches, the shard from torch.distributed, a new epoch each iteration
    train = Loader(args.data, "train", args.batch_size, device=device,
                   image_size=args.image_size, engine=Engine(workers=args.workers),
                   sampling=Sampling(seed=args.seed))
    val = Loader(args.data, "val", args.batch_size, device=device,
                 image_size=args.image_size, engine=Engine(workers=args.workers))
    return train, val, train.num_classes


def train_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, device, dtype):
    model.train()
    total, seen = torch.zeros((), device=device), 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.detach() * len(targets)
        seen += len(targets)
    return total, seen


@torch.no_grad()
def evaluate(model, loader, device, dtype):
    """Top-1 over every rank's images (summed by all-reduce)."""
    model.eval()
    sums = torch.zeros(2, device=device)  # correct, count
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype):
            logits = model(images)
        sums += torch.stack([(logits.argmax(1) == targets).sum(), sums.new_tensor(len(targets))])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def main(argv=None):
    args = get_args(argv)
    device, rank, world = setup_distributed()
    torch.manual_seed(args.seed)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    train, val, num_classes = make_loaders(args, device, world > 1)
    model = torchvision.models.get_model(args.arch, num_classes=num_classes)
    model = model.to(device, memory_format=torch.channels_last)  # the Loader's batch layout
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                                    if device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    lr = args.lr * args.batch_size * world / 256
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(train))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        total, seen = train_one_epoch(model, criterion, optimizer, scheduler, scaler, train,
                                      device, dtype)
        top1 = evaluate(model, val, device, dtype)
        record = {"epoch": epoch + 1, "train_loss": total.item() / seen, "val_top1": top1,
                  "images_per_s": seen * world / (time.perf_counter() - t0)}
        if rank == 0:
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
