"""Training of Res-MTNet: a library function (`train`) and the ``resmtnet-train`` CLI.

    resmtnet-train --config configs/ct.json [--out runs/ct] [--resume] [--set epochs=5 ...]
    torchrun --nproc_per_node 2 -m napari_resmtnet.training.train --config ...   # DDP (gloo on CPU)

The data are split patient-disjoint by ``seriesuid`` (`datasets.split_by_series`); the split
is recorded in every checkpoint and in the exported weights. A checkpoint (``last.pt``) is
written atomically after every epoch; ``--resume`` continues from it. Every loss term is
logged to ``log.jsonl``. The exported ``model.pt`` holds only tensors and plain values, so it
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..model import ResMTNet, ResMTNetConfig
from .augment import AugmentConfig, augment_batch
from ..io.preprocess import normalize_ct
from .datasets import MALIGNANCY_TARGETS, load_ct_records, split_by_series
from .cxr_data import load_cxr_records, make_cxr_batch, training_context
from . import wholescan
from ..inference.predictor import Predictor
from ..inference.weights import WEIGHTS_FORMAT, bundled_entry, load_checkpoint, sha256_of
from .wholescan import negative_crop
from .fpr import train_fpr


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


def _read_config(path: Path, depth: int = 0) -> dict:
    """A JSON config; ``"base": "other.json"`` (beside it) names the config it refines: the
    base is read first and this file's keys override it (nested dicts key by key)."""
    d = json.loads(path.read_text())
    base = d.pop("base", None)
    if base:
        if depth > 4:
            raise ValueError(f"{path}: 'base' chain deeper than 4 configs")
        d = _merge(_read_config(path.parent / base, depth + 1), d)
    return d


@dataclass
class TrainConfig:
    name: str = "resmtnet-ct"
    modality: str = "CT"
    data: str = "../shared/data/ct_nodule_cubes"
    out: str = "runs/ct"
    val_fraction: float = 0.2
    seed: int = 0
    epochs: int = 40
    max_steps: int = 0  # stop after this many optimiser steps (0: no limit)
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    threads: int = 0  # torch threads per process (0: torch's default)
    limit: int = 0  # use only the first N records (smoke tests)
    spacing_mm: float = 1.0  # model input spacing
    init: str = ""  # start from these weights (fine-tuning); "" = random init
    implant: dict = field(default_factory=dict)  # CXR: nodule implantation settings
    malignancy_target: str = "binary"  # CT: "binary" (LIDC 1-2 vs 4-5), "rating" (soft (r-1)/4) or
    #                                    "readers_mean" (soft (mean-1)/4 of every reader's rating)
    network: dict = field(default_factory=dict)
    augment: dict = field(default_factory=dict)
    # CT: hard negatives from whole training scans: {"scans": folder, "fraction": share of each
    # batch, "mine": weights whose candidates are mined ("bundled" or a path; "" none)}
    negatives: dict = field(default_factory=dict)
    # second stage: {"steps", "batch_size", "lr", "floor", "pos_fraction"} trains only the
    # candidate classifier of an ``init`` model (see `train_fpr`); {} trains the detector
    fpr: dict = field(default_factory=dict)
    # names (prefixes) of the parameters to train, e.g. ["mal2.", "malignancy_head."]; the
    # rest stay as ``init`` gave them ([] trains everything)
    trainable: list = field(default_factory=list)

    @classmethod
    def from_file(cls, path, overrides=()):
        d = _read_config(Path(path))
        for ov in overrides:
            key, _, val = ov.partition("=")
            try:
                val = json.loads(val)
            except json.JSONDecodeError:
                pass
            tgt = d
            *parents, leaf = key.split(".")
            for p in parents:
                tgt = tgt.setdefault(p, {})
            tgt[leaf] = val
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        cfg = cls(**d)

        if cfg.malignancy_target not in MALIGNANCY_TARGETS:
            raise ValueError(
                f"{path}: malignancy_target must be one of {MALIGNANCY_TARGETS}, got {cfg.malignancy_target!r}"
            )
        if cfg.malignancy_target != "binary" and cfg.modality != "CT":
            raise ValueError(f"{path}: malignancy_target {cfg.malignancy_target!r} needs LIDC ratings (CT only)")
        return cfg

    def network_config(self) -> ResMTNetConfig:
        d = dict(self.network)
        d.setdefault("spatial_dims", 3 if self.modality == "CT" else 2)
        return ResMTNetConfig.from_dict(d)

    def augment_config(self) -> AugmentConfig:
        d = dict(self.augment)
        for k in ("scale", "aniso_factor"):
            if k in d:
                d[k] = tuple(d[k])
        return AugmentConfig(**d)


