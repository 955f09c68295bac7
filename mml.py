"""mml.py: the MMLandmarks benchmark (CVPR 2026) in one readable file.

18,557 US landmarks, each seen four ways: ground photos (G), aerial images (S, "satellite"),
a Wikipedia text (T) and a GPS point (C, "coordinates"). One model embeds all four into one
space with a CLIP-style contrastive loss, so a photo finds its aerial view (G2S), an aerial
view its photos (S2G), a photo, an aerial view or a sentence its location (G2C, S2C, T2C),
and a sentence its images (T2G, T2S).

    pip install -r requirements.txt
    python mml.py train        # no data needed: writes a synthetic world in the released
                               #   layout (25 s), then trains (4-6 min on 2 CPU cores)
    python mml.py eval         # all 13 tasks, official and strict (15 s); --viz: pictures
    python mml.py locate photo.jpg          # where is it? the top 5 places
    python mml.py train --data /data/MMLandmarks --preset paper --clip DIR  # the authors'
    torchrun --standalone --nproc_per_node=8 mml.py train --data /data/MMLandmarks ...
    python mml.py convert weights_best.pth --clip DIR --out authors.pt   # their release
    python mml.py compare runs/a runs/b     # side by side, with bootstrap intervals
    python mml.py bench        # where the time goes, on this machine

Reading path. The main path comes first, in the order the data flows: config, geometry,
data (the released layout, then the checks that guard it; images, sentences, batches,
augmentation), model, loss, metrics, train (ending with the loop), eval (the protocol's
sides, what embeds them, the scoring). Then using a model (checkpoints, `load`, `locate`),
outside models (CLIP folders, `convert`) and the command line; last, five appendices a
first reading skips: the image cache, comparing runs, the pictures, the synthetic world,
the bench. The core is model, loss, metrics and train. PROTOCOL N cites section N of the
protocol in README.md.

Shape letters: B batch, D embedding width, E a CLIP tower's output width, H image side in
pixels, L tokens, Q queries, N gallery items, P positives per query, W processes.
"""
import argparse
import contextlib
import csv
import dataclasses
import datetime
import difflib
import fcntl
import functools
import hashlib
import io
import itertools
import json
import math
import mmap
import os
import pickle
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

# ---- config -------------------------------------------------------------------------------

def option(default, help: str, cmds: str = "train", low=None, high=None, choices=None):
    """A Config field: its help becomes its --help line; cmds names the commands that take
    it; low and high bound a number, choices a string (both checked in `check_config`)."""
    return field(default=default, metadata={"help": help, "cmds": cmds.split(),
                                            "range": (low, high), "choices": choices})

# the commands that take an option; in Config, `option(..., MODEL_CMDS)` says which
DATA_CMDS, MODEL_CMDS = "train eval prepare bench", "train bench"
BACKBONES = ("small", "resnet18", "resnet50", "convnext_tiny", "vit_b_16", "clip")  # images

@dataclass
class Config:
    # data
    data: str = option("", "dataset root in the released layout (default: a synthetic world "
                           "in data/synthetic, made on first use; eval: the checkpoint's)",
                       DATA_CMDS)
    scale: float = option(1.0, "size of the synthetic world (1: 1,600 train, 100 query "
                               "landmarks)", "train prepare bench synth", 0.01, 100)
    subset: int = option(0, "train on the first N training landmarks only (0: all)", low=0)
    n_val: int = option(1024, "training landmarks held out for validation (<= 10%% of them)",
                        low=2)
    holdout: str = option("seeded", "which: seeded by --seed, or the authors' (their "
                                    "random.Random(42) shuffle of the sorted ids)",
                          choices=("seeded", "authors"))
    outdoor_only: bool = option(False, "train on the outdoor ground photos only (the subset "
                                       "CSV)")
    last_sat_only: bool = option(False, "train on each landmark's latest aerial image only")
    train_text: str = option("first", "training sentence (PROTOCOL 2)",
                             choices=("first", "random"))
    query_text: str = option("first,random,no_cues", "query sentences of the text tasks", "eval")
    img_size: int = option(64, "images are resized to H x H (torchvision and CLIP backbones: "
                               "their weights' size)", MODEL_CMDS + " prepare", 16, 1024)
    resize: str = option("crop", "crop: the short side to H and the centre square (mml's); "
                                 "squash: the whole image to H x H (the authors'); clip: as "
                                 "CLIP's image processor", MODEL_CMDS + " prepare",
                         choices=("crop", "squash", "clip"))
    cache: str = option("", "image cache folder made by `prepare` (default: DATA/cache)",
                        DATA_CMDS)
    workers: int = option(min(8, os.cpu_count() or 1), "DataLoader worker processes",
                          DATA_CMDS, 0, 256)
    seed: int = option(0, "seed of training (hold-out, sampling, augmentation, init); of "
                           "eval: the queries the pictures show, never the protocol's",
                       "train eval synth bench")
    device: str = option("", "cuda or cpu (default: cuda when a GPU is visible)",
                         "train eval locate bench")
    # model
    preset: str = option("", "paper: the authors' baseline (needs --clip; the first log line "
                             "shows what it sets, any option given overrides it)",
                         choices=("", "paper"))
    clip: str = option("", "a Hugging Face CLIP folder (config.json, model.safetensors or "
                           "pytorch_model.bin, tokenizer.json) for the clip backbones",
                       "train eval locate convert bench")
    modalities: str = option("GSTC", "modalities to train: any two or more of G S T C",
                             MODEL_CMDS)
    embed_dim: int = option(128, "width D of the shared space (the authors: 512)", MODEL_CMDS,
                            2, 65536)
    image_backbone: str = option("small", "small is a CNN from scratch, clip the --clip "
                                          "folder's vision tower; the others are "
                                          "torchvision's", MODEL_CMDS, choices=BACKBONES)
    text_backbone: str = option("small", "small is a transformer from scratch, clip the --clip "
                                         "folder's text tower", MODEL_CMDS,
                                choices=("small", "clip"))
    pretrained: bool = option(False, "start torchvision backbones from their ImageNet weights "
                                     "(downloaded once into torchvision's cache)", MODEL_CMDS)
    freeze: str = option("", "encoders whose backbone stays fixed while their heads train (the "
                             "authors' setting): some of ground,satellite,text,gps or G,S,T,C")
    head: str = option("linear", "projection heads of G, S and T: linear; mlp: Linear-ReLU-"
                                 "Linear (the authors'); none: the backbone's own output",
                       MODEL_CMDS, choices=("linear", "mlp", "none"))
    head_hidden: int = option(0, "hidden width of the mlp heads (0: --embed-dim)", MODEL_CMDS,
                              0, 65536)
    img_width: int = option(32, "channels of the small CNN's first stage (x2 per stage; a "
                                "multiple of 8)", MODEL_CMDS, 8, 4096)
    share_image_trunk: bool = option(False, "ground and aerial share one backbone (as the "
                                            "authors' CLIP), with separate heads")
    vocab_size: int = option(2000, "BPE vocabulary of the text tokenizer", MODEL_CMDS, 32, 10**6)
    max_len: int = option(40, "tokens per sentence, padded or truncated (CLIP: 77)", MODEL_CMDS,
                          2, 4096)
    text_width: int = option(128, "text transformer width (a multiple of 64, or at most 64)",
                             MODEL_CMDS, 8, 65536)
    text_layers: int = option(2, "text transformer layers", MODEL_CMDS, 1, 256)
    gps_width: int = option(256, "GPS MLP width (GeoCLIP: 1024)", MODEL_CMDS, 1, 65536)
    gps_depth: int = option(2, "GPS MLP hidden layers per scale (GeoCLIP: 3)", MODEL_CMDS, 0, 64)
    gps_preset: str = option("", "geoclip: GeoCLIP's GPS sizes (--gps-width 1024 --gps-depth 3 "
                                 "--embed-dim 512), which its weights need", MODEL_CMDS,
                             choices=("", "geoclip"))
    gps_scaling: bool = option(True, "Equal Earth scaled by SF/180 as GeoCLIP's weights need "
                                     "(the authors' GPS encoder, from scratch, is not)",
                               MODEL_CMDS)
    gps_init: str = option("", "GeoCLIP location-encoder state dict to start the GPS encoder "
                               "from")
    # training
    loss: str = option("complete", "complete: all modality pairs; imagebind: ground vs each "
                                   "other", MODEL_CMDS, choices=("complete", "imagebind"))
    batch_size: int = option(128, "global batch (split across torchrun processes)", MODEL_CMDS,
                             2, 10**6)
    epochs: int = option(25, "passes over the training landmarks, one sample each", low=1)
    max_steps: int = option(0, "stop after N steps, which the lr schedule spans (0: --epochs)",
                            low=0)
    lr: float = option(2e-3, "peak AdamW learning rate", low=0.0)
    schedule: str = option("cosine", "the lr after the warmup: a cosine decay to 0, or constant "
                                     "(the authors')", choices=("cosine", "constant"))
    warmup: float = option(0.05, "fraction of the steps warming the lr up linearly", low=0.0,
                           high=1.0)
    weight_decay: float = option(0.05, "AdamW weight decay", low=0.0)
    decay_all: bool = option(False, "decay biases, norms and the scale too (the authors'), not "
                                    "only weight matrices")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", low=0.0)
    grad_clip_value: float = option(0.0, "clip each gradient element to +-this (the authors: "
                                         "100; 0: off)", low=0.0)
    scale_cap: float = option(100.0, "cap of the learnt logit scale after each step (CLIP: "
                                     "100; 0: none, as the authors)", low=0.0)
    augment: str = option("mml", "mml: colour jitter always, blur or sharpen 20%% each; paper: "
                                 "the authors' strengths (jitter 0.15 with hue at p=0.5, 15%% "
                                 "each)", choices=("mml", "paper"))
    bf16: bool = option(True, "bf16 autocast on GPUs that support it (the CPU: fp32)",
                        "train eval bench")
    compile: bool = option(False, "torch.compile the model", MODEL_CMDS)
    log_every: int = option(10, "steps between log lines", low=1)
    out: str = option("runs/mml", "run folder: checkpoints, log.jsonl, eval/ (synth: the "
                                  "world; convert: the checkpoint; compare: its table)",
                      "train eval synth convert compare")
    resume: bool = option(False, "continue the run in --out from its last.pt, exactly")
    overwrite: bool = option(False, "start over in an --out that holds a run, replacing it")
    select: str = option("loss", "best.pt: the epoch of lowest validation loss (the authors' "
                                 "rule), or of highest mean validation R@1",
                         choices=("loss", "recall"))
    val_batch: int = option(0, "validation batch (0: --batch-size; the authors: 128)", low=0)
    overfit_batch: bool = option(False, "train on one fixed batch: the loss must fall to ~0")
    max_bad_steps: int = option(10, "stop after this many non-finite losses in a row", low=1)
    # evaluation and locate
    ckpt: str = option("", "the checkpoint (default: OUT/best.pt, runs/mml/best.pt unless "
                           "--out)", "eval locate")
    tasks: str = option("", "comma-separated tasks, e.g. G2S,T2C-no_cues (default: all)", "eval")
    chunk: int = option(512, "queries scored at once; memory ~ 6 bytes x chunk x gallery",
                        "eval bench", 1)
    eval_batch: int = option(256, "batch when embedding queries and galleries",
                             "eval locate bench", 1)
    viz: bool = option(False, "also draw pictures: a grid of results per retrieval task, a map "
                              "per x2C task, the training curves", "eval")
    viz_queries: str = option("random", "the queries the grids show: random (seeded by "
                                        "--seed), or hard: the best-, median- and worst-ranked",
                              "eval", choices=("random", "hard"))
    by: str = option("", "also print the results by landmark category or state", "eval",
                     choices=("", "category", "state"))
    export: str = option("", "write the protocol's sides to this folder, a CSV each, for any "
                             "model to embed (no evaluation)", "eval")
    embeddings: str = option("", "score the embeddings in this folder ({side}.npy, rows as in "
                                 "--export's CSVs) instead of a checkpoint's", "eval")
    runs: tuple = option((), "run or eval folders to compare; the first is the baseline",
                         "compare")
    latex: bool = option(False, "also print the comparison as a LaTeX table", "compare")
    resamples: int = option(1000, "bootstrap resamples of the query landmarks", "compare", 100,
                            100000)
    inputs: tuple = option((), "ground photos to locate (aerial images with --satellite)",
                           "locate")
    text: tuple = option((), "a description to locate (repeatable)", "locate")
    satellite: bool = option(False, "the inputs are aerial images", "locate")
    top: int = option(5, "locations per input", "locate", 1)
    gallery: str = option("", "a lat,lon[,name] CSV of candidate places (default: the index "
                              "tiles' centres and the training landmarks)", "locate")
    json: bool = option(False, "answer with one JSON list on standard output", "locate")
    source: str = option("", "what to convert: a Hugging Face CLIP folder, the authors' "
                             "weights_best.pth or GeoCLIP's weights folder (both with --clip)",
                         "convert")
    # prepare and bench
    splits: str = option("train,query,index", "splits `prepare` decodes into the cache",
                         "prepare")
    phases: str = option("decode,steps,backbones,loader,augment,embed,rank,locate,towers,paper",
                         "phases `bench` times, in order", "bench")
    bench_queries: int = option(200, "queries timed for the per-query baseline", "bench", 1)

# The authors' setting (PROTOCOL 5: their train.py, configs/mml_clip.yaml, models/*.py):
# frozen CLIP towers, one for both image views, MLP heads, GeoCLIP's GPS encoder from scratch
# without the scaling, squashed images, their augmentation strengths and optimisation. The
# image size and the 77 tokens come from the --clip folder.
PRESETS = {"paper": {
    "image_backbone": "clip", "text_backbone": "clip", "share_image_trunk": True,
    "freeze": "GST", "head": "mlp", "embed_dim": 512, "gps_width": 1024, "gps_depth": 3,
    "gps_scaling": False, "resize": "squash", "modalities": "GSTC", "loss": "complete",
    "train_text": "first", "lr": 1e-4, "weight_decay": 5e-4, "decay_all": True,
    "batch_size": 512, "epochs": 20, "warmup": 0.0, "schedule": "constant", "grad_clip": 0.0,
    "grad_clip_value": 100.0, "scale_cap": 0.0, "augment": "paper", "n_val": 1024,
    "holdout": "authors", "val_batch": 128, "select": "loss"}}

COMMANDS = {  # each command and its --help line
    "train": "train a model (on a synthetic world made on first use, without --data)",
    "eval": "evaluate a checkpoint on every task of the protocol",
    "locate": "the likeliest places of photos, aerial images or sentences",
    "synth": "write a synthetic world in the released layout",
    "prepare": "decode every image once into a cache that training and eval read",
    "bench": "time each phase of a run on this machine",
    "convert": "make an mml checkpoint of CLIP, the authors' released model or GeoCLIP",
    "compare": "set runs side by side, with bootstrap intervals over query landmarks",
}

# The four modalities by letter, and the names the command line and the API also accept.
MODALITY = {"G": "ground", "S": "satellite", "T": "text", "C": "gps"}
LETTER = {name: m for m, name in MODALITY.items()}

class UserError(Exception):
    """A mistake in the input (a path, a file, a flag): printed as one line, no traceback."""

def is_master() -> bool:
    """True in a single process, and in process 0 of a torchrun group."""
    return not dist.is_initialized() or dist.get_rank() == 0

def print0(*args):
    if is_master():
        print(*args, flush=True)

def barrier():
    if dist.is_initialized():
        dist.barrier()

def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes: (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def write_atomically(path: Path, write):
    """write(tmp), then rename tmp to path: a crash never leaves a half-written file where a
    whole one was. A failed write (a full disk, a read-only folder) is one line, and leaves
    no .tmp behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch.save reports ENOSPC as RuntimeError
        if isinstance(e, (OSError, RuntimeError)):
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"{path}: could not be written ({why})") from None
        raise

def writable_folder(path: Path, option: str) -> Path:
    """The folder, made if need be and proven writable, before any work that a write failing
    at its end would lose."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{option} {path}: not a writable folder ({e.strerror})") from None
    return path

# ---- geometry -----------------------------------------------------------------------------

EARTH_RADIUS_KM = 6371.0

def equal_earth(latlon: torch.Tensor, scaled: bool = True) -> torch.Tensor:
    """(..., 2) degrees (lat, lon) -> (..., 2) Equal Earth (x, y), x in [-1, 1] if scaled.

    The equal-area projection GeoCLIP feeds its location encoder (Savric et al. 2018), with
    GeoCLIP's scaling SF/180 so that longitude 180 lands on x = 1; its pretrained weights
    expect that scaling. The MMLandmarks authors' copy leaves it out (scaled=False): x then
    spans about [-2.7, 2.7], and their encoder, trained from scratch, was fit to that.
    """
    a1, a2, a3, a4, sf = 1.340264, -0.081106, 0.000893, 0.003796, 66.50336
    lat, lon = torch.deg2rad(latlon[..., 0]), torch.deg2rad(latlon[..., 1])
    theta = torch.asin(math.sqrt(3) / 2 * torch.sin(lat))
    x = (2 * math.sqrt(3) * lon * torch.cos(theta)
         / (3 * (9 * a4 * theta**8 + 7 * a3 * theta**6 + 3 * a2 * theta**2 + a1)))
    y = a4 * theta**9 + a3 * theta**7 + a2 * theta**3 + a1 * theta
    return torch.stack((x, y), dim=-1) * (sf / 180 if scaled else 1)

def haversine_km(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Great-circle distance in km between (..., 2) tensors of (lat, lon) degrees."""
    a, b = torch.deg2rad(a.double()), torch.deg2rad(b.double())
    dlat, dlon = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    h = (torch.sin(dlat / 2) ** 2
         + torch.cos(a[..., 0]) * torch.cos(b[..., 0]) * torch.sin(dlon / 2) ** 2)
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(h.clamp(0, 1)))

# ---- data ---------------------------------------------------------------------------------
# The reader follows the released layout (PROTOCOL 1): per split, a CSV of landmarks with GPS
# and one CSV per modality listing image ids; files sharded by id under
# split/{ground,satellite,text}/a/b/c/. Everything is read with the csv module into plain
# lists, so 800k index rows take about a second.

def synthetic_root(scale: float) -> Path:
    """Where `train`, `prepare` and `synth` put the synthetic world of a given --scale."""
    return Path("data") / ("synthetic" if scale == 1 else f"synthetic-x{scale:g}")

def default_world(cfg: Config) -> Path:
    """The dataset root: --data, or the synthetic world (generated on first use)."""
    if cfg.data:
        return Path(cfg.data)
    root = synthetic_root(cfg.scale)
    if is_master() and not root.exists():  # renamed into place when whole
        t = time.time()
        print0(f"no --data given: generating a synthetic world in {root} ...")
        counts = synthesize(root, cfg.scale)
        print0(f"  done in {time.time() - t:.0f}s: {json.dumps(counts)}")
    barrier()  # every process, whether or not the world had to be written
    return root

def shard(split_dir: Path, kind: str, image_id: str) -> Path:
    """ROOT/split/kind/a/b/c/id.ext: the released sharding by the id's first three digits."""
    ext = {"ground": ".jpg", "satellite": ".png", "text": ".json"}[kind]
    return split_dir / kind / image_id[0] / image_id[1] / image_id[2] / (image_id + ext)

@dataclass
class Split:
    """One split's landmarks as parallel lists: row i describes one landmark."""
    dir: Path                  # ROOT/train or ROOT/query
    ids: np.ndarray            # (n,) landmark ids
    latlon: np.ndarray         # (n, 2) degrees
    ground: list[list[str]]    # ground photo ids
    sat: list[list[str]]       # aerial image ids of every year, oldest first
    latest: list[str]          # the latest aerial image (the query split's evaluation view)
    text: list[str]            # Wikipedia article (json) id
    no_cues: list[str] | None  # first sentence without geographic cues (query split only)
    text_order: list[int]      # the rows in the order mml_{split}_text.csv lists them

    def take(self, rows) -> "Split":
        rows = list(rows)
        lists = [None if xs is None else [xs[i] for i in rows] for xs in
                 (self.ground, self.sat, self.latest, self.text, self.no_cues)]
        new_row = {old: new for new, old in enumerate(rows)}
        order = [new_row[r] for r in self.text_order if r in new_row]
        return Split(self.dir, self.ids[rows], self.latlon[rows], *lists, order)

def read_split(root: Path, split: str, outdoor_only: bool = False) -> Split:
    """Read ROOT/{train,query}: landmarks, GPS, image lists, text ids (PROTOCOL 1)."""
    d, p = check_root(root, split), f"mml_{split}"
    listing = d / f"{p}.csv"
    meta = read_table(listing, ["landmark_id", "lat", "lon"])
    ids = np.array(unique_landmarks(listing, meta), dtype=np.int64)
    latlon = parse_latlon(listing, meta)
    listed = ids.tolist()
    ground = by_landmark(d / f"{p}_ground{'_subset' * outdoor_only}.csv", "images", listing,
                         listed, partial=outdoor_only)
    sat = latest = by_landmark(d / f"{p}_satellite.csv", "images", listing, listed)
    if split == "query" and (d / f"{p}_all_satellite.csv").is_file():
        # the query split lists the latest image alone, and every year in another CSV
        sat = by_landmark(d / f"{p}_all_satellite.csv", "images", listing, listed)
    # each landmark's aerial ids are listed oldest first: the last is the latest
    latest = {i: (s.split() or [""])[-1] for i, s in latest.items()}
    text = by_landmark(d / f"{p}_text.csv", "json", listing, listed)
    no_cues = None
    if (d / f"{p}_text_sentences.csv").is_file():
        no_cues = by_landmark(d / f"{p}_text_sentences.csv", "sentences", listing, listed)
    keep = [n for n, i in enumerate(listed) if ground.get(i, "").split() and sat[i].split()]
    # the outdoor subset leaves out landmarks with no outdoor photo
    if len(keep) < len(ids):
        print0(f"{d}: {len(ids) - len(keep)} landmarks without ground or aerial images left out")
    rows = ids[keep].tolist()
    row_of = {i: n for n, i in enumerate(rows)}
    return Split(d, ids[keep], latlon[keep], [ground[i].split() for i in rows],
                 [sat[i].split() for i in rows], [latest[i] for i in rows],
                 [text[i] for i in rows], None if no_cues is None else [no_cues[i] for i in rows],
                 [row_of[i] for i in text if i in row_of])  # dicts keep the CSV's order

def by_landmark(path: Path, column: str, listing: Path, ids: list[int],
                partial: bool = False) -> dict:
    """{landmark id: value} of one CSV of a split, checked both ways against the split's
    listing (partial: the CSV may leave some out, as the outdoor subset does)."""
    table = read_table(path, ["landmark_id", column], ids=(column,) * (column != "sentences"))
    values, known = dict(zip(unique_landmarks(path, table), table[column])), set(ids)
    extra = [i for i in values if i not in known]
    absent = [] if partial else [i for i in ids if i not in values]
    for missing, here, there in ((extra, listing, path.name), (absent, path, listing.name)):
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(f"{here}: landmark {', '.join(map(str, missing[:5]))}{more} listed "
                            f"in {there} but missing here")
    return values

@dataclass
class Index:
    """The distractors. Evaluation may run without one of the lists (None): it then skips
    the tasks whose gallery needs it."""
    dir: Path
    ground: list[str] | None       # GLDv2 ground photo ids
    sat: list[str] | None          # aerial image ids
    sat_latlon: np.ndarray | None  # (n, 2) the tiles' centres: the GPS gallery's distractors

def read_index(root: Path, required: bool = True) -> Index:
    d = check_root(root, "index") if required else root / "index"
    index = Index(d, None, None, None)
    if required or (d / "mml_index_ground.csv").is_file():
        index.ground = read_table(d / "mml_index_ground.csv", ["images"], ids=("images",))["images"]
    if required or (d / "mml_index_satellite.csv").is_file():
        sat = read_table(d / "mml_index_satellite.csv", ["images", "lat", "lon"],
                         ids=("images",))
        index.sat = sat["images"]
        index.sat_latlon = parse_latlon(d / "mml_index_satellite.csv", sat)
    return index

def read_train(cfg: Config, root: Path) -> tuple[Split, Split]:
    """The training split, cut to --subset, minus a hold-out: (train, validation). Seeded by
    --seed, or the authors' (their train_dataset.py): random.Random(42) shuffles the positions
    of the sorted landmark ids, and the first n_val are held out."""
    split = read_split(root, "train", cfg.outdoor_only)
    if cfg.subset:
        split = split.take(range(min(cfg.subset, len(split.ids))))
    # held out: 1,024 of 17,557 on the real data
    n_val = min(cfg.n_val, max(2, len(split.ids) // 10))
    if cfg.holdout == "authors":
        order = list(range(len(split.ids)))
        random.Random(42).shuffle(order)
        perm = np.argsort(split.ids, kind="stable")[order]
    else:
        perm = np.random.default_rng(cfg.seed).permutation(len(split.ids))
    return split.take(np.sort(perm[n_val:])), split.take(np.sort(perm[:n_val]))

# What guards the reader: every CSV is checked as it is read, and a bad cell is one line naming
# the file and the line. Ids become file names (shard): plain names only, so that no path
# built from a CSV can leave the dataset root (no separator, no "..", never absolute). The
# release's are 16 hex digits.
PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{3,}")

def read_table(path: Path, columns: list[str], lower: bool = False,
               ids: tuple = ()) -> dict[str, list[str]]:
    """One CSV as {column: values}, checking the columns (lower: the header in any case) and
    that the `ids` columns hold space-separated plain ids only."""
    if not path.is_file():
        raise UserError(f"{path}: file not found (expected a CSV with columns {','.join(columns)})")
    data = path.read_bytes()
    try:
        # -sig: a byte-order mark is not part of the header
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte {data[e.start]:#04x})"
                        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() if lower else h for h in next(reader, [])]
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"{path}, line {reader.line_num}: not a CSV row ({e})") from None
    for c in columns:
        if c not in header:
            raise UserError(f"{path}: no column {c!r} (expected {','.join(columns)}, found "
                            f"{','.join(header)})")
    short = next((n for n, r in enumerate(rows, 2) if len(r) < len(header)), None)
    if short is not None:
        raise UserError(f"{path}, line {short}: {len(rows[short - 2])} fields, expected "
                        f"{len(header)}")
    table = {c: [r[header.index(c)] for r in rows] for c in columns}
    for c in ids:
        for n, cell in enumerate(table[c], 2):
            bad = [i for i in cell.split() if not PLAIN_ID.fullmatch(i)]
            if bad:
                raise UserError(f"{path}, line {n}: {c} {bad[0]!r} is not a plain id (letters, "
                                f"digits, _ and -, at least 3 of them)")
    return table

def csv_header(path: Path) -> list[str]:
    """A CSV's column names, lower-cased, without reading the rest."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return [h.strip().lower() for h in next(csv.reader(f), [])]

def unique_landmarks(path: Path, table: dict) -> list[int]:
    """The landmark_id column as integers, each listed once: a repeated row would count its
    landmark's queries twice."""
    keys = parse_numbers(path, table, ["landmark_id"], int)[:, 0].tolist()
    if len(set(keys)) < len(keys):
        seen = {}
        for n, k in enumerate(keys, 2):
            if k in seen:
                raise UserError(f"{path}, line {n}: landmark {k} again (first on line {seen[k]})")
            seen[k] = n
    return keys

def parse_numbers(path: Path, table: dict, columns: list[str], dtype) -> np.ndarray:
    """(N, len(columns)) numbers from CSV columns; a bad cell is an error naming its line."""
    try:
        return np.array([table[c] for c in columns], dtype=dtype).T
    except ValueError:
        for n, row in enumerate(zip(*(table[c] for c in columns)), 2):
            try:
                [dtype(v) for v in row]
            except ValueError:
                raise UserError(f"{path}, line {n}: {','.join(row)} is not a number") from None
        raise

def parse_latlon(path: Path, table: dict) -> np.ndarray:
    """(N, 2) latitude and longitude in degrees; NaN or out of range is an error."""
    latlon = parse_numbers(path, table, ["lat", "lon"], float)
    ok = (np.abs(latlon[:, 0]) <= 90) & (np.abs(latlon[:, 1]) <= 180)  # False for NaN too
    if not ok.all():
        n = int(np.argmin(ok))
        raise UserError(f"{path}, line {n + 2}: GPS ({latlon[n, 0]}, {latlon[n, 1]}) is not "
                        f"a latitude in [-90, 90] and a longitude in [-180, 180]")
    return latlon

def check_root(root: Path, sub: str = "") -> Path:
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found (expected the MMLandmarks layout: "
                        f"mmlandmarks.csv, train/, query/, index/)")
    if sub and not (root / sub).is_dir():
        raise UserError(f"{root / sub}: split folder not found (expected mml_{sub}*.csv and "
                        f"ground/, satellite/ inside)")
    return root / sub

def write_csv(path: Path, header: list[str], rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

# Images: decoded to H x H uint8, from the files or from the `prepare` cache.

# Bounds on what one input may cost. The release's photos are about 800 px and its articles
# well under a megabyte; a file past these is unreadable, as a corrupt one is.
MAX_PIXELS = 50_000_000      # a decoded image (after draft): 50 megapixels, 150 MB of RGB
MAX_ARTICLE_BYTES = 1 << 24  # an article: 16 MiB of JSON

def regular_file(path: Path) -> Path:
    """path, if it names a regular file or nothing (a FIFO or a device would block a read)."""
    if path.exists() and not path.is_file():
        raise ValueError("not a regular file")
    return path

def load_image(path: Path, size: int, resize: str = "crop", draft: bool = True) -> np.ndarray:
    """(H, H, 3) uint8, decoded and resized by `to_square`. For --resize crop, draft() lets the
    JPEG decoder work at 1/2, 1/4 or 1/8 scale, never below H: 800-px photos decode 2-3x
    faster (see `bench`); the other modes decode in full, as the code they follow does."""
    with Image.open(regular_file(path)) as im:
        if draft and resize == "crop":
            im.draft("RGB", (size, size))
        if im.width * im.height > MAX_PIXELS:  # known from the header, before decoding
            raise ValueError(f"{im.width}x{im.height} px, over the {MAX_PIXELS:,}-pixel limit")
        return to_square(im.convert("RGB"), size, resize)

def to_square(im: Image.Image, size: int, resize: str = "crop") -> np.ndarray:
    """An RGB image -> (H, H, 3) uint8. crop: the short side to H (bilinear), then the centre
    square. squash: the whole image to H x H, as the authors' OpenCV INTER_LINEAR_EXACT, which
    torch's bilinear without antialiasing matches to within one grey level (PIL's bilinear
    antialiases: about ten off). clip: as CLIP's image processor, the short side to H
    (bicubic), then the centre square."""
    if resize == "crop":
        return np.array(ImageOps.fit(im, (size, size), Image.BILINEAR))
    if resize == "squash":
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float()        # (1, 3, h, w)
        x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=False)
        return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    short, long = sorted(im.size)
    # as transformers' get_resize_output_image_size rounds
    long = int(size * long / short)
    im = im.resize((size, long) if im.width == short else (long, size), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.array(im.crop((left, top, left + size, top + size)))

class UnreadableFile(Exception):
    """A data file (image or article) that is missing or cannot be decoded."""

class ImageStore:
    """Decoded H x H images of one split and kind (ground or satellite), looked up by id:
    from the `prepare` cache when it has this split and kind (a uint8 array (n, H, H, 3) on
    disk and a manifest of ids), else from the files. A cache made for another size, one
    that lacks images this run needs, or one whose array is not whole, is refused, never
    silently used."""

    def __init__(self, split_dir: Path, kind: str, size: int, cache: Path | None, needed=(),
                 resize: str = "crop"):
        self.dir, self.kind, self.size, self.resize = split_dir, kind, size, resize
        self.cached, self.row_of, self.file, self.pid = False, {}, None, None
        self.cache = cache / f"{split_dir.name}_{kind}" if cache else None
        manifest = self.cache.with_suffix(".json") if cache else None
        if manifest and manifest.is_file():
            m = read_manifest(manifest, {"size": int, "ids": list, "broken": list})
            made = (m["size"], m.get("resize", "crop"))
            if made != (size, resize):
                raise UserError(f"{manifest}: the cache holds {made[0]} px images made by "
                                f"--resize {made[1]}, not --img-size {size} --resize {resize}; "
                                f"rerun `prepare` with those, or name another --cache")
            array = self.cache.with_suffix(".u8")
            whole = max(1, len(m["ids"])) * size * size * 3  # an empty list keeps one row
            found = array.stat().st_size if array.is_file() else 0
            if found != whole:
                raise UserError(f"{array}: {found} bytes where its manifest promises {whole} "
                                f"({len(m['ids'])} images): the cache is not whole; rerun "
                                f"`prepare`")
            self.cached, self.row_of = True, {i: n for n, i in enumerate(m["ids"])}
            self.broken = set(m["broken"])
            lacking = [i for i in needed if i not in self.row_of]
            if lacking:
                raise UserError(f"{manifest}: the cache lacks {len(lacking)} images of this run "
                                f"(first: {lacking[0]}); the file list changed: rerun `prepare`")

    def path(self, image_id: str) -> Path:
        return shard(self.dir, self.kind, image_id)

    def __getstate__(self):
        # an open file is reopened in each worker, not pickled into it
        return {**self.__dict__, "file": None}

    def __call__(self, image_id: str, out: np.ndarray | None = None) -> np.ndarray:
        """The image as (H, H, 3) uint8, written into `out` when given (a batch's slot)."""
        out = np.empty((self.size, self.size, 3), np.uint8) if out is None else out
        if not self.cached:
            try:
                out[...] = load_image(self.path(image_id), self.size, self.resize)
                return out
            except Exception as e:
                # missing, truncated, not an image: decoders raise all sorts
                raise UnreadableFile(f"{self.path(image_id)}: {e}") from None
        if image_id in self.broken:
            raise UnreadableFile(f"{self.path(image_id)}: could not be decoded when cached")
        # One read straight into place: 5-10x faster than copying out of a memory map, whose
        # first touch of each page faults. Each process opens the file itself: forked workers
        # sharing one descriptor would share its read position.
        if self.pid != os.getpid():
            self.file = open(self.cache.with_suffix(".u8"), "rb", buffering=0)
            self.pid = os.getpid()
        self.file.seek(self.row_of[image_id] * out.nbytes)
        # the array was cut short while in use
        if self.file.readinto(out) != out.nbytes:
            raise UnreadableFile(f"{self.cache}.u8: ends before image {image_id}")
        return out

def read_manifest(path: Path, fields: dict) -> dict:
    """A cache's JSON manifest, with the types its fields must have; one line otherwise."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable cache manifest ({e}); move it away and rerun "
                        f"`prepare`") from None
    wrong = [k for k, t in fields.items() if not isinstance(m, dict) or
             not isinstance(m.get(k), t)]
    if wrong:
        raise UserError(f"{path}: not an mml cache manifest ({wrong[0]!r} missing or not a "
                        f"{fields[wrong[0]].__name__}); move it away and rerun `prepare`")
    return m

def cache_dir(cfg: Config, root: Path) -> Path:
    """Where the image and tower caches of a dataset live: --cache, or ROOT/cache."""
    return Path(cfg.cache) if cfg.cache else root / "cache"

def image_stores(cfg: Config, split_dir: Path, needed: dict) -> dict:
    """{"G": store, "S": store} for one split; needed: {"G": ids, "S": ids} the run will read."""
    return {m: ImageStore(split_dir, MODALITY[m], cfg.img_size, cache_dir(cfg, split_dir.parent),
                          needed.get(m, ()), cfg.resize) for m in "GS"}

# Text: every article read, split into sentences and tokenised once, before training.

def read_article(path: Path) -> dict:
    """A Wikipedia article: an ordered {section title: text}, paragraphs split by newlines."""
    try:
        if regular_file(path).stat().st_size > MAX_ARTICLE_BYTES:
            raise ValueError(f"over the {MAX_ARTICLE_BYTES:,}-byte limit")
        article = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        # RecursionError: nested too deeply
        raise UnreadableFile(f"{path}: {type(e).__name__}: {e}") from None
    if not isinstance(article, dict) or not article or not all(
            isinstance(text, str) for text in article.values()):
        raise UnreadableFile(f"{path}: expected a JSON object {{section title: text}}")
    return article

def read_articles(split: Split) -> tuple[list[dict | None], list[str]]:
    """Every article of a split (None where unreadable: training goes on without it, as
    without a bad image), and why each unreadable one failed."""
    articles, bad = [], []
    for text_id in split.text:
        try:
            articles.append(read_article(shard(split.dir, "text", text_id)))
        except UnreadableFile as e:
            articles.append(None)
            bad.append(str(e))
    return articles, bad

def train_tokenizer(texts, cfg: Config) -> Tokenizer:
    """A lower-cased BPE tokenizer learnt from training text only; it travels inside every
    checkpoint, so evaluation maps words to the ids training used. BPE, not WordPiece: the
    WordPiece trainer numbers tied tokens differently from run to run (no exact --resume)."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=["[PAD]", "[UNK]"], show_progress=False))
    # id 0 is padding, which SmallText masks
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=cfg.max_len)
    tok.enable_truncation(cfg.max_len)
    return tok

def tokenize(tok: Tokenizer, sentences: list[str]) -> torch.Tensor:
    return torch.tensor([e.ids for e in tok.encode_batch(sentences)], dtype=torch.long)  # (n, L)

class Sentences:
    """A split's candidate sentences, tokenised once: the loop picks rows of `tokens` and never
    parses JSON. An article splits the authors' way (PROTOCOL 2), naive on purpose so numbers
    compare: sections, paragraphs at newlines, pieces at '. '. Three levels of (start, count)
    rows record that tree (per article its sections, per section its paragraphs, per
    paragraph its pieces); pick() walks it, taking the first branch at every level ("first")
    or a random one ("random"). With mode "first" only the first pieces are kept at all."""

    def __init__(self, articles: list[dict | None], tok: Tokenizer | None, mode: str):
        levels, self.texts = ([], [], []), []
        keep = 1 if mode == "first" else None
        # an unreadable article (None) gives one empty sentence
        for article in articles:
            sections = list((article or {"": ""}).values())[:keep]
            levels[0].append((len(levels[1]), len(sections)))
            for section in sections:
                paragraphs = section.split("\n")[:keep]
                levels[1].append((len(levels[2]), len(paragraphs)))
                for paragraph in paragraphs:
                    pieces = paragraph.split(". ")[:keep]
                    levels[2].append((len(self.texts), len(pieces)))
                    self.texts += pieces
        self.levels = [np.array(rows, dtype=np.int64) for rows in levels]
        if tok is not None:  # evaluation tokenises the few sentences it draws, later
            self.tokens = torch.cat([tokenize(tok, self.texts[i:i + 65536])          # (P, L)
                                     for i in range(0, len(self.texts), 65536)])

    def pick(self, i: int, mode: str, rng: random.Random) -> int:
        """The row of `tokens` holding article i's sentence. randrange(n) draws exactly what
        the authors' rng.choice over n items draws, so the same rng picks the same sentence."""
        row = i
        for level in self.levels:
            start, count = level[row]
            row = start + (rng.randrange(count) if mode == "random" else 0)
        return int(row)

class LandmarkSet(torch.utils.data.Dataset):
    """Landmarks -> batches: a list of (epoch, row) keys -> {"G", "S": (B, 3, H, H) uint8,
    "T": (B, L) ids, "C": (B, 2) lat/lon, "bad": B strings naming unreadable files}, for the
    active modalities. Training draws a random photo, a random year's aerial image (the latest
    with --last-sat-only) and a --train-text sentence; validation the first photo, the latest
    tile and the first sentence. A sample's randomness is seeded by (seed, epoch, row): the
    same whichever worker draws it, so --resume is exact. Workers only read; the loop jitters
    whole batches on the device (`augment`).

    Whole batches, not samples: in a worker the arrays are made in shared memory and each
    image is read straight into its slot, sparing the two copies of every pixel that
    collating samples costs (2x a worker's throughput). They are (B, H, H, 3) as stored, so
    their (B, 3, H, H) view is channels-last, the layout GPU convolutions run fastest in.

    An unreadable file is skipped for another view of the landmark and listed in "bad"; the
    training loop reports them per epoch."""

    def __init__(self, split: Split, stores: dict, sentences: Sentences, cfg: Config, train: bool):
        self.split, self.stores, self.sentences, self.cfg = split, stores, sentences, cfg
        self.train = train

    def __len__(self):
        return len(self.split.ids)

    def view(self, m: str, ids: list[str], rng: random.Random, out: np.ndarray, bad: list):
        """One of ids (a random one when training) read into out (H, H, 3)."""
        for image_id in rng.sample(ids, len(ids)) if self.train else ids:
            try:
                self.stores[m](image_id, out)
                return
            except UnreadableFile as e:
                bad.append(str(e))
        out[...] = 0  # no readable view at all: a black image

    def __getitem__(self, keys: list[tuple[int, int]]) -> dict:
        s, side, mods, B = self.split, self.cfg.img_size, self.cfg.modalities, len(keys)
        images = {m: torch.empty(B, side, side, 3, dtype=torch.uint8) for m in "GS" if m in mods}
        if torch.utils.data.get_worker_info() is not None:  # in a worker: shared memory
            images = {m: x.share_memory_() for m, x in images.items()}
        rows, tokens, bad = [i for _, i in keys], [], []
        for j, (epoch, i) in enumerate(keys):
            rng, problems = random.Random(f"{self.cfg.seed}/{epoch}/{i}"), []
            if "G" in mods:
                self.view("G", s.ground[i], rng, images["G"][j].numpy(), problems)
            if "S" in mods:
                sats = s.sat[i] if self.train and not self.cfg.last_sat_only else [s.latest[i]]
                self.view("S", sats, rng, images["S"][j].numpy(), problems)
            if "T" in mods:
                mode = self.cfg.train_text if self.train else "first"
                tokens.append(self.sentences.pick(i, mode, rng))
            bad.append("\n".join(problems))
        out = {m: x.permute(0, 3, 1, 2) for m, x in images.items()}          # (B, 3, H, H)
        if "T" in mods:
            out["T"] = self.sentences.tokens[tokens]                         # (B, L)
        if "C" in mods:
            out["C"] = torch.tensor(s.latlon[rows], dtype=torch.float32)     # (B, 2)
        return out | {"bad": bad}

class EpochSampler(torch.utils.data.Sampler):
    """Batches of (epoch, row) keys for one process, global steps start to stop, epoch after
    epoch: per epoch a permutation seeded by (seed, epoch), cut into global batches of B (the
    last partial one dropped), of which process r of W takes the r-th B/W slice. The same
    global batches for any W, resumable from any step, and one iterator for the whole run, so
    the loader's workers never drain at an epoch's end."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0, stop: int = 0):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.start, self.stop = start, stop

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        per_epoch, local = self.n // self.batch, self.batch // self.world
        for step in range(self.start, self.stop):
            epoch, b = divmod(step, per_epoch)
            if b == 0 or step == self.start:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            first = b * self.batch + self.rank * local
            yield [(epoch, int(i)) for i in perm[first:first + local]]

def augment_params(seed: int, epoch: int, step: int, n: int, strength: str = "mml"):
    """(n, 2, 7) jitter for the n samples of one global batch, each view (ground, aerial) its
    own: brightness, contrast and saturation factors; a draw r (blur if r < 0.2, sharpen if
    r < 0.4); the blur's sigma in [0.3, 1]; quarter turns in {0, 1, 2, 3}; a hue shift in
    turns. mml: factors in [0.8, 1.2], no hue. paper, the authors' albumentations settings:
    ColorJitter(0.15, 0.15, 0.15, hue 0.15) on half the samples, blur or sharpen 15% each.
    Keyed by (seed, epoch, step) and taken by position in the global batch, so a sample's
    jitter does not depend on the number of loader workers or processes, and --resume
    repeats it."""
    rng = np.random.default_rng([seed, epoch, step])
    u = torch.from_numpy(rng.random((n, 2, 6)))
    low = torch.tensor([0.8, 0.8, 0.8, 0.0, 0.3, 0.0], dtype=torch.float64)
    span = torch.tensor([0.4, 0.4, 0.4, 1.0, 0.7, 4.0], dtype=torch.float64)
    params = torch.cat([low + span * u, torch.zeros(n, 2, 1, dtype=torch.float64)], -1)
    if strength == "paper":  # drawn after mml's, which therefore stay as they were
        hue, jittered = torch.from_numpy(rng.random((n, 2, 2))).unbind(-1)  # each (n, 2)
        on = (jittered < 0.5).double()
        params[..., :3] = 1 + on[..., None] * 0.3 * (u[..., :3] - 0.5)     # [0.85, 1.15]
        params[..., 6] = on * 0.3 * (hue - 0.5)                             # [-0.15, 0.15]
        params[..., 3] = u[..., 3] * 0.4 / 0.3  # r < 0.2 for 15%, r < 0.4 for 30%
    params[..., 5] = params[..., 5].floor()
    return params.float()

def rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, H) in [0, 1], (B,) -> hue shifted by that fraction of the colour circle: a
    rotation of RGB space about its grey axis (Rodrigues' formula), which keeps greys and
    brightness and approximates HSV's hue shift (albumentations', torchvision's) without a
    round trip through HSV."""
    angle = 2 * math.pi * turns.view(-1, 1, 1)                              # (B, 1, 1)
    cross = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=x.device) / math.sqrt(3)
    eye = torch.eye(3, device=x.device)
    rotation = torch.cos(angle) * eye + torch.sin(angle) * cross + (1 - torch.cos(angle)) / 3
    return torch.einsum("bij,bjhw->bihw", rotation, x).clamp(0, 1)

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, H) -> (B, 1, H, H) luma with ITU-R 601 weights, as torchvision computes it."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)

def augment(images: torch.Tensor, params: torch.Tensor, rotate: bool,
            hue: bool = False) -> torch.Tensor:
    """(B, 3, H, H) uint8 -> (B, 3, H, H) float in [0, 1], jittered as the authors did: light
    colour jitter, blur or sharpen, and aerial views turned by a multiple of 90 degrees (north
    is not special). Each sample by its own row of params (B, 7) from augment_params, all at
    once on the images' device; `hue`: whether any hue shift is drawn (known on the CPU, so
    no sync asks the device). Each step is torchvision's per-image function written for a
    batch (tested against it): adjust_brightness, _contrast, _saturation, gaussian_blur with a
    3x3 kernel, adjust_sharpness with factor 2, rot90; the hue shift is approximated."""
    x = images.float() / 255
    bright, contrast, sat, r, sigma, turns, shift = (p.view(-1, 1, 1, 1) for p in params.T)
    x = (x * bright).clamp(0, 1)                                       # each param (B, 1, 1, 1)
    x = (contrast * x + (1 - contrast) * grayscale(x).mean((2, 3), keepdim=True)).clamp(0, 1)
    x = (sat * x + (1 - sat) * grayscale(x)).clamp(0, 1)
    if hue:
        x = rotate_hue(x, shift.view(-1))
    # blur (r < 0.2) with the separable Gaussian kernel [w, 1, w] / (1 + 2w), w = exp(-1 /
    # (2 sigma^2)), over a reflect-padded image, along rows then columns
    blur = (r < 0.2).view(-1)
    w = torch.exp(-0.5 / sigma[blur]**2)
    pad = F.pad(x[blur], (1, 1, 1, 1), mode="reflect")                 # (b, 3, H+2, H+2)
    rows = (pad[..., :-2] + pad[..., 2:]) * w + pad[..., 1:-1]         # (b, 3, H+2, H)
    blurred = ((rows[..., :-2, :] + rows[..., 2:, :]) * w + rows[..., 1:-1, :]) / (1 + 2 * w)**2
    # sharpen (0.2 <= r < 0.4): 2x - smooth, where smooth is x under the 3x3 kernel
    # [[1,1,1],[1,5,1],[1,1,1]] / 13, border pixels kept (the kernel's 3x3 box sum, + 4 x)
    sharp = ((r >= 0.2) & (r < 0.4)).view(-1)
    y = x[sharp]                                                       # (b', 3, H, H)
    rows = y[..., :-2] + y[..., 1:-1] + y[..., 2:]                     # (b', 3, H, H-2)
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]    # (b', 3, H-2, H-2)
    smooth = y.clone()
    smooth[..., 1:-1, 1:-1] = (box + 4 * y[..., 1:-1, 1:-1]) / 13
    x[blur] = blurred
    x[sharp] = (2 * y - smooth).clamp(0, 1)
    if rotate:
        for k in (1, 2, 3):
            chosen = turns.view(-1) == k
            x[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    return x

# ---- model --------------------------------------------------------------------------------
# Four encoders, one per modality, each a backbone (the trunk), then a projection head to the
# shared width D and an L2 normalisation, so that a dot product between any two embeddings is
# a cosine similarity. Backbones: a small CNN or torchvision's for images, a small transformer
# for text, or CLIP's towers for both (in the section on outside models, after the main
# path); GeoCLIP's location encoder for GPS. GroupNorm rather than BatchNorm in the CNN: a
# sample's embedding must not depend on the rest of its batch (in evaluation, or on another
# GPU's share of the batch).

class ResBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut, halving the side: (B, c_in, h, h) -> (B, c_out,
    h/2, h/2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=2, bias=False)

    def forward(self, x):
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(y)) + self.skip(x))