# --- data ------------------------------------------------------------------------------------


def load_records(cfg: TrainConfig):
    """All records of the configured data set, for either modality."""
    if cfg.modality == "CT":
        return load_ct_records(cfg.data, limit=cfg.limit or None)

    return load_cxr_records(cfg.data, limit=cfg.limit or None)


def split_records(records, cfg: TrainConfig):
    train_uids, val_uids = split_by_series([r.seriesuid for r in records], cfg.val_fraction, cfg.seed)
    tr, va = set(train_uids), set(val_uids)
    return [r for r in records if r.seriesuid in tr], [r for r in records if r.seriesuid in va], train_uids, val_uids


def negative_context(cfg: TrainConfig, split: dict, model: ResMTNet | None = None):
    """Whole training scans with hard-negative crop centres (``cfg.negatives``), or None.

    ``negatives``: ``scans`` (the whole-scan folder), ``fraction`` (share of each batch),
    ``mine`` (weights whose candidates are mined: "bundled" or a path), ``remine_epochs``
    (epochs after which the model being trained mines its own candidates again). With
    ``model`` given, that model is the miner."""
    neg = cfg.negatives or {}
    if cfg.modality != "CT" or not neg.get("scans") or not neg.get("fraction"):
        return None

    scans = wholescan.whole_scans(neg["scans"], split, splits=("train",))
    if not scans:
        raise RuntimeError(f"{neg['scans']}: no whole training scans found for hard negatives")
    mined = None
    if model is not None:
        was = model.training
        model.eval()
        pred = Predictor(
            "CT",
            model=model,
            info={"threshold": 0.05, "spacing_mm": cfg.spacing_mm},
            device="cpu",
            score_floor=0.05,
            max_detections=300,
            detector_only=True,
        )
        mined = wholescan.mine_candidates(pred, scans)
        model.train(was)
    elif neg.get("mine"):
        w = None if neg["mine"] == "bundled" else neg["mine"]
        pred = Predictor(
            "CT",
            weights=w,
            sha256=None if w is None else sha256_of(w),
            score_floor=0.05,
            max_detections=300,
            detector_only=True,
        )
        mined = wholescan.mine_candidates(pred, scans)
    return wholescan.negative_pool(scans, cfg.spacing_mm, mined, seed=cfg.seed)


def make_batch(records, cfg: TrainConfig, aug: AugmentConfig, g: torch.Generator, context=None, negatives=None):
    """Normalised, augmented training batch: (N, 1, *crop) tensor and target dicts. With
    ``negatives`` (see `negative_context`) a share ``cfg.negatives["fraction"]`` of the batch is
    replaced by crops of whole training scans around hard-negative points (labelled lesions in
    a crop stay positives)."""
    if cfg.modality == "CXR":
        return make_cxr_batch(records, cfg, aug, g, context)
    arrays = [r.array for r in records]
    centres = [r.centers[r.main] for r in records]
    targets = [r.target(cfg.malignancy_target) for r in records]
    replaced = set()
    if negatives:
        n_neg = int(round(float(cfg.negatives.get("fraction", 0)) * len(records)))
        for k in range(len(records) - n_neg, len(records)):
            neg = negatives[int(torch.randint(len(negatives), (), generator=g))]
            if not len(neg.points):
                continue
            pt = neg.points[int(torch.randint(len(neg.points), (), generator=g))]
            crop, lc, le = negative_crop(neg, pt, records[k].array.shape[0])
            arrays[k] = crop
            replaced.add(k)
            centres[k] = np.full(3, (crop.shape[0] - 1) / 2)
            d = le.mean(1) if len(le) else np.zeros(0)
            targets[k] = {"centers": lc, "diameters": d, "malignant": -np.ones(len(lc), np.float32), "extents": le}
    imgs = torch.from_numpy(np.stack([normalize_ct(a) for a in arrays]))[:, None]
    aux = None
    net = cfg.network_config()
    if net.segmentation or net.fine_segmentation:
        aux = [
            {"mask": r.mask, "ignore": r.ignore_region()} if r.mask is not None and k not in replaced else None
            for k, r in enumerate(records)
        ]
    return augment_batch(imgs, targets, aug, g, "CT", centers=centres, aux=aux)