def image_trunk(width: int) -> nn.Sequential:
    """(B, 3, H, H) float -> (B, 8 * width) features: a stem and three residual stages."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, width),
        nn.GELU(), ResBlock(width, 2 * width), ResBlock(2 * width, 4 * width),
        ResBlock(4 * width, 8 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())

class Block(nn.Module):
    """One pre-norm transformer layer, (B, L, W) -> (B, L, W): x + attention(norm(x)), then
    x + MLP(norm(x)). Its modules carry Hugging Face CLIP's names, so that CLIP's weights load
    by name; the small text encoder is made of the same layer."""

    def __init__(self, width: int, heads: int, hidden: int, act: str = "gelu",
                 eps: float = 1e-5):
        super().__init__()
        self.heads, self.act = heads, act
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = nn.ModuleDict({p: nn.Linear(width, width) for p in
                                        ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(width, hidden), "fc2": nn.Linear(hidden, width)})

    def forward(self, x, keep=None, causal: bool = False):
        """keep: (B, L), False at padding, which no token attends to; causal: each token sees
        only itself and those before it (CLIP's text)."""
        B, L, W = x.shape
        y = self.layer_norm1(x)
        q, k, v = (self.self_attn[p](y).view(B, L, self.heads, -1).transpose(1, 2)
                   for p in ("q_proj", "k_proj", "v_proj"))                # (B, heads, L, W/heads)
        mask = None if keep is None else keep[:, None, None, :]             # (B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        x = x + self.self_attn["out_proj"](y.transpose(1, 2).reshape(B, L, W))
        y = self.mlp["fc1"](self.layer_norm2(x))
        # quick_gelu, x sigmoid(1.702 x): CLIP's approximation of gelu
        y = y * torch.sigmoid(1.702 * y) if self.act == "quick_gelu" else F.gelu(y)
        return x + self.mlp["fc2"](y)

class SmallText(nn.Module):
    """(B, L) token ids, 0 = padding -> (B, width): a small transformer trained from scratch,
    mean-pooled over the real tokens."""

    def __init__(self, vocab: int, max_len: int, width: int, layers: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, max(1, width // 64), 4 * width)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        keep = ids != 0                                            # (B, L)
        # an empty sentence keeps one token: an all-masked row would be NaN
        keep[:, 0] = True
        x = self.tokens(ids) + self.pos[: ids.shape[1]]            # (B, L, width)
        for block in self.blocks:
            x = block(x, keep)
        weight = keep.unsqueeze(-1).to(x.dtype)                    # (B, L, 1)
        return (self.norm(x) * weight).sum(1) / weight.sum(1)      # (B, width)

def image_backbone(cfg: Config) -> tuple[nn.Module, int]:
    """(B, 3, H, H) normalised pixels -> (B, width) features: (module, width). `small` is
    the CNN above, `clip` the vision tower of the --clip folder; the others are torchvision's
    ImageNet classifiers with their classifier layer replaced by nothing (our head projects
    to D instead). Random weights here, always: train loads the pretrained ones, and eval the
    checkpoint's."""
    if cfg.image_backbone == "small":
        return image_trunk(cfg.img_width), 8 * cfg.img_width
    if cfg.image_backbone == "clip":
        c = clip_config(cfg.clip)
        return CLIPVision(c["vision"], c["projection_dim"]), c["projection_dim"]
    size = {"image_size": cfg.img_size} if cfg.image_backbone == "vit_b_16" else {}
    net = torchvision.models.get_model(cfg.image_backbone, weights=None, **size)
    if cfg.image_backbone.startswith("resnet"):
        width = net.fc.in_features
        net.fc = nn.Identity()
    elif cfg.image_backbone == "convnext_tiny":
        width = net.classifier[2].in_features
        net.classifier[2] = nn.Identity()
    else:
        width = net.heads.head.in_features
        net.heads = nn.Identity()
    return net, width

def projection_head(cfg: Config, width: int) -> nn.Module:
    """(B, width) -> (B, D): one Linear (mml's), Linear-ReLU-Linear (the authors' heads, and
    GeoCLIP's with --head-hidden 768), or none: the backbone's own output (off-the-shelf
    CLIP, whose towers end in their own projection)."""
    if cfg.head == "none":
        if width != cfg.embed_dim:
            raise UserError(f"--head none: the backbone's output is {width}-d, not --embed-dim "
                            f"{cfg.embed_dim}")
        return nn.Identity()
    if cfg.head == "mlp":
        hidden = cfg.head_hidden or cfg.embed_dim
        return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, cfg.embed_dim))
    return nn.Linear(width, cfg.embed_dim)

class Encoder(nn.Module):
    """A backbone (trunk) and its projection head: (B, ...) -> (B, D) unit vectors. Image
    encoders first normalise their pixels as the backbone expects, from uint8 (evaluation:
    4x less to copy) or float in [0, 1] (jittered training batches)."""

    def __init__(self, trunk: nn.Module, width: int, cfg: Config, pixels: tuple = ()):
        super().__init__()
        self.trunk, self.width, self.head = trunk, width, projection_head(cfg, width)
        self.pixels = bool(pixels)
        if pixels:  # (mean, std) per channel
            self.register_buffer("mean", torch.tensor(pixels[0]).view(3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(pixels[1]).view(3, 1, 1), persistent=False)

    def features(self, x):
        """The backbone's output (B, width): what the frozen-tower cache of `eval` holds."""
        if self.pixels:
            x = ((x.float() / 255 if x.dtype == torch.uint8 else x) - self.mean) / self.std
        return self.trunk(x)

    def project(self, features):
        return F.normalize(self.head(features).float(), dim=-1)

    def forward(self, x):
        return self.project(self.features(x))

def image_encoder(cfg: Config, share_with: Encoder | None = None) -> Encoder:
    """A ground or aerial encoder; with share_with, on that one's backbone (its own head)."""
    trunk, width = (share_with.trunk, share_with.width) if share_with else image_backbone(cfg)
    # small: [0, 1] to [-1, 1]; torchvision's: the ImageNet statistics its weights expect
    if cfg.image_backbone == "small":
        pixels = ((0.5,) * 3, (0.5,) * 3)
    elif cfg.image_backbone == "clip":
        pixels = (CLIP_MEAN, CLIP_STD)
    else:
        stats = backbone_weights(cfg.image_backbone).transforms()
        pixels = (stats.mean, stats.std)
    return Encoder(trunk, width, cfg, pixels)

def text_encoder(cfg: Config) -> Encoder:
    if cfg.text_backbone == "clip":
        c = clip_config(cfg.clip)
        return Encoder(CLIPText(c["text"], c["projection_dim"]), c["projection_dim"], cfg)
    trunk = SmallText(cfg.vocab_size, cfg.max_len, cfg.text_width, cfg.text_layers)
    return Encoder(trunk, cfg.text_width, cfg)

class RandomFourierFeatures(nn.Module):
    """(B, 2) -> (B, 2n): [cos(2 pi v b^T), sin(2 pi v b^T)] with b ~ N(0, sigma^2) fixed.

    b is a buffer, so it is saved with the weights (GeoCLIP's key `capsule.0.b`). At
    sigma = 256 the phases reach thousands of radians: they are computed in float32 even
    under bf16 autocast, which would round them to noise.
    """

    def __init__(self, n: int, sigma: float):
        super().__init__()
        self.register_buffer("b", torch.randn(n, 2) * sigma)

    def forward(self, v):
        with torch.autocast(v.device.type, enabled=False):
            phase = 2 * math.pi * v.float() @ self.b.T             # (B, n)
            return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)

class GPSEncoder(nn.Module):
    """(B, 2) lat/lon degrees -> (B, D): GeoCLIP's location encoder (Vivanco et al. 2023).

    Equal Earth projection, then per scale sigma in (2^0, 2^4, 2^8) random Fourier features
    and an MLP with a linear head; the three scales' outputs are summed. Module names follow
    GeoCLIP (LocEnc{k}.capsule / .head), so with --gps-width 1024 --gps-depth 3
    --embed-dim 512 its pretrained state dict loads unchanged (--gps-init). `scaled`: the
    projection's SF/180 scaling, which GeoCLIP's weights need and the authors' copy, trained
    from scratch, leaves out (PROTOCOL 6).
    """
    SIGMAS = (2**0, 2**4, 2**8)

    def __init__(self, width: int, depth: int, dim: int, scaled: bool = True, n_freq: int = 256):
        super().__init__()
        self.scaled = scaled
        for k, sigma in enumerate(self.SIGMAS):
            layers, d = [RandomFourierFeatures(n_freq, sigma)], 2 * n_freq
            for _ in range(depth):
                layers += [nn.Linear(d, width), nn.ReLU()]
                d = width
            self.add_module(f"LocEnc{k}", nn.ModuleDict(
                {"capsule": nn.Sequential(*layers), "head": nn.Sequential(nn.Linear(d, dim))}))

    def forward(self, latlon):
        v = equal_earth(latlon.float(), self.scaled)               # (B, 2)
        out = sum(enc["head"](enc["capsule"](v)) for enc in self.children())
        return F.normalize(out.float(), dim=-1)

def is_head(name: str) -> bool:
    """Whether a parameter or module name lies in a projection head (what --freeze trains)."""
    return "head" in name.split(".")

class MML(nn.Module):
    """The four encoders and the learnable temperature. forward: batch -> ({m: (B, D)}, scale).
    The backbones of the --freeze encoders get no gradient and stay in eval mode (their
    BatchNorm statistics fixed); their heads train."""

    def __init__(self, cfg: Config):
        super().__init__()
        m, enc = cfg.modalities, {}
        if "G" in m:
            enc["G"] = image_encoder(cfg)
        if "S" in m:
            enc["S"] = image_encoder(cfg, enc["G"] if cfg.share_image_trunk else None)
        if "T" in m:
            enc["T"] = text_encoder(cfg)
        if "C" in m:
            enc["C"] = GPSEncoder(cfg.gps_width, cfg.gps_depth, cfg.embed_dim, cfg.gps_scaling)
        self.enc = nn.ModuleDict(enc)
        # CLIP's initial temperature 0.07, learnt in log space (Radford et al. 2021)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.frozen = [f for f in cfg.freeze if f in self.enc]
        for f in self.frozen:
            for name, p in self.enc[f].named_parameters():
                p.requires_grad_(is_head(name))
        self.train()  # modules start in training mode: frozen backbones must not

    def train(self, mode: bool = True):
        super().train(mode)
        # module by module: a frozen backbone's BatchNorm stays fixed
        for f in self.frozen:
            for name, module in self.enc[f].named_modules():
                module.training = mode and is_head(name)
        return self

    def forward(self, batch: dict):
        # the scale is returned, not read off the module, so that DDP sees it used in forward
        return {m: self.enc[m](batch[m]) for m in self.enc}, self.logit_scale.exp()

    def towers(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen CLIP towers: loaded from their folder, never
        saved (1.7 GB a checkpoint for ViT-L/14-336), their digest recorded instead."""
        return tuple(f"enc.{m}.trunk." for m in self.frozen
                     if isinstance(getattr(self.enc[m], "trunk", None), (CLIPVision, CLIPText)))

# ---- loss ---------------------------------------------------------------------------------

def loss_pairs(modalities: str, kind: str) -> list[str]:
    """complete: every pair of modalities (the authors' default); imagebind: ground vs each."""
    if kind == "imagebind":
        return ["G" + m for m in modalities if m != "G"]
    return [a + b for a, b in itertools.combinations(modalities, 2)]

class GatherWithGrad(torch.autograd.Function):
    """(B, D) on each of W processes -> (W*B, D) on every process, with gradients flowing back.

    A plain dist.all_gather returns tensors without history: each process's loss would push
    gradient only into its own B rows and treat the others' as constants, so the model
    would learn from a fraction of its negatives. Every row enters every process's loss, so
    the gradient of a row is the sum over processes: backward all-reduces and keeps our slice.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        B = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * B:(dist.get_rank() + 1) * B]

def contrastive_loss(emb: dict, scale: torch.Tensor, pairs: list[str], gather: bool = True):
    """Symmetric InfoNCE (CLIP) for each pair of modalities, averaged over the pairs.

    emb: {modality: (B, D) unit vectors}. Row i of one modality matches row i of the other;
    the other B-1 rows (W*B-1 under torchrun) are the negatives. Under torchrun each process
    scores its own B rows against all W*B columns (open_clip's "local loss"), so its labels
    are offset by rank*B. Each process's loss is a mean over its rows and DDP averages the
    processes' gradients, so the update is exactly that of the mean over the global batch;
    scaling the loss by W as well would multiply the gradients by W (open_clip issue 616).
    Returns (loss, {pair: loss}). Call it outside autocast: logits up to 100 need float32.
    """
    world = dist.get_world_size() if gather and dist.is_initialized() else 1
    cols = {m: GatherWithGrad.apply(e) if world > 1 else e for m, e in emb.items()}  # (W*B, D)
    B = next(iter(emb.values())).shape[0]
    labels = torch.arange(B, device=scale.device) + (dist.get_rank() * B if world > 1 else 0)
    parts = {}
    for a, b in pairs:
        logits_ab = scale * emb[a] @ cols[b].T                     # (B, W*B)
        logits_ba = scale * emb[b] @ cols[a].T                     # (B, W*B)
        parts[a + b] = (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2
    return sum(parts.values()) / len(parts), parts

# ---- metrics ------------------------------------------------------------------------------
# PROTOCOL 4. A positive is a gallery item with the query's landmark id; label -1 marks an
# index distractor. The authors' official numbers treat distractors as junk: removed from the
# ranking before R@k and mAP@1k (after taking the top 1,000 for mAP), seen only by medR. The
# strict numbers rank the distractors like any other item. Both are reported. Here c is the
# number of queries in a chunk (--chunk), scored at once against the whole gallery.

@contextlib.contextmanager
def matmul_precision(level: str):
    """Float32 matmuls at this precision inside, and what was set before afterwards: "high"
    (TF32) for training's speed; "highest" for scores, where TF32's rounding would create
    ties among 100k+ gallery items. The one switch of matmul precision; it always restores."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)

def count_at_least(scores: torch.Tensor, t: torch.Tensor, n_junk: int) -> tuple:
    """Items scoring >= t per row, among the distractors (the first n_junk columns) and among
    the rest: (c, N), (c, 1) -> two (c,). A count, not a sort: one pass over the scores."""
    return ((scores[:, :n_junk] >= t).sum(1, dtype=torch.int32),
            (scores[:, n_junk:] >= t).sum(1, dtype=torch.int32))

def positives(q_labels: torch.Tensor, g_labels: torch.Tensor) -> tuple:
    """Each query's positives as gallery indices, found by sorting the labels once and looking
    each query's run up: (Q, P) indices, (Q, P) which of them are real (P is the most any
    query has), (Q,) how many each query has."""
    by_label = torch.argsort(g_labels, stable=True)
    sorted_labels = g_labels[by_label]
    start = torch.searchsorted(sorted_labels, q_labels)
    n_good = torch.searchsorted(sorted_labels, q_labels, right=True) - start       # (Q,)
    if bool((n_good == 0).any()):
        raise ValueError(f"query {int(torch.nonzero(n_good == 0)[0])} has no positive in the "
                         f"gallery")
    slots = torch.arange(int(n_good.max()), device=g_labels.device)                # (P,)
    index = by_label[(start[:, None] + slots).clamp(max=len(g_labels) - 1)]       # (Q, P)
    return index, slots < n_good[:, None], n_good

def ap_term(hit: int, position: torch.Tensor) -> torch.Tensor:
    """The authors' AP contribution of a query's hit number `hit` (0-based) at 0-based
    `position` of its ranking: the mean of the precision just before it and at it."""
    before = torch.where(position > 0, hit / position.clamp(min=1), 1.0)
    return (before + (hit + 1) / (position + 1)) / 2

def rank_queries(q: torch.Tensor, g: torch.Tensor, q_labels: torch.Tensor,
                 g_labels: torch.Tensor, map_top: int = 1000, chunk: int = 512,
                 top: int = 5) -> dict:
    """Per query (Q,): 0-based position of its first positive in the full ranking
    ("first_strict") and with distractors removed ("first_official"), AP over the top
    map_top under both ("ap_strict", "ap_official"), its `top` best gallery items (Q, top)
    and its best-scoring positive ("match", what the pictures show).

    No sort of the gallery. A positive's position is a count: the items scoring at least as
    high as it. The first positive is counted against the whole gallery (medR needs its
    position however low). AP needs only positives within the top map_top, and every item
    above such a positive lies in the top map_top too, so those are counted among the top
    map_top scores alone (topk: a selection, not a sort). Ties go against the query: an item
    whose score equals a positive's ranks before it, unless it is a positive too. Scores are
    float32 with TF32 off, since rounding at 100k+ items creates ties. Memory stays bounded
    by the chunk: about 6 bytes x chunk x N.
    """
    Q, N = len(q), len(g)
    junk = g_labels == -1
    n_junk, order = int(junk.sum()), None
    # distractors first: counting them is then a slice
    if not bool(junk[:n_junk].all()):
        order = torch.argsort((~junk).int(), stable=True)
        g, g_labels = g[order], g_labels[order]
    pos_index, is_pos, n_good = positives(q_labels, g_labels)                    # (Q, P) ...
    K = min(map_top, N)
    res = {"first_strict": torch.zeros(Q, dtype=torch.long, device=g.device),
           "first_official": torch.zeros(Q, dtype=torch.long, device=g.device),
           "ap_strict": torch.zeros(Q, dtype=torch.float64, device=g.device),
           "ap_official": torch.zeros(Q, dtype=torch.float64, device=g.device),
           "top": torch.zeros(Q, min(top, N), dtype=torch.long, device=g.device),
           "match": torch.zeros(Q, dtype=torch.long, device=g.device)}
    with matmul_precision("highest"):
        for s in range(0, Q, chunk):
            part = slice(s, s + chunk)
            scores = q[part].float() @ g.float().T                            # (c, N)
            top_scores, top_index = scores.topk(K, dim=1)                      # (c, K) best first
            res["top"][part] = top_index[:, :res["top"].shape[1]]
            pos = scores.gather(1, pos_index[part]).masked_fill(~is_pos[part], -math.inf)
            res["match"][part] = pos_index[part].gather(1, pos.argmax(1, keepdim=True))[:, 0]
            pos = pos.sort(dim=1, descending=True).values                     # (c, P) best first
            # the first positive, counted against the whole gallery
            t = pos[:, :1]
            junk_above, labelled_above = count_at_least(scores, t, n_junk)
            # the query split's non-positives scoring at least as high
            official = labelled_above - (pos >= t).sum(1)
            res["first_official"][part] = official
            res["first_strict"][part] = official + junk_above
            # every positive within the top K, counted among the top K scores alone
            top_is_junk = top_index < n_junk                                   # (c, K)
            # the K-th best score: lower ones are out of the top K
            cutoff = top_scores[:, -1:]
            for j in range(pos.shape[1]):
                t = pos[:, j:j + 1]                                            # (c, 1)
                real = j < n_good[part]
                above_cutoff = real & (t > cutoff)[:, 0]
                at_cutoff = real & (t == cutoff)[:, 0]
                if not bool((above_cutoff | at_cutoff).any()):
                    break  # the remaining positives all score below the K-th item
                at_least = top_scores >= t
                junk_above = (at_least & top_is_junk).sum(1, dtype=torch.int32)
                labelled_above = (at_least & ~top_is_junk).sum(1, dtype=torch.int32)
                # its ties may go on past the top K: count them all
                if bool(at_cutoff.any()):
                    junk_above[at_cutoff], labelled_above[at_cutoff] = count_at_least(
                        scores[at_cutoff], t[at_cutoff], n_junk)
                # positions of positive j: items above it, less the positives among them,
                # plus the j positives that rank before it (ties go against the query)
                official = labelled_above - (pos >= t).sum(1) + j
                strict = official + junk_above
                hit = above_cutoff | (at_cutoff & (strict < map_top))
                res["ap_strict"][part] += torch.where(hit, ap_term(j, strict.double()), 0.0)
                res["ap_official"][part] += torch.where(hit, ap_term(j, official.double()), 0.0)
    res["ap_strict"] /= n_good
    res["ap_official"] /= n_good
    if order is not None:
        res["top"], res["match"] = order[res["top"]], order[res["match"]]
    return res

def summarise(ranks: dict, ks=(1, 5, 10), map_top: int = 1000) -> dict:
    """Per-query ranks -> {"official": {R@k, mAP, medR}, "strict": {...}}, in percent but medR.
    medR is the median 1-based position in the full ranking under both protocols (the
    authors' medR already counts distractors), numpy's median (mean of the middle two)."""
    med = float(np.median(ranks["first_strict"].cpu().numpy() + 1))
    m = "mAP@1k" if map_top == 1000 else f"mAP@{map_top}"
    out = {}
    for p in ("official", "strict"):
        recall = {f"R@{k}": 100 * (ranks[f"first_{p}"] < k).double().mean().item() for k in ks}
        out[p] = {**recall, m: 100 * ranks[f"ap_{p}"].mean().item(), "medR": med}
    return out

def retrieval_metrics(query_emb, gallery_emb, query_labels, gallery_labels, ks=(1, 5, 10),
                      map_top=1000) -> dict:
    """Official and strict R@k, mAP@map_top and medR of a retrieval task (PROTOCOL 4)."""
    return summarise(rank_queries(query_emb, gallery_emb, query_labels, gallery_labels, map_top),
                     ks, map_top)

def geo_metrics(km: torch.Tensor) -> dict:
    """% of predictions within 1, 25, 200, 750, 2500 km of the truth, and the median error:
    from each query's error in km, (Q,)."""
    within = {f"acc@{t}km": 100 * (km <= t).double().mean().item() for t in (1, 25, 200, 750, 2500)}
    return within | {"median_km": float(np.median(km.cpu().numpy()))}

# ---- train --------------------------------------------------------------------------------
# One process per GPU under torchrun (nanoGPT's shape): RANK in the environment means
# distributed; process 0 logs, validates and writes checkpoints while the others wait at a
# barrier. Without torchrun all of this reduces to rank 0 of 1 and no extra code runs.
# `train` checks and locks the run folder, then `fit` runs the phases; the loop is its last
# screen, and the per-step work is `train_step`.

def setup_distributed(cfg: Config) -> torch.device:
    """Join the torchrun group if there is one (NCCL on GPUs, gloo on the CPU); return the
    device this process computes on."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"

def bf16_on(device: torch.device, cfg: Config) -> bool:
    return device.type == "cuda" and cfg.bf16 and torch.cuda.is_bf16_supported()

def autocast_for(device: torch.device, cfg: Config):
    """bf16 autocast on a GPU that has it, else a no-op: the one mixed-precision switch."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_on(device, cfg))

def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device; pinned memory makes the copy asynchronous (non_blocking)."""
    out = {m: x.to(device, non_blocking=True) for m, x in batch.items() if torch.is_tensor(x)}
    # images: channels-last on a GPU, where convolutions run fastest that way; plain
    # (B, 3, H, H) on the CPU, where the elementwise jitter runs 1.4x faster on it
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return {m: x.contiguous(memory_format=layout) if x.dim() == 4 else x for m, x in out.items()}

def jitter(inputs: dict, params: torch.Tensor) -> dict:
    """A batch's image views, on their device, augmented by their rows of params (B, 2, 7)."""
    hue = bool(params[..., 6].any())  # on the CPU: no sync
    for k, m in enumerate("GS"):
        if m in inputs:
            x = augment(inputs[m], params[:, k].to(inputs[m].device), m == "S", hue)
            inputs[m] = to_device({m: x}, x.device)[m]  # the device's layout again
    return inputs

def learn_tokenizer(cfg: Config, articles: list, ckpt: dict | None) -> Tokenizer:
    """The run's tokenizer: the checkpoint's on --resume; CLIP's with its text tower; else
    learnt once, on process 0, from the training articles and sent to the others: every
    process must agree."""
    if ckpt:
        return Tokenizer.from_str(ckpt["tokenizer"])
    if cfg.text_backbone == "clip":
        return clip_tokenizer(cfg.clip, cfg.max_len)
    tok_json = [None]
    if is_master():
        texts = (v for a in articles if a for v in a.values())
        tok_json = [train_tokenizer(texts, cfg).to_str()]
    if dist.is_initialized():
        dist.broadcast_object_list(tok_json)
    return Tokenizer.from_str(tok_json[0])

def training_sets(cfg: Config, root: Path, ckpt: dict | None) -> tuple:
    """(training set, validation set, tokenizer): the splits, every article read and
    tokenised once, the images' stores (the cache when there is one)."""
    train_split, val_split = read_train(cfg, root)
    if len(train_split.ids) < 2 or len(val_split.ids) < 2:
        raise UserError(f"{root}: {len(train_split.ids)} training and {len(val_split.ids)} "
                        f"validation landmarks; need at least 2 of each")
    (articles, bad), (val_articles, val_bad) = read_articles(train_split), read_articles(val_split)
    if bad or val_bad:
        print0(f"{len(bad + val_bad)} unreadable articles: their landmarks train with an empty "
               f"sentence (first: {(bad + val_bad)[0]})")
    tok = learn_tokenizer(cfg, articles, ckpt)
    both = (train_split, val_split)
    stores = image_stores(cfg, train_split.dir, {
        "G": [i for s in both for g in s.ground for i in g],
        "S": [i for s in both for g in s.sat for i in g]})
    return (LandmarkSet(train_split, stores, Sentences(articles, tok, cfg.train_text), cfg, True),
            LandmarkSet(val_split, stores, Sentences(val_articles, tok, "first"), cfg, False), tok)

def make_optimizer(raw: MML, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the trained parameters (frozen ones get no optimizer state)."""
    trained = [p for p in raw.parameters() if p.requires_grad]
    if cfg.decay_all:  # the authors' AdamW(model.parameters(), weight_decay=...)
        groups = [{"params": trained, "weight_decay": cfg.weight_decay}]
    else:  # decay weight matrices; not biases, norms, the scale
        groups = [{"params": [p for p in trained if p.dim() >= 2],
                   "weight_decay": cfg.weight_decay},
                  {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))

def build_model(cfg: Config, device, ckpt: dict | None, path: Path) -> tuple:
    """(model, optimizer, the frozen towers' record): from the checkpoint at path on
    --resume; else initialised (the same seed on every process: identical weights), with
    CLIP's towers from --clip, --pretrained and --gps-init."""
    torch.manual_seed(cfg.seed)
    if ckpt:
        raw, towers = restore(path, ckpt, cfg), ckpt.get("towers")
    else:
        raw, towers = MML(cfg), None
        if "clip" in (cfg.image_backbone, cfg.text_backbone):
            state, digest = load_clip_weights(cfg.clip)
            install_towers(raw, state, cfg.clip)
            # checkpoints name the folder and its digest instead of copying it
            if raw.towers():
                towers = {"folder": str(Path(cfg.clip).resolve()), "digest": digest}
        if cfg.pretrained and cfg.image_backbone not in ("small", "clip"):
            # a shared trunk loads twice: the same weights
            for m in {"G", "S"} & set(raw.enc):
                load_pretrained(raw.enc[m].trunk, cfg.image_backbone)
        if cfg.gps_init:
            if "C" not in raw.enc:
                raise UserError("--gps-init: needs C in --modalities")
            load_matching(raw.enc["C"], load_tensors(Path(cfg.gps_init), "state dict"),
                          f"--gps-init {cfg.gps_init}")
    raw = raw.to(device)
    if device.type == "cuda":
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(raw, cfg)
    if ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: its optimizer state does not fit this model ({e})") from None
        torch.set_rng_state(ckpt["torch_rng"])
    return raw, optimizer, towers

def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Linear warmup, then a cosine decay to zero, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

@torch.no_grad()
def validate(model: MML, val_set: LandmarkSet, cfg: Config, pairs: list[str], device) -> dict:
    """Loss over the held-out landmarks in fixed batches (--val-batch), and for each trained
    pair an in-set retrieval R@1 (the first modality's items searching the second's), with
    their mean "val_R@1" (what --select recall picks by): a quick check, not the benchmark."""
    model.eval()
    n, B = len(val_set), min(cfg.val_batch or cfg.batch_size, len(val_set))
    batches = [[(0, i) for i in range(s, min(s + B, n))] for s in range(0, n, B)]
    loader = torch.utils.data.DataLoader(val_set, batch_size=None, sampler=batches,
                                         num_workers=min(cfg.workers, 2))
    total, embs = 0.0, []
    for batch in loader:
        with autocast_for(device, cfg):
            emb, scale = model(to_device(batch, device))
        rows = len(batch["bad"])
        total += contrastive_loss(emb, scale, pairs, gather=False)[0].item() * rows
        embs.append(emb)
    model.train()
    emb = {m: torch.cat([e[m] for e in embs]) for m in embs[0]}
    labels = torch.arange(n, device=device)
    r1 = {f"val_{a}2{b}_R@1": retrieval_metrics(emb[a], emb[b], labels, labels)["official"][
        "R@1"] for a, b in pairs}
    return {"val_loss": total / n, "val_R@1": sum(r1.values()) / len(r1), **r1,
            "chance_R@1": 100 / n}

class StopSignal:
    """SIGTERM (a cluster's preemption or time limit) and SIGINT (Ctrl-C) ask the training
    loop to stop: it finishes the step, saves last.pt and exits. A second signal exits at once.
    Used as `with StopSignal() as stop:`; the previous handlers come back on exit."""

    def __enter__(self):
        self.signum = 0  # the first signal received
        self.previous = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum:
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop "
              f"at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

def ignore_stop_signals(worker_id: int):
    """In loader workers: a scheduler signals the whole process group, and a worker killed by
    it would take the main process's last step with it. The main process decides to stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def start_over(out: Path):
    """--overwrite: remove what an earlier run of mml wrote in `out`, and nothing else."""
    for name in ("last.pt", "best.pt", "log.jsonl", "eval/metrics.json"):
        (out / name).unlink(missing_ok=True)

def save_checkpoint(state: dict, path: Path):
    """torch.save through a temporary file: a crash mid-write never leaves a half-written
    checkpoint where the last good one was, and a full disk leaves the old one and no .tmp."""
    write_atomically(path, lambda tmp: torch.save(state, tmp))

def train_step(model: nn.Module, raw: MML, optimizer, batch: dict, cfg: Config, pairs: list,
               epoch: int, step: int, lr: float,
               stop: bool = False) -> tuple[list[float], torch.Tensor, bool]:
    """One optimisation step on this process's rows of a global batch: jitter on the device,
    forward, the contrastive loss, one all-reduce of the losses and the stop vote, backward
    and update unless the loss is not finite. Returns ([loss, per-pair losses] averaged over
    the processes, the logit scale, whether any process was told to stop). `bench` times
    this very function."""
    rank, world = rank_and_world()
    device, local = raw.logit_scale.device, len(batch["bad"])  # this process's rows
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = augment_params(cfg.seed, epoch, step, local * world, cfg.augment)  # (B, 2, 7)
    inputs = jitter(to_device(batch, device), params[rank * local:(rank + 1) * local])
    with autocast_for(device, cfg):
        emb, scale = model(inputs)
    loss, parts = contrastive_loss(emb, scale, pairs)  # float32, outside autocast
    # One all-reduce carries the losses and whether any process was told to stop, so that
    # every process skips the same steps and stops after the same step.
    values = torch.stack([loss.detach(), *(v.detach() for v in parts.values()),
                          torch.tensor(float(stop), device=device)])
    if world > 1:
        dist.all_reduce(values)
        values[:-1] /= world
    # A CPU-GPU sync point, once per step: whether to update at all (a non-finite loss is
    # skipped) must be known on the CPU, by every process alike, before the update.
    *losses, stop_votes = values.tolist()
    if math.isfinite(losses[0]):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        if cfg.grad_clip_value:  # the authors' clip_grad_value_
            nn.utils.clip_grad_value_(raw.parameters(), cfg.grad_clip_value)
        optimizer.step()
        if cfg.scale_cap:  # CLIP caps the scale at 100 so training cannot blow up
            with torch.no_grad():
                raw.logit_scale.clamp_(max=math.log(cfg.scale_cap))
    return losses, scale.detach(), stop_votes > 0

class TrainLog:
    """Process 0's log: per --log-every steps one line and one log.jsonl record (step, the
    losses, lr, the logit scale, which people watch to diagnose collapse, samples/s, elapsed
    time and ETA); per epoch its validation record; at the end a summary."""

    def __init__(self, out: Path, step: int, total: int, batch: int):
        # line-buffered: each flushed
        self.file = open(out / "log.jsonl", "a", buffering=1)
        self.start_step, self.total, self.batch = step, total, batch
        self.t_start = self.t_last = time.time()
        self.step_last = step

    def step(self, epoch: int, step: int, losses: dict, lr: float, scale: torch.Tensor):
        now = time.time()
        rec = {"epoch": epoch, "step": step, "loss": losses.pop("loss"),
               **{f"loss_{k}": v for k, v in losses.items()}, "lr": lr,
               "logit_scale": scale.item(),
               "samples_per_s": (step - self.step_last) * self.batch / (now - self.t_last),
               "elapsed_s": now - self.t_start}
        eta = (self.total - step) * (now - self.t_start) / (step - self.start_step)
        print(f"epoch {epoch} step {step}/{self.total} | loss {rec['loss']:.3f} ("
              + " ".join(f"{k} {v:.2f}" for k, v in losses.items())
              + f") | lr {lr:.2e} | scale {rec['logit_scale']:.1f} | "
              f"{rec['samples_per_s']:.0f} samples/s | {fmt_time(rec['elapsed_s'])} elapsed, "
              f"ETA {fmt_time(eta)}", flush=True)
        self.file.write(json.dumps(rec) + "\n")
        self.t_last, self.step_last = now, step

    def epoch(self, epoch: int, step: int, val: dict, unreadable: int, improved: bool):
        print(f"epoch {epoch} | " + " | ".join(f"{k} {v:.3f}" for k, v in val.items())
              + (" | new best" if improved else ""), flush=True)
        record = {"epoch": epoch, "step": step, **val, "unreadable": unreadable}
        self.file.write(json.dumps(record) + "\n")

    def done(self, step: int, skipped: int, select: str, best: float):
        took, steps = time.time() - self.t_start, step - self.start_step
        rate = steps * self.batch / max(took, 1e-9)
        print(f"done: {steps} steps in {fmt_time(took)} ({rate:.0f} samples/s with "
              f"validation), {skipped} skipped; best val {select} {best:.3f}; checkpoints in "
              f"{Path(self.file.name).parent}/")
        self.file.close()

def end_of_epoch(raw: MML, optimizer, saved: dict, cfg: Config, epoch: int, step: int,
                 best: float, unreadable: list, val_set, pairs: list, device, log: TrainLog,
                 epoch_done: bool) -> float:
    """At an epoch's end, and when stopping mid-epoch: report the files skipped as unreadable,
    then on process 0 validate (at an epoch's end), save best.pt if it improved, and last.pt;
    the other processes wait. Returns the best validation value so far."""
    n_bad = torch.tensor(len(unreadable))
    if dist.is_initialized():
        dist.all_reduce(n_bad)
    if n_bad:
        print0(f"epoch {epoch}: {int(n_bad)} unreadable files skipped for other views (first: "
               f"{unreadable[0] if unreadable else 'on another process'})")
    if is_master():
        out = Path(cfg.out)
        state = {"model": trained_state(raw), "optimizer": optimizer.state_dict(), "step": step,
                 "epoch": epoch, "best": best, "torch_rng": torch.get_rng_state(), **saved}
        if epoch_done:
            val = validate(raw, val_set, cfg, pairs, device)
            value = val["val_loss" if cfg.select == "loss" else "val_R@1"]
            improved = value < best if cfg.select == "loss" else value > best
            best = value if improved else best
            log.epoch(epoch, step, val, int(n_bad), improved)
            state |= {"best": best, "val": val}
            # best.pt first: a crash between the two saves then leaves last.pt at the epoch
            # before, whose resume redoes this epoch and rewrites best.pt the same
            if improved:
                save_checkpoint(state, out / "best.pt")
        save_checkpoint(state, out / "last.pt")
    barrier()
    return best  # process 0's is the one that counts: only it saves

def fit(cfg: Config, device: torch.device):
    """Phases: data (`training_sets`, one loader iterator for the whole run), model (fresh, or
    the checkpoint's on --resume), then the loop: per step `train_step`, per --log-every
    steps a log line, per epoch (or on a stop signal) `end_of_epoch`: validate, save best.pt
    and last.pt. Process 0 logs, validates and saves; the others wait at a barrier."""
    rank, world = rank_and_world()
    out, root = Path(cfg.out), default_world(cfg)
    # the checkpoint records the data as an absolute path: eval reads it from anywhere
    cfg = dataclasses.replace(cfg, data=str(root.resolve()))
    ckpt = load_checkpoint(out / "last.pt", resume=True) if cfg.resume else None
    train_set, val_set, tok = training_sets(cfg, root, ckpt)

    # A global batch never larger than the landmarks, and divisible by the process count.
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must divide "
                        f"evenly over {world} processes")
    B = min(cfg.batch_size, len(train_set)) // world * world
    if B < cfg.batch_size:
        print0(f"batch {cfg.batch_size} > {len(train_set)} training landmarks: using {B}")
    steps_per_epoch = len(train_set) // B
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    step = ckpt["step"] if ckpt else 0
    sampler = EpochSampler(len(train_set), B, cfg.seed, rank, world, step, total)
    loader = torch.utils.data.DataLoader(  # batch_size None: the sampler yields batches
        train_set, batch_size=None, sampler=sampler, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers > 0 else None,
        worker_init_fn=ignore_stop_signals)

    # No per-rank seed offset is needed (nanoGPT has one for its data): every random draw of
    # the data is keyed by (seed, epoch, row) or by a sample's place in the global batch.
    raw, optimizer, towers = build_model(cfg, device, ckpt, out / "last.pt")
    # the lr is a function of the step alone
    warmup = max(1, round(cfg.warmup * total))
    # best.pt: lowest validation loss, or highest R@1
    lower_is_better = cfg.select == "loss"
    best = ckpt["best"] if ckpt else (math.inf if lower_is_better else -math.inf)
    if ckpt:
        print0(f"resumed {out / 'last.pt'} at step {step}")
    elif rank == 0 and cfg.overwrite:
        start_over(out)
    # Keep `raw` for saving: checkpoints then never carry compile's `_orig_mod.` or DDP's
    # `module.` prefixes (nanoGPT and open_clip both had to patch those out later).
    model = torch.compile(raw) if cfg.compile else raw
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    pairs = loss_pairs(cfg.modalities, cfg.loss)
    if cfg.preset:
        print0(f"--preset {cfg.preset}: " + " ".join(
            f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in PRESETS[cfg.preset]))
    n_params = sum(p.numel() for p in raw.parameters())
    n_trained = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    print0(f"training {cfg.modalities} ({cfg.loss}: {' '.join(pairs)}), {n_params / 1e6:.2f}M "
           f"parameters ({n_trained / 1e6:.2f}M trained), {len(train_set)} landmarks "
           f"({len(val_set)} held out) from {root}, batch {B} on {world} x {device.type}, "
           f"{steps_per_epoch} steps/epoch, {total} steps")
    log = TrainLog(out, step, total, B) if rank == 0 else None
    # in every save
    saved = {"config": dataclasses.asdict(cfg), "tokenizer": tok.to_str()}
    if towers:
        saved["towers"] = towers
    batches = loader
    if cfg.overfit_batch:  # one fixed batch, again and again: the loss must fall to ~0
        batches = itertools.repeat(next(iter(loader)), total - step)
    # non-finite losses: in a row now, and in all
    bad_in_row, skipped, unreadable = 0, 0, []
    # TF32 for training, not for scores
    with StopSignal() as stop, matmul_precision("high"):
        for batch in batches:
            epoch = step // steps_per_epoch
            unreadable += [line for s in batch["bad"] for line in s.split("\n") if line]
            lr = cfg.lr * lr_factor(step, total, warmup, cfg.schedule)
            losses, scale, stopping = train_step(model, raw, optimizer, batch, cfg, pairs,
                                                 epoch, step, lr, stop.signum > 0)
            if math.isfinite(losses[0]):
                bad_in_row = 0
            else:
                bad_in_row, skipped = bad_in_row + 1, skipped + 1
                print0(f"step {step}: loss is {losses[0]}, step skipped")
                if bad_in_row >= cfg.max_bad_steps:
                    raise UserError(f"{bad_in_row} non-finite losses in a row at step {step}: "
                                    f"stopping; the last good checkpoint is {out / 'last.pt'} "
                                    f"(try a lower --lr)")
            step += 1
            if log and (step % cfg.log_every == 0 or step == total or stopping):
                log.step(epoch, step, dict(zip(["loss"] + list(pairs), losses)), lr, scale)
            if step % steps_per_epoch == 0 or step >= total or stopping:
                best = end_of_epoch(raw, optimizer, saved, cfg, epoch, step, best, unreadable,
                                    val_set, pairs, device, log,
                                    epoch_done=step % steps_per_epoch == 0 or step >= total)
                unreadable = []
            if stopping and step < total:
                print0(f"stopped at step {step} of {total}: saved {out / 'last.pt'}; continue "
                       f"with `python mml.py train --out {out} --resume`")
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    if log:
        log.done(step, skipped, cfg.select, best)

class RunLock:
    """One writer per run folder: an exclusive flock on OUT/train.lock while the `with` lasts.
    The kernel drops a flock when its process dies, so a killed run's lock is never stale; the
    file names the process that holds it."""

    def __init__(self, out: Path):
        self.path = out / "train.lock"

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise UserError(f"{self.path.parent}: another `train` is writing there (process "
                            f"{holder}); wait for it to end, or stop it") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()  # and with it the lock

def train(cfg: Config):
    """`train`: the run folder checked and locked before any data is read, then `fit`."""
    device = setup_distributed(cfg)
    if is_master():
        writable_folder(Path(cfg.out), "--out")
    with RunLock(Path(cfg.out)) if is_master() else contextlib.nullcontext():
        fit(cfg, device)

# ---- eval ---------------------------------------------------------------------------------
# PROTOCOL 3: every query ground photo is its own query; the aerial queries are the
# latest tile of each query landmark; galleries are the index distractors (label -1) plus the
# query split's own items; the GPS gallery is the index tiles' centres plus the query
# landmarks' coordinates, and a geolocalisation guess is the top-1 GPS item. Evaluation is
# in three parts: the protocol's sides (the named lists of items each task queries or
# searches), something that embeds them (an mml checkpoint, any functions, or files of
# embeddings made elsewhere), and `score`, which ranks, summarises and writes.

TASKS = ("G2S", "S2G", "G2C", "S2C", "T2G", "T2S", "T2C")
TEXT_MODES = ("first", "random", "no_cues")

@dataclass(frozen=True)
class Task:
    """A task, parsed once from its name (G2S, T2C-no_cues): which modality queries, which
    is searched, and for a sentence task which sentences."""
    name: str
    query: str      # G, S or T
    gallery: str    # G, S or C
    text: str = ""  # T2x: first, random or no_cues

    @property
    def geo(self) -> bool:
        """Geolocalisation (x2C): scored by distance too, also against the open gallery."""
        return self.gallery == "C"

    @property
    def sides(self) -> tuple[str, ...]:
        """The names of its sides: queries, gallery, and for x2C the open gallery."""
        query = {"G": "query_ground", "S": "query_satellite"}.get(self.query,
                                                                  f"query_text_{self.text}")
        gallery = {"G": "gallery_ground", "S": "gallery_satellite", "C": "gallery_gps"}
        return (query, gallery[self.gallery]) + ("open_gps",) * self.geo

def task_list(names: str, query_text: str = "first,random,no_cues") -> list[Task]:
    """The tasks to run: all of them, or those named (T2C picks T2C in every sentence mode);
    names in any case, spaces allowed after commas."""
    every = [Task(t, t[0], t[2]) for t in TASKS if t[0] != "T"] + [
        Task(f"{t}-{m}", "T", t[2], m) for t in TASKS if t[0] == "T"
        for m in query_text.split(",")]
    chosen = []
    for name in filter(None, (n.strip().lower() for n in names.split(","))):
        match = [t for t in every if name in (t.name.lower(), t.name.split("-")[0].lower())]
        if not match:
            raise UserError(f"--tasks: no task {name!r} (known: "
                            f"{', '.join(t.name for t in every)})")
        chosen += match
    return list(dict.fromkeys(chosen)) or every

@dataclass
class Side:
    """One side of the protocol: its items in a fixed order, the same for every model. What
    `--export` writes, `--embeddings` reads and every embedder embeds."""
    name: str
    modality: str                # what embeds it: G, S (images), T (sentences), C (points)
    labels: torch.Tensor         # (N,) landmark ids; -1 marks a distractor
    ids: list[str]               # image ids; landmark ids for sentences and query points
    latlon: torch.Tensor | None  # (N, 2) float64 degrees, where known
    show: list                   # what a row is: a file path, a sentence, or None (a point)
    items: object                # images: [(split folder, kind, ids)]; sentences; (N, 2) points

class Protocol:
    """The protocol's sides on one dataset (PROTOCOL 3), each built when a task first asks for
    it. Galleries hold their distractors (label -1) first, then the query split's items."""

    def __init__(self, root: Path):
        self.root, self.query = root, read_split(root, "query")
        self.index = read_index(root, required=False)
        self.lm = torch.as_tensor(self.query.ids)                                  # (Q,)
        self.latlon = torch.as_tensor(self.query.latlon, dtype=torch.float64)      # (Q, 2)
        self.drawn = {}  # the sentence sides, by mode

    def side(self, name: str) -> Side:
        if name.startswith("query_text_"):
            return self.sentences(name[len("query_text_"):])
        return getattr(self, name)

    def images(self, name: str, kind: str, parts: list, labels, latlon=None) -> Side:
        """An image side of parts (split folder, kind, ids), in order."""
        ids = [i for _, _, part in parts for i in part]
        show = [shard(d, k, i) for d, k, part in parts for i in part]
        return Side(name, LETTER[kind], labels, ids, latlon, show, parts)

    @functools.cached_property
    def query_ground(self) -> Side:
        """Every query ground photo, labelled with its landmark: each is its own query."""
        q, per_landmark = self.query, torch.tensor([len(g) for g in self.query.ground])
        return self.images("query_ground", "ground", [(q.dir, "ground", sum(q.ground, []))],
                           self.lm.repeat_interleave(per_landmark),
                           self.latlon.repeat_interleave(per_landmark, dim=0))

    @functools.cached_property
    def query_satellite(self) -> Side:
        """The latest aerial image of each query landmark."""
        return self.images("query_satellite", "satellite",
                           [(self.query.dir, "satellite", self.query.latest)], self.lm,
                           self.latlon)

    def image_gallery(self, kind: str, distractors: list[str], own: Side) -> Side:
        """The index's images (label -1), then the query side's own, in its order."""
        labels = torch.cat([torch.full((len(distractors),), -1), own.labels])
        return self.images(f"gallery_{kind}", kind,
                           [(self.index.dir, kind, distractors), *own.items], labels)

    @functools.cached_property
    def gallery_ground(self) -> Side:
        """The index photos, then every query photo."""
        return self.image_gallery("ground", self.index.ground, self.query_ground)

    @functools.cached_property
    def gallery_satellite(self) -> Side:
        """The index tiles, then each query landmark's latest tile."""
        return self.image_gallery("satellite", self.index.sat, self.query_satellite)

    @functools.cached_property
    def gallery_gps(self) -> Side:
        """The index tiles' centres, then the query landmarks' coordinates: the protocol's,
        where every query's true location is among the answers."""
        points = torch.cat([torch.as_tensor(self.index.sat_latlon), self.latlon])
        labels = torch.cat([torch.full((len(self.index.sat),), -1), self.lm])
        ids = self.index.sat + [str(i) for i in self.query.ids.tolist()]
        return Side("gallery_gps", "C", labels, ids, points, [None] * len(ids), points)

    @functools.cached_property
    def open_gps(self) -> Side:
        """The index tiles' centres and the training landmarks, no query landmark: where a
        geolocaliser has to find a place it has not been given (`locate`'s default)."""
        points, names = open_gallery(self.root)
        return Side("open_gps", "C", torch.full((len(points),), -1), names, points, names,
                    points)

    def sentences(self, mode: str) -> Side:
        """One sentence per query landmark: first, random, or the no_cues sentence of
        mml_query_text_sentences.csv. The random ones are the authors' own draw
        (eval_dataset.py, _load_text_data): one random.Random(42) stream over the rows of
        mml_query_text.csv in file order, a section, a paragraph and a piece each, so they
        are part of the protocol and no option changes them."""
        q = self.query
        if mode not in self.drawn:
            if mode == "no_cues":
                texts = q.no_cues
            else:
                table, rng, texts = self.articles, random.Random(42), [""] * len(q.ids)
                for n in q.text_order:
                    texts[n] = table.texts[table.pick(n, mode, rng)]
            ids = [str(i) for i in q.ids.tolist()]
            self.drawn[mode] = Side(f"query_text_{mode}", "T", self.lm, ids, self.latlon, texts,
                                    texts)
        return self.drawn[mode]

    @functools.cached_property
    def articles(self) -> "Sentences":
        """Every sentence of the query articles, read once for the first and random modes."""
        articles, bad = read_articles(self.query)
        if bad:
            raise UserError(f"{bad[0]} (evaluation needs every file of the protocol)")
        return Sentences(articles, None, "random")

    def missing(self, task: Task) -> str:
        """Why the data cannot run a task ("" when it can)."""
        # the ground gallery needs the index photos; the aerial and GPS galleries its tiles
        kind = MODALITY[task.gallery if task.gallery in "GS" else "S"]
        if (self.index.ground if kind == "ground" else self.index.sat) is None:
            return f"{self.index.dir / f'mml_index_{kind}.csv'}: not found"
        if task.text == "no_cues" and self.query.no_cues is None:
            return f"{self.query.dir / 'mml_query_text_sentences.csv'}: not found"
        return ""

    @functools.cached_property
    def groups(self) -> dict | None:
        """{"category" | "state": {landmark id: its group}} from mmlandmarks.csv, or None."""
        path = self.root / "mmlandmarks.csv"
        if not path.is_file() or not {"category", "state"} <= set(csv_header(path)):
            return None
        table = read_table(path, ["landmark_id", "category", "state"])
        ids = unique_landmarks(path, table)
        return {g: dict(zip(ids, table[g])) for g in ("category", "state")}

def open_gallery(root: Path) -> tuple[torch.Tensor, list[str]]:
    """(N, 2) lat/lon and names: the index tiles' centres (no name), then the training
    landmarks (named by their Commons category). Never the query landmarks: they are the test."""
    index = read_index(root, required=False)  # the tiles' list alone is needed
    if index.sat is None:
        raise UserError(f"{index.dir / 'mml_index_satellite.csv'}: file not found (the open "
                        f"gallery holds the index tiles' centres)")
    path = check_root(root, "train") / "mml_train.csv"
    train = read_table(path, ["CommonsCategory", "lat", "lon"])
    latlon = np.concatenate([index.sat_latlon, parse_latlon(path, train)])   # (N, 2) float64
    return torch.as_tensor(latlon), [""] * len(index.sat) + train["CommonsCategory"]

class ImageList(torch.utils.data.Dataset):
    """An image side's parts -> ((3, H, H) uint8, "" or why the file could not be read)."""

    def __init__(self, parts: list, cfg: Config):
        self.rows = []  # (store, image id)
        for split_dir, kind, ids in parts:
            store = ImageStore(split_dir, kind, cfg.img_size, cache_dir(cfg, split_dir.parent),
                               ids, cfg.resize)
            self.rows += [(store, i) for i in ids]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, n):
        store, image_id = self.rows[n]
        try:
            return torch.from_numpy(store(image_id)).permute(2, 0, 1), ""
        except UnreadableFile as e:
            return torch.zeros(3, store.size, store.size, dtype=torch.uint8), str(e)

def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Process r holds rows [n*r/W, n*(r+1)/W) of an (n, D) result: give every process all n."""
    world = dist.get_world_size()
    sizes = [n * (r + 1) // world - n * r // world for r in range(world)]
    padded = x.new_zeros(max(sizes), x.shape[1])
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])

@torch.no_grad()
def embed(encoder, data, what: str, cfg: Config, device, inputs_on=None) -> torch.Tensor:
    """(N, D) float32 embeddings on `device`, in batches of --eval-batch: of an ImageList, a
    list of sentences or a tensor of inputs (tokens, points, features). Each batch is handed
    to `encoder` on `inputs_on` (default: device). Under torchrun each process embeds its
    share and all receive every row."""
    rank, world = rank_and_world()
    n, B = len(data), cfg.eval_batch
    lo, hi = n * rank // world, n * (rank + 1) // world
    if isinstance(data, torch.utils.data.Dataset):
        batches = torch.utils.data.DataLoader(
            torch.utils.data.Subset(data, range(lo, hi)), batch_size=B,
            num_workers=cfg.workers, pin_memory=device.type == "cuda")
    else:
        batches = ((data[s:min(s + B, hi)], ()) for s in range(lo, hi, B))
    parts, t0, t_print = [], time.time(), time.time()
    for x, errors in batches:
        bad = [e for e in errors if e]
        if bad:  # unlike training: a missing gallery image would change the benchmark
            raise UserError(f"{bad[0]} (evaluation needs every file of the protocol)")
        if torch.is_tensor(x):
            x = to_device({"x": x}, inputs_on or device)["x"]
        with autocast_for(device, cfg):
            parts.append(embedding_rows(encoder(x), len(x), what).to(device))
        done = sum(len(p) for p in parts) * world
        if time.time() - t_print > 10:
            rate = done / (time.time() - t0)
            eta = fmt_time((n - done) / rate)
            print0(f"  embedding {what}: {done}/{n}, {rate:.0f}/s, ETA {eta}")
            t_print = time.time()
    emb = torch.cat(parts) if parts else torch.zeros(0, cfg.embed_dim, device=device)
    return gather_rows(emb, n) if world > 1 else emb

def embedding_rows(out, n: int, what: str) -> torch.Tensor:
    """An encoder's output for n inputs as (n, D) float32: what any encoder must return."""
    out = out if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))
    if out.dim() != 2 or len(out) != n or not out.is_floating_point():
        raise UserError(f"{what}: the encoder returned {tuple(out.shape)} {out.dtype} for a "
                        f"batch of {n}; expected ({n}, D) floats")
    return out.float()

def checked(emb: torch.Tensor, side: Side, what: str) -> torch.Tensor:
    """A side's embeddings, held to the protocol: a row per item, finite, unit length (rows
    that are not are normalised, with a warning: cosine scores need unit vectors)."""
    if emb.dim() != 2 or len(emb) != len(side.ids):
        raise UserError(f"{what}: {tuple(emb.shape)} embeddings for the {len(side.ids)} rows of "
                        f"{side.name}; expected ({len(side.ids)}, D)")
    if not bool(torch.isfinite(emb).all()):
        bad = int(torch.nonzero(~torch.isfinite(emb).all(1))[0])
        raise UserError(f"{what}: row {bad} of {side.name} is not finite (NaN or inf)")
    norms = emb.norm(dim=1)
    if bool(((norms - 1).abs() > 1e-3).any()):
        print0(f"warning: {what}: {int(((norms - 1).abs() > 1e-3).sum())} rows of {side.name} "
               f"are not unit vectors; normalising them")
        emb = F.normalize(emb, dim=-1)
    return emb

def device_for(cfg: Config) -> torch.device:
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

class Functions:
    """Any encoders, as functions of a batch: {"G" or "S": (B, 3, H, H) uint8 images decoded
    by --resize to img_size, "T": a list of B strings, "C": (B, 2) float64 lat/lon} -> (B, D),
    a tensor or array. Batches are handed over on the CPU."""

    def __init__(self, fns: dict, cfg: Config):
        self.fns, self.cfg = fns, cfg

    def missing(self, task: Task) -> str:
        return encoders_lacking(task, "".join(m for m in "GSTC" if m in self.fns))

    def embed_side(self, side: Side, root: Path) -> torch.Tensor:
        data = ImageList(side.items, self.cfg) if side.modality in "GS" else side.items
        return embed(self.fns[side.modality], data, f"encoder {side.modality} on {side.name}",
                     self.cfg, device_for(self.cfg), torch.device("cpu"))

class Files:
    """Embeddings made elsewhere: FOLDER/{side}.npy, (N, D) rows in the order of the CSV that
    `eval --export` wrote for that side."""

    def __init__(self, folder: Path, cfg: Config):
        self.folder, self.cfg = folder, cfg

    def missing(self, task: Task) -> str:
        lacking = [s for s in task.sides if not (self.folder / f"{s}.npy").is_file()]
        return f"{self.folder / lacking[0]}.npy: not found" if lacking else ""

    def embed_side(self, side: Side, root: Path) -> torch.Tensor:
        path = self.folder / f"{side.name}.npy"
        if not path.is_file():
            raise UserError(f"{path}: not found (embed the rows of {side.name}.csv, which "
                            f"`eval --export` writes, in order)")
        try:
            array = np.load(path, allow_pickle=False)  # never a pickle
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable .npy file ({e})") from None
        if array.dtype.kind != "f":
            raise UserError(f"{path}: {array.dtype} values; expected floats")
        return torch.from_numpy(array.astype(np.float32)).to(device_for(self.cfg))

def score(protocol: Protocol, embedder, tasks: list[Task], cfg: Config, source: dict,
          config: dict | None = None) -> dict:
    """The protocol's tasks, embedded by `embedder` (each side once, shared between tasks):
    rank, summarise official and strict metrics (and for x2C the geolocalisation, against the
    protocol's gallery and the open one), break them down by category and state, write the
    task's CSV and, with --viz, its picture; finally merge metrics.json and print the tables.
    Returns {task: results}."""
    rank, _ = rank_and_world()
    device, out, embedded, results = device_for(cfg), Path(cfg.out) / "eval", {}, {}

    def side(name: str) -> tuple[Side, torch.Tensor]:
        if name not in embedded:
            s = protocol.side(name)
            embedded[name] = s, checked(embedder.embed_side(s, protocol.root), s, source_name(
                source))
        return embedded[name]
    for task in tasks:
        (q, q_emb), (g, g_emb) = side(task.sides[0]), side(task.sides[1])
        opened = side("open_gps") if task.geo else None
        # every process embeds its share above; process 0 ranks and reports
        if rank != 0:
            continue
        if q_emb.shape[1] != g_emb.shape[1]:
            raise UserError(f"{task.name}: {q.name} is {q_emb.shape[1]}-d, {g.name} "
                            f"{g_emb.shape[1]}-d; a task's two sides share one space")
        t0 = time.time()
        ranks = rank_queries(q_emb, g_emb, q.labels.to(device), g.labels.to(device),
                             chunk=cfg.chunk)
        res = summarise(ranks)
        res["protocol"], res["queries"] = items_digest(q, g), len(q.ids)
        res["gallery"], res["distractors"] = len(g.ids), int((g.labels == -1).sum())
        columns = per_query(ranks, q, g)
        # the guess is the top-1 point: from the ranking, and from the open one
        if task.geo:
            for block, (gallery, emb) in (("geo", (g, g_emb)), ("geo_open", opened)):
                top = ranks["top"][:, 0] if block == "geo" else nearest(q_emb, emb, cfg.chunk)
                pred = gallery.latlon[top.cpu()]
                km = haversine_km(pred, q.latlon)
                res[block] = geo_metrics(km)
                prefix = "" if block == "geo" else "open_"
                columns[f"{prefix}pred_lat"] = [f"{v:.6f}" for v in pred[:, 0].tolist()]
                columns[f"{prefix}pred_lon"] = [f"{v:.6f}" for v in pred[:, 1].tolist()]
                columns[f"{prefix}error_km"] = [f"{v:.3f}" for v in km.tolist()]
        # printed, not in metrics.json: it holds results alone
        seconds = time.time() - t0
        res |= breakdowns(protocol, task, q, columns)
        write_atomically(out / f"{task.name}.csv", lambda tmp: write_csv(
            tmp, list(columns), zip(*columns.values())))
        results[task.name] = res
        print(f"{task.name}: {len(q.ids)} queries x {len(g.ids)} gallery ({res['distractors']} "
              f"distractors) ranked in {seconds:.2f}s", flush=True)
        if cfg.viz:
            draw_task(task, protocol, q, g, q_emb, g_emb, ranks, columns,
                      out / f"{task.name}.png", cfg)
    if rank == 0 and results:
        write_metrics(out / "metrics.json", results, cfg, device, source, config)
        print_tables(results, cfg.by)
        if cfg.viz and "checkpoint" in source:
            draw_curves(Path(source["checkpoint"]).parent / "log.jsonl", out / "curves.png")
        print(f"\nper-query results{', pictures' if cfg.viz else ''} and metrics.json in {out}/")
    barrier()
    return results

def source_name(source: dict) -> str:
    return next(str(source[k]) for k in ("checkpoint", "embeddings", "encoders") if k in source)

def per_query(ranks: dict, q: Side, g: Side) -> dict:
    """The task's CSV, column by column: per query its 1-based rank (strict and official), its
    AP (what `compare` resamples), its top 5 and which of them are its landmark."""
    hits = (g.labels[ranks["top"].cpu()] == q.labels[:, None]).int()               # (Q, 5)
    return {"query_id": q.ids, "landmark_id": q.labels.tolist(),
            "rank_strict": (ranks["first_strict"] + 1).tolist(),
            "rank_official": (ranks["first_official"] + 1).tolist(),
            "ap_strict": [f"{v:.6f}" for v in ranks["ap_strict"].tolist()],
            "ap_official": [f"{v:.6f}" for v in ranks["ap_official"].tolist()],
            "top5": [" ".join(g.ids[j] for j in row) for row in ranks["top"].tolist()],
            "top5_hits": [" ".join(map(str, row)) for row in hits.tolist()]}

def breakdowns(protocol: Protocol, task: Task, q: Side, columns: dict) -> dict:
    """Per landmark category and per state (mmlandmarks.csv): the number of queries and R@1
    (official) for retrieval, acc@25km and acc@750km for geolocalisation."""
    if protocol.groups is None:
        return {}
    values = {"R@1": [100.0 * (r == 1) for r in columns["rank_official"]]}
    if task.geo:
        km = [float(k) for k in columns["error_km"]]
        values = {f"acc@{t}km": [100.0 * (k <= t) for k in km] for t in (25, 750)}
    out = {}
    for by, group_of in protocol.groups.items():
        groups = {}
        for n, lm in enumerate(q.labels.tolist()):
            groups.setdefault(group_of.get(lm, "?"), []).append(n)
        out[f"by_{by}"] = {name: {"queries": len(rows), **{k: sum(v[r] for r in rows) / len(rows)
                                                          for k, v in values.items()}}
                           for name, rows in sorted(groups.items())}
    return out

def items_digest(q: Side, g: Side) -> str:
    """What a task was scored on: its queries and gallery, ids and labels (compare refuses
    runs whose digests differ)."""
    h = hashlib.sha256(json.dumps([q.ids, q.labels.tolist(), g.ids, g.labels.tolist()]).encode())
    return h.hexdigest()[:16]

def write_metrics(path: Path, results: dict, cfg: Config, device, source: dict, config):
    """metrics.json, merged by task: results of other tasks (other checkpoints) stay, each
    naming its source and data; the evaluation's own record at the top."""
    earlier = {}
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))["tasks"]
        except (ValueError, KeyError, TypeError):
            print(f"warning: {path}: not a metrics.json mml wrote; replacing it")
    merged = {**source, **provenance(cfg, device), "config": config,
              "tasks": earlier | {t: {**r, **source} for t, r in results.items()}}
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(merged, indent=1)))

def provenance(cfg: Config, device: torch.device) -> dict:
    """What metrics.json records of the evaluation itself: its options, the code (mml.py's
    sha256 and, in a git checkout, the commit), torch, the device and the date."""
    here, commit = Path(__file__).resolve(), None
    try:
        git = subprocess.run(["git", "-C", str(here.parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        commit = git.stdout.strip() if git.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"eval": {k: getattr(cfg, k) for k in EVAL_OPTIONS},
            "code": {"mml_sha256": hashlib.sha256(here.read_bytes()).hexdigest(), "git": commit},
            "torch": torch.__version__, "device": name,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

EVAL_OPTIONS = ("tasks", "query_text", "chunk", "eval_batch", "img_size", "resize", "seed",
                "viz_queries")

def evaluate(cfg: Config):
    """`eval`: the protocol on the data, embedded by the checkpoint (--ckpt) or read from
    files (--embeddings); or, with --export, the protocol's sides written for another model
    to embed. Tasks the data or the model cannot run are named and skipped."""
    device = setup_distributed(cfg)
    if is_master() and not cfg.export:  # before the hours of embedding, not after them
        writable_folder(Path(cfg.out) / "eval", "--out")
    # never generated here: a checkpoint names its data
    root = check_root(Path(cfg.data))
    protocol = Protocol(root)
    if cfg.export:
        return export_protocol(protocol, runnable(protocol, cfg), Path(cfg.export))
    if cfg.embeddings:
        embedder, config = Files(Path(cfg.embeddings), cfg), None
        source = {"data": str(root), "embeddings": str(Path(cfg.embeddings).resolve())}
    else:
        embedder = Checkpoint(cfg.ckpt, device, cfg.clip, cfg.eval_batch, cfg.workers,
                              cfg.cache)
        config = embedder.config
        source = {"data": str(root), "checkpoint": str(cfg.ckpt), "step": embedder.step,
                  "epoch": embedder.epoch}
    print0(f"evaluating {source_name(source)} on {root}")
    score(protocol, embedder, runnable(protocol, cfg, embedder), cfg, source, config)

def encoders_lacking(task: Task, modalities: str) -> str:
    """Why encoders of these modalities cannot run a task ("" when they can)."""
    absent = [m for m in task.query + task.gallery if m not in modalities]
    return f"no {MODALITY[absent[0]]} encoder (the model has {modalities})" if absent else ""

def runnable(protocol: Protocol, cfg: Config, embedder=None) -> list[Task]:
    """The tasks asked for that the data and the embedder can run: one asked for by name and
    impossible is an error, one of all the tasks a note."""
    tasks = []
    for task in task_list(cfg.tasks, cfg.query_text):
        why = protocol.missing(task) or (embedder.missing(task) if embedder else "")
        if why and cfg.tasks:
            raise UserError(f"task {task.name}: {why}")
        if why:
            print0(f"skipping {task.name}: {why}")
        else:
            tasks.append(task)
    return tasks

def export_protocol(protocol: Protocol, tasks: list[Task], folder: Path):
    """`eval --export DIR`: every side of the tasks as DIR/{side}.csv (row, id, item: a file
    path or a sentence, landmark: its id or -1 for a distractor, lat, lon where known), and
    DIR/tasks.json naming each task's sides. Embed each CSV's rows, in order, into
    DIR/{side}.npy of shape (rows, D), then score them with `eval --embeddings DIR`."""
    writable_folder(folder, "--export")
    names = list(dict.fromkeys(name for t in tasks for name in t.sides))
    for name in names:
        s = protocol.side(name)
        latlon = s.latlon.tolist() if s.latlon is not None else [("", "")] * len(s.ids)
        rows = [(n, i, "" if shown is None else shown, label, lat, lon) for n, (
            i, shown, label, (lat, lon)) in enumerate(zip(s.ids, s.show, s.labels.tolist(),
                                                           latlon))]
        write_atomically(folder / f"{name}.csv", lambda tmp: write_csv(
            tmp, ["row", "id", "item", "landmark", "lat", "lon"], rows))
    sides = {t.name: dict(zip(("queries", "gallery", "open_gallery"), t.sides)) for t in tasks}
    write_atomically(folder / "tasks.json", lambda tmp: tmp.write_text(json.dumps(sides, indent=1)))
    print(f"{len(names)} sides of {len(tasks)} tasks in {folder}/: embed each {{side}}.csv into "
          f"{{side}}.npy, then `python mml.py eval --embeddings {folder} --data {protocol.root}`")

@torch.no_grad()
def nearest(q: torch.Tensor, g: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """(Q,) each query's best gallery item by cosine score, in float32 and in chunks."""
    with matmul_precision("highest"):
        return torch.cat([(part @ g.float().T).argmax(1) for part in q.float().split(chunk)])

def print_tables(results: dict, by: str = ""):
    """The results laid out like the authors' tables (PROTOCOL 5), then the
    geolocalisation against the protocol's GPS gallery and against the open one, and with
    --by, the breakdown by category or state."""
    cols = ("mAP@1k", "R@1", "R@5", "R@10")
    print(f"\n{'task':<16}{'medR':>8} | official (distractors as junk)      | strict "
          f"(distractors ranked)")
    print(f"{'':<24} | " + "".join(f"{c:>8}" for c in cols) + "   | "
          + "".join(f"{c:>8}" for c in cols))
    for task, r in results.items():
        print(f"{task:<16}{r['official']['medR']:>8.1f} | "
              + "".join(f"{r['official'][c]:>8.2f}" for c in cols) + "   | "
              + "".join(f"{r['strict'][c]:>8.2f}" for c in cols))
    keys = ("acc@1km", "acc@25km", "acc@200km", "acc@750km", "acc@2500km", "median_km")
    for block, title in (("geo", "geolocalisation, the protocol's gallery (the true point is in "
                                 "it)"),
                         ("geo_open", "open world: index tiles and training landmarks only")):
        geo = {t: r[block] for t, r in results.items() if block in r}
        if geo:
            print(f"\n{title}\n{'':<16}" + "".join(f"{k.split('@')[-1]:>11}" for k in keys)
                  + "   (% of queries within; median error)")
            for task, g in geo.items():
                print(f"{task:<16}" + "".join(f"{g[k]:>11.1f}" for k in keys))
    if by:
        print(f"\nby {by} (queries; R@1, or acc@25km and acc@750km for geolocalisation)")
        for task, r in results.items():
            for group, v in r.get(f"by_{by}", {}).items():
                print(f"{task:<16}{group[:28]:<30}{v['queries']:>7}" + "".join(
                    f"{x:>9.1f}" for k, x in v.items() if k != "queries"))

# ---- using a model: checkpoints, the Python API, locate -----------------------------------
# A checkpoint is checked before use and never unpickled; `load` makes it an embedder (what
# `eval` and `Locator` use, and what a researcher's script calls); `evaluate_encoders` scores
# any functions on the protocol; `locate` answers where a photo or a sentence is.

# What a checkpoint must hold, and of which type; --resume needs the training state too.
CHECKPOINT_PARTS = {"model": dict, "config": dict, "tokenizer": str, "step": int, "epoch": int}
RESUME_PARTS = {"optimizer": dict, "torch_rng": torch.Tensor, "best": (int, float)}

def load_tensors(path: Path, what: str, expect: type = dict):
    """torch.load that never runs code: weights_only=True unpickles tensors, numbers, strings,
    lists and dicts only. A file that needs more could execute anything while loading (a
    checkpoint is a pickle), so it is refused, never unpickled."""
    if not path.is_file():
        raise UserError(f"{path}: no {what} there")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: not an mml {what}: it needs more than tensors and plain data "
                        f"to load, and may contain code, so it is not unpickled") from None
    except Exception as e:  # truncated, not a torch file at all
        why = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__}: {why})") from None
    if not isinstance(obj, expect):
        raise UserError(f"{path}: not a {what} (holds a {type(obj).__name__}, not a "
                        f"{expect.__name__})")
    return obj

def load_checkpoint(path: Path, resume: bool = False) -> dict:
    """A checkpoint, its parts checked before anything uses them: one line naming the part."""
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there (train one with `python mml.py train`, "
                        f"or name one with --ckpt)")
    ckpt = load_tensors(path, "checkpoint")
    for part, kind in CHECKPOINT_PARTS.items() | (RESUME_PARTS.items() if resume else set()):
        value = ckpt.get(part)
        if not isinstance(value, kind) or isinstance(value, bool):
            found = "missing" if part not in ckpt else f"a {type(value).__name__}"
            raise UserError(f"{path}: not an mml checkpoint{' to resume' * resume} ({part} is "
                            f"{found})")
    bad = next((k for k, v in ckpt["model"].items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise UserError(f"{path}: not an mml checkpoint (model entry {bad!r} is not a tensor)")
    try:
        Tokenizer.from_str(ckpt["tokenizer"])
    except Exception as e:  # the tokenizers library raises its own exception types
        raise UserError(f"{path}: not an mml checkpoint (its tokenizer does not load: "
                        f"{str(e)[:80]})") from None
    return ckpt

def load_matching(module: nn.Module, state: dict, what: str, ignore: tuple = ()):
    """load_state_dict, but a mismatch names the first key that is missing, unexpected or of
    another shape, with both shapes, in one line. Keys under the `ignore` prefixes (frozen
    towers, loaded from their folder) are not expected in `state`."""
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore)}
    for key in list(own) + [k for k in state if k not in own]:
        mine, theirs = own.get(key), state.get(key)
        if mine is None or theirs is None or tuple(mine.shape) != tuple(theirs.shape):
            shapes = ["absent" if t is None else tuple(getattr(t, "shape", ()))
                      for t in (theirs, mine)]
            raise UserError(f"{what}: does not fit this model: {key} is {shapes[0]} in the "
                            f"file and {shapes[1]} in the model")
    module.load_state_dict(state, strict=not ignore)

def trained_state(model: MML) -> dict:
    """What a checkpoint keeps of the model: everything but its frozen CLIP towers."""
    towers = model.towers()
    return {k: v for k, v in model.state_dict().items() if not k.startswith(towers)}

def restore(path: Path, ckpt: dict, cfg: Config) -> MML:
    """A checkpoint's model, on the CPU: its weights, and its frozen CLIP towers from their
    folder (the checkpoint's, or --clip), refused unless they hold the very weights it was
    trained with."""
    model = MML(cfg)
    towers = model.towers()
    if towers:
        state, digest = load_clip_weights(cfg.clip)
        record = ckpt.get("towers")
        want = record.get("digest") if isinstance(record, dict) else None
        if digest != want:
            raise UserError(f"{cfg.clip}: its weights (digest {digest[:12]}) are not the CLIP "
                            f"towers {path} was trained with ({str(want)[:12]}); name their "
                            f"folder with --clip")
        install_towers(model, state, cfg.clip)
        model.tower_digest = digest  # what evaluation's tower cache is keyed by
    load_matching(model, ckpt["model"], str(path), ignore=towers)
    return model

class Checkpoint:
    """An mml checkpoint ready to embed, the Python API: `model = mml.load(CKPT)`, then

        model.embed_images(["photo.jpg"], kind="ground")  # paths or (H, W, 3) uint8 arrays
        model.embed_text(["a red church in Denver"])
        model.embed_gps([[40.7, -74.0]])                   # lat, lon in degrees

    each an (N, D) float32 tensor of unit vectors, made with the checkpoint's own
    preprocessing and tokenizer, in batches on the best device. `eval` embeds the protocol's
    sides with it, and `Locator` answers with it."""

    def __init__(self, ckpt, device=None, clip: str = "", batch: int = 256, workers: int = 0,
                 cache: str = ""):
        self.path = Path(ckpt)
        saved = load_checkpoint(self.path)
        self.cfg = dataclasses.replace(checkpoint_config(self.path, saved), eval_batch=batch,
                                       workers=workers, cache=cache)
        self.cfg.clip = clip or self.cfg.clip
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = restore(self.path, saved, self.cfg).to(self.device).eval()
        self.tok = Tokenizer.from_str(saved["tokenizer"])
        self.step, self.epoch, self.config = saved["step"], saved["epoch"], saved["config"]
        self.modalities = self.cfg.modalities

    def missing(self, task: Task) -> str:
        return encoders_lacking(task, self.modalities)

    def encoder(self, m: str) -> Encoder:
        if m not in self.model.enc:
            raise UserError(f"{self.path}: has no {MODALITY[m]} encoder (trained on "
                            f"{self.cfg.modalities})")
        return self.model.enc[m]

    def embed_images(self, images, kind: str = "ground") -> torch.Tensor:
        """(N, D): images as paths, or decoded (H, W, 3) uint8 arrays of any size."""
        m, size, how = LETTER[kind], self.cfg.img_size, self.cfg.resize
        pixels = [load_image(Path(x), size, how) if isinstance(x, (str, Path)) else
                  to_square(Image.fromarray(np.asarray(x, dtype=np.uint8)), size, how)
                  for x in images]
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)               # (N, 3, H, H)
        return embed(self.encoder(m), x, f"{kind} images", self.cfg, self.device)

    def embed_text(self, sentences: list[str]) -> torch.Tensor:
        tokens = tokenize(self.tok, [str(s) for s in sentences])                  # (N, L)
        return embed(self.encoder("T"), tokens, "sentences", self.cfg, self.device)

    def embed_gps(self, latlon) -> torch.Tensor:
        points = torch.as_tensor(np.asarray(latlon, dtype=np.float64)).view(-1, 2)
        return embed(self.encoder("C"), points, "points", self.cfg, self.device)

    def embed_side(self, side: Side, root: Path) -> torch.Tensor:
        """A side of the protocol: images through the DataLoader's workers (and a frozen CLIP
        tower through its cache), sentences through the checkpoint's tokenizer."""
        enc, cfg = self.encoder(side.modality), self.cfg
        if side.modality == "T":
            return embed(enc, tokenize(self.tok, side.items), side.name, cfg, self.device)
        if side.modality == "C":
            return embed(enc, side.items, side.name, cfg, self.device)
        # each image once per tower
        if f"enc.{side.modality}.trunk." in self.model.towers():
            features = torch.cat([self.tower_features(enc, part, root) for part in side.items])
            return embed(enc.project, features, side.name, cfg, self.device)
        return embed(enc, ImageList(side.items, cfg), side.name, cfg, self.device)

    def tower_features(self, enc: Encoder, part: tuple, root: Path) -> torch.Tensor:
        """(n, E) outputs of a frozen CLIP tower for one split's images, from the tower cache
        when it holds them. The key covers the towers' weights, the preprocessing, the
        precision and the image list: a second checkpoint on the same towers runs only its
        heads, and a cache made by anything else is never used."""
        split_dir, kind, ids = part
        precision = "bf16" if bf16_on(self.device, self.cfg) else "fp32"
        key = hashlib.sha256(json.dumps([self.model.tower_digest, self.cfg.img_size,
                                         self.cfg.resize, precision, kind, ids]).encode())
        key, name = key.hexdigest(), f"{split_dir.name}_{kind}"
        path = cache_dir(self.cfg, root) / "towers" / f"{name}-{key[:16]}.pt"
        features = read_cache(path, key, (len(ids), enc.width))
        if features is None:
            features = embed(enc.features, ImageList([part], self.cfg), f"{name} (CLIP tower)",
                             self.cfg, self.device)
            if is_master():
                write_cache(path, key, features)
        return features.to(self.device)