#: Network settings a fine-tune may add to its base: their new parameters start fresh (the
#: per-axis size head from the base's one-channel head, repeated per axis).
GROWABLE = (
    "size_per_axis",
    "fpr",
    "fpr_patch",
    "fpr_width",
    "fpr_weight",
    "attributes",
    "fine_segmentation",
    "w_attributes",
    "w_fine_segmentation",
    "texture_weights",
    "seg_detail",
    "seg_aligned",
)


def warm_start(model: ResMTNet, init: dict, net_cfg: ResMTNetConfig, name: str = "init") -> list[str]:
    """Load ``init``'s weights into ``model``; the two configs may differ only in `GROWABLE`
    settings. Returns the names of the parameters that start fresh."""
    base = ResMTNetConfig.from_dict(init["network"]).to_dict()  # defaults filled in
    new = net_cfg.to_dict()
    diff = sorted(k for k in new if base.get(k) != new[k] and k not in GROWABLE)
    if diff:
        raise RuntimeError(f"{name}: its network config differs from this config's network in {diff}")
    own = model.state_dict()
    fresh = []
    for k, v in own.items():
        w = init["state_dict"].get(k)
        if w is None:
            fresh.append(k)
        elif k.startswith("seg_decoder.") and base.get("seg_detail") != new.get("seg_detail"):
            fresh.append(k)  # another decoder: it trains from its own initialisation
        elif w.shape == v.shape:
            own[k] = w
        elif k.startswith("size.") and w.shape[0] == 1:  # one diameter -> one extent per axis
            own[k] = w.expand(v.shape).clone()
        else:
            raise RuntimeError(f"{name}: parameter {k} has shape {tuple(w.shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(own)
    return fresh


# --- distributed -----------------------------------------------------------------------------


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world, rank


def _atomic_save(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_weights(model: ResMTNet, cfg: TrainConfig, split: dict, path: Path, extra: dict | None = None):
    """Write deployable weights: state_dict + plain metadata (weights_only-loadable)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "format": WEIGHTS_FORMAT,
        "name": cfg.name,
        "version": __version__,
        "modality": cfg.modality,
        "spacing_mm": float(cfg.spacing_mm),
        "network": cfg.network_config().to_dict(),
        "train_config": asdict(cfg),
        "split": split,
        "state_dict": state,
        **(extra or {}),
    }
    _atomic_save(obj, path)
    return path


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train per ``cfg``; returns the path of the exported ``model.pt``."""
    world, rank = _dist_info()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    records = load_records(cfg)
    if not records:
        raise RuntimeError(f"{cfg.data}: no training records found")
    train_recs, val_recs, train_uids, val_uids = split_records(records, cfg)
    split = {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "train": train_uids, "val": val_uids}

    net_cfg = cfg.network_config()
    model = ResMTNet(net_cfg)
    if cfg.init:
        if cfg.init == "bundled":
            e = bundled_entry(cfg.modality)
            init = load_checkpoint(e["path"], e["sha256"])
        else:
            init = load_checkpoint(cfg.init, sha256_of(cfg.init))
        if init["split"]["val"] != val_uids:
            raise RuntimeError(f"{cfg.init}: it was trained on another split; fine-tuning would leak validation data")
        warm_start(model, init, net_cfg, cfg.init)
    if cfg.fpr:  # second stage only: the detector (from ``init``) stays as it is
        if not (cfg.init and net_cfg.fpr):
            raise RuntimeError("an fpr stage needs 'init' (the trained detector) and network.fpr = true")

        path = out / "model.pt"
        if rank == 0:
            train_fpr(cfg, model, train_recs, split, out, progress=progress)
            export_weights(model, cfg, split, path)
        return path
    model = model.to(device)
    if net_cfg.spatial_dims == 3 and device.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)
    params = list(model.parameters())
    if cfg.trainable:
        named = dict(model.named_parameters())
        for n, p in named.items():
            p.requires_grad_(any(n.startswith(t) for t in cfg.trainable))
        params = [p for p in params if p.requires_grad]
        if not params:
            raise RuntimeError(f"'trainable' {cfg.trainable} names no parameter of the network")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, len(train_recs) // (per_rank * world))  # full global batches per epoch
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)

    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))

    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    epoch, step = 0, 0
    ckpt_path = out / "last.pt"
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        epoch, step = int(ck["epoch"]), int(ck["step"])
        if rank < len(ck["generator"]):
            g.set_state(ck["generator"][rank])
        else:  # only rank 0's state is saved: other ranks re-seed, distinct per rank and epoch
            g.manual_seed(cfg.seed * 1000 + rank + 7919 * epoch)
        if ck["split"]["val"] != val_uids:
            raise RuntimeError(f"{ckpt_path}: the checkpoint's split differs from this config's split")
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model)

    context = None
    if cfg.modality == "CXR":
        context = training_context(cfg, train_recs)
    negatives = negative_context(cfg, split)
    aug = cfg.augment_config()
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=cfg.name, unit="step", file=sys.stderr)
    model.train()
    t0 = time.time()
    while step < total:
        # one permutation shared by all ranks; each global batch wraps around the end, so
        # every rank runs the same number of steps (no rank waits for a missing all-reduce)
        perm = torch.randperm(len(train_recs), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        for b in range(steps_per_epoch):
            if step >= total:
                break
            first = b * per_rank * world + rank * per_rank
            idx = [perm[(first + k) % len(perm)] for k in range(per_rank)]
            images, targets = make_batch([train_recs[i] for i in idx], cfg, aug, g, context, negatives)
            images = images.to(device)
            if images.dim() == 5 and device.type == "cpu":
                images = images.contiguous(memory_format=torch.channels_last_3d)
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step)
            losses = ddp_model(images, targets)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            step += 1
            if rank == 0:
                rec = {"step": step, "epoch": epoch, "lr": lr_at(step), "time": round(time.time() - t0, 1)}
                rec.update({k: round(float(v.detach()), 5) for k, v in losses.items()})
                log.write(json.dumps(rec) + "\n")
                if bar:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.3f}",
                        hm=f"{rec['heatmap']:.3f}",
                        mal=f"{rec['malignancy']:.3f}",
                        **{k[:3]: f"{rec[k]:.3f}" for k in ("attributes", "fine_segmentation") if k in rec},
                    )
        epoch += 1
        if negatives is not None and epoch in (cfg.negatives.get("remine_epochs") or []) and step < total:
            negatives = negative_context(cfg, split, model)  # the model mines its own false positives again
            if rank == 0:
                n = sum(len(x.points) for x in negatives)
                log.write(json.dumps({"epoch": epoch, "remined": n}) + "\n")
        if rank == 0:
            log.flush()
            gens = [g.get_state()]
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "generator": gens,
                    "split": split,
                    "config": asdict(cfg),
                },
                ckpt_path,
            )
    if bar:
        bar.close()
    path = out / "model.pt"
    if rank == 0:
        log.close()
        export_weights(model, cfg, split, path)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="resmtnet-train", description="Train Res-MTNet from a JSON config.")
    p.add_argument("--config", required=True, help="JSON config (see configs/)")
    p.add_argument("--out", help="output folder (overrides the config's 'out')")
    p.add_argument("--data", help="data folder (overrides the config's 'data')")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. epochs=5 network.cross_task=false",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    overrides = list(a.set)
    if a.out:
        overrides.append(f"out={json.dumps(a.out)}")
    if a.data:
        overrides.append(f"data={json.dumps(a.data)}")
    try:
        cfg = TrainConfig.from_file(a.config, overrides)
    except (OSError, ValueError, TypeError) as e:
        print(f"resmtnet-train: {e}", file=sys.stderr)
        return 2
    try:
        path = train(cfg, resume=a.resume, progress=not a.no_progress)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"resmtnet-train: {e}", file=sys.stderr)
        return 1
    if _dist_info()[1] == 0:
        print(f"weights written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