def load(ckpt, device=None, clip: str = "", batch: int = 256) -> Checkpoint:
    """An mml checkpoint (trained, or made by `convert`) ready to embed: see Checkpoint."""
    return Checkpoint(ckpt, device, clip, batch)

def evaluate_encoders(encoders: dict, data, out="runs/encoders", tasks: str = "",
                      img_size: int = 224, resize: str = "crop", batch: int = 256,
                      device: str = "", workers: int = 0, viz: bool = False,
                      name: str = "encoders") -> dict:
    """Any model on the benchmark, from Python: encoders maps some of "G", "S", "T", "C" to
    functions of a batch (see Functions); the tasks they cannot run are named and skipped.
    Writes what `eval` writes into OUT/eval/ and returns {task: results}."""
    # bf16 off: the functions run in whatever precision they choose themselves
    cfg = dataclasses.replace(Config(), data=str(data), out=str(out), tasks=tasks,
                              img_size=img_size, resize=resize, eval_batch=batch,
                              device=device, workers=workers, viz=viz, bf16=False)
    check_config(cfg)
    unknown = set(encoders) - set("GSTC")
    if unknown:
        raise UserError(f"evaluate_encoders: modalities {sorted(unknown)}; expected some of "
                        f"G, S, T, C")
    writable_folder(Path(cfg.out) / "eval", "out")
    protocol = Protocol(check_root(Path(cfg.data)))
    embedder = Functions(encoders, cfg)
    return score(protocol, embedder, runnable(protocol, cfg, embedder), cfg,
                 {"data": str(protocol.root), "encoders": name})

class Locator:
    """Where is this? The top locations of photos, aerial images or sentences in a GPS
    gallery, by a trained model; `python mml.py locate` in Python:

        from mml import Locator
        where = Locator("runs/mml/best.pt")   # gallery: index tiles and training landmarks
        where(["photo.jpg"], top=3)           # or kind="satellite", or kind="text" (sentences)
        # -> [{"input": "photo.jpg", "top": [{"lat", "lon", "score", "prob", "name"}, ...]}]

    prob is the softmax over the whole gallery at the model's learnt logit scale. The
    gallery (the default, or a lat,lon[,name] CSV such as GeoCLIP's) is embedded once and
    cached beside the checkpoint, in a file named after the gallery's content and keyed by
    the GPS encoder's weights: reused while both are unchanged, rebuilt when either changes."""

    def __init__(self, ckpt: str | Path, gallery: str | Path | None = None, device=None,
                 batch: int = 256, clip: str = ""):
        self.model = load(ckpt, device, clip, batch)
        path, cfg = self.model.path, self.model.cfg
        if "C" not in cfg.modalities:
            raise UserError(f"{path}: trained without the GPS encoder (C): nothing to locate with")
        if gallery:
            self.latlon, self.names = read_gallery(Path(gallery))
        elif not cfg.data:
            raise UserError(f"{path}: names no dataset (a converted model): give --gallery, a "
                            f"lat,lon CSV of places")
        else:
            self.latlon, self.names = open_gallery(check_root(Path(cfg.data)))
        digest = hashlib.sha256(self.latlon.numpy().tobytes() + "\n".join(self.names).encode())
        cache = path.with_name(f"{path.stem}.gallery-{digest.hexdigest()[:16]}.pt")
        # the gallery's embeddings depend on the GPS encoder alone: its weights are the key
        key = tensor_digest(self.model.encoder("C").state_dict())
        self.emb = read_cache(cache, key, (len(self.names), cfg.embed_dim))
        if self.emb is not None:
            note(f"gallery: {len(self.names)} points, embeddings from {cache}")
        else:
            t = time.time()
            self.emb = self.model.embed_gps(self.latlon)                              # (N, D)
            note(f"gallery: {len(self.names)} points embedded in {time.time() - t:.1f}s")
            write_cache(cache, key, self.emb)  # a read-only folder: no cache, no harm
        self.emb = self.emb.to(self.model.device)

    @torch.no_grad()
    def __call__(self, inputs: list[str], kind: str = "ground", top: int = 5) -> list[dict]:
        """One answer per input, in order: {"input", "top": [...]}, or {"input", "error"}.
        Inputs are read, embedded and scored LOCATE_CHUNK at a time: memory stays bounded by
        that many rows of scores against the gallery, however many inputs come."""
        m, cfg = LETTER[kind], self.model.cfg
        encoder = self.model.encoder(m)  # an error now, not after reading the inputs
        results = [{"input": str(x)} for x in inputs]
        for start in range(0, len(inputs), LOCATE_CHUNK):
            rows = list(range(start, min(start + LOCATE_CHUNK, len(inputs))))
            if kind == "text":
                q = self.model.embed_text([inputs[n] for n in rows])
            else:
                pixels = []
                for n in list(rows):
                    try:
                        pixels.append(load_image(Path(inputs[n]), cfg.img_size, cfg.resize))
                    except Exception as e:
                        # missing, not an image: this input's error alone
                        results[n]["error"] = f"{inputs[n]}: cannot read it as an image ({e})"
                        rows.remove(n)
                if not rows:
                    continue
                x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)       # (n, 3, H, H)
                q = embed(encoder, x, f"{kind} images", cfg, self.model.device)
            self.answer(q, top, [results[n] for n in rows])
        return results

    def answer(self, q: torch.Tensor, top: int, results: list[dict]):
        """Fill results with the top places of embedded inputs q (n, D)."""
        scores = q @ self.emb.T                                                     # (n, N)
        probs = torch.softmax(self.model.model.logit_scale.exp() * scores, dim=1)
        best = scores.topk(min(top, len(self.names)), dim=1).indices
        for n, (result, picks) in enumerate(zip(results, best.tolist())):
            result["top"] = [{"lat": round(float(self.latlon[j, 0]), 6),
                              "lon": round(float(self.latlon[j, 1]), 6),
                              "score": float(scores[n, j]), "prob": float(probs[n, j]),
                              "name": self.names[j]} for j in picks]

LOCATE_CHUNK = 64  # inputs at a time: 64 x 4 bytes x gallery of scores (77 MB at 300k)

def tensor_digest(state: dict) -> str:
    """sha256 of a state dict's names and bytes: what a cache of its outputs is keyed by."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()

def read_cache(path: Path, key: str, shape: tuple) -> torch.Tensor | None:
    """A cache mml wrote with write_cache, or None when it is absent, unreadable, made for
    another key or of another shape: then the caller rebuilds it, never uses it."""
    if not path.is_file():
        return None
    try:
        cached = load_tensors(path, "cache")
    except UserError:
        note(f"{path}: not a readable cache; rebuilding it")
        return None
    tensor = cached.get("tensor")
    if cached.get("key") != key or not torch.is_tensor(tensor) or tuple(tensor.shape) != shape:
        return None
    return tensor

def write_cache(path: Path, key: str, tensor: torch.Tensor):
    try:
        writable_folder(path.parent, "cache")
        save_checkpoint({"key": key, "tensor": tensor.cpu()}, path)
    except UserError as e:
        # a read-only or full disk: the answer comes anyway, uncached
        note(f"not cached: {e}")

def note(*args):
    """Progress and notes of `locate`: standard error, so that its standard output holds the
    answers alone (with --json, JSON that pipes into other tools)."""
    print(*args, file=sys.stderr, flush=True)

def read_gallery(path: Path) -> tuple[torch.Tensor, list[str]]:
    """A GPS gallery CSV: lat,lon and an optional name column (any case: GeoCLIP's has
    LAT,LON)."""
    if not path.is_file():
        raise UserError(f"{path}: gallery not found (expected a CSV with columns lat,lon[,name])")
    named = "name" in csv_header(path)
    table = read_table(path, ["lat", "lon"] + ["name"] * named, lower=True)
    if not table["lat"]:
        raise UserError(f"{path}: no places listed (expected rows of lat,lon[,name])")
    latlon = torch.as_tensor(parse_latlon(path, table))                       # (N, 2) float64
    return latlon, table.get("name", [""] * len(latlon))

def locate(cfg: Config):
    """`python mml.py locate`: answers on standard output, one block or one JSON list."""
    if not cfg.inputs and not cfg.text:
        raise UserError("locate: give image paths, or sentences with --text")
    where = Locator(cfg.ckpt, cfg.gallery or None, cfg.device or None, cfg.eval_batch, cfg.clip)
    results = where(list(cfg.inputs), "satellite" if cfg.satellite else "ground", cfg.top)
    results += where(list(cfg.text), "text", cfg.top)
    if cfg.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(r["input"] if "top" in r else f"{r['input']}\n  error: {r['error']}")
            for n, p in enumerate(r.get("top", []), 1):
                print(f"  {n}. {p['lat']:10.5f} {p['lon']:11.5f}  score {p['score']:.3f}  "
                      f"p {p['prob']:.3f}  {p['name']}")
    if any("error" in r for r in results):
        sys.exit(1)

# ---- outside models: CLIP, torchvision's weights, the authors', GeoCLIP -------------------
# Models made elsewhere, for the model section's backbones: CLIP's vision and text towers, in
# plain torch from the model section's transformer Block, sized by a Hugging Face folder the
# user fetched once (mml never downloads it), filled from its weights and tokenising with its
# tokenizer.json; torchvision's ImageNet weights. `convert` turns the field's models into mml
# checkpoints.

def clip_layers(c: dict) -> nn.Module:
    """A CLIP tower's stack of layers, at Hugging Face's key `encoder.layers.{i}`."""
    encoder = nn.Module()
    encoder.layers = nn.ModuleList(Block(c["hidden_size"], c["num_attention_heads"],
                                         c["intermediate_size"], c["hidden_act"],
                                         c["layer_norm_eps"])
                                   for _ in range(c["num_hidden_layers"]))
    return encoder

class CLIPVision(nn.Module):
    """CLIP's vision tower (Radford et al. 2021): (B, 3, H, H) normalised pixels -> (B, E),
    its projected image embedding. The image is cut into patches, each a token; a learnt class
    token goes first, and its state after the layers, normed and projected, is the image's
    (Hugging Face's `pooler_output`, then `visual_projection`)."""

    def __init__(self, c: dict, projection: int):
        super().__init__()
        W, patch, eps = c["hidden_size"], c["patch_size"], c["layer_norm_eps"]
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.randn(W) * 0.02)
        self.embeddings.patch_embedding = nn.Conv2d(3, W, patch, stride=patch, bias=False)
        self.embeddings.position_embedding = nn.Embedding((c["image_size"] // patch) ** 2 + 1, W)
        self.pre_layrnorm = nn.LayerNorm(W, eps=eps)  # sic: Hugging Face's spelling
        self.encoder = clip_layers(c)
        self.post_layernorm = nn.LayerNorm(W, eps=eps)
        self.projection = nn.Linear(W, projection, bias=False)

    def forward(self, x):
        e = self.embeddings
        x = e.patch_embedding(x).flatten(2).transpose(1, 2)                # (B, patches, W)
        first = e.class_embedding.to(x.dtype).expand(len(x), 1, -1)        # (B, 1, W)
        x = self.pre_layrnorm(torch.cat([first, x], 1) + e.position_embedding.weight)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.projection(self.post_layernorm(x[:, 0]))              # (B, E)

class CLIPText(nn.Module):
    """CLIP's text tower: (B, L) CLIP token ids -> (B, E). Causal layers; the sentence's
    embedding is the state at its first end-of-text token, normed and projected. The padding
    comes after that token, so under the causal mask it is never attended to."""

    def __init__(self, c: dict, projection: int):
        super().__init__()
        W = c["hidden_size"]
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(c["vocab_size"], W)
        self.embeddings.position_embedding = nn.Embedding(c["max_position_embeddings"], W)
        self.encoder = clip_layers(c)
        self.final_layer_norm = nn.LayerNorm(W, eps=c["layer_norm_eps"])
        self.projection = nn.Linear(W, projection, bias=False)
        # Hugging Face's rule: an end-of-text id of 2 (old configs) means "the largest id",
        # which in CLIP's vocabulary is the end-of-text token
        self.end = c["eos_token_id"]

    def forward(self, ids):
        e = self.embeddings
        x = e.token_embedding(ids) + e.position_embedding.weight[: ids.shape[1]]  # (B, L, W)
        for layer in self.encoder.layers:
            x = layer(x, causal=True)
        end = ids.argmax(1) if self.end == 2 else (ids == self.end).int().argmax(1)   # (B,)
        x = self.final_layer_norm(x[torch.arange(len(x), device=x.device), end])
        return self.projection(x)                                          # (B, E)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

def backbone_weights(name: str):
    """torchvision's ImageNet weights of a backbone: their URL, image size, pixel statistics."""
    return torchvision.models.get_model_weights(name).DEFAULT

def load_pretrained(trunk: nn.Module, name: str):
    """Start a torchvision backbone from ImageNet, through torchvision's weights API: taken
    from its cache (TORCH_HOME/hub/checkpoints) when there, downloaded into it otherwise;
    read with weights_only=True like every file mml loads. The classifier's keys are dropped."""
    weights = backbone_weights(name)
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        state = weights.get_state_dict(progress=is_master(), check_hash=True, weights_only=True)
    except Exception as e:
        # no network, a truncated download, a file of another format
        why = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"--pretrained: {name}'s ImageNet weights are not usable at {path} and "
                        f"not downloadable from {weights.url} ({type(e).__name__}: {why}); put "
                        f"that file there") from None
    own = trunk.state_dict()
    load_matching(trunk, {k: v for k, v in state.items() if k in own}, f"--pretrained {path}")

# Hugging Face's defaults (CLIPVisionConfig, CLIPTextConfig): a saved config.json leaves out
# the values that equal them
CLIP_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
             "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407}

def clip_config(folder: str) -> dict:
    """A CLIP folder's config.json as {"vision": sizes, "text": sizes, "projection_dim": E},
    checked to be the architecture the model section implements."""
    if not folder:
        raise UserError("--clip: name the Hugging Face CLIP folder (such as "
                        "clip-vit-large-patch14-336) that the clip backbones read")
    path = Path(folder) / "config.json"
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable CLIP config ({type(e).__name__}: {e})") from None
    if not isinstance(c, dict) or c.get("model_type") != "clip":
        raise UserError(f"{path}: model_type {c.get('model_type') if isinstance(c, dict) else c!r}"
                        f"; supported: Hugging Face CLIPModel folders (model_type \"clip\")")
    # old configs keep their sizes in *_config_dict, which override *_config (as in transformers)
    vision = {**CLIP_VISION, **c.get("vision_config", {}), **c.get("vision_config_dict", {})}
    text = {**CLIP_TEXT, **c.get("text_config", {}), **c.get("text_config_dict", {})}
    projection = c.get("projection_dim", 512)
    for part, sizes in (("vision", vision), ("text", text)):
        bad = [k for k in CLIP_TEXT | CLIP_VISION if k in sizes and k not in (
            "hidden_act", "layer_norm_eps") and not (isinstance(sizes[k], int) and sizes[k] > 0)]
        if bad or sizes["hidden_act"] not in ("quick_gelu", "gelu") or not isinstance(
                projection, int) or sizes["hidden_size"] % sizes["num_attention_heads"]:
            raise UserError(f"{path}: {part} config {bad[0] if bad else 'hidden_act'} "
                            f"{sizes[bad[0]] if bad else sizes['hidden_act']!r} is not one this "
                            f"CLIP implements (positive sizes, heads dividing the width, "
                            f"quick_gelu or gelu)")
    if vision["image_size"] % vision["patch_size"]:
        raise UserError(f"{path}: image_size {vision['image_size']} is not a multiple of "
                        f"patch_size {vision['patch_size']}")
    return {"vision": vision, "text": text, "projection_dim": projection}

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}

def read_safetensors(path: Path) -> dict:
    """A .safetensors file without the safetensors package: 8 bytes of header length, a JSON
    header of each tensor's dtype, shape and byte range, then the bytes. The file is mapped
    copy-on-write, and each tensor is a view of the map: nothing is copied until loaded."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        tensors = {}
        for name, t in header.items():
            if name != "__metadata__":
                dtype, (begin, end) = SAFETENSORS_DTYPES[t["dtype"]], t["data_offsets"]
                count = (end - begin) // dtype.itemsize
                flat = (torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + begin)
                        if count else torch.empty(0, dtype=dtype))
                tensors[name] = flat.reshape(t["shape"])
        return tensors
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{e})") from None

def load_clip_weights(folder: str) -> tuple[dict, str]:
    """The folder's weights as Hugging Face's state dict (model.safetensors, else
    pytorch_model.bin read with weights_only=True), and their digest: what a checkpoint
    records of its frozen towers, and what the tower cache is keyed by."""
    d = Path(folder)
    if (d / "model.safetensors").is_file():
        state = read_safetensors(d / "model.safetensors")
    elif (d / "pytorch_model.bin").is_file():
        state = load_tensors(d / "pytorch_model.bin", "CLIP state dict")
    else:
        raise UserError(f"{d}: no model.safetensors or pytorch_model.bin (the weights of the "
                        f"Hugging Face CLIP folder; README, Real data, says how to fetch them)")
    # older transformers also saved the towers' position index buffers: not weights
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    return state, tensor_digest(state)

def install_towers(model: nn.Module, state: dict, what: str):
    """Fill a model's CLIP towers from Hugging Face's keys: vision_model.* and
    visual_projection for the vision tower, text_model.* and text_projection for the text's."""
    for enc in model.enc.values():
        names = {CLIPVision: ("vision_model.", "visual_projection.weight"),
                 CLIPText: ("text_model.", "text_projection.weight")}.get(
                     type(getattr(enc, "trunk", None)))  # the GPS encoder has no trunk
        if names:
            tower = {k[len(names[0]):]: v for k, v in state.items() if k.startswith(names[0])}
            if names[1] in state:
                tower["projection.weight"] = state[names[1]]
            load_matching(enc.trunk, tower, what)

def clip_tokenizer(folder: str, max_len: int) -> Tokenizer:
    """The folder's tokenizer.json: CLIP's byte-level BPE, each sentence between its start
    and end-of-text tokens, truncated to max_len and padded with end-of-text, as the authors'
    CLIPTokenizer(padding="max_length", truncation=True) does."""
    path = Path(folder) / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise UserError(f"{path}: not a readable tokenizer ({str(e)[:80]}); a Hugging Face "
                        f"CLIP folder holds one") from None
    end = tok.token_to_id("<|endoftext|>")
    if end is None:
        raise UserError(f"{path}: no <|endoftext|> token: not CLIP's tokenizer")
    tok.enable_padding(pad_id=end, pad_token="<|endoftext|>", length=max_len)
    tok.enable_truncation(max_len)
    return tok

def convert(cfg: Config):
    """`convert SRC --out CKPT`: an outside model as an mml checkpoint, which `eval`, `locate`
    and `load` then use unchanged. SRC is a Hugging Face CLIP folder (off-the-shelf CLIP: its
    projected image and text embeddings, normalised; no GPS), the authors' weights_best.pth
    with --clip of clip-vit-large-patch14-336 (their released model, all four modalities),
    or GeoCLIP's weights folder with --clip of clip-vit-large-patch14 (images to GPS)."""
    src, out = Path(cfg.source), Path(cfg.out)
    kind = ("clip" if (src / "config.json").is_file() else "geoclip" if (
        src / "location_encoder_weights.pth").is_file() else "authors" if src.is_file() else "")
    if not kind:
        raise UserError(f"{src}: not a model `convert` knows: a Hugging Face CLIP folder holds "
                        f"config.json; GeoCLIP's weights folder holds location_encoder_weights"
                        f".pth, image_encoder_mlp_weights.pth, logit_scale_weights.pth (with "
                        f"--clip); the authors' release is one file, weights_best.pth (with "
                        f"--clip)")
    writable_folder(out.parent, "--out")
    if kind != "clip":
        clip_config(cfg.clip)  # without --clip, one line saying it is needed
    folder = str((src if kind == "clip" else Path(cfg.clip)).resolve())
    weights, digest = load_clip_weights(folder)  # read once: 1.7 GB for ViT-L/14-336
    converter = {"clip": convert_clip, "geoclip": convert_geoclip, "authors": convert_authors}
    new, state, tok = converter[kind](src, folder, weights, digest)
    model = MML(new)
    install_towers(model, weights, folder)
    load_matching(model, state, str(src), ignore=model.towers())
    save_checkpoint({"model": trained_state(model), "config": dataclasses.asdict(new),
                     "tokenizer": tok.to_str(), "step": 0, "epoch": 0,
                     "towers": {"folder": folder, "digest": digest},
                     "converted_from": str(src.resolve())}, out)
    print(f"{out}: {new.modalities} from {src}, towers from {folder} (digest {digest[:12]}); "
          f"evaluate it with `python mml.py eval --ckpt {out} --data ROOT`")

def convert_clip(src: Path, folder: str, weights: dict, digest: str) -> tuple:
    """Off-the-shelf CLIP: both towers frozen, no heads, CLIP's own logit scale."""
    c = clip_config(folder)
    new = dataclasses.replace(
        Config(), clip=folder, modalities="GST", image_backbone="clip", text_backbone="clip",
        share_image_trunk=True, freeze="GST", head="none", embed_dim=c["projection_dim"],
        img_size=c["vision"]["image_size"], resize="clip",
        max_len=c["text"]["max_position_embeddings"])
    if "logit_scale" not in weights:
        raise UserError(f"{src}: its weights hold no logit_scale: not a CLIPModel's")
    return new, {"logit_scale": weights["logit_scale"]}, clip_tokenizer(new.clip, new.max_len)

def convert_authors(src: Path, clip: str, weights: dict, digest: str) -> tuple:
    """The authors' MmlCLIP state dict (their weights_best.pth): its two copies of CLIP must
    be the --clip folder's weights; its heads, GPS encoder and scale are renamed to mml's."""
    c = clip_config(clip)
    theirs = {k: v for k, v in load_tensors(src, "state dict of the authors' MmlCLIP").items()
              if not k.endswith("position_ids")}
    for copy in ("image_encoder.clip_model.", "text_encoder.clip_model.", ):
        if tensor_digest({k[len(copy):]: v for k, v in theirs.items()
                          if k.startswith(copy)}) != digest:
            raise UserError(f"{src}: its {copy[:-1]} is not the CLIP of {clip}; give the "
                            f"folder they trained from (openai/clip-vit-large-patch14-336)")
    names = {"ground_projector.": "enc.G.head.", "satellite_projector.": "enc.S.head.",
             "text_projector.": "enc.T.head.", "location_encoder.": "enc.C.",
             "logit_scale": "logit_scale"}
    state = {}
    for k, v in theirs.items():
        if not k.startswith(("image_encoder.", "text_encoder.")):
            prefix = next((p for p in names if k.startswith(p)), None)
            if prefix is None:
                raise UserError(f"{src}: {k} is not a key of the authors' MmlCLIP")
            # their GPS heads are bare Linear layers, GeoCLIP's (and mml's) a Sequential of one
            state[re.sub(r"(LocEnc\d+\.head)\.", r"\1.0.", names[prefix] + k[len(prefix):])] = v
    new = dataclasses.replace(Config(), **PRESETS["paper"], clip=clip,
                              img_size=c["vision"]["image_size"],
                              max_len=c["text"]["max_position_embeddings"])
    return new, state, clip_tokenizer(clip, new.max_len)

def convert_geoclip(src: Path, clip: str, weights: dict, digest: str) -> tuple:
    """GeoCLIP (its wheel's geoclip/model/weights): CLIP ViT-L/14's projected image embedding
    through an MLP (768-768-512) for ground and aerial images alike, its location encoder
    (with the SF/180 scaling) and its logit scale."""
    c = clip_config(clip)
    mlp = load_tensors(src / "image_encoder_mlp_weights.pth", "GeoCLIP image MLP")
    location = load_tensors(src / "location_encoder_weights.pth", "GeoCLIP location encoder")
    scale = load_tensors(src / "logit_scale_weights.pth", "GeoCLIP logit scale", torch.Tensor)
    if not {"0.weight", "2.weight"} <= set(mlp):
        raise UserError(f"{src / 'image_encoder_mlp_weights.pth'}: expected GeoCLIP's keys "
                        f"0.weight, 0.bias, 2.weight, 2.bias")
    new = dataclasses.replace(
        Config(), clip=clip, modalities="GSC", image_backbone="clip",
        share_image_trunk=True, freeze="GS", head="mlp", head_hidden=mlp["0.weight"].shape[0],
        embed_dim=mlp["2.weight"].shape[0], gps_width=1024, gps_depth=3, img_size=c[
            "vision"]["image_size"], resize="clip")
    state = {f"enc.{m}.head.{k}": v for m in "GS" for k, v in mlp.items()}
    state |= {f"enc.C.{k}": v for k, v in location.items()} | {"logit_scale": scale.detach()}
    return new, state, Tokenizer(models.BPE())  # no text tower: an empty tokenizer

# ---- command line -------------------------------------------------------------------------

CHECKPOINT_FIELDS = ("modalities", "embed_dim", "image_backbone", "text_backbone", "img_width",
                "share_image_trunk", "freeze", "head", "head_hidden", "vocab_size", "max_len",
                "text_width", "text_layers", "gps_width", "gps_depth", "gps_scaling", "img_size",
                "resize", "preset")  # what eval and --resume take from the checkpoint

def parse_args(argv=None) -> tuple[str, Config, set]:
    """Command, Config and the names of the options given explicitly. Each command's options
    are the Config fields that name it; an unknown one is an error naming the closest."""
    p = argparse.ArgumentParser(prog="mml.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)  # abbreviations would hide typos too
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flags, not_given = {}, argparse.SUPPRESS  # an option not given is not set at all
    for command, about in COMMANDS.items():
        sub = commands.add_parser(command, help=about, description=about, allow_abbrev=False)
        flags[command] = []
        for f in (f for f in dataclasses.fields(Config) if command in f.metadata["cmds"]):
            flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
            if "default" not in help and f.default is not False and f.default not in ("", ()):
                help += f" (default: {f.default})"
            if f.name == "inputs":
                sub.add_argument("inputs", nargs="*", default=not_given, help=help, metavar="INPUT")
            elif f.name == "source":
                sub.add_argument("source", nargs="?", default=not_given, help=help, metavar="SRC")
            elif f.name == "runs":
                sub.add_argument("runs", nargs="+", help=help, metavar="RUN")
            elif f.type is bool:
                sub.add_argument(flag, action=argparse.BooleanOptionalAction, default=not_given,
                                 help=help)
            elif f.type is tuple:
                sub.add_argument(flag, action="append", default=not_given, help=help,
                                 metavar="TEXT")
            else:
                choices = f.metadata["choices"]  # argparse names them in --help and errors
                sub.add_argument(flag, type=f.type, default=not_given, help=help, choices=choices,
                                 metavar=None if choices else f.type.__name__.upper())
            flags[command].append(flag)
    args, unknown = p.parse_known_args(argv)
    for u in unknown:
        flag = u.split("=")[0]
        elsewhere = [c for c, names in flags.items() if flag in names]
        close = difflib.get_close_matches(flag, flags[args.command], n=1)
        if args.command in ("eval", "locate") and flag in flags["train"]:
            p.error(f"{args.command}: {flag} is the checkpoint's (a model and its training "
                    f"settings come from it)")
        p.error(f"{args.command}: unknown option {u}" + (
            f" (an option of {' and '.join(elsewhere)})" if elsewhere else
            f"; did you mean {close[0]}?" if close else ""))
    given = {k: v for k, v in vars(args).items() if k != "command"}
    return args.command, Config(**given), set(given)

def checkpoint_config(path: Path, ckpt: dict | None = None) -> Config:
    """The Config a checkpoint (at path, or loaded from there) was trained with, held to the
    same checks as the command line. Options added to mml.py since take their defaults; one
    this mml.py does not know is an error."""
    saved, defaults = (ckpt or load_checkpoint(path))["config"], dataclasses.asdict(Config())
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise UserError(f"{path}: its config does not fit this mml.py (unknown options: "
                        f"{', '.join(map(str, unknown))})")
    cfg = Config(**(defaults | saved))
    check_config(cfg, f"{path}: config field ")
    return cfg

def check_config(cfg: Config, where: str = ""):
    """Each field of its type, within its (low, high) and among its choices, and the settings
    that must agree: one line naming the option, or the checkpoint's field (where)."""
    for f in dataclasses.fields(Config):
        value, choices = getattr(cfg, f.name), f.metadata["choices"]
        low, high = f.metadata["range"]
        name = f"{where}{f.name}" if where else "--" + f.name.replace("_", "-")
        kinds = {float: (int, float), tuple: (tuple, list)}.get(f.type, f.type)
        if not isinstance(value, kinds) or isinstance(value, bool) != (f.type is bool):
            raise UserError(f"{name} {value!r}: expected a {f.type.__name__}")
        if f.type is float and not math.isfinite(value):
            raise UserError(f"{name} {value}: expected a finite number")
        if choices and value not in choices:
            raise UserError(f"{name} {value!r}: expected one of {', '.join(map(repr, choices))}")
        if (low is not None and value < low) or (high is not None and value > high):
            kind = "an integer" if f.type is int else "a number"
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise UserError(f"{name} {value}: expected {kind} {bounds}")
    option = (lambda f: f"{where}{f}") if where else (lambda f: "--" + f.replace("_", "-"))
    if cfg.img_width % 8:  # GroupNorm(8, ...) in the image CNN
        raise UserError(f"{option('img_width')} {cfg.img_width}: expected a multiple of 8")
    # one attention head per 64 channels
    if cfg.text_width > 64 and cfg.text_width % 64:
        raise UserError(f"{option('text_width')} {cfg.text_width}: expected a multiple of 64, "
                        f"or at most 64")
    mods = cfg.modalities.upper()
    if len(set(mods)) < 2 or set(mods) - set("GSTC") or len(set(mods)) != len(mods):
        raise UserError(f"{option('modalities')} {cfg.modalities}: expected two or more "
                        f"distinct letters of GSTC")
    if cfg.loss == "imagebind" and "G" not in mods:
        raise UserError(f"{option('loss')} imagebind: pairs ground with the others: needs G in "
                        f"--modalities")
    if cfg.share_image_trunk and not {"G", "S"} <= set(mods):
        raise UserError(f"{option('share_image_trunk')}: needs both G and S in --modalities "
                        f"(got {mods})")
    if set(cfg.phases.split(",")) - set(BENCH_PHASES):
        raise UserError(f"{option('phases')} {cfg.phases}: expected some of "
                        f"{','.join(BENCH_PHASES)}")
    if set(cfg.query_text.split(",")) - set(TEXT_MODES):
        raise UserError(f"{option('query_text')} {cfg.query_text}: expected some of "
                        f"{','.join(TEXT_MODES)}")

def adopt_saved(cfg: Config, given: set, path: Path, fields) -> tuple[Config, Config]:
    """cfg with `fields` taken from the checkpoint at path; one given otherwise is an error.
    Returns (cfg, the checkpoint's whole saved config)."""
    saved = checkpoint_config(path)
    for k in fields:
        if k in given and getattr(cfg, k) != getattr(saved, k):
            raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)}: {path} was trained with "
                            f"{getattr(saved, k)}; leave the option out to use the checkpoint's")
    return dataclasses.replace(cfg, **{k: getattr(saved, k) for k in fields}), saved

def resolve_model(cfg: Config, given: set) -> Config:
    """Backbone, image size, --freeze and the GPS preset, checked and made canonical."""
    # the sizes the towers were made for
    if "clip" in (cfg.image_backbone, cfg.text_backbone):
        c = clip_config(cfg.clip)
        side, tokens = c["vision"]["image_size"], c["text"]["max_position_embeddings"]
        if cfg.image_backbone == "clip" and "img_size" in given and cfg.img_size != side:
            raise UserError(f"--img-size {cfg.img_size}: the vision tower of {cfg.clip} takes "
                            f"{side} px images")
        if cfg.text_backbone == "clip" and "max_len" in given and cfg.max_len > tokens:
            raise UserError(f"--max-len {cfg.max_len}: the text tower of {cfg.clip} takes at "
                            f"most {tokens} tokens")
        cfg = dataclasses.replace(
            cfg, img_size=side if cfg.image_backbone == "clip" else cfg.img_size,
            max_len=cfg.max_len if "max_len" in given or cfg.text_backbone != "clip" else tokens)
    # the size the ImageNet weights were trained at
    elif cfg.image_backbone != "small":
        crop = backbone_weights(cfg.image_backbone).transforms().crop_size[0]
        if "img_size" not in given:
            cfg = dataclasses.replace(cfg, img_size=crop)
        vit = cfg.image_backbone == "vit_b_16"
        if vit and (cfg.img_size % 16 or cfg.pretrained and cfg.img_size != crop):
            raise UserError(f"--img-size {cfg.img_size}: vit_b_16 takes {crop} px images with "
                            f"--pretrained, and multiples of 16 without")
    letters = ""
    for name in filter(None, (n.strip() for n in cfg.freeze.split(","))):
        letters += LETTER.get(name.lower(), name.upper())  # a name, or letters: GST
        if not set(letters) <= set("GSTC"):
            raise UserError(f"--freeze {cfg.freeze}: expected some of ground, satellite, text, "
                            f"gps (or G, S, T, C)")
    freeze = "".join(m for m in "GSTC" if m in letters)
    if cfg.share_image_trunk and len({"G", "S"} & set(freeze)) == 1:
        raise UserError(f"--freeze {cfg.freeze}: the ground and aerial encoders share one "
                        f"backbone (--share-image-trunk): freeze both or neither")
    if cfg.gps_preset == "geoclip":
        for k, v in (("gps_width", 1024), ("gps_depth", 3), ("embed_dim", 512)):
            if k in given and getattr(cfg, k) != v:
                raise UserError(f"--gps-preset geoclip sets --{k.replace('_', '-')} {v}, not "
                                f"{getattr(cfg, k)}")
        cfg = dataclasses.replace(cfg, gps_width=1024, gps_depth=3, embed_dim=512)
    return dataclasses.replace(cfg, freeze=freeze)

def warn_random_frozen(cfg: Config):
    """A frozen backbone that starts from random weights never learns: say so, once."""
    pretrained = {"G": cfg.image_backbone == "clip" or cfg.pretrained and cfg.image_backbone
                  != "small", "T": cfg.text_backbone == "clip", "C": bool(cfg.gps_init)}
    pretrained["S"] = pretrained["G"]
    random_frozen = [m for m in cfg.freeze if m in cfg.modalities and not pretrained[m]]
    if random_frozen:
        print0(f"warning: --freeze {','.join(random_frozen)}: these backbones start from random "
               f"weights, and frozen they never learn (--pretrained, --clip or --gps-init "
               f"give them weights)")

def resolve(command: str, cfg: Config, given: set) -> Config:
    """Settings that follow from others, all in one place: checks; where eval and --resume take
    the model from (its checkpoint); where eval writes (beside its checkpoint)."""
    check_config(cfg)
    # a preset sets what the options given leave unsaid
    if command == "train" and cfg.preset and not cfg.resume:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in PRESETS[cfg.preset].items()
                                         if k not in given})
    mods = cfg.modalities.upper()
    cfg = dataclasses.replace(cfg, modalities="".join(m for m in "GSTC" if m in mods))
    cfg = resolve_model(cfg, given)
    if command == "convert" and not {"source", "out"} <= given:
        raise UserError("convert: name what to convert (SRC) and the checkpoint to write "
                        "(--out)")
    if command == "synth" and "out" not in given:
        cfg.out = str(synthetic_root(cfg.scale))
    if command == "locate" and "ckpt" not in given:
        cfg.ckpt = str(Path(cfg.out) / "best.pt")
    if command == "eval":
        if cfg.export and cfg.embeddings:
            raise UserError("--export writes the protocol's sides, --embeddings scores them: "
                            "one at a time")
        if "ckpt" not in given:
            cfg.ckpt = str(Path(cfg.out) / "best.pt")
        elif "out" not in given:
            cfg.out = str(Path(cfg.ckpt).parent)
        if cfg.embeddings and "out" not in given:
            cfg.out = cfg.embeddings
        if "ckpt" in given or not (cfg.export or cfg.embeddings):
            # the checkpoint's model, and its data unless --data names other data
            cfg, saved = adopt_saved(cfg, given, Path(cfg.ckpt), CHECKPOINT_FIELDS)
            cfg.data = cfg.data if "data" in given else saved.data
            cfg.clip = cfg.clip if "clip" in given else saved.clip
        if not cfg.data:
            names = cfg.ckpt if "ckpt" in given else "--export and --embeddings have no checkpoint"
            raise UserError(f"--data: name the dataset root ({names} to name it)")
        groups = Path(cfg.data) / "mmlandmarks.csv"
        if cfg.by and not (groups.is_file() and cfg.by in csv_header(groups)):
            raise UserError(f"--by {cfg.by}: {groups} has no {cfg.by} column (or is missing)")
    if command == "compare" and "out" not in given:
        cfg.out = "runs/compare"
    out = Path(cfg.out)
    # the run's own settings, except those given now
    if command == "train" and cfg.resume:
        if cfg.overwrite:
            raise UserError("--resume continues the run in --out, --overwrite replaces it: "
                            "give one of them")
        if not (out / "last.pt").is_file():
            raise UserError(f"{out / 'last.pt'}: no run to resume there (--resume continues the "
                            f"run in --out: name its folder with --out)")
        cfg, saved = adopt_saved(cfg, given, out / "last.pt", CHECKPOINT_FIELDS)
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in given})
    elif command == "train" and not cfg.overwrite:
        held = [n for n in ("last.pt", "best.pt", "log.jsonl") if (out / n).exists()]
        if held:
            raise UserError(f"{out}: holds a run already ({', '.join(held)}): continue it with "
                            f"--resume, or start over with --overwrite")
    if command == "train":
        warn_random_frozen(cfg)
    return cfg

def main(argv=None):
    # workers are forked after use
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command, cfg, given = parse_args(argv)
    try:
        cfg = resolve(command, cfg, given)
        run = {"train": train, "eval": evaluate, "locate": locate, "synth": synth,
               "prepare": prepare, "bench": bench, "convert": convert, "compare": compare}
        run[command](cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

# ---- appendix: the image cache (a first reading skips it) ---------------------------------
# `prepare` decodes every image of the chosen splits once into one uint8 array per split and
# kind, with a JSON manifest of its ids written last; `ImageStore` (data) reads it back.

def decode_or_none(job: tuple) -> np.ndarray | None:
    try:
        return load_image(*job)
    except Exception:  # counted as broken in the manifest: see ImageStore
        return None

def build_cache(split_dir: Path, kind: str, ids: list[str], size: int, cache: Path, pool,
                resize: str = "crop") -> int:
    """Decode images into cache/{split}_{kind}.u8 (n, H, H, 3), then write the manifest, so
    that an interrupted build is never taken for a whole one; return how many were unreadable.
    An existing array is replaced only if its manifest says mml made it. Written as a stream,
    not through a memory map: a full disk is then an error, not a SIGBUS."""
    store = ImageStore(split_dir, kind, size, None, resize=resize)
    name = cache / f"{split_dir.name}_{kind}"
    manifest, array = name.with_suffix(".json"), name.with_suffix(".u8")
    # the ids come after
    head = manifest.read_bytes()[:100] if manifest.is_file() else b""
    if (array.exists() or manifest.exists()) and b'"generator": "mml.py prepare"' not in head:
        raise UserError(f"{array}: exists and was not made by `mml.py prepare`; refusing to "
                        f"replace it (--cache names another folder)")
    broken, blank = [], np.zeros((size, size, 3), np.uint8)

    def decode_all(tmp: Path):
        with open(tmp, "wb") as f:
            jobs = ((store.path(i), size, resize) for i in ids)
            for row, img in enumerate(pool.imap(decode_or_none, jobs, chunksize=32)):
                if img is None:
                    broken.append(ids[row])
                f.write((blank if img is None else img).tobytes())
            if not ids:  # one blank row: an empty array cannot be mapped
                f.write(blank.tobytes())
    manifest.unlink(missing_ok=True)  # never an old manifest beside a new array
    write_atomically(array, decode_all)
    write_atomically(manifest, lambda tmp: tmp.write_text(json.dumps({
        "generator": "mml.py prepare", "size": size, "resize": resize, "ids": ids,
        "broken": broken})))
    return len(broken)

def prepare(cfg: Config):
    """`prepare`: decode every image of --splits once into the cache, so that training reads
    pixels, not JPEGs."""
    root = default_world(cfg)
    cache = writable_folder(cache_dir(cfg, root), "--cache")
    jobs = []  # (split folder, kind, image ids)
    for split in cfg.splits.split(","):
        if split == "index":
            index = read_index(root)
            jobs += [(index.dir, "ground", index.ground), (index.dir, "satellite", index.sat)]
        else:
            s = read_split(root, split)
            tiles = dict.fromkeys(i for g in s.sat + [s.latest] for i in g)
            jobs += [(s.dir, "ground", [i for g in s.ground for i in g]),
                     (s.dir, "satellite", list(tiles))]
    n, side = sum(len(ids) for *_, ids in jobs), cfg.img_size
    need, free = n * side * side * 3, shutil.disk_usage(cache).free
    print0(f"prepare: {n} images at {side}x{side} px -> {need / 1e9:.2f} GB in {cache}")
    if need > free:  # checked before the hours of decoding, not found at their end
        raise UserError(f"{cache}: {need / 1e9:.2f} GB needed and {free / 1e9:.2f} GB free; "
                        f"--cache names a larger disk, --splits fewer splits")
    with torch.multiprocessing.get_context("fork").Pool(max(1, cfg.workers)) as pool:
        for split_dir, kind, ids in jobs:
            t = time.time()
            broken = build_cache(split_dir, kind, ids, side, cache, pool, cfg.resize)
            print0(f"  {split_dir.name} {kind}: {len(ids)} images, {broken} unreadable, "
                   f"{len(ids) / (time.time() - t):.0f} images/s")

# ---- appendix: comparing runs (a first reading skips it) ----------------------------------
# Runs side by side, with what a paper needs to tell a difference from noise: 95% bootstrap
# intervals that resample query landmarks (a landmark's photos are not independent queries,
# and resampling photos would overstate the confidence), each run's difference to the
# first on the very same resamples (paired), and runs that differ only in --seed as one
# setting, mean +- std.

HEADLINE = {False: ("R@1", "R@5", "R@10", "mAP@1k"),  # retrieval, official
            True: ("acc@1km", "acc@25km", "acc@200km", "acc@750km", "acc@2500km")}  # x2C
# options that change no result, or change only the draw of one (--seed): runs that differ
# in these alone are seeds of one setting
NOT_A_SETTING = ("seed", "out", "resume", "overwrite", "workers", "device", "log_every",
                 "cache", "data", "ckpt", "compile")

def read_run(folder: Path) -> dict:
    """A run folder (holding eval/) or an eval folder: its metrics.json and, per task, the
    per-query values of the headline metrics, from the task's CSV."""
    path = next((p for p in (folder / "metrics.json", folder / "eval/metrics.json")
                 if p.is_file()), None)
    if path is None:
        raise UserError(f"{folder}: no metrics.json there or in eval/ (run `mml.py eval`)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        listed = metrics["tasks"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a metrics.json of mml ({type(e).__name__})") from None
    tasks = {}
    for name, r in listed.items():
        geo = name[2] == "C"
        columns = ["landmark_id", "error_km"] if geo else ["landmark_id", "rank_official",
                                                           "ap_official"]
        rows = read_table(path.parent / f"{name}.csv", columns)
        numbers = {c: parse_numbers(path.parent / f"{name}.csv", rows, [c], float)[:, 0]
                   for c in columns}
        if geo:
            values = {f"acc@{t}km": 100.0 * (numbers["error_km"] <= t) for t in
                      (1, 25, 200, 750, 2500)}
        else:
            values = {f"R@{k}": 100.0 * (numbers["rank_official"] <= k) for k in (1, 5, 10)}
            values["mAP@1k"] = 100 * numbers["ap_official"]
        tasks[name] = {"protocol": r.get("protocol"), "data": r.get("data"), "values": values,
                       "landmarks": numbers["landmark_id"].astype(np.int64)}
    label = folder.parent.name if folder.name == "eval" else folder.name
    return {"name": label, "path": path, "config": metrics.get("config"), "tasks": tasks}

def cluster_weights(landmarks: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, Q): how often each query is drawn when the query landmarks are drawn with
    replacement, all of a landmark's queries together. A resampled mean is weights @ values
    / weights.sum()."""
    unique, landmark_of = np.unique(landmarks, return_inverse=True)
    picks = np.random.default_rng(seed).integers(0, len(unique), (resamples, len(unique)))
    counts = np.stack([np.bincount(p, minlength=len(unique)) for p in picks])   # (R, L)
    return counts[:, landmark_of].astype(np.float64)                            # (R, Q)

def setting_groups(runs: list[dict]) -> list[list[dict]]:
    """Runs grouped by setting: the same training config but for NOT_A_SETTING, each with a
    seed of its own; a run without a config (outside embeddings) is its own group."""
    groups, keys = [], []
    for run in runs:
        config = run["config"]
        key = None if config is None else json.dumps(
            {k: v for k, v in config.items() if k not in NOT_A_SETTING}, sort_keys=True)
        same = [g for g, k in zip(groups, keys) if key is not None and k == key and
                config.get("seed") not in [r["config"].get("seed") for r in g]]
        if same:
            same[0].append(run)
        else:
            groups.append([run])
            keys.append(key)
    return groups

def comparison(runs: list[dict], resamples: int) -> dict:
    """{(task, metric): [per group: (value, std, lo, hi, diff, diff_lo, diff_hi)]}: a group's
    value is its runs' mean (std across them, 0 for one run); lo and hi bound its 95%
    bootstrap interval; diff and its interval are to the first group, on the same resamples.
    Runs evaluated on other queries or galleries than the first are refused, naming both."""
    first, groups, table = runs[0], setting_groups(runs), {}
    for run in runs[1:]:
        for name, t in run["tasks"].items():
            mine = first["tasks"].get(name)
            if mine and mine["protocol"] != t["protocol"]:
                raise UserError(f"{run['path']} and {first['path']} were evaluated on different "
                                f"queries or galleries for {name} (data {t['data']} and "
                                f"{mine['data']}): compare runs of one protocol")
    names = list(dict.fromkeys(n for r in runs for n in r["tasks"]))
    for name in names:
        have = [all(name in r["tasks"] for r in g) for g in groups]
        if not any(have):
            continue
        landmarks = groups[have.index(True)][0]["tasks"][name]["landmarks"]
        w = cluster_weights(landmarks, resamples)                                   # (R, Q)
        for metric in HEADLINE[name[2] == "C"]:
            cells, base = [], None
            for g, here in zip(groups, have):
                if not here:
                    cells.append(None)
                    continue
                x = np.stack([r["tasks"][name]["values"][metric] for r in g])     # (runs, Q)
                points = x.mean(1)                                                # (runs,)
                boot = (w @ x.T / w.sum(1, keepdims=True)).mean(1)                 # (R,)
                base = (boot, points.mean()) if base is None else base
                cells.append((points.mean(), points.std(ddof=1) if len(g) > 1 else 0.0,
                              *np.percentile(boot, [2.5, 97.5]), points.mean() - base[1],
                              *np.percentile(boot - base[0], [2.5, 97.5])))
            table[name, metric] = cells
    return table

def compare(cfg: Config):
    """`compare RUN...`: one table of every task's headline metrics (official R@k and mAP@1k,
    or the geolocalisation's accuracies), each run with its 95% interval and, after the
    first, its paired difference to the first; also as compare.csv and compare.png in --out,
    and with --latex for a paper."""
    runs = [read_run(Path(r)) for r in cfg.runs]
    groups = setting_groups(runs)
    labels = [g[0]["name"] + (f" ({len(g)} seeds)" if len(g) > 1 else "") for g in groups]
    table = comparison(runs, cfg.resamples)
    text = lambda c, d: "-" if c is None else (
        f"{c[4]:+.2f} [{c[5]:+.2f}, {c[6]:+.2f}]" if d else
        f"{c[0]:.2f}" + (f" +- {c[1]:.2f}" if c[1] else "") + f" [{c[2]:.2f}, {c[3]:.2f}]")
    header = ["task", "metric"] + labels + [f"{lab} - {labels[0]}" for lab in labels[1:]]
    rows = [[t, m] + [text(c, False) for c in cells] + [text(c, True) for c in cells[1:]]
            for (t, m), cells in table.items()]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(f"{str(v):<{w}}" for v, w in zip(r, widths)))
    out = writable_folder(Path(cfg.out), "--out")
    write_atomically(out / "compare.csv", lambda tmp: write_csv(
        tmp, ["task", "metric", "run", "value", "std", "low", "high", "diff", "diff_low",
              "diff_high"], [[t, m, lab, *c] for (t, m), cells in table.items()
                             for lab, c in zip(labels, cells) if c is not None]))
    draw_comparison(table, labels, out / "compare.png")
    if cfg.latex:
        tex = lambda r: " & ".join(str(v).replace("+-", "$\\pm$").replace("_", "\\_")
                                   for v in r) + " \\\\"
        print("\n\\begin{tabular}{ll" + "r" * (len(header) - 2) + "}\n\\toprule")
        print(tex(header) + "\n\\midrule")
        for r in rows:
            print(tex(r))
        print("\\bottomrule\n\\end{tabular}")
    print(f"\n95% intervals: {cfg.resamples} bootstrap resamples of the query landmarks; "
          f"compare.csv and compare.png in {out}/")

def draw_comparison(table: dict, labels: list[str], path: Path):
    """Each task and metric a row, each setting a dot at its value and a bar over its 95%
    interval, on one 0-100% axis."""
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    left, width, line = 190, 600, 16
    img = Image.new("RGB", (left + width + 20, 40 + line * len(table) + 20 * len(labels)),
                    "white")
    draw, text = ImageDraw.Draw(img), font(12)
    for x in range(0, 101, 20):
        draw.line((left + x * width / 100, 30, left + x * width / 100, 30 + line * len(table)),
                  fill=(225, 225, 225))
        draw.text((left + x * width / 100 - 8, 14), f"{x}%", fill="black", font=text)
    for n, ((task, metric), cells) in enumerate(table.items()):
        y = 30 + n * line + line // 2
        draw.text((8, y - 7), f"{task} {metric}", fill="black", font=text)
        for k, c in enumerate(cells):
            if c is not None:
                colour, dy = palette[k % len(palette)], (k - len(cells) / 2) * 3
                draw.line((left + c[2] * width / 100, y + dy, left + c[3] * width / 100, y + dy),
                          fill=colour, width=2)
                draw.ellipse((left + c[0] * width / 100 - 3, y + dy - 3,
                              left + c[0] * width / 100 + 3, y + dy + 3), fill=colour)
    for k, label in enumerate(labels):
        y = 40 + line * len(table) + 20 * k
        draw.rectangle((8, y, 20, y + 12), fill=palette[k % len(palette)])
        draw.text((28, y - 1), label, fill="black", font=text)
    img.save(path)

# ---- appendix: the pictures (a first reading skips it) ------------------------------------

# Pictures (`eval --viz`), with Pillow alone: per retrieval task a grid of queries, their top
# 5 and, when it is not among them, their correct match; per x2C task a map of the errors;
# the training curves from log.jsonl.
GRID_THUMB, GRID_GAP, GRID_LINE, GRID_ROWS = 96, 8, 18, 8  # px, px, px, queries
GREEN, RED = (0, 160, 0), (200, 30, 30)
MAP_LAT, MAP_LON, MAP_PX = (24.0, 50.0), (-125.0, -66.0), 16  # contiguous US, px per degree
MAP_LINES = 12  # the worst queries' lines to their guesses: few enough to follow
ERROR_BANDS = ((1, (0, 140, 0)), (25, (20, 150, 150)), (200, (40, 80, 210)),
               (750, (230, 140, 0)), (2500, (210, 30, 30)), (math.inf, (90, 0, 60)))

def font(size: int = 13):
    # Pillow's scalable font: legible at any size
    return ImageFont.load_default(size=size)

def grid_cell(row: int, col: int) -> tuple[int, int]:
    """Top-left pixel of a grid's thumbnail: a caption line above each row, a line of scores
    under it; columns 0 the query, 1-5 its top 5, 6 its correct match."""
    return (GRID_GAP + col * (GRID_THUMB + GRID_GAP),
            GRID_LINE + row * (GRID_THUMB + GRID_GAP + 2 * GRID_LINE))

def picture_queries(ranks: list[int], seed: int, how: str = "random") -> list[int]:
    """The queries a grid shows, GRID_ROWS of them: seeded random ones in order, or (hard) the
    best-, median- and worst-ranked, in that order."""
    n = len(ranks)
    if how == "random":
        return sorted(random.Random(seed).sample(range(n), min(GRID_ROWS, n)))
    # stable: ties keep the query order
    order = sorted(range(n), key=lambda i: ranks[i])
    middle = (n - 2) // 2
    return list(dict.fromkeys(order[:3] + order[middle:middle + 2] + order[-3:]))

def thumbnail(path) -> Image.Image:
    try:
        return Image.fromarray(load_image(Path(path), GRID_THUMB))
    except Exception:  # the grid still shows the rest
        return Image.new("RGB", (GRID_THUMB, GRID_THUMB), (128, 128, 128))

def draw_task(task: Task, protocol: Protocol, q: Side, g: Side, q_emb, g_emb, ranks: dict,
              columns: dict, path: Path, cfg: Config):
    """A retrieval task's grid: each row a query (its image, or its sentence) and its top 5,
    their scores underneath, bordered green where a result is the query's landmark, red
    otherwise, distractors marked; then, when the top 5 miss it, the query's best-scoring
    correct item and its rank. An x2C task's map: see draw_map."""
    if task.geo:
        return draw_map(task, protocol, q, columns, path)
    text, n_junk = font(), int((g.labels == -1).sum())
    rows = picture_queries(columns["rank_strict"], cfg.seed, cfg.viz_queries)
    img = Image.new("RGB", (grid_cell(0, 7)[0], grid_cell(len(rows), 0)[1]), "white")
    draw = ImageDraw.Draw(img)

    def cell(r: int, c: int, j: int, colour, under: str):
        x, y = grid_cell(r, c)
        img.paste(thumbnail(g.show[j]), (x, y))
        draw.rectangle((x, y, x + GRID_THUMB - 1, y + GRID_THUMB - 1), outline=colour, width=4)
        if j < n_junk:
            draw.rectangle((x + 4, y + GRID_THUMB - 20, x + GRID_THUMB - 5, y + GRID_THUMB - 5),
                           fill="black")
            draw.text((x + 8, y + GRID_THUMB - 19), "distractor", fill="white", font=text)
        draw.text((x, y + GRID_THUMB + 2), under, fill="black", font=text)
    for r, i in enumerate(rows):
        x, y = grid_cell(r, 0)
        rank, official = columns["rank_strict"][i], columns["rank_official"][i]
        caption = (f"query {q.ids[i]}" if task.query != "T" else "sentence") + (
            f" (landmark {int(q.labels[i])}): correct match at rank {rank} (official {official})")
        draw.text((x, y - GRID_LINE + 2), caption[:110], fill="black", font=text)
        if task.query == "T":  # the sentence itself, wrapped into the query's cell
            draw.rectangle((x, y, x + GRID_THUMB - 1, y + GRID_THUMB - 1), fill=(235, 235, 235))
            lines = textwrap.wrap(str(q.show[i]), 15)[:7] or ["(empty)"]
            draw.multiline_text((x + 3, y + 3), "\n".join(lines), fill="black", font=text)
        else:
            img.paste(thumbnail(q.show[i]), (x, y))
        top = ranks["top"][i, :5].tolist()
        scores = (g_emb[top] @ q_emb[i]).tolist()
        for c, (j, s) in enumerate(zip(top, scores), 1):
            cell(r, c, j, GREEN if g.labels[j] == q.labels[i] else RED, f"{s:.3f}")
        if rank > len(top):
            j = int(ranks["match"][i])
            cell(r, 6, j, GREEN, f"{float(g_emb[j] @ q_emb[i]):.3f}  #{rank}")
    img.save(path)

def map_xy(lat: float, lon: float) -> tuple[float, float]:
    """Equirectangular: a degree is MAP_PX pixels both ways."""
    return (lon - MAP_LON[0]) * MAP_PX, (MAP_LAT[1] - lat) * MAP_PX

def draw_map(task: Task, protocol: Protocol, q: Side, columns: dict, path: Path):
    """The contiguous US, training landmarks faint; each query's true location a dot coloured
    by its error band, the worst on the bottom and the best on top; lines from true location
    to guess for the MAP_LINES worst queries only, so that they can be followed; a legend
    with each band's share."""
    width = int((MAP_LON[1] - MAP_LON[0]) * MAP_PX)
    height = int((MAP_LAT[1] - MAP_LAT[0]) * MAP_PX)
    img = Image.new("RGB", (width, height + 40), (250, 250, 246))
    draw, text = ImageDraw.Draw(img), font()
    for lat, lon in protocol.open_gps.latlon[len(protocol.index.sat):].tolist():
        x, y = map_xy(lat, lon)
        draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(200, 200, 200))
    km = [float(k) for k in columns["error_km"]]
    guess = list(zip(map(float, columns["pred_lat"]), map(float, columns["pred_lon"])))
    band = [next(n for n, (limit, _) in enumerate(ERROR_BANDS) if k <= limit) for k in km]
    worst_first = sorted(range(len(km)), key=lambda i: -km[i])
    for i in worst_first[:MAP_LINES]:
        draw.line((*map_xy(*q.latlon[i].tolist()), *map_xy(*guess[i])),
                  fill=ERROR_BANDS[band[i]][1], width=2)
    for i in worst_first:
        x, y = map_xy(*q.latlon[i].tolist())
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=ERROR_BANDS[band[i]][1])
    draw.text((8, 6), f"{task.name}: {len(km)} queries at their true location, coloured by "
                      f"error; lines to the guess for the {MAP_LINES} worst", fill="black",
              font=font(15))
    for n, (limit, colour) in enumerate(ERROR_BANDS):
        x = 8 + n * 155
        share = 100 * band.count(n) / max(1, len(band))
        label = f"<= {limit:g} km" if limit < math.inf else "> 2500 km"
        draw.rectangle((x, height + 12, x + 14, height + 26), fill=colour)
        draw.text((x + 20, height + 12), f"{label}: {share:.0f}%", fill="black", font=text)
    img.save(path)

def plot(draw: ImageDraw.ImageDraw, box: tuple, title: str, series: dict):
    """Line plots in box (x0, y0, x1, y1): {name: (xs, ys)}, with their extremes labelled."""
    x0, y0, x1, y1 = box
    text, palette = font(), [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44),
                             (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    draw.text((x0 + 8, y0 + 4), title, fill="black", font=font(14))
    left, top, right, bottom = x0 + 58, y0 + 26, x1 - 12, y1 - 22  # the plotting area
    draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        return
    lo_x, hi_x = min(p[0] for p in points), max(p[0] for p in points)
    lo_y, hi_y = min(p[1] for p in points), max(p[1] for p in points)
    hi_x, hi_y = max(hi_x, lo_x + 1e-12), max(hi_y, lo_y + 1e-12)
    for value, y in ((hi_y, top), (lo_y, bottom - 12)):
        draw.text((x0 + 4, y), f"{value:.3g}", fill="black", font=text)
    for value, x in ((lo_x, left), (hi_x, right - 30)):
        draw.text((x, bottom + 4), f"{value:g}", fill="black", font=text)
    for n, (name, (xs, ys)) in enumerate(series.items()):
        colour = palette[n % len(palette)]
        line = [(left + (x - lo_x) / (hi_x - lo_x) * (right - left),
                 bottom - (y - lo_y) / (hi_y - lo_y) * (bottom - top))
                for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        else:  # one point: an epoch so far
            draw.point(line, fill=colour)
        draw.text((right - 70, top + 4 + 14 * n), name, fill=colour, font=text)

def draw_curves(log: Path, path: Path):
    """Training curves from a run's log.jsonl: losses by step, validation by epoch, the lr,
    the logit scale and the throughput: 1200 x 540 px."""
    if not log.is_file():
        print(f"no training curves: {log} not found")
        return
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "val_loss" in r]
    by = lambda rows, x, key: ([r[x] for r in rows], [r[key] for r in rows])
    pairs = [k for k in (steps[0] if steps else {}) if k.startswith("loss_")]
    recalls = [k for k in (epochs[0] if epochs else {}) if k.startswith("val_") and "R@1" in k]
    panels = [("training loss by step", {"total": by(steps, "step", "loss"),
                                         **{k[5:]: by(steps, "step", k) for k in pairs}}),
              ("validation loss by epoch", {"val": by(epochs, "epoch", "val_loss")}),
              ("validation R@1 (%) by epoch", {k[4:-4] or "mean": by(epochs, "epoch", k)
                                               for k in recalls}),
              ("learning rate by step", {"lr": by(steps, "step", "lr")}),
              ("logit scale by step", {"scale": by(steps, "step", "logit_scale")}),
              ("samples/s by step", {"rate": by(steps, "step", "samples_per_s")})]
    img = Image.new("RGB", (1200, 540), "white")
    draw = ImageDraw.Draw(img)
    for n, (title, series) in enumerate(panels):
        x, y = 400 * (n % 3), 270 * (n // 3)
        plot(draw, (x, y, x + 400, y + 270), title, series)
    img.save(path)

# ---- appendix: the synthetic world (a first reading skips it) -----------------------------
# A small world written in the released layout, so that a demo run and every test read data
# through the same code a real user's run does. It is learnable across modalities: location
# decides the land cover seen from above and from the ground; each landmark's category decides
# its footprint and silhouette, its colour the roof and the facade; the text names category,
# colour, size, land cover, city and state. Several landmarks share category and colour, so
# retrieval has to combine cues and never becomes trivial.

CITIES = [  # (city, state, lat, lon): landmarks cluster around these
    ("New York", "NY", 40.71, -74.01), ("Los Angeles", "CA", 34.05, -118.24),
    ("Chicago", "IL", 41.88, -87.63), ("Houston", "TX", 29.76, -95.37),
    ("Phoenix", "AZ", 33.45, -112.07), ("Philadelphia", "PA", 39.95, -75.17),
    ("San Antonio", "TX", 29.42, -98.49), ("San Diego", "CA", 32.72, -117.16),
    ("Dallas", "TX", 32.78, -96.80), ("San Francisco", "CA", 37.77, -122.42),
    ("Seattle", "WA", 47.61, -122.33), ("Denver", "CO", 39.74, -104.99),
    ("Boston", "MA", 42.36, -71.06), ("Nashville", "TN", 36.16, -86.78),
    ("Detroit", "MI", 42.33, -83.05), ("Portland", "OR", 45.52, -122.68),
    ("Las Vegas", "NV", 36.17, -115.14), ("Memphis", "TN", 35.15, -90.05),
    ("Atlanta", "GA", 33.75, -84.39), ("Miami", "FL", 25.76, -80.19),
    ("Minneapolis", "MN", 44.98, -93.27), ("New Orleans", "LA", 29.95, -90.07),
    ("Salt Lake City", "UT", 40.76, -111.89), ("Kansas City", "MO", 39.10, -94.58),
    ("Albuquerque", "NM", 35.08, -106.65), ("Charlotte", "NC", 35.23, -80.84),
    ("Washington", "DC", 38.91, -77.04), ("Pittsburgh", "PA", 40.44, -79.99),
    ("Omaha", "NE", 41.26, -95.93), ("Boise", "ID", 43.62, -116.20),
    ("Billings", "MT", 45.78, -108.50), ("Cleveland", "OH", 41.50, -81.69),
    ("Richmond", "VA", 37.54, -77.44), ("Oklahoma City", "OK", 35.47, -97.52),
    ("Buffalo", "NY", 42.89, -78.88), ("Jacksonville", "FL", 30.33, -81.66),
    ("Tucson", "AZ", 32.22, -110.97), ("Sacramento", "CA", 38.58, -121.49)]
COLOURS = {"red": (178, 52, 44), "blue": (48, 82, 168), "white": (228, 228, 222),
           "black": (42, 42, 48), "yellow": (222, 190, 62), "orange": (214, 122, 42),
           "purple": (118, 62, 140), "brown": (116, 80, 52), "teal": (40, 140, 140)}
COVER = {"forest": (46, 92, 50), "farmland": (152, 160, 86), "desert": (206, 182, 136),
         "pine forest": (30, 66, 52), "city": (128, 128, 126)}
# Per category: the right half of its front view, (x, y) from the ground (y = 0) up to its
# top on x = 0, mirrored into a polygon; and its footprint from above, as (shape, box in
# half-widths around the centre, paint).
CATEGORIES = {
    "church": ([(.4, 0), (.4, .5), (.1, .5), (.1, .72), (0, 1)],
               [("rect", (-1, -.33, 1, .33), "roof"), ("rect", (-.33, -1, .33, 1), "roof")]),
    "tower": ([(.12, 0), (.1, .9), (0, 1)], [("rect", (-.33, -.33, .33, .33), "roof")]),
    "stadium": ([(.5, 0), (.44, .32), (0, .32)], [("ellipse", (-1, -1, 1, 1), "roof"),
                                                   ("ellipse", (-.5, -.33, .5, .33), "grass")]),
    "lighthouse": ([(.15, 0), (.08, .84), (.13, .84), (.13, .9), (0, 1)],
                   [("rect", (.5, -3, 3, 3), "water"), ("ellipse", (-.5, -.5, .5, .5), "roof")]),
    "capitol": ([(.45, 0), (.45, .45), (.2, .45), (.14, .66), (0, .75)],
                [("rect", (-1, -1, 1, 1), "roof"), ("ellipse", (-.5, -.5, .5, .5), "light")]),
    "museum": ([(.45, 0), (.45, .5), (0, .68)],
               [("rect", (-1, -.7, 1, .7), "roof"), ("rect", (-.5, -.33, .5, .33), "cover")]),
    "castle": ([(.4, 0), (.4, .7), (.3, .7), (.3, .62), (.1, .62), (.1, .7), (0, .7)],
               [("rect", (-.8, -.8, .8, .8), "roof")] + [
                   ("ellipse", (x - .25, y - .25, x + .25, y + .25), "dark")
                   for x in (-.8, .8) for y in (-.8, .8)]),
    "obelisk": ([(.2, 0), (.2, .08), (.06, .08), (.04, .9), (0, 1)],
                [("ellipse", (-1, -1, 1, 1), "stone"), ("rect", (-.2, -.2, .2, .2), "roof")]),
    "skyscraper": ([(.2, 0), (.2, .6), (.12, .6), (.12, .85), (.04, .85), (0, 1)],
                   [("rect", (-.6, -.6, .6, .6), "roof"), ("rect", (-.3, -.3, .3, .3), "light")]),
}
NAME_WORDS = ["Old", "Grand", "North", "Lake", "Cedar", "Liberty", "Union", "Harbor", "Pioneer",
              "Summit", "River", "Founders", "Mission", "Oak", "Sunset", "Eagle", "Granite", "Elm"]

def land_cover(lat: float, lon: float) -> tuple[str, np.ndarray]:
    """What the ground looks like at a place, smooth in location: (name, RGB)."""
    dry = np.clip((-lon - 97) / 12, 0, 1) * np.clip((43 - lat) / 6, 0, 1)  # the south-west
    cold = np.clip((lat - 42) / 4, 0, 1)                                   # the north
    wave = 0.5 + 0.5 * math.sin(lat * 0.9) * math.cos(lon * 0.7)           # farm or forest
    urban = max(math.exp(-((lat - c[2]) ** 2 + (lon - c[3]) ** 2) / 0.15**2) for c in CITIES)
    weights = {"desert": dry, "pine forest": (1 - dry) * cold * (1 - wave),
               "forest": (1 - dry) * (1 - cold) * (1 - wave), "farmland": (1 - dry) * wave,
               "city": 2.5 * urban}
    rgb = sum(w * np.array(COVER[k], float) for k, w in weights.items()) / sum(weights.values())
    return max(weights, key=weights.get), rgb

def place_landmark(rng: random.Random) -> dict:
    """A random landmark: where it is and what it looks like."""
    city, state, lat, lon = rng.choice(CITIES)
    rural = rng.random() < 0.3  # rural landmarks spread far from the city
    spread = rng.uniform(1.0, 2.5) if rural else 0.08
    colour = rng.choice(list(COLOURS))
    return {"lat": min(48.5, max(25.5, lat + rng.gauss(0, spread))),
            "lon": min(-67.5, max(-124, lon + rng.gauss(0, spread))), "city": city,
            "state": state, "rural": rural, "category": rng.choice(list(CATEGORIES)),
            "colour": colour, "rgb": np.clip(np.array(COLOURS[colour]) + [
                rng.gauss(0, 14) for _ in range(3)], 0, 255),
            "size": rng.uniform(0.25, 0.6), "year": rng.randint(1780, 2010),
            "name": f"{rng.choice(NAME_WORDS)} {rng.choice(NAME_WORDS)}"}

def rgb(a) -> tuple:
    return tuple(int(v) for v in np.clip(a, 0, 255))

def render_satellite(lm: dict | None, lat: float, lon: float, rng: random.Random,
                     size: int = 96) -> Image.Image:
    """An aerial tile centred at (lat, lon): land cover, fields, roads and, if lm is given,
    the landmark's footprint. rng varies what changes between years: light, angle, offset."""
    _, cover = land_cover(lat, lon)
    canvas = Image.new("RGB", (2 * size, 2 * size), rgb(cover))  # turned, then cropped
    d = ImageDraw.Draw(canvas)
    # the same fields and roads every year
    ground = random.Random(f"{lat:.4f},{lon:.4f}")
    for _ in range(30):
        x, y, w, h = (ground.uniform(0, 2 * size) for _ in range(4))
        d.rectangle((x, y, x + w / 4, y + h / 4), fill=rgb(cover + [ground.gauss(0, 18)] * 3))
    for _ in range(ground.randint(0, 3)):
        d.line([(ground.uniform(0, 2 * size), 0), (ground.uniform(0, 2 * size), 2 * size)],
               fill=(95, 95, 95), width=3)
    if lm is not None:
        paints = {"roof": lm["rgb"], "dark": lm["rgb"] * 0.7, "light": lm["rgb"] * 0.7 + 60,
                  "cover": cover, "grass": (70, 150, 60), "water": (40, 80, 150),
                  "stone": (170, 170, 165)}
        r = lm["size"] * size / 2
        for shape, (x0, y0, x1, y1), paint in CATEGORIES[lm["category"]][1]:
            (d.rectangle if shape == "rect" else d.ellipse)(
                (size + x0 * r, size + y0 * r, size + x1 * r, size + y1 * r),
                fill=rgb(paints[paint]))
    x, y = (int(size + rng.uniform(-4, 4)) for _ in "xy")
    canvas = canvas.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR, center=(x, y))
    tile = canvas.crop((x - size // 2, y - size // 2, x + size // 2, y + size // 2))
    return ImageEnhance.Brightness(tile).enhance(rng.uniform(0.75, 1.25))

def render_ground(lm: dict | None, lat: float, lon: float, rng: random.Random,
                  w: int = 128, h: int = 96, indoor: bool = False) -> Image.Image:
    """A photo from the ground: sky, terrain in the local land cover and, if lm is given,
    the landmark's silhouette in its facade colour, from a random viewpoint and distance.
    Indoors: walls in a lighter facade colour and a floor."""
    sky = [rng.uniform(90, 150), rng.uniform(140, 190), rng.uniform(200, 250)]
    img = Image.new("RGB", (w, h), rgb(sky))
    d = ImageDraw.Draw(img)
    facade = lm["rgb"] * rng.uniform(0.8, 1.1) if lm is not None else None
    if indoor:
        d.rectangle((0, 0, w, h * 0.75), fill=rgb(facade * 0.6 + 90))
        d.rectangle((0, h * 0.75, w, h), fill=(110, 80, 55))
        return img
    _, cover = land_cover(lat, lon)
    horizon = h * rng.uniform(0.6, 0.8)
    d.rectangle((0, horizon, w, h), fill=rgb(cover * 0.85))
    for _ in range(12):  # bushes
        x, y = rng.uniform(0, w), rng.uniform(horizon, h)
        d.ellipse((x, y, x + 6, y + 3), fill=rgb(cover * rng.uniform(0.6, 1.1)))
    if lm is not None:
        height = h * (0.4 + lm["size"]) * rng.uniform(0.75, 1.05)
        x = w / 2 + rng.uniform(-0.2, 0.2) * w
        half = CATEGORIES[lm["category"]][0]
        d.polygon([(x + u * height, horizon + 2 - v * height)
                   for u, v in half + [(-u, v) for u, v in reversed(half)]], fill=rgb(facade))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img

def describe(lm: dict) -> tuple[dict, str]:
    """The landmark's Wikipedia article {section: text} and its first sentence without cues."""
    size = "small" if lm["size"] < 0.35 else "large" if lm["size"] > 0.5 else "mid-sized"
    place = f"rural {lm['state']}" if lm["rural"] else f"{lm['city']}, {lm['state']}"
    kind, colour, year = lm["category"], lm["colour"], lm["year"]
    first = f"The {lm['name']} {kind.title()} is a {size} {colour} {kind}"
    article = {
        "Introduction": f"{first} in {place}. It was completed in {year}.\nVisitors know it "
                        f"for its {colour} roof. It draws crowds every summer.",
        "History": f"Work on the {kind} began in {year - 3}. It lies near {lm['city']}.\n"
                   f"The site was restored in {year + 60}. It is listed as a landmark.",
        "Architecture": f"The {kind} has a {colour} roof and a {size} footprint. It is "
                        f"surrounded by {land_cover(lm['lat'], lm['lon'])[0]}."}
    return article, first

# only mml writes it: a folder with it is mml's to replace
SYNTH_MARKER = "mml_synthetic.json"

def refuse_unless_synthetic(folder: Path):
    """mml replaces a folder only if it wrote it: an empty one, or a world with SYNTH_MARKER."""
    if folder.exists() and not (folder / SYNTH_MARKER).is_file() and (
            not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{folder}: not empty and not a synthetic world written by mml (no "
                        f"{SYNTH_MARKER}); refusing to replace it (--out names where to write)")

def save(content, path: Path):
    """An image (JPEG or PNG by the name) or a text, in a folder made on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        content.save(path, **({"quality": 90} if path.suffix == ".jpg" else {"compress_level": 1}))

# mml_{split}{suffix}.csv: its columns after landmark_id, and the split that lacks it
SPLIT_CSVS = {"": "CommonsCategory,lat,lon", "_ground": "images", "_ground_subset": "images",
              "_satellite": "images", "_all_satellite": "images", "_text": "json",
              "_text_sentences": "sentences", "_licenses": "images,license"}
LACKS = {"train": ("_all_satellite", "_text_sentences"), "query": ("_ground_subset",)}

def synthesize(out: Path, scale: float = 1.0, seed: int = 0) -> dict:
    """Write a synthetic world in the released layout to `out`; return its counts. Written to
    a temporary folder and renamed into place, so an interrupted run never leaves a
    half-written world that a later run would take for a whole one. Both folders carry
    SYNTH_MARKER from their first moment, so mml only ever replaces worlds of its own."""
    tmp = out.with_name(out.name + ".tmp")
    for folder in (out, tmp):
        # replacing it would replace the link, not what it names
        if folder.is_symlink():
            raise UserError(f"{folder}: a symbolic link; name the folder itself with --out")
        refuse_unless_synthetic(folder)
    writable_folder(out.parent, "--out")
    if tmp.exists():  # left by an interrupted run
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    marker = {"generator": "mml.py synthesize", "scale": scale, "seed": seed}
    (tmp / SYNTH_MARKER).write_text(json.dumps(marker))
    rng = random.Random(seed)
    new_id = lambda: f"{rng.getrandbits(64):016x}"  # the released 16-hex-digit ids
    n_train, n_query = max(40, int(1600 * scale)), max(20, int(100 * scale))
    landmark_ids = rng.sample(range(10**5, 10**7), n_train + n_query)
    counts, master = {}, []
    for split, ids in (("train", landmark_ids[:n_train]), ("query", landmark_ids[n_train:])):
        d, rows = tmp / split, {suffix: [] for suffix in SPLIT_CSVS}
        for lid in ids:
            lm = place_landmark(rng)
            ground = {new_id(): k > 0 and rng.random() < 0.15 for k in range(rng.randint(3, 8))}
            for gid, indoor in ground.items():
                save(render_ground(lm, lm["lat"], lm["lon"], rng, indoor=indoor),
                     shard(d, "ground", gid))
            sats = [new_id() for _ in range(rng.randint(2, 5))]  # oldest first
            for sid in sats:
                save(render_satellite(lm, lm["lat"], lm["lon"], rng), shard(d, "satellite", sid))
            tid = new_id()
            article, no_cues = describe(lm)
            save(json.dumps(article), shard(d, "text", tid))
            name = f"{lm['name']} {lm['category'].title()} ({lm['city']})"
            lat, lon = f"{lm['lat']:.6f}", f"{lm['lon']:.6f}"
            outdoor = [g for g, indoor in ground.items() if not indoor]
            # the query split lists each landmark's latest aerial image apart from all years
            for suffix, *value in (("", name, lat, lon), ("_ground", " ".join(ground)),
                                   ("_ground_subset", " ".join(outdoor)), ("_text", tid),
                                   ("_satellite", sats[-1] if split == "query" else " ".join(sats)),
                                   ("_all_satellite", " ".join(sats)),
                                   ("_text_sentences", no_cues)):
                rows[suffix].append((lid, *value))
            rows["_licenses"] += [(lid, i, "CC BY-SA 4.0") for i in [*ground, *sats]]
            bbox = [f"{v:.6f}" for v in (lm["lat"] - 1e-3, lm["lon"] - 1e-3, lm["lat"] + 1e-3,
                                         lm["lon"] + 1e-3)]
            master.append([lid, name, name, lat, lon, *bbox, f"Q{lid}", "way", lid * 7,
                           lm["category"], lm["state"], f"building > {lm['category']}"])
        for suffix, columns in SPLIT_CSVS.items():
            if suffix not in LACKS[split]:
                write_csv(d / f"mml_{split}{suffix}.csv", ["landmark_id", *columns.split(",")],
                          rows[suffix])
        counts[split] = {"landmarks": len(ids), "text": len(ids)} | {
            kind: sum(len(images.split()) for _, images in rows[suffix])
            for kind, suffix in (("ground", "_ground"), ("satellite", "_all_satellite"))}
    # Index distractors: photos of other buildings and of plain landscape; aerial tiles at
    # random places, half with a building on them. Their centres make up the GPS gallery.
    d, ground_rows, sat_rows = tmp / "index", [], []
    for i in range(max(60, int(2000 * scale))):
        lm, gid = place_landmark(rng), new_id()
        save(render_ground(lm if i % 2 else None, lm["lat"], lm["lon"], rng),
             shard(d, "ground", gid))
        ground_rows.append((gid, f"{rng.getrandbits(40):x}"))
    for i in range(max(60, int(1000 * scale))):
        lm, sid = place_landmark(rng), new_id()
        save(render_satellite(lm if i % 2 else None, lm["lat"], lm["lon"], rng),
             shard(d, "satellite", sid))
        sat_rows.append((sid, f"{lm['lat']:.6f}", f"{lm['lon']:.6f}", rng.randint(2010, 2022)))
    write_csv(d / "mml_index_ground.csv", ["images", "gldv2_id"], ground_rows)
    write_csv(d / "mml_index_satellite.csv", ["images", "lat", "lon", "year"], sat_rows)
    counts["index"] = {"ground": len(ground_rows), "satellite": len(sat_rows)}
    write_csv(tmp / "mmlandmarks.csv",
              ["landmark_id", "CommonsCategory", "WikipediaPage", "lat", "lon", "min_lat",
               "min_lon", "max_lat", "max_lon", "QID", "osm_type", "osm_id", "category",
               "state", "hierarchical_category"], master)
    (tmp / SYNTH_MARKER).write_text(json.dumps({**marker, "counts": counts}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return counts

def synth(cfg: Config):
    """`synth`: write a synthetic world to --out (default: where `train` reads it)."""
    t = time.time()
    counts = synthesize(Path(cfg.out), cfg.scale, cfg.seed)
    print(f"synthetic world in {cfg.out} ({time.time() - t:.0f}s): {json.dumps(counts)}")

# ---- appendix: the bench (a first reading skips it) ---------------------------------------
# `python mml.py bench` times each phase of a run in one go on this machine. Ratios between
# rows are meaningful; absolute numbers only with the device they were measured on.

def timed(fn, min_seconds: float = 1.0, sync=lambda: None) -> float:
    """Seconds per call of fn, averaged over as many calls as fill min_seconds (after one)."""
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n

def report(what: str, value: float, unit: str, how: str):
    print(f"  {what:<46}{value:>12,.{3 if value < 10 else 1}f} {unit:<10} {how}", flush=True)

def bench_decode(cfg: Config, device, sync, done: dict):
    """Decoding real-sized files (an 800-px JPEG photo, an 800x800 PNG tile, with noise for
    the texture real photos have and flat renders lack), and reading the prepare cache."""
    image_id, how = "0123456789abcdef", "one process (= per worker), CPU"
    with tempfile.TemporaryDirectory() as tmp, \
            torch.multiprocessing.get_context("fork").Pool(1) as pool:
        rng, noise = random.Random(0), np.random.default_rng(0)
        lm, split_dir = place_landmark(rng), Path(tmp) / "bench"
        for kind, img in (("ground", render_ground(lm, lm["lat"], lm["lon"], rng, 800, 600)),
                          ("satellite", render_satellite(lm, lm["lat"], lm["lon"], rng, 800))):
            pixels = np.asarray(img) + noise.integers(-24, 24, (*img.size[::-1], 3))
            save(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)),
                 shard(split_dir, kind, image_id))
        photo, tile = shard(split_dir, "ground", image_id), shard(split_dir, "satellite", image_id)
        for what, path, draft in (("800x600 JPEG, full decode", photo, False),
                                  ("800x600 JPEG, draft()", photo, True),
                                  ("800x800 PNG", tile, True)):
            seconds = timed(lambda: load_image(path, cfg.img_size, draft=draft))
            report(f"decode+resize {what}", 1 / seconds, "images/s", how)
        build_cache(split_dir, "ground", [image_id], cfg.img_size, Path(tmp), pool)
        cached = ImageStore(split_dir, "ground", cfg.img_size, Path(tmp), [image_id])
        report("read a cached image (prepare)", 1 / timed(lambda: cached(image_id)), "images/s",
               how)

def random_batch(cfg: Config, B: int, device=None) -> dict:
    """A batch of the configured shape with random content, as the loader delivers it (on the
    CPU, pinned for a GPU), or on `device`."""
    gen, side = torch.Generator().manual_seed(0), cfg.img_size
    batch = {m: torch.randint(0, 256, (B, 3, side, side), dtype=torch.uint8, generator=gen)
             for m in "GS"}
    vocab = clip_config(cfg.clip)["text"]["vocab_size"] if cfg.text_backbone == "clip" else (
        cfg.vocab_size)
    batch["T"] = torch.randint(1, vocab, (B, cfg.max_len), generator=gen)
    batch["C"] = torch.rand(B, 2, generator=gen) * 20 + torch.tensor([28.0, -110.0])
    batch = {m: x for m, x in batch.items() if m in cfg.modalities}
    if device is not None:
        return to_device(batch, device)
    pin = torch.cuda.is_available()
    return {m: x.pin_memory() if pin else x for m, x in batch.items()} | {"bad": [""] * B}

def step_rate(cfg: Config, device, sync, label: str) -> float:
    """Training samples/s of the model cfg describes: `train_step` itself, the function the
    training loop calls (jitter, forward, loss, all-reduce, backward, clipping, update, the
    scale's cap), on random inputs copied from the CPU as the loader's are."""
    torch.manual_seed(0)
    raw = MML(cfg).to(device)
    if device.type == "cuda":
        raw = raw.to(memory_format=torch.channels_last)
    model = torch.compile(raw) if cfg.compile else raw
    optimizer, pairs = make_optimizer(raw, cfg), loss_pairs(cfg.modalities, cfg.loss)
    batch, steps = random_batch(cfg, cfg.batch_size), itertools.count()
    step = lambda: train_step(model, raw, optimizer, batch, cfg, pairs, 0, next(steps), cfg.lr)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with matmul_precision("high"):  # as the training loop
        rate = cfg.batch_size / timed(step, 3.0 if cuda else 5.0, sync)
    # on the CPU the process's peak resident memory: ru_maxrss is in KiB on Linux
    peak = (f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda
            else f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    params = [sum(p.numel() for p in raw.parameters() if p.requires_grad or every) / 1e6
              for every in (True, False)]
    report(label, rate, "samples/s", f"{device.type}, batch {cfg.batch_size}, H {cfg.img_size}, "
           f"{params[0]:.1f}M params ({params[1]:.1f}M trained), {peak}")
    return rate

def bench_steps(cfg: Config, device, sync, done: dict) -> float:
    """Training steps: fp32, and on a GPU bf16 and bf16 + compile; returns the fastest."""
    rates = [step_rate(dataclasses.replace(cfg, bf16=False), device, sync, "train step, fp32")]
    if device.type == "cuda":
        rates.append(step_rate(cfg, device, sync, "train step, bf16"))
        rates.append(step_rate(dataclasses.replace(cfg, compile=True), device, sync,
                               "train step, bf16 + compile"))
    return max(rates)

def bench_backbones(cfg: Config, device, sync, done: dict):
    """A step with each image backbone at 224 px, trained whole and with frozen image
    backbones (the authors' setting); a batch of at most 8 on the CPU, where they are slow."""
    B = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, 8)
    for backbone in BACKBONES[:-1]:  # CLIP's have a phase of their own: paper
        for freeze in ("", "GS"):
            run = dataclasses.replace(cfg, image_backbone=backbone, img_size=224, batch_size=B,
                                      freeze=freeze)
            step_rate(run, device, sync, f"train step, {backbone}{', frozen' * bool(freeze)}")

def bench_loader(cfg: Config, device, sync, done: dict):
    """The training loader on the dataset (the synthetic world by default): batches ready for
    the step (collated, pinned on a GPU) for at least 3 s, epoch after epoch, as the training
    loop's single iterator delivers them."""
    root = default_world(cfg)
    data, _, _ = training_sets(cfg, root, None)
    B = min(cfg.batch_size, len(data))
    batches = iter(torch.utils.data.DataLoader(
        data, batch_size=None, sampler=EpochSampler(len(data), B, 0, stop=10**9),
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers > 0 else None))
    next(batches)  # the workers' start-up is not loading time
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3:
        n += len(next(batches)["bad"])
    rate = n / (time.perf_counter() - t0)
    source = "from the cache" if data.stores["G"].cached else "decoding"
    pace = "keeps up with" if rate >= done.get("steps", 0) else "slower than"
    report(f"training loader, {cfg.workers} workers", rate, "samples/s",
           f"{root}, {source}, batch {B}; {pace} the fastest step")

def bench_augment(cfg: Config, device, sync, done: dict):
    batch = random_batch(cfg, cfg.batch_size, device)
    params = augment_params(0, 0, 0, cfg.batch_size)
    seconds = timed(lambda: jitter(dict(batch), params), 2.0, sync)
    report(f"augmentation, batched on {device.type}", cfg.batch_size / seconds, "samples/s",
           f"ground and aerial view, batch {cfg.batch_size}, H {cfg.img_size}")

@torch.no_grad()
def bench_embed(cfg: Config, device, sync, done: dict):
    model, batch = MML(cfg).to(device).eval(), random_batch(cfg, cfg.eval_batch, device)
    for m in cfg.modalities:
        seconds = timed(lambda: model.enc[m](batch[m]), 2.0, sync)
        report(f"embed {m}", cfg.eval_batch / seconds, "items/s",
               f"{device.type}, batch {cfg.eval_batch}, fp32")

def argsort_ranks(q, g, q_labels, g_labels, map_top: int = 1000) -> dict:
    """The authors' way, for comparison: per query, score, sort the whole gallery, walk it.
    Ties are broken the documented way (positives after the items they tie with)."""
    res = {k: [] for k in ("first_strict", "first_official", "ap_strict", "ap_official")}
    for i in range(len(q)):
        scores, positive = g @ q[i], g_labels == q_labels[i]
        by_kind = torch.cat([torch.nonzero(~positive)[:, 0], torch.nonzero(positive)[:, 0]])
        order = by_kind[torch.argsort(scores[by_kind], descending=True, stable=True)]
        hit, junk = positive[order], g_labels[order] == -1
        strict = torch.nonzero(hit)[:, 0]
        official = torch.nonzero(hit[~junk])[:, 0]
        # top map_top of the full ranking, then junk out
        kept = int((strict < map_top).sum())
        for name, rows in (("strict", strict), ("official", official)):
            res[f"first_{name}"].append(int(rows[0]))
            res[f"ap_{name}"].append(sum(((j / r if r else 1) + (j + 1) / (r + 1)) / 2
                                         for j, r in enumerate(rows[:kept].tolist())) / len(strict))
    return {k: torch.tensor(v, dtype=torch.float64 if k.startswith("ap") else torch.long)
            for k, v in res.items()}

def fake_embeddings(n_queries: int, n_landmarks: int, n_labelled: int, n_junk: int, dim: int,
                    device, seed: int = 0) -> tuple:
    """Random unit vectors shaped like a task: queries and labelled gallery items scattered
    around a random centre per landmark (so positives rank high, as with a trained model),
    distractors anywhere. -> (q (Q, D), g (N, D), q_labels, g_labels), distractors first.
    Rounded to multiples of 2^-10, so that every score is a multiple of 2^-20 below 1 in size
    and exact in float32 whatever the order of summation (a GEMM and a GEMV, a CPU and a GPU
    all agree): the bench compares two rankings, not two roundings."""
    gen = torch.Generator(device).manual_seed(seed)
    noise = lambda n: torch.randn(n, dim, generator=gen, device=device)
    unit = lambda x: torch.round(F.normalize(x, dim=-1) * 1024) / 1024
    centres = F.normalize(noise(n_landmarks), dim=-1)
    q_labels = torch.arange(n_queries, device=device) % n_landmarks
    lab = torch.arange(n_labelled, device=device) % n_landmarks
    near = lambda labels: unit(centres[labels] + 0.1 * noise(len(labels)))
    g = torch.cat([unit(noise(n_junk)), near(lab)])
    return near(q_labels), g, q_labels, torch.cat([torch.full((n_junk,), -1, device=device), lab])

def bench_rank(cfg: Config, device, sync, done: dict):
    """Ranking at full scale, G2S 18,688 x (99,539 + 1,000) and S2G 1,000 x (714,554 + 18,688),
    against the authors' per-query argsort on a sample of queries: the same metrics, or stop."""
    for task, nq, n_lm, n_lab, n_junk in (("G2S", 18688, 1000, 1000, 99539),
                                          ("S2G", 1000, 1000, 18688, 714554)):
        q, g, ql, gl = fake_embeddings(nq, n_lm, n_lab, n_junk, 512, device)
        # warm-up: library start-up is not ranking time
        rank_queries(q[:64], g, ql[:64], gl)
        sync()
        t0 = time.perf_counter()
        ranks = rank_queries(q, g, ql, gl, chunk=cfg.chunk)
        sync()
        fast = time.perf_counter() - t0
        sample = torch.randperm(nq, generator=torch.Generator().manual_seed(0))
        sample = sample[:cfg.bench_queries].to(device)
        t0 = time.perf_counter()
        with matmul_precision("highest"):
            loop = argsort_ranks(q[sample], g, ql[sample], gl)
        sync()
        slow = (time.perf_counter() - t0) * nq / len(sample)
        same = all(torch.equal(loop[k], ranks[k][sample].cpu())
                   for k in ("first_strict", "first_official"))
        same &= all(torch.allclose(loop[k].double(), ranks[k][sample].cpu(), atol=1e-9)
                    for k in ("ap_strict", "ap_official"))
        report(f"rank {task} {nq} x {len(g)}, chunked counts", fast, "s",
               f"{device.type}, D = 512, all queries, --chunk {cfg.chunk}")
        report(f"rank {task}, per-query argsort loop", slow, "s",
               f"{device.type}, {len(sample)} queries timed, x {nq / len(sample):.0f}")
        report(f"rank {task}, speed-up (metrics {'identical' if same else 'DIFFER'})", slow / fast,
               "x", "same device, same run")
        if not same:
            raise SystemExit("bench: the chunked ranking disagrees with the per-query loop")

def bench_locate(cfg: Config, device, sync, done: dict):
    """`locate` with a 100,000-point gallery (GeoCLIP's size), whole calls: the first embeds
    and caches the gallery, a later one reads the cache."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt, gallery = Path(tmp) / "model.pt", Path(tmp) / "gallery.csv"
        tok = train_tokenizer(["a red church in a city"], cfg)
        save_checkpoint({"model": MML(cfg).state_dict(), "config": dataclasses.asdict(cfg),
                         "tokenizer": tok.to_str(), "step": 0, "epoch": 0}, ckpt)
        rng = np.random.default_rng(0)
        write_csv(gallery, ["lat", "lon"], np.stack([rng.uniform(24, 50, 100_000),
                                                     rng.uniform(-125, -66, 100_000)], 1))
        for label in ("first call, embeds the gallery", "later call, reads the cache"):
            t0 = time.perf_counter()
            Locator(ckpt, gallery, device, cfg.eval_batch)(["a red church"], "text")
            report(f"locate, 100,000 points: {label}", time.perf_counter() - t0, "s",
                   f"{device.type}, GPS width {cfg.gps_width}, loading included")

def write_clip_folder(folder: Path, vision: dict, text: dict, projection: int,
                      weights: bool = True) -> Path:
    """A Hugging Face-style CLIP folder with random weights: config.json, pytorch_model.bin
    (unless not `weights`) and the test fixture's small CLIP tokenizer.json (664 tokens).
    What the bench times."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).parent / "assets/fixtures/clip-tiny/tokenizer.json", folder)
    # the fixture's <|endoftext|>
    text = {**text, "vocab_size": 664, "eos_token_id": 663}
    (folder / "config.json").write_text(json.dumps({
        "model_type": "clip", "projection_dim": projection, "vision_config": vision,
        "text_config": text}))
    if weights:
        c, state = clip_config(str(folder)), {"logit_scale": torch.tensor(math.log(1 / 0.07))}
        for tower, prefix, projected in ((CLIPVision(c["vision"], projection), "vision_model.",
                                          "visual_projection.weight"),
                                         (CLIPText(c["text"], projection), "text_model.",
                                          "text_projection.weight")):
            for k, v in tower.state_dict().items():
                state[projected if k == "projection.weight" else prefix + k] = v
        torch.save(state, folder / "pytorch_model.bin")
    return folder

def bench_towers(cfg: Config, device, sync, done: dict):
    """`eval` of G2S and S2G with frozen CLIP towers (a random-weight 4-layer ViT at 112 px,
    CLIP's architecture), twice on the dataset: the first runs the towers on every image and
    caches their output; the second, as for another checkpoint on the same towers, runs
    only the heads and the ranking."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp, root = Path(tmp), default_world(cfg)
        folder = write_clip_folder(tmp / "clip", {
            "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
            "num_attention_heads": 4, "image_size": 112, "patch_size": 16}, {
            "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 2}, 128)
        seconds = []
        with contextlib.redirect_stdout(io.StringIO()):
            main(["convert", str(folder), "--out", str(tmp / "clip.pt")])
        for label in ("first eval, runs the towers", "second eval, reads their cache"):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                main(["eval", "--ckpt", str(tmp / "clip.pt"), "--data", str(root), "--out",
                      str(tmp), "--cache", str(tmp / "cache"), "--tasks", "G2S,S2G",
                      "--workers", str(cfg.workers), "--device", device.type])
            seconds.append(time.perf_counter() - t0)
            report(f"eval G2S+S2G, frozen CLIP: {label}", seconds[-1], "s",
                   f"{device.type}, {root}, whole commands")
        report("eval on cached towers, speed-up", seconds[0] / seconds[1], "x", "same run")

# CLIP ViT-L/14-336's sizes (openai/clip-vit-large-patch14-336's config.json)
VIT_L_336 = ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16, "image_size": 336, "patch_size": 14},
             {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12}, 768)

@torch.no_grad()
def tower_rate(cfg: Config, device, sync) -> float:
    """Images/s through the vision tower alone, under the run's precision."""
    enc, side = MML(cfg).enc["G"].to(device).eval(), cfg.img_size
    x = torch.randint(0, 256, (cfg.eval_batch, 3, side, side), dtype=torch.uint8, device=device)
    with autocast_for(device, cfg):
        return cfg.eval_batch / timed(lambda: enc.features(x), 2.0, sync)

def bench_paper(cfg: Config, device, sync, done: dict):
    """--preset paper at full size with random weights (no --clip needed): the training step
    with frozen ViT-L/14-336 towers (a batch of 2 on the CPU), the tower's embedding rate,
    and from those the time of the authors' 20 epochs of 16,533 landmarks and of a full
    evaluation's 833,781 images on this device: estimates from the step and the tower alone,
    without the loader and the ranking."""
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_clip_folder(Path(tmp), *VIT_L_336, weights=False)
        run = dataclasses.replace(cfg, **{
            **PRESETS["paper"], "clip": str(folder), "img_size": 336, "max_len": 77,
            "batch_size": cfg.batch_size if cuda else 2,
            "eval_batch": cfg.eval_batch if cuda else 2})
        rate = step_rate(run, device, sync, "train step, --preset paper, ViT-L/14-336")
        images = tower_rate(run, device, sync)
    report("CLIP ViT-L/14-336 vision tower", images, "images/s",
           f"{device.type}, batch {run.eval_batch}, {'bf16' if bf16_on(device, run) else 'fp32'}")
    report("estimate: the paper's 20 epochs, steps alone", 20 * 16533 / rate / 3600, "h",
           f"{device.type}, batch {run.batch_size}")
    report("estimate: the towers of a full evaluation", 833781 / images / 60, "min",
           f"{device.type}, each image once (the tower cache)")

BENCH_PHASES = {"decode": bench_decode, "steps": bench_steps, "backbones": bench_backbones,
                "loader": bench_loader, "augment": bench_augment, "embed": bench_embed,
                "rank": bench_rank, "locate": bench_locate, "towers": bench_towers,
                "paper": bench_paper}

def bench(cfg: Config):
    """`bench`: one table of throughputs on this machine, a phase at a time (--phases):
    decoding and the cache, training steps, each image backbone's step, the training loader
    against the fastest step, the batched augmentation, embedding, ranking against the
    authors' per-query loop, and `locate` with a 100,000-point gallery. Each phase is given
    what the earlier ones returned."""
    device = setup_distributed(cfg)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench on {name}, torch {torch.__version__}; H = {cfg.img_size}, "
          f"B = {cfg.batch_size}, D = {cfg.embed_dim}")
    done = {}
    for phase in cfg.phases.split(","):
        done[phase] = BENCH_PHASES[phase](cfg, device, sync, done)

if __name__ == "__main__":
    main()
