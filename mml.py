"""mml.py: the MMLandmarks benchmark (CVPR 2026) in one readable file.

18,557 US landmarks, each seen four ways: ground photos (G), aerial images (S, "satellite"),
a Wikipedia text (T) and a GPS point (C, "coordinates"). One model embeds all four into one
space with a CLIP-style contrastive loss, so a photo finds its aerial view (G2S), an aerial
view its photos (S2G), a photo, an aerial view or a sentence its location (G2C, S2C, T2C),
and a sentence its images (T2G, T2S).

    pip install -r requirements.txt
    python mml.py train   # no data needed: writes a synthetic world in the released
                          #   layout (30 s), then trains (about 7 min on 2 CPU cores)
    python mml.py eval    # all 13 tasks, official and strict (20 s); --viz: pictures
    python mml.py train --data /data/MMLandmarks --preset paper --clip DIR  # the authors'
    torchrun --standalone --nproc_per_node=8 mml.py train --data /data/MMLandmarks ...

Map. The main path, in the order the data flows: config, geometry, data, model, loss,
metrics, train. Then eval (the protocol's tasks), using a model (checkpoints, the Python
API), outside models (CLIP, torchvision's weights, `convert`), the tools (compare, locate,
the pictures, the image cache, the bench), the synthetic world, and the command line.
PROTOCOL N cites section N of the protocol in README.md.

Shape letters: B batch, D embedding width, E a backbone's output width, H image side in
pixels, L tokens, Q queries, N gallery items, P positives per query, W processes.
"""
import argparse
import contextlib
import csv
import dataclasses
import datetime
import difflib
import functools
import hashlib
import inspect
import io
import itertools
import json
import math
import mmap
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

# ---- config -------------------------------------------------------------------------------
# One dataclass is the whole configuration. The comment beside a field is its --help line,
# and the command line is made from the fields (`parse_args`, at the end of the file). A
# checkpoint stores its Config, and `check_config` holds a checkpoint's values to the same
# types, choices and bounds as the command line's.

BACKBONE = Literal["small", "resnet18", "resnet50", "convnext_tiny", "vit_b_16", "clip"]

@dataclass
class Config:
    # data (the fields from here to `select` are `train`'s options)
    data: str = ""  # dataset root, released layout (default: synthetic; eval: the ckpt's)
    scale: float = 1.0  # size of the synthetic world (1: 1,600 train, 100 query landmarks)
    n_val: int = 1024  # training landmarks held out for validation (at most a tenth)
    holdout: Literal["seeded", "authors"] = "seeded"  # by --seed, or the authors' own draw
    outdoor_only: bool = False  # train on the outdoor ground photos only (the subset CSV)
    last_sat_only: bool = False  # train on each landmark's latest aerial image only
    train_text: Literal["first", "random"] = "first"  # the training sentence (PROTOCOL 2)
    img_size: int = 64  # images are resized to H x H (pretrained backbones: their size)
    resize: Literal["crop", "squash", "clip"] = "crop"  # centre square, whole, or as CLIP
    cache: str = ""  # the image cache `prepare` writes (default: DATA/cache)
    workers: int = min(8, os.cpu_count() or 1)  # DataLoader worker processes
    seed: int = 0  # seeds the hold-out, the sampling, the jitter and the initial weights
    device: str = ""  # cuda or cpu (default: cuda when a GPU is visible)
    # model
    preset: Literal["", "paper"] = ""  # paper: the authors' baseline (needs --clip)
    clip: str = ""  # a Hugging Face CLIP folder, for the clip backbones
    modalities: str = "GSTC"  # the modalities to train: two or more of G S T C
    embed_dim: int = 128  # width D of the shared space (the authors: 512)
    image_backbone: BACKBONE = "small"  # small: a CNN; clip: CLIP's; or torchvision's
    text_backbone: Literal["small", "clip"] = "small"  # small: a transformer; or CLIP's
    pretrained: bool = False  # torchvision's backbones start from their ImageNet weights
    freeze: str = ""  # encoders whose backbone stays fixed, heads trained: G,S or ground,...
    head: Literal["linear", "mlp", "geoclip", "none"] = "linear"  # G, S, T projection heads
    img_width: int = 32  # channels of the small CNN's first stage (a multiple of 8)
    share_image_trunk: bool = False  # ground and aerial views share one backbone
    vocab_size: int = 2000  # BPE vocabulary of the small text encoder
    max_len: int = 40  # tokens per sentence (CLIP: 77)
    text_width: int = 128  # small text transformer's width (a multiple of 64, or below)
    text_layers: int = 2  # small text transformer's layers
    gps_width: int = 256  # GPS MLP width (GeoCLIP: 1024)
    gps_depth: int = 2  # GPS MLP hidden layers per scale (GeoCLIP: 3)
    gps_scaling: bool = True  # Equal Earth scaled by SF/180, as GeoCLIP (the authors: no)
    # training
    loss: Literal["complete", "imagebind"] = "complete"  # every pair, or ground with each
    batch_size: int = 128  # the global batch, split across torchrun's processes
    epochs: int = 25  # passes over the training landmarks, one sample of each
    max_steps: int = 0  # stop after this many steps (0: --epochs)
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    recipe: Literal["mml", "paper"] = "mml"  # optimisation and jitter (see train_step)
    bf16: bool = True  # bf16 autocast on GPUs that have it (the CPU: float32)
    compile: bool = False  # torch.compile the model
    log_every: int = 10  # steps between log lines
    out: str = "runs/mml"  # run folder (eval: the ckpt's; synth: the world; convert: a file)
    resume: bool = False  # continue the run in --out from its last.pt, exactly
    overwrite: bool = False  # start over in an --out that holds a run
    select: Literal["recall", "loss"] = "recall"  # best.pt: best validation R@1, or loss
    # evaluation and the tools
    ckpt: str = ""  # the checkpoint (default: OUT/best.pt)
    tasks: str = ""  # comma-separated tasks, e.g. G2S,T2C-no_cues (default: all 13)
    chunk: int = 512  # queries scored at once: memory about 6 bytes x chunk x gallery
    eval_batch: int = 256  # batch of embedding, in evaluation and locate
    viz: bool = False  # also draw result grids and the training curves
    inputs: tuple = ()  # photos to locate (aerial images with --satellite)
    text: tuple = ()  # a description to locate (repeatable)
    satellite: bool = False  # the inputs are aerial images
    top: int = 5  # places per input
    gallery: str = ""  # a lat,lon[,name] CSV of places (default: index tiles, train landmarks)
    json: bool = False  # answer with one JSON list on standard output
    source: str = ""  # a CLIP folder, the authors' weights_best.pth or GeoCLIP's weights
    runs: tuple = ()  # run or eval folders; the first is the baseline
    latex: bool = False  # also print the table in LaTeX
    resamples: int = 1000  # bootstrap resamples of the query landmarks
    splits: str = "train,query,index"  # splits `prepare` decodes into the cache
    phases: str = "steps,loader,rank,towers,paper"  # what `bench` times, in order
    bench_queries: int = 200  # queries timed for the per-query baseline

# The authors' baseline (PROTOCOL 5; their train.py and configs/mml_clip.yaml): frozen CLIP
# towers, one for both image views, MLP heads, GeoCLIP's GPS encoder from scratch without
# the scaling, squashed images, their optimisation and jitter, selection by validation loss.
# The image size and the 77 tokens come from the --clip folder.
PRESETS = {"paper": {
    "image_backbone": "clip", "text_backbone": "clip", "share_image_trunk": True,
    "freeze": "GST", "head": "mlp", "embed_dim": 512, "gps_width": 1024, "gps_depth": 3,
    "gps_scaling": False, "resize": "squash", "modalities": "GSTC", "loss": "complete",
    "train_text": "first", "lr": 1e-4, "weight_decay": 5e-4, "recipe": "paper",
    "batch_size": 512, "epochs": 20, "n_val": 1024, "holdout": "authors", "select": "loss"}}

# The modalities by letter, and the names the command line and the API also accept.
MODALITY = {"G": "ground", "S": "satellite", "T": "text", "C": "gps"}
LETTER = {name: m for m, name in MODALITY.items()}

class UserError(Exception):
    """A mistake in the input (a path, a file, an option): one line, exit status 1."""

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
    whole one was. A failed write (a full disk, a read-only folder) is one line and leaves
    no .tmp behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch.save reports a full disk as a RuntimeError
        if isinstance(e, (OSError, RuntimeError)):
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"{path}: could not be written ({why})") from None
        raise

def writable_folder(path: Path, option: str) -> Path:
    """The folder, made if need be and proven writable before any work that a failed write
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
# The released layout (PROTOCOL 1): per split a CSV of landmarks with their GPS and one CSV
# per modality listing file ids; the files sharded by id under split/{ground,satellite,text}/
# a/b/c/. Read with the csv module into plain lists: 800k index rows take about a second.

def shard(split_dir: Path, kind: str, image_id: str) -> Path:
    """ROOT/split/kind/a/b/c/id.ext: the released sharding by the id's first three letters."""
    ext = {"ground": ".jpg", "satellite": ".png", "text": ".json"}[kind]
    return split_dir / kind / image_id[0] / image_id[1] / image_id[2] / (image_id + ext)

@dataclass
class Split:
    """One split's landmarks as parallel lists: row i describes one landmark."""
    dir: Path  # ROOT/train or ROOT/query
    ids: np.ndarray  # (n,) landmark ids
    latlon: np.ndarray  # (n, 2) degrees
    ground: list[list[str]]  # ground photo ids
    sat: list[list[str]]  # aerial image ids of every year, oldest first
    latest: list[str]          # the latest aerial image (the query split's evaluation view)
    text: list[str]  # Wikipedia article (json) id
    no_cues: list[str] | None  # first sentence without geographic cues (query split only)
    text_order: list[int]  # the rows in the order mml_{split}_text.csv lists them

    def take(self, rows) -> "Split":
        rows = list(rows)
        lists = [None if xs is None else [xs[i] for i in rows] for xs in
                 (self.ground, self.sat, self.latest, self.text, self.no_cues)]
        new_row = {old: new for new, old in enumerate(rows)}
        order = [new_row[r] for r in self.text_order if r in new_row]
        return Split(self.dir, self.ids[rows], self.latlon[rows], *lists, order)

def read_split(root: Path, split: str, outdoor_only: bool = False) -> Split:
    """Read ROOT/{train,query}: landmarks, GPS, file lists, article ids (PROTOCOL 1)."""
    d, p = check_root(root, split), f"mml_{split}"
    listing = d / f"{p}.csv"
    meta = read_csv(listing, ["landmark_id", "lat", "lon"])
    ids = np.array(unique_landmarks(listing, meta), dtype=np.int64)
    latlon, listed = parse_latlon(listing, meta), ids.tolist()

    def column(name: str, values: str = "images", partial: bool = False) -> dict:
        return by_landmark(d / f"{p}_{name}.csv", values, listing, listed, partial)
    ground = column("ground_subset" if outdoor_only else "ground", partial=outdoor_only)
    sat = latest = column("satellite")
    if split == "query":  # it lists the latest aerial image alone, and every year apart
        sat, no_cues = column("all_satellite"), column("text_sentences", "sentences")
    # each landmark's aerial ids are listed oldest first: the last is the latest
    latest = {i: (s.split() or [""])[-1] for i, s in latest.items()}
    text = column("text", "json")
    # the outdoor subset leaves out landmarks with no outdoor photo
    keep = [n for n, i in enumerate(listed) if ground.get(i, "").split() and sat[i].split()]
    if len(keep) < len(ids):
        print0(f"{d}: {len(ids) - len(keep)} landmarks without ground or aerial images skipped")
    rows = ids[keep].tolist()
    row_of = {i: n for n, i in enumerate(rows)}
    return Split(d, ids[keep], latlon[keep], [ground[i].split() for i in rows],
                 [sat[i].split() for i in rows], [latest[i] for i in rows],
                 [text[i] for i in rows], [no_cues[i] for i in rows] if split == "query" else
                 None, [row_of[i] for i in text if i in row_of])  # dicts keep the CSV's order

def by_landmark(path: Path, column: str, listing: Path, ids: list[int],
                partial: bool = False) -> dict:
    """{landmark id: value} of one CSV of a split, checked both ways against the split's
    listing (partial: the CSV may leave some out, as the outdoor subset does)."""
    table = read_csv(path, ["landmark_id", column], ids=(column,) * (column != "sentences"))
    values, known = dict(zip(unique_landmarks(path, table), table[column])), set(ids)
    extra = [i for i in values if i not in known]
    absent = [] if partial else [i for i in ids if i not in values]
    for missing, here, there in ((extra, listing, path.name), (absent, path, listing.name)):
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(f"{here}: landmark {', '.join(map(str, missing[:5]))}{more} listed "
                            f"in {there} but missing here")
    return values

def read_train(cfg: Config, root: Path) -> tuple[Split, Split]:
    """The training split minus a hold-out: (train, validation). Seeded by --seed, or the
    authors' (their train_dataset.py): random.Random(42) shuffles the positions of the sorted
    landmark ids, and the first n_val are held out."""
    split = read_split(root, "train", cfg.outdoor_only)
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
# release's ids are 16 hex digits.
PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{3,}")

def read_csv(path: Path, columns: list[str], ids: tuple = (), lower: bool = False,
             optional: tuple = ()) -> dict:
    """One CSV as {column: values}: UTF-8 text, the columns there (and the `optional` ones
    that are; lower: headers in any case), every row whole, the `ids` columns holding
    space-separated plain ids only."""
    if not path.is_file():
        raise UserError(f"{path}: file not found (a CSV with columns {','.join(columns)})")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the header
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte {data[e.start]:#04x})"
                        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header, *rows = list(reader) or [[]]
    except csv.Error as e:
        raise UserError(f"{path}, line {reader.line_num}: not a CSV row ({e})") from None
    header = [h.strip().lower() for h in header] if lower else header
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (expected {','.join(columns)}, found "
                        f"{','.join(header)})")
    short = next((n for n, r in enumerate(rows, 2) if len(r) < len(header)), None)
    if short is not None:
        raise UserError(f"{path}, line {short}: {len(rows[short - 2])} fields, expected "
                        f"{len(header)}")
    table = {c: [r[header.index(c)] for r in rows]
             for c in columns + [c for c in optional if c in header]}
    for c in ids:
        for n, cell in enumerate(table[c], 2):
            bad = [i for i in cell.split() if not PLAIN_ID.fullmatch(i)]
            if bad:
                raise UserError(f"{path}, line {n}: {c} {bad[0]!r} is not a plain id (letters, "
                                f"digits, _ and -, at least 3 of them)")
    return table

def parse_numbers(path: Path, table: dict, columns: list[str], dtype) -> np.ndarray:
    """(N, len(columns)) numbers from CSV columns; a bad cell is one line naming its line."""
    try:
        return np.array([table[c] for c in columns], dtype=dtype).T
    except ValueError:
        for n, row in enumerate(zip(*(table[c] for c in columns)), 2):
            try:
                [dtype(v) for v in row]
            except ValueError:
                raise UserError(f"{path}, line {n}: {','.join(row)} is not a number") from None
        raise

def unique_landmarks(path: Path, table: dict) -> list[int]:
    """The landmark_id column as integers, each listed once: a repeated row would count its
    landmark's queries twice."""
    keys = parse_numbers(path, table, ["landmark_id"], int)[:, 0].tolist()
    first = {}
    for n, k in enumerate(keys, 2):
        if first.setdefault(k, n) != n:
            raise UserError(f"{path}, line {n}: landmark {k} again (first on line {first[k]})")
    return keys

def parse_latlon(path: Path, table: dict) -> np.ndarray:
    """(N, 2) latitude and longitude in degrees; NaN or out of range is one line."""
    latlon = parse_numbers(path, table, ["lat", "lon"], float)
    ok = (np.abs(latlon[:, 0]) <= 90) & (np.abs(latlon[:, 1]) <= 180)  # False for NaN too
    if not ok.all():
        n = int(np.argmin(ok))
        raise UserError(f"{path}, line {n + 2}: GPS ({latlon[n, 0]}, {latlon[n, 1]}) is not "
                        f"a latitude in [-90, 90] and a longitude in [-180, 180]")
    return latlon

def check_root(root: Path, sub: str) -> Path:
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found (expected the MMLandmarks layout: "
                        f"mmlandmarks.csv, train/, query/, index/)")
    if not (root / sub).is_dir():  # --data ROOT/train, say, for ROOT
        hint = f"; the root is {root.parent}" if (root.parent / sub).is_dir() else ""
        raise UserError(f"{root / sub}: split folder not found (expected mml_{sub}*.csv and "
                        f"ground/, satellite/ inside{hint})")
    return root / sub

# Images: decoded to H x H uint8, from the files or from the `prepare` cache. Bounds on what
# one input may cost: the release's photos are about 800 px and its articles well under a
# megabyte; a file past these is unreadable, as a corrupt one is.
MAX_PIXELS = 50_000_000  # a decoded image (after draft): 50 megapixels, 150 MB of RGB
MAX_ARTICLE_BYTES = 1 << 24  # an article: 16 MiB of JSON

class UnreadableFile(Exception):
    """A data file (image or article) that is missing or cannot be decoded."""

def regular_file(path: Path) -> Path:
    """path, if it names a regular file (a FIFO would block a read, /dev/zero never end it)."""
    if not path.is_file():
        raise ValueError("not a regular file" if path.exists() else "not found")
    return path

def read_text(path: Path, limit: int) -> str:
    """A regular file's UTF-8 text, of at most `limit` bytes; else ValueError or OSError."""
    size = regular_file(path).stat().st_size
    if size > limit:
        raise ValueError(f"{size:,} bytes, over the {limit:,} allowed")
    return path.read_text(encoding="utf-8")

def to_square(im: Image.Image, size: int, resize: str = "crop") -> np.ndarray:
    """An RGB image -> (H, H, 3) uint8. crop: the short side to H (bilinear), then the centre
    square. squash: the whole image to H x H, as the authors' OpenCV INTER_LINEAR_EXACT, which
    torch's bilinear without antialiasing matches to within one grey level (PIL's bilinear
    antialiases: up to 96 off). clip: as CLIP's image processor, the short side to H
    (bicubic), then the centre square."""
    if resize == "crop":
        return np.array(ImageOps.fit(im, (size, size), Image.BILINEAR))
    if resize == "squash":
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float()  # (1, 3, h, w)
        x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False,
                          antialias=False)
        return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    short, long = sorted(im.size)
    long = int(size * long / short)  # as transformers' get_resize_output_image_size rounds
    im = im.resize((size, long) if im.width == short else (long, size), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.array(im.crop((left, top, left + size, top + size)))

def load_image(path: Path, size: int, resize: str = "crop") -> np.ndarray:
    """(H, H, 3) uint8, decoded and resized by `to_square`. For --resize crop, draft() lets the
    JPEG decoder work at 1/2, 1/4 or 1/8 scale, never below H: 800-px photos decode 2-3x
    faster; the other modes decode in full, as the code they follow does."""
    with Image.open(regular_file(path)) as im:
        if resize == "crop":
            im.draft("RGB", (size, size))
        if im.width * im.height > MAX_PIXELS:  # known from the header, before decoding
            raise ValueError(f"{im.width}x{im.height} px, over the {MAX_PIXELS:,}-pixel limit")
        return to_square(im.convert("RGB"), size, resize)

class ImageStore:
    """Decoded H x H images of one split and kind (ground or satellite), looked up by id:
    from the `prepare` cache when it holds them (a uint8 array (n, H, H, 3) beside a JSON
    manifest of ids), else from the files. A cache made for another size or --resize, one
    that lacks images of this run, or one whose array is not whole, is refused, never used."""

    def __init__(self, split_dir: Path, kind: str, size: int, cache: Path | None = None,
                 needed=(), resize: str = "crop"):
        self.dir, self.kind, self.size, self.resize = split_dir, kind, size, resize
        self.row_of, self.file, self.pid = None, None, None
        self.array = cache / f"{split_dir.name}_{kind}.u8" if cache else None
        manifest = self.array.with_suffix(".json") if cache else None
        if not (manifest and manifest.is_file()):
            return
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            types = [isinstance(m[k], t) for k, t in
                     (("size", int), ("ids", list), ("broken", list), ("resize", str))]
        except (OSError, ValueError, KeyError, TypeError) as e:
            types = [f"{type(e).__name__}: {e}"]
        if not all(t is True for t in types):
            raise UserError(f"{manifest}: not a cache manifest mml wrote ({types[-1]}); move it "
                            f"away and rerun `prepare`")
        if (m["size"], m["resize"]) != (size, resize):
            raise UserError(f"{manifest}: the cache holds {m['size']} px images made by "
                            f"--resize {m['resize']}, not --img-size {size} --resize {resize}")
        whole = max(1, len(m["ids"])) * size * size * 3  # an empty list keeps one row
        found = self.array.stat().st_size if self.array.is_file() else 0
        if found != whole:
            raise UserError(f"{self.array}: {found} bytes where its manifest promises {whole} "
                            f"({len(m['ids'])} images): the cache is not whole; rerun `prepare`")
        self.row_of, self.broken = {i: n for n, i in enumerate(m["ids"])}, set(m["broken"])
        lacking = [i for i in needed if i not in self.row_of]
        if lacking:
            raise UserError(f"{manifest}: the cache lacks {len(lacking)} images of this run "
                            f"(first: {lacking[0]}); the file list changed: rerun `prepare`")

    def path(self, image_id: str) -> Path:
        return shard(self.dir, self.kind, image_id)

    def __getstate__(self):
        return {**self.__dict__, "file": None}  # reopened in each worker, not pickled into it

    def __call__(self, image_id: str, out: np.ndarray | None = None) -> np.ndarray:
        """The image as (H, H, 3) uint8, written into `out` when given (a batch's slot)."""
        out = np.empty((self.size, self.size, 3), np.uint8) if out is None else out
        if self.row_of is None:
            try:
                out[...] = load_image(self.path(image_id), self.size, self.resize)
                return out
            except Exception as e:  # missing, truncated, not an image: decoders raise all sorts
                raise UnreadableFile(f"{self.path(image_id)}: {e}") from None
        if image_id in self.broken:
            raise UnreadableFile(f"{self.path(image_id)}: could not be decoded when cached")
        # One read straight into place: 5-10x faster than copying out of a memory map, whose
        # first touch of each page faults. Each process opens the file itself: forked workers
        # sharing one descriptor would share its read position.
        if self.pid != os.getpid():
            self.file, self.pid = open(self.array, "rb", buffering=0), os.getpid()
        self.file.seek(self.row_of[image_id] * out.nbytes)
        if self.file.readinto(out) != out.nbytes:  # the array was cut short while in use
            raise UnreadableFile(f"{self.array}: ends before image {image_id}")
        return out

def cache_dir(cfg: Config, root: Path) -> Path:
    """Where the image and tower caches of a dataset live: --cache, or ROOT/cache."""
    return Path(cfg.cache) if cfg.cache else root / "cache"

# Text: every article read, split into sentences and tokenised once, before training.

def read_article(path: Path) -> dict:
    """A Wikipedia article: an ordered {section title: text}, paragraphs split by newlines."""
    try:
        article = json.loads(read_text(path, MAX_ARTICLE_BYTES))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
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
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=cfg.max_len)  # SmallText masks 0
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
        for article in articles:  # an unreadable article (None) gives one empty sentence
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
        if tok is not None:  # evaluation draws its few sentences as texts
            self.tokens = torch.cat([tokenize(tok, self.texts[i:i + 65536])  # (P, L)
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
    "T": (B, L) ids, "C": (B, 2) lat/lon, "bad": B strings naming unreadable files}. Training
    draws a random photo, a random year's aerial image (the latest with --last-sat-only) and
    a --train-text sentence; validation the first photo, the latest tile, the first sentence.
    A sample's randomness is seeded by (seed, epoch, row), whichever worker draws it, so
    --resume is exact. An unreadable file is skipped for another view and listed in "bad".

    Whole batches, not samples: in a worker the arrays are made in shared memory and each
    image is read straight into its slot, sparing the two copies of every pixel that
    collating samples costs (2x a worker's throughput). They are (B, H, H, 3) as stored, so
    their (B, 3, H, H) view is channels-last, the layout GPU convolutions run fastest in."""

    def __init__(self, split: Split, stores: dict, sentences: Sentences, cfg: Config,
                 train: bool):
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
        images = {m: torch.empty(B, side, side, 3, dtype=torch.uint8)
                  for m in "GS" if m in mods}
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
        out = {m: x.permute(0, 3, 1, 2) for m, x in images.items()}  # (B, 3, H, H)
        if "T" in mods:
            out["T"] = self.sentences.tokens[tokens]  # (B, L)
        if "C" in mods:
            out["C"] = torch.tensor(s.latlon[rows], dtype=torch.float32)  # (B, 2)
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

def augment_params(seed: int, epoch: int, step: int, n: int, recipe: str = "mml"):
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
    if recipe == "paper":  # drawn after mml's, which therefore stay as they were
        hue, jittered = torch.from_numpy(rng.random((n, 2, 2))).unbind(-1)  # each (n, 2)
        on = (jittered < 0.5).double()
        params[..., :3] = 1 + on[..., None] * 0.3 * (u[..., :3] - 0.5)  # [0.85, 1.15]
        params[..., 6] = on * 0.3 * (hue - 0.5)  # [-0.15, 0.15]
        params[..., 3] = u[..., 3] * 0.4 / 0.3  # r < 0.2 for 15%, r < 0.4 for 30%
    params[..., 5] = params[..., 5].floor()
    return params.float()

def rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, H) in [0, 1], (B,) -> hue shifted by that fraction of the colour circle: a
    rotation of RGB space about its grey axis (Rodrigues' formula), which keeps greys and
    brightness and approximates HSV's hue shift (albumentations', torchvision's) without a
    round trip through HSV."""
    angle = 2 * math.pi * turns.view(-1, 1, 1)  # (B, 1, 1)
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
    x = (x * bright).clamp(0, 1)  # each param (B, 1, 1, 1)
    x = (contrast * x + (1 - contrast) * grayscale(x).mean((2, 3), keepdim=True)).clamp(0, 1)
    x = (sat * x + (1 - sat) * grayscale(x)).clamp(0, 1)
    if hue:
        x = rotate_hue(x, shift.view(-1))
    # blur (r < 0.2) with the separable Gaussian kernel [w, 1, w] / (1 + 2w), w = exp(-1 /
    # (2 sigma^2)), over a reflect-padded image, along rows then columns
    blur = (r < 0.2).view(-1)
    w = torch.exp(-0.5 / sigma[blur]**2)
    pad = F.pad(x[blur], (1, 1, 1, 1), mode="reflect")  # (b, 3, H+2, H+2)
    rows = (pad[..., :-2] + pad[..., 2:]) * w + pad[..., 1:-1]  # (b, 3, H+2, H)
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
# for text, CLIP's towers for both (built from this section's Block, in the section on
# outside models), GeoCLIP's location encoder for GPS. GroupNorm rather than BatchNorm in the
# CNN: a sample's embedding must not depend on the rest of its batch (in evaluation, or on
# another GPU's share of the batch).

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
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(width, hidden),
                                  "fc2": nn.Linear(hidden, width)})

    def forward(self, x, keep=None, causal: bool = False):
        """keep: (B, L), False at padding, which no token attends to; causal: each token sees
        only itself and those before it (CLIP's text)."""
        B, L, W = x.shape
        y = self.layer_norm1(x)
        q, k, v = (self.self_attn[p](y).view(B, L, self.heads, -1).transpose(1, 2)
                   for p in ("q_proj", "k_proj", "v_proj"))  # (B, heads, L, W/heads)
        mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, L)
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
        keep = ids != 0  # (B, L)
        # an empty sentence keeps one token: an all-masked row would be NaN
        keep[:, 0] = True
        x = self.tokens(ids) + self.pos[: ids.shape[1]]  # (B, L, width)
        for block in self.blocks:
            x = block(x, keep)
        weight = keep.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (self.norm(x) * weight).sum(1) / weight.sum(1)  # (B, width)

def backbone_weights(name: str):
    """torchvision's ImageNet weights of a backbone: their URL, image size, pixel statistics."""
    return torchvision.models.get_model_weights(name).DEFAULT

def image_backbone(cfg: Config) -> tuple[nn.Module, int]:
    """(B, 3, H, H) normalised pixels -> (B, E) features: (module, E). `small` is the CNN
    above, `clip` the vision tower of the --clip folder; the others are torchvision's ImageNet
    classifiers with their classifier layer removed (our head projects to D instead). Random
    weights here: `train` loads pretrained ones, and `eval` the checkpoint's."""
    if cfg.image_backbone == "small":
        return image_trunk(cfg.img_width), 8 * cfg.img_width
    if cfg.image_backbone == "clip":
        return clip_tower(cfg.clip, "vision")
    size = {"image_size": cfg.img_size} if cfg.image_backbone == "vit_b_16" else {}
    net = torchvision.models.get_model(cfg.image_backbone, weights=None, **size)
    if cfg.image_backbone.startswith("resnet"):
        width, net.fc = net.fc.in_features, nn.Identity()
    elif cfg.image_backbone == "convnext_tiny":
        width, net.classifier[2] = net.classifier[2].in_features, nn.Identity()
    else:
        width, net.heads = net.heads.head.in_features, nn.Identity()
    return net, width

def projection_head(cfg: Config, width: int) -> nn.Module:
    """(B, E) -> (B, D): one Linear (mml's); Linear-ReLU-Linear with a hidden width of D (the
    authors') or of E (GeoCLIP's); or none, the backbone's own output (CLIP's towers end in
    their own projection)."""
    if cfg.head == "none":
        if width != cfg.embed_dim:
            raise UserError(f"--head none: the backbone's output is {width}-d, not --embed-dim "
                            f"{cfg.embed_dim}")
        return nn.Identity()
    if cfg.head in ("mlp", "geoclip"):
        hidden = cfg.embed_dim if cfg.head == "mlp" else width
        return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(),
                             nn.Linear(hidden, cfg.embed_dim))
    return nn.Linear(width, cfg.embed_dim)

# CLIP's pixel statistics (its image processor's image_mean and image_std)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

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
        """The backbone's output (B, E): what the frozen-tower cache of `eval` holds."""
        if self.pixels:
            x = ((x.float() / 255 if x.dtype == torch.uint8 else x) - self.mean) / self.std
        return self.trunk(x)

    def project(self, features):
        return F.normalize(self.head(features).float(), dim=-1)

    def forward(self, x):
        return self.project(self.features(x))

def image_encoder(cfg: Config, share_with: Encoder | None = None) -> Encoder:
    """A ground or aerial encoder; with share_with, on that one's backbone (its own head)."""
    if share_with:
        trunk, width = share_with.trunk, share_with.width
    else:
        trunk, width = image_backbone(cfg)
    # small: [0, 1] to [-1, 1]; the others: the statistics their weights expect
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
        return Encoder(*clip_tower(cfg.clip, "text"), cfg)
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
            phase = 2 * math.pi * v.float() @ self.b.T  # (B, n)
            return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)

class GPSEncoder(nn.Module):
    """(B, 2) lat/lon degrees -> (B, D): GeoCLIP's location encoder (Vivanco et al. 2023).

    Equal Earth projection, then per scale sigma in (2^0, 2^4, 2^8) random Fourier features
    and an MLP with a linear head; the three scales' outputs are summed. Module names follow
    GeoCLIP (LocEnc{k}.capsule / .head), so at width 1024, depth 3 and D = 512 its pretrained
    state dict loads unchanged (load_state_dict, or `convert`). `scaled`: the projection's
    SF/180 scaling, which GeoCLIP's weights need and the authors' copy, trained from scratch,
    leaves out (PROTOCOL 6).
    """
    SIGMAS = (2**0, 2**4, 2**8)

    def __init__(self, width: int, depth: int, dim: int, scaled: bool = True,
                 n_freq: int = 256):
        super().__init__()
        self.scaled = scaled
        for k, sigma in enumerate(self.SIGMAS):
            layers, d = [RandomFourierFeatures(n_freq, sigma)], 2 * n_freq
            for _ in range(depth):
                layers += [nn.Linear(d, width), nn.ReLU()]
                d = width
            self.add_module(f"LocEnc{k}", nn.ModuleDict({
                "capsule": nn.Sequential(*layers), "head": nn.Sequential(nn.Linear(d, dim))}))

    def forward(self, latlon):
        v = equal_earth(latlon.float(), self.scaled)  # (B, 2)
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
            enc["C"] = GPSEncoder(cfg.gps_width, cfg.gps_depth, cfg.embed_dim,
                                  cfg.gps_scaling)
        self.enc = nn.ModuleDict(enc)
        # CLIP's initial temperature 0.07, learnt in log space (Radford et al. 2021)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.frozen = [f for f in cfg.freeze if f in self.enc]
        backbone = {"G": cfg.image_backbone, "S": cfg.image_backbone, "T": cfg.text_backbone}
        self.frozen_clip = [f for f in self.frozen if backbone.get(f) == "clip"]
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
        return tuple(f"enc.{m}.trunk." for m in self.frozen_clip)

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
    cols = {m: GatherWithGrad.apply(e) if world > 1 else e  # (W*B, D)
            for m, e in emb.items()}
    B = next(iter(emb.values())).shape[0]
    offset = dist.get_rank() * B if world > 1 else 0  # our rows among the gathered columns
    labels = torch.arange(B, device=scale.device) + offset
    parts = {}
    for a, b in pairs:
        logits_ab = scale * emb[a] @ cols[b].T  # (B, W*B)
        logits_ba = scale * emb[b] @ cols[a].T  # (B, W*B)
        parts[a + b] = (F.cross_entropy(logits_ab, labels)
                        + F.cross_entropy(logits_ba, labels)) / 2
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
    ties among 100k+ gallery items."""
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
    n_good = torch.searchsorted(sorted_labels, q_labels, right=True) - start  # (Q,)
    if bool((n_good == 0).any()):
        raise ValueError(f"query {int(torch.nonzero(n_good == 0)[0])} has no positive in the "
                         f"gallery")
    slots = torch.arange(int(n_good.max()), device=g_labels.device)  # (P,)
    index = by_label[(start[:, None] + slots).clamp(max=len(g_labels) - 1)]  # (Q, P)
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
    pos_index, is_pos, n_good = positives(q_labels, g_labels)  # (Q, P) ...
    K = min(map_top, N)
    zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype,
                                                         device=g.device)
    res = {"first_strict": zeros(Q), "first_official": zeros(Q), "match": zeros(Q),
           "ap_strict": zeros(Q, dtype=torch.float64), "top": zeros(Q, min(top, N)),
           "ap_official": zeros(Q, dtype=torch.float64)}
    with matmul_precision("highest"):
        for s in range(0, Q, chunk):
            part = slice(s, s + chunk)
            scores = q[part].float() @ g.float().T  # (c, N)
            top_scores, top_index = scores.topk(K, dim=1)  # (c, K) best first
            res["top"][part] = top_index[:, :res["top"].shape[1]]
            pos = scores.gather(1, pos_index[part]).masked_fill(~is_pos[part], -math.inf)
            res["match"][part] = pos_index[part].gather(1, pos.argmax(1, keepdim=True))[:, 0]
            pos = pos.sort(dim=1, descending=True).values  # (c, P) best first
            # the first positive, counted against the whole gallery
            t = pos[:, :1]
            junk_above, labelled_above = count_at_least(scores, t, n_junk)
            # the query split's non-positives scoring at least as high
            official = labelled_above - (pos >= t).sum(1)
            res["first_official"][part] = official
            res["first_strict"][part] = official + junk_above
            # every positive within the top K, counted among the top K scores alone
            top_is_junk = top_index < n_junk  # (c, K)
            # the K-th best score: lower ones are out of the top K
            cutoff = top_scores[:, -1:]
            for j in range(pos.shape[1]):
                t = pos[:, j:j + 1]  # (c, 1)
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
        recall = {f"R@{k}": 100 * (ranks[f"first_{p}"] < k).double().mean().item()
                  for k in ks}
        out[p] = {**recall, m: 100 * ranks[f"ap_{p}"].mean().item(), "medR": med}
    return out

def retrieval_metrics(query_emb, gallery_emb, query_labels, gallery_labels, ks=(1, 5, 10),
                      map_top=1000) -> dict:
    """Official and strict R@k, mAP@map_top and medR of a retrieval task (PROTOCOL 4)."""
    ranks = rank_queries(query_emb, gallery_emb, query_labels, gallery_labels, map_top)
    return summarise(ranks, ks, map_top)

def geo_metrics(km: torch.Tensor) -> dict:
    """% of predictions within 1, 25, 200, 750, 2500 km of the truth, and the median error:
    from each query's error in km, (Q,)."""
    within = {f"acc@{t}km": 100 * (km <= t).double().mean().item()
              for t in (1, 25, 200, 750, 2500)}
    return within | {"median_km": float(np.median(km.cpu().numpy()))}

# ---- train --------------------------------------------------------------------------------
# One process per GPU under torchrun (nanoGPT's shape): RANK in the environment means
# distributed; process 0 logs, validates and writes checkpoints while the others wait at a
# barrier. Without torchrun all of this reduces to rank 0 of 1 and no extra code runs.
# `fit` runs the phases; the loop is its last screen, and the work of a step is `train_step`.
# Reading checkpoints back (`load_checkpoint`, `restore`) and outside weights
# (`load_pretrained`, `clip_tokenizer`) come after evaluation, with their other users.

def setup_distributed(cfg: Config):
    """Join the torchrun group if there is one: NCCL on GPUs, gloo on the CPU."""
    if "RANK" in os.environ and not dist.is_initialized():
        cuda = cfg.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

def device_of(cfg: Config) -> torch.device:
    """Where this process computes: --device, else its GPU when one is visible."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

def bf16_on(device: torch.device, cfg: Config) -> bool:
    return device.type == "cuda" and cfg.bf16 and torch.cuda.is_bf16_supported()

def autocast_for(device: torch.device, cfg: Config):
    """bf16 autocast on a GPU that has it, else a no-op: the one mixed-precision switch."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_on(device, cfg))

def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor to the device; pinned memory makes the copy asynchronous (non_blocking)."""
    x = x.to(device, non_blocking=True)
    # images: channels-last on a GPU, where convolutions run fastest that way; plain
    # (B, 3, H, H) on the CPU, where the elementwise jitter runs 1.4x faster on it
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return x.contiguous(memory_format=layout) if x.dim() == 4 else x

def batch_to(batch: dict, device: torch.device) -> dict:
    """A loader's batch on the device: its tensors (not its list of unreadable files)."""
    return {m: to_device(x, device) for m, x in batch.items() if torch.is_tensor(x)}

def jitter(inputs: dict, params: torch.Tensor) -> dict:
    """A batch's image views, on their device, augmented by their rows of params (B, 2, 7)."""
    hue = bool(params[..., 6].any())  # on the CPU: no sync
    for k, m in enumerate("GS"):
        if m in inputs:
            x = augment(inputs[m], params[:, k].to(inputs[m].device), m == "S", hue)
            inputs[m] = to_device(x, x.device)  # the device's layout again
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

def training_sets(cfg: Config, ckpt: dict | None) -> tuple:
    """(training set, validation set, tokenizer): the splits, every article read and
    tokenised once, the images' stores (the cache when there is one)."""
    root = Path(cfg.data)
    train_split, val_split = read_train(cfg, root)
    if len(train_split.ids) < 2 or len(val_split.ids) < 2:
        raise UserError(f"{root}: {len(train_split.ids)} training and {len(val_split.ids)} "
                        f"validation landmarks; need at least 2 of each")
    articles, bad = read_articles(train_split)
    val_articles, val_bad = read_articles(val_split)
    if bad or val_bad:
        print0(f"{len(bad + val_bad)} unreadable articles: their landmarks train with an empty "
               f"sentence (first: {(bad + val_bad)[0]})")
    tok = learn_tokenizer(cfg, articles, ckpt)
    both = (train_split, val_split)
    needed = {"G": [i for s in both for g in s.ground for i in g],
              "S": [i for s in both for g in s.sat for i in g]}
    stores = {m: ImageStore(train_split.dir, MODALITY[m], cfg.img_size, cache_dir(cfg, root),
                            needed[m], cfg.resize) for m in "GS"}
    train_set = LandmarkSet(train_split, stores, Sentences(articles, tok, cfg.train_text), cfg,
                            train=True)
    val_set = LandmarkSet(val_split, stores, Sentences(val_articles, tok, "first"), cfg,
                          train=False)
    return train_set, val_set, tok

def make_optimizer(raw: MML, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the trained parameters (frozen ones get no optimizer state). mml: weight
    decay on weight matrices only (not biases, norms, the scale), betas as CLIP's. The
    authors: AdamW(model.parameters(), lr, weight_decay), torch's defaults otherwise."""
    trained = [p for p in raw.parameters() if p.requires_grad]
    if cfg.recipe == "paper":
        return torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = [{"params": [p for p in trained if p.dim() >= 2],
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))

def build_model(cfg: Config, device, ckpt: dict | None, path: Path) -> tuple:
    """(model, optimizer, the frozen towers' record): from the checkpoint at path on
    --resume; else initialised (the same seed on every process: identical weights), with
    pretrained parts from CLIP's folder or torchvision's cache."""
    torch.manual_seed(cfg.seed)
    if ckpt:
        raw, towers = restore(path, ckpt, cfg), ckpt.get("towers")
    else:
        raw = MML(cfg)
        towers = load_pretrained(raw, cfg)
    raw = raw.to(device)
    if device.type == "cuda":
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(raw, cfg)
    if ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: its optimizer state does not fit the model ({e})") from None
        torch.set_rng_state(ckpt["torch_rng"])
    return raw, optimizer, towers

def lr_at(step: int, total: int, cfg: Config) -> float:
    """mml: a linear warmup over the first 5% of the steps, then a cosine decay to zero. The
    authors: constant."""
    warmup = max(1, round(0.05 * total))
    if cfg.recipe == "paper":
        factor = 1.0
    elif step < warmup:
        factor = (step + 1) / warmup
    else:
        factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return cfg.lr * factor

# The validation batch, the authors' batch_size_eval: fixed, so that validation losses of runs
# with other training batches compare (the loss depends on how many negatives a batch holds).
VAL_BATCH = 128

@torch.no_grad()
def validate(model: MML, val_set: LandmarkSet, cfg: Config, pairs: list[str], device) -> dict:
    """Loss over the held-out landmarks in fixed batches, and for each trained pair an in-set
    retrieval R@1 (the first modality's items searching the second's), with their mean
    "val_R@1" (what --select recall picks by): a quick check, not the benchmark."""
    model.eval()
    n, B = len(val_set), min(VAL_BATCH, len(val_set))
    batches = [[(0, i) for i in range(s, min(s + B, n))] for s in range(0, n, B)]
    loader = torch.utils.data.DataLoader(val_set, batch_size=None, sampler=batches,
                                         num_workers=min(cfg.workers, 2))
    total, embs = 0.0, []
    for batch in loader:
        with autocast_for(device, cfg):
            emb, scale = model(batch_to(batch, device))
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

@contextlib.contextmanager
def stop_signals():
    """SIGTERM (a cluster's preemption or time limit) and SIGINT (Ctrl-C) ask the training
    loop to stop: it finishes the step, saves last.pt and exits; a second signal exits at
    once. Yields {"signal": the first one's number, 0 until then}; the handlers that were
    there before come back on exit."""
    state = {"signal": 0}

    def handle(signum, frame):
        if state["signal"]:
            raise SystemExit(128 + signum)
        state["signal"] = signum
        print(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop "
              f"at once)", file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

def ignore_stop_signals(worker_id: int):
    """In loader workers: a scheduler signals the whole process group, and a worker killed by
    it would take the main process's last step with it. The main process decides to stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def training_loader(data: LandmarkSet, sampler: EpochSampler, cfg: Config, device):
    """The training batches, in loader workers (batch_size None: the sampler yields batches)."""
    return torch.utils.data.DataLoader(
        data, batch_size=None, sampler=sampler, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers > 0 else None,
        worker_init_fn=ignore_stop_signals)

def trained_state(model: MML) -> dict:
    """What a checkpoint keeps of the model: everything but its frozen CLIP towers."""
    towers = model.towers()
    return {k: v for k, v in model.state_dict().items() if not k.startswith(towers)}

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
    params = augment_params(cfg.seed, epoch, step, local * world, cfg.recipe)  # (B, 2, 7)
    inputs = jitter(batch_to(batch, device), params[rank * local:(rank + 1) * local])
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
        if cfg.recipe == "paper":  # the authors' clip_grad_value_(100)
            nn.utils.clip_grad_value_(raw.parameters(), 100.0)
        else:
            nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        optimizer.step()
        if cfg.recipe == "mml":  # CLIP caps the scale at 100 so training cannot blow up
            with torch.no_grad():
                raw.logit_scale.clamp_(max=math.log(100.0))
    return losses, scale.detach(), stop_votes > 0

def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"

class TrainLog:
    """Process 0's log: per --log-every steps one line and one log.jsonl record (step, the
    losses, lr, the logit scale, which people watch to diagnose collapse, samples/s, elapsed
    time and ETA); per epoch its validation record."""

    def __init__(self, out: Path, step: int, total: int, batch: int):
        self.file = open(out / "log.jsonl", "a", buffering=1)  # line-buffered: each flushed
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
              f"validation), {skipped} skipped; best validation {select} {best:.3f}; "
              f"checkpoints in {Path(self.file.name).parent}/")
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

# Non-finite losses in a row that stop a run: one is skipped, ten mean the run has diverged.
MAX_BAD_STEPS = 10

def fit(cfg: Config):
    """`train`. Phases: data (`training_sets`, one loader iterator for the whole run), model
    (fresh, or the checkpoint's on --resume), then the loop: per step `train_step`, per
    --log-every steps a log line, per epoch (or on a stop signal) `end_of_epoch`: validate,
    save best.pt and last.pt. Process 0 logs, validates and saves; the others wait."""
    rank, world = rank_and_world()
    out, device = Path(cfg.out), device_of(cfg)
    if rank == 0:  # before any data is read, not at the first save
        writable_folder(out, "--out")
    ckpt = load_checkpoint(out / "last.pt", resume=True) if cfg.resume else None
    train_set, val_set, tok = training_sets(cfg, ckpt)

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
    loader = training_loader(train_set, sampler, cfg, device)

    # No per-rank seed offset is needed (nanoGPT has one for its data): every random draw of
    # the data is keyed by (seed, epoch, row) or by a sample's place in the global batch.
    raw, optimizer, towers = build_model(cfg, device, ckpt, out / "last.pt")
    # best.pt: the lowest validation loss, or the highest mean R@1
    best = ckpt["best"] if ckpt else (math.inf if cfg.select == "loss" else -math.inf)
    if ckpt:
        print0(f"resumed {out / 'last.pt'} at step {step}")
    elif rank == 0 and cfg.overwrite:  # what an earlier run of mml wrote here, nothing else
        for name in ("last.pt", "best.pt", "log.jsonl", "eval/metrics.json"):
            (out / name).unlink(missing_ok=True)
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
           f"({len(val_set)} held out) from {cfg.data}, batch {B} on {world} x {device.type}, "
           f"{steps_per_epoch} steps/epoch, {total} steps")
    log = TrainLog(out, step, total, B) if rank == 0 else None
    saved = {"config": dataclasses.asdict(cfg), "tokenizer": tok.to_str()}  # in every save
    if towers:
        saved["towers"] = towers
    # non-finite losses: in a row now, and in all
    bad_in_row, skipped, unreadable = 0, 0, []
    # TF32 for training, not for scores
    with stop_signals() as stop, matmul_precision("high"):
        for batch in loader:
            epoch = step // steps_per_epoch
            unreadable += [line for s in batch["bad"] for line in s.split("\n") if line]
            lr = lr_at(step, total, cfg)
            losses, scale, stopping = train_step(model, raw, optimizer, batch, cfg, pairs,
                                                 epoch, step, lr, stop["signal"] > 0)
            bad_in_row = 0 if math.isfinite(losses[0]) else bad_in_row + 1
            if bad_in_row:
                skipped += 1
                print0(f"step {step}: loss is {losses[0]}, step skipped")
                if bad_in_row >= MAX_BAD_STEPS:
                    raise UserError(f"{bad_in_row} non-finite losses in a row at step {step}: "
                                    f"stopping; the last good checkpoint is {out / 'last.pt'} "
                                    f"(try a lower --lr)")
            step += 1
            if log and (step % cfg.log_every == 0 or step == total or stopping):
                log.step(epoch, step, dict(zip(["loss"] + list(pairs), losses)), lr, scale)
            epoch_done = step % steps_per_epoch == 0 or step >= total
            if epoch_done or stopping:
                best = end_of_epoch(raw, optimizer, saved, cfg, epoch, step, best, unreadable,
                                    val_set, pairs, device, log, epoch_done)
                unreadable = []
            if stopping and step < total:
                print0(f"stopped at step {step} of {total}: saved {out / 'last.pt'}; continue "
                       f"with `python mml.py train --out {out} --resume`")
                raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    if log:
        log.done(step, skipped, cfg.select, best)

# ---- eval ---------------------------------------------------------------------------------
# PROTOCOL 3: every query ground photo is its own query; the aerial queries are the latest
# tile of each query landmark; galleries are the index distractors (label -1) plus the query
# split's own items; the GPS gallery is the index tiles' centres plus the query landmarks'
# coordinates, and a geolocalisation guess is the top-1 GPS item. Evaluation is in three
# parts: the protocol's sides (the named lists of items a task queries or searches), the
# functions that embed them (`Functions`; an mml checkpoint is one), and `score`, which
# ranks, summarises and writes.

TASKS = ("G2S", "S2G", "G2C", "S2C", "T2G", "T2S", "T2C")
TEXT_MODES = ("first", "random", "no_cues")

@dataclass(frozen=True)
class Task:
    """A task, parsed once from its name (G2S, T2C-no_cues): which modality queries, which
    is searched, and for a sentence task which sentences."""
    name: str
    query: str  # G, S or T
    gallery: str  # G, S or C
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

ALL_TASKS = [Task(t, t[0], t[2]) for t in TASKS if t[0] != "T"] + [
    Task(f"{t}-{m}", "T", t[2], m) for t in TASKS if t[0] == "T" for m in TEXT_MODES]
TASK = {t.name: t for t in ALL_TASKS}  # by name

def task_list(names: str) -> list[Task]:
    """The tasks to run: all of them, or those named (T2C picks T2C in every sentence mode);
    names in any case, spaces allowed after commas."""
    chosen = []
    for name in filter(None, (n.strip().lower() for n in names.split(","))):
        match = [t for t in ALL_TASKS if name in (t.name.lower(), t.name.split("-")[0].lower())]
        if not match:
            raise UserError(f"--tasks: no task {name!r} (known: "
                            f"{', '.join(t.name for t in ALL_TASKS)})")
        chosen += match
    return list(dict.fromkeys(chosen)) or ALL_TASKS

@dataclass
class Index:
    """The distractors: index/mml_index_{ground,satellite}.csv."""
    dir: Path
    ground: list[str]  # GLDv2 ground photo ids
    sat: list[str]  # aerial image ids
    sat_latlon: np.ndarray  # (n, 2) the tiles' centres: the GPS gallery's distractors

def read_index(root: Path) -> Index:
    d = check_root(root, "index")
    sat = read_csv(d / "mml_index_satellite.csv", ["images", "lat", "lon"], ids=("images",))
    return Index(d, read_csv(d / "mml_index_ground.csv", ["images"], ids=("images",))["images"],
                 sat["images"], parse_latlon(d / "mml_index_satellite.csv", sat))

@dataclass
class Side:
    """One side of the protocol: its items in a fixed order, the same for every model."""
    name: str
    modality: str  # what embeds it: G, S (images), T (sentences), C (points)
    labels: torch.Tensor  # (N,) landmark ids; -1 marks a distractor
    ids: list[str]  # image ids; landmark ids for sentences and query points
    latlon: torch.Tensor | None  # (N, 2) float64 degrees, where known
    show: list                   # what a row is: a file path, a sentence, or a place's name
    items: object  # images: [(split folder, kind, ids)]; sentences; (N, 2) points

def image_side(name: str, parts: list, labels: torch.Tensor, latlon=None) -> Side:
    """A side of images: parts (split folder, kind, ids), in order."""
    ids = [i for _, _, part in parts for i in part]
    show = [shard(d, kind, i) for d, kind, part in parts for i in part]
    return Side(name, LETTER[parts[0][1]], labels, ids, latlon, show, parts)

class Protocol:
    """The protocol's sides on one dataset (PROTOCOL 3), each built when a task first asks for
    it. Galleries hold their distractors (label -1) first, then the query split's items."""

    def __init__(self, root: Path):
        self.root, self.query, self.index = root, read_split(root, "query"), read_index(root)
        self.lm = torch.as_tensor(self.query.ids)  # (Q,)
        self.latlon = torch.as_tensor(self.query.latlon, dtype=torch.float64)  # (Q, 2)
        self.sides, self.articles = {}, None  # articles: read once, for first and random

    def side(self, name: str) -> Side:
        if name not in self.sides:
            self.sides[name] = self.build(name)
        return self.sides[name]

    def build(self, name: str) -> Side:
        q, index, kind = self.query, self.index, name.split("_")[-1]
        if name == "query_ground":  # every query photo, labelled with its landmark
            n = torch.tensor([len(g) for g in q.ground])
            return image_side(name, [(q.dir, "ground", sum(q.ground, []))],
                              self.lm.repeat_interleave(n), self.latlon.repeat_interleave(n, 0))
        if name == "query_satellite":  # the latest aerial image of each query landmark
            return image_side(name, [(q.dir, "satellite", q.latest)], self.lm, self.latlon)
        if name in ("gallery_ground", "gallery_satellite"):  # the index's, then the query's
            own, distractors = self.side(f"query_{kind}"), (index.ground if kind == "ground"
                                                             else index.sat)
            labels = torch.cat([torch.full((len(distractors),), -1), own.labels])
            return image_side(name, [(index.dir, kind, distractors), *own.items], labels)
        if name == "gallery_gps":  # the tiles' centres, then each query landmark's own point
            points = torch.cat([torch.as_tensor(index.sat_latlon), self.latlon])
            labels = torch.cat([torch.full((len(index.sat),), -1), self.lm])
            ids = index.sat + [str(i) for i in q.ids.tolist()]
            return Side(name, "C", labels, ids, points, [""] * len(ids), points)
        if name == "open_gps":  # no query landmark: a place the geolocaliser was not given
            points, names = open_gallery(self.root)
            return Side(name, "C", torch.full((len(points),), -1), names, points, names, points)
        return self.sentences(name[len("query_text_"):])

    def sentences(self, mode: str) -> Side:
        """One sentence per query landmark: first, random, or the no_cues sentence of
        mml_query_text_sentences.csv. The random ones are the authors' own draw
        (eval_dataset.py, _load_text_data): one random.Random(42) stream over the rows of
        mml_query_text.csv in file order, a section, a paragraph and a piece each, so they
        are part of the protocol and no option changes them."""
        q, texts = self.query, self.query.no_cues
        if mode != "no_cues":
            if self.articles is None:
                articles, bad = read_articles(q)
                if bad:
                    raise UserError(f"{bad[0]} (evaluation needs every file of the protocol)")
                self.articles = Sentences(articles, None, "random")
            table, rng, texts = self.articles, random.Random(42), [""] * len(q.ids)
            for n in q.text_order:
                texts[n] = table.texts[table.pick(n, mode, rng)]
        ids = [str(i) for i in q.ids.tolist()]
        return Side(f"query_text_{mode}", "T", self.lm, ids, self.latlon, texts, texts)

def open_gallery(root: Path) -> tuple[torch.Tensor, list[str]]:
    """(N, 2) lat/lon and names: the index tiles' centres (no name), then the training
    landmarks (named by their Commons category). Never the query landmarks: they are the test."""
    index, path = read_index(root), check_root(root, "train") / "mml_train.csv"
    train = read_csv(path, ["CommonsCategory", "lat", "lon"])
    latlon = np.concatenate([index.sat_latlon, parse_latlon(path, train)])  # (N, 2) float64
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
def embed(fn, data, what: str, cfg: Config, device, spread: bool = True) -> torch.Tensor:
    """(N, D) float32 embeddings on `device`, in batches of --eval-batch: of an ImageList, a
    list of sentences, or a tensor of points or features, each batch handed to fn on the CPU
    and what it returns checked (batch_rows). With torchrun (and `spread`) each process embeds
    its share, and all receive every row."""
    rank, world = rank_and_world() if spread else (0, 1)
    n, B = len(data), cfg.eval_batch
    lo, hi = n * rank // world, n * (rank + 1) // world
    if isinstance(data, torch.utils.data.Dataset):
        batches = torch.utils.data.DataLoader(
            torch.utils.data.Subset(data, range(lo, hi)), batch_size=B,
            num_workers=cfg.workers, pin_memory=device.type == "cuda")
    else:
        batches = ((data[s:min(s + B, hi)], ()) for s in range(lo, hi, B))
    parts, done, t0, t_print = [], lo, time.time(), time.time()
    for x, errors in batches:
        bad = [e for e in errors if e]
        if bad:  # unlike training: a missing gallery image would change the benchmark
            raise UserError(f"{bad[0]} (evaluation needs every file of the protocol)")
        parts.append(batch_rows(fn(x), len(x), what, parts[0].shape[1] if parts else None,
                                done).to(device))
        done += len(x)
        if time.time() - t_print > 10:
            rate = (done - lo) * world / (time.time() - t0)
            print0(f"  embedding {what}: {done * world}/{n}, {rate:.0f}/s, "
                   f"ETA {fmt_time((n - done * world) / rate)}")
            t_print = time.time()
    emb = torch.cat(parts) if parts else torch.zeros(0, 1, device=device)
    return gather_rows(emb, n) if world > 1 else emb

def batch_rows(out, n: int, what: str, width: int | None = None, first: int = 0):
    """What an encoder returned for a batch of n, held to the protocol: (n, D) floats, D the
    width of its earlier batches, every row finite. Rows are numbered from `first`."""
    out = out if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))
    if out.dim() != 2 or len(out) != n or not out.is_floating_point() or (
            width is not None and out.shape[1] != width):
        raise UserError(f"{what}: the encoder returned {tuple(out.shape)} {out.dtype} for a "
                        f"batch of {n}; expected ({n}, {width or 'D'}) floats")
    finite = torch.isfinite(out).all(1)
    if not bool(finite.all()):
        row = first + int(torch.nonzero(~finite)[0])
        raise UserError(f"{what}: the embedding of row {row} is not finite (NaN or inf)")
    return out.float()

def unit_rows(emb: torch.Tensor, side: Side) -> torch.Tensor:
    """A side's embeddings as unit vectors, which cosine scores need: rows that are not are
    normalised (with a warning); a zero row, which has no direction, is one line. Norms in
    float64: a float32 norm of rows past about 1e19 overflows, and would zero them."""
    norms = emb.double().norm(dim=1, keepdim=True)  # (N, 1)
    if bool((norms == 0).any()):
        row = int(torch.nonzero(norms[:, 0] == 0)[0])
        raise UserError(f"{side.name}: the embedding of row {row} is zero (no direction)")
    off = int(((norms - 1).abs() > 1e-3).sum())
    if off:
        print0(f"warning: {off} rows of {side.name} are not unit vectors; normalising them")
        emb = (emb.double() / norms).float()
    return emb

class Functions:
    """Any encoders, as functions of a batch: {"G" or "S": (B, 3, H, H) uint8 images decoded
    by --resize to img_size, "T": a list of B strings, "C": (B, 2) float64 lat/lon} -> (B, D)
    floats, a tensor or an array. Batches are handed over on the CPU."""

    def __init__(self, fns: dict, cfg: Config):
        self.fns, self.cfg = fns, cfg

    def width(self, m: str) -> int:
        """The width D of modality m's embeddings, from a batch of one blank input."""
        side = self.cfg.img_size
        blank = {"T": ["a"], "C": torch.zeros(1, 2, dtype=torch.float64)}.get(
            m, torch.zeros(1, 3, side, side, dtype=torch.uint8))
        return batch_rows(self.fns[m](blank), 1, f"{MODALITY[m]} encoder").shape[1]

    def embed_side(self, side: Side) -> torch.Tensor:
        data = ImageList(side.items, self.cfg) if side.modality in "GS" else side.items
        return embed(self.fns[side.modality], data, f"{MODALITY[side.modality]} encoder on "
                     f"{side.name}", self.cfg, device_of(self.cfg))

def score(protocol: Protocol, embedder: Functions, cfg: Config, source: dict) -> dict:
    """The tasks of --tasks that the embedder has encoders for (the others are named and
    skipped), each side embedded once and shared between tasks: rank, summarise official and
    strict metrics (and for x2C the geolocalisation, against the protocol's gallery and the
    open one), write each task's CSV and its entry of metrics.json together, with --viz its
    picture; then print the tables. A task whose two sides' widths differ is named before any
    embedding, the others still run, and it ends in an error."""
    rank, _ = rank_and_world()
    device, out, embedded, results, tasks = device_of(cfg), Path(cfg.out) / "eval", {}, {}, []
    for task in task_list(cfg.tasks):
        absent = [m for m in task.query + task.gallery if m not in embedder.fns]
        if absent and cfg.tasks:
            raise UserError(f"task {task.name}: no {MODALITY[absent[0]]} encoder")
        if absent:
            print0(f"skipping {task.name}: no {MODALITY[absent[0]]} encoder")
        else:
            tasks.append(task)
    widths = {m: embedder.width(m) for m in dict.fromkeys(m for t in tasks for m in
                                                             t.query + t.gallery)}
    clash = [f"{t.name}: {MODALITY[t.query]} embeddings are {widths[t.query]}-d, "
             f"{MODALITY[t.gallery]} {widths[t.gallery]}-d; a task's two sides share one space"
             for t in tasks if widths[t.query] != widths[t.gallery]]
    for line in clash:
        print0(f"skipping {line}")
    for task in (t for t in tasks if widths[t.query] == widths[t.gallery]):
        for name in (n for n in task.sides if n not in embedded):
            s = protocol.side(name)
            embedded[name] = s, unit_rows(embedder.embed_side(s), s)
        if rank != 0:  # every process embeds its share above; process 0 ranks and reports
            continue
        (q, q_emb), (g, g_emb) = embedded[task.sides[0]], embedded[task.sides[1]]
        t0 = time.time()
        ranks = rank_queries(q_emb, g_emb, q.labels.to(device), g.labels.to(device),
                             chunk=cfg.chunk)
        res = summarise(ranks) | {"protocol": items_digest(q, g), "queries": len(q.ids),
                                  "gallery": len(g.ids),
                                  "distractors": int((g.labels < 0).sum())}
        columns = per_query(ranks, q, g)
        # the guess is the top-1 point: of the ranking, and of the open gallery
        blocks = [("geo", "", (g, g_emb)), ("geo_open", "open_", embedded.get("open_gps"))]
        for block, prefix, (gallery, emb) in blocks if task.geo else []:
            top = ranks["top"][:, 0] if block == "geo" else nearest(q_emb, emb, cfg.chunk)
            pred = gallery.latlon[top.cpu()]
            km = haversine_km(pred, q.latlon)
            res[block] = geo_metrics(km)
            columns[f"{prefix}pred_lat"] = [f"{v:.6f}" for v in pred[:, 0].tolist()]
            columns[f"{prefix}pred_lon"] = [f"{v:.6f}" for v in pred[:, 1].tolist()]
            columns[f"{prefix}error_km"] = [f"{v:.3f}" for v in km.tolist()]
        print(f"{task.name}: {len(q.ids)} queries x {len(g.ids)} gallery ({res['distractors']} "
              f"distractors) ranked in {time.time() - t0:.2f}s", flush=True)
        # the CSV, then its entry in metrics.json with the CSV's digest: `compare` refuses a
        # CSV that is not the one its entry describes (another eval's, or a cut one)
        text = io.StringIO()
        csv.writer(text).writerows([list(columns), *zip(*columns.values())])
        data = text.getvalue().encode()
        write_atomically(out / f"{task.name}.csv", lambda tmp: tmp.write_bytes(data))
        results[task.name] = res | {"csv_sha256": hashlib.sha256(data).hexdigest()} | source
        write_metrics(out / "metrics.json", {task.name: results[task.name]}, cfg, device,
                      source)
        if cfg.viz and not task.geo:
            draw_grid(task, q, g, q_emb, g_emb, ranks, columns, out / f"{task.name}.png")
    if rank == 0 and results:
        print_tables(results)
        if cfg.viz and "checkpoint" in source:
            draw_curves(Path(source["checkpoint"]).parent / "log.jsonl", out / "curves.png")
        print(f"\nper-query results{', pictures' if cfg.viz else ''} and metrics.json in {out}/")
    barrier()
    if clash:
        raise UserError(clash[0] + (f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""))
    return results

def per_query(ranks: dict, q: Side, g: Side) -> dict:
    """The task's CSV, column by column: per query its 1-based rank (strict and official), its
    AP (what `compare` resamples), its top 5 and which of them are its landmark; for a
    sentence task the sentence asked."""
    hits = (g.labels[ranks["top"].cpu()] == q.labels[:, None]).int()  # (Q, 5)
    sentence = {"query_text": q.show} if q.modality == "T" else {}
    return {"query_id": q.ids, "landmark_id": q.labels.tolist(), **sentence,
            "rank_strict": (ranks["first_strict"] + 1).tolist(),
            "rank_official": (ranks["first_official"] + 1).tolist(),
            "ap_strict": [f"{v:.6f}" for v in ranks["ap_strict"].tolist()],
            "ap_official": [f"{v:.6f}" for v in ranks["ap_official"].tolist()],
            "top5": [" ".join(g.ids[j] for j in row) for row in ranks["top"].tolist()],
            "top5_hits": [" ".join(map(str, row)) for row in hits.tolist()]}

def items_digest(q: Side, g: Side) -> str:
    """What a task was scored on: its queries and gallery, ids and labels (compare refuses
    runs whose digests differ)."""
    items = [q.ids, q.labels.tolist(), g.ids, g.labels.tolist()]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]

@functools.cache
def code_record() -> dict:
    """The code that ran: mml.py's sha256 and, in a git checkout, its commit. Once a process:
    metrics.json is rewritten after every task."""
    here, commit = Path(__file__).resolve(), None
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # no git on this machine
        git = subprocess.run(["git", "-C", str(here.parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        commit = git.stdout.strip() if git.returncode == 0 else None
    return {"mml_sha256": hashlib.sha256(here.read_bytes()).hexdigest(), "git": commit}

def write_metrics(path: Path, results: dict, cfg: Config, device, source: dict):
    """metrics.json, merged by task: the results of other tasks (other checkpoints) stay,
    each naming its source; the latest evaluation's own record at the top: its options, the
    code (mml.py's sha256 and, in a git checkout, the commit), torch, the device, the date."""
    earlier = {}
    with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
        earlier = dict(json.loads(path.read_text(encoding="utf-8"))["tasks"])
    merged = source | {
        "eval": {k: getattr(cfg, k) for k in ("tasks", "chunk", "eval_batch", "img_size",
                                               "resize")},
        "code": code_record(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tasks": earlier | results}
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(merged, indent=1)))

def evaluate(cfg: Config):
    """`eval`: the protocol on the checkpoint's data (or --data; never generated here),
    embedded by the checkpoint."""
    if is_master():  # before the hours of embedding, not after them
        writable_folder(Path(cfg.out) / "eval", "--out")
    model = Checkpoint(cfg.ckpt, device_of(cfg), cfg.clip, cfg.eval_batch, cfg.workers,
                       cfg.cache)
    cfg = dataclasses.replace(cfg, data=cfg.data or model.cfg.data, img_size=model.cfg.img_size,
                              resize=model.cfg.resize)
    if not cfg.data:
        raise UserError(f"--data: name the dataset root ({cfg.ckpt} names none)")
    print0(f"evaluating {cfg.ckpt} on {cfg.data}")
    score(Protocol(Path(cfg.data)), model, cfg, {"data": cfg.data, "checkpoint": str(cfg.ckpt),
                                                "step": model.step, "epoch": model.epoch,
                                                "config": model.config})

@torch.no_grad()
def nearest(q: torch.Tensor, g: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """(Q,) each query's best gallery item by cosine score, in float32 and in chunks."""
    with matmul_precision("highest"):
        return torch.cat([(part @ g.float().T).argmax(1) for part in q.float().split(chunk)])

def print_tables(results: dict):
    """The results laid out like the authors' tables (PROTOCOL 5), then the geolocalisation
    against the protocol's GPS gallery and against the open one."""
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
    for block, title in (("geo", "geolocalisation, the protocol's gallery (the true point is "
                                 "in it)"),
                         ("geo_open", "open world: index tiles and training landmarks only")):
        geo = {t: r[block] for t, r in results.items() if block in r}
        if geo:
            print(f"\n{title}\n{'':<16}" + "".join(f"{k.split('@')[-1]:>11}" for k in keys)
                  + "   (% of queries within; median error)")
            for task, g in geo.items():
                print(f"{task:<16}" + "".join(f"{g[k]:>11.1f}" for k in keys))

# ---- using a model: checkpoints, the Python API ------------------------------------------
# A checkpoint is checked before use and never unpickled; `load` makes it an embedder (what
# `eval` and `locate` use, and what a researcher's script calls); `evaluate_encoders` scores
# any functions on the protocol.

# What a checkpoint must hold, and of which type; --resume needs the training state too.
CHECKPOINT_PARTS = {"model": dict, "config": dict, "tokenizer": str, "step": int, "epoch": int}
RESUME_PARTS = {"optimizer": dict, "torch_rng": torch.Tensor, "best": (int, float)}

def load_tensors(path: Path, what: str, expect: type = dict):
    """torch.load that never runs code: weights_only=True unpickles tensors, numbers, strings,
    lists and dicts only. A file that needs more could execute anything while loading (a
    checkpoint is a pickle), so it is refused, never unpickled. A state dict's keys must be
    names and its values tensors."""
    if not path.is_file():
        raise UserError(f"{path}: no {what} there")
    with open(path, "rb") as f:  # torch.save writes a zip (PK); old torch a pickle (0x80 2)
        if f.read(2) not in (b"PK", b"\x80\x02"):
            raise UserError(f"{path}: not a {what} (not a file torch.save writes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: not a plain {what}: it needs more than tensors and plain data "
                        f"to load, and may contain code, so it is not unpickled") from None
    except Exception as e:  # truncated, corrupt
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__})") from None
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)),
               None) if isinstance(obj, dict) and what.endswith("state dict") else None
    if not isinstance(obj, expect) or bad is not None:
        found = f"entry {bad!r} is not a named tensor" if bad is not None else (
            f"holds a {type(obj).__name__}")
        raise UserError(f"{path}: not a {what} ({found})")
    return obj

def load_checkpoint(path: Path, resume: bool = False) -> dict:
    """A checkpoint, its parts checked before anything uses them: one line naming the part."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        raise UserError(f"{path}: a folder; name a checkpoint in it"
                        + (f" (it holds {', '.join(inside)})" if inside else ""))
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

def restore(path: Path, ckpt: dict, cfg: Config) -> MML:
    """A checkpoint's model, on the CPU: its weights, and its frozen CLIP towers from their
    folder (the checkpoint's, or --clip), refused unless they are the very towers it was
    trained with."""
    if "clip" in (cfg.image_backbone, cfg.text_backbone) and not Path(cfg.clip).is_dir():
        raise UserError(f"{cfg.clip}: the CLIP folder {path} was trained with is not there "
                        f"(moved?); name it with --clip")
    model = MML(cfg)
    towers = model.towers()
    if towers:
        state, digest = load_clip_weights(cfg.clip)
        record = ckpt.get("towers")
        want = record.get("digest") if isinstance(record, dict) else None
        if digest != want:
            raise UserError(f"{cfg.clip}: its config and weights (digest {digest[:12]}) are not "
                            f"the CLIP towers {path} was trained with ({str(want)[:12]}); name "
                            f"their folder with --clip")
        install_towers(model, state, cfg.clip)
        model.tower_digest = digest  # what evaluation's tower cache is keyed by
    load_matching(model, ckpt["model"], str(path), ignore=towers)
    return model

class Checkpoint(Functions):
    """An mml checkpoint ready to embed, the Python API: `model = mml.load(CKPT)`, then

        model.embed_images(["photo.jpg"], kind="ground")  # or (H, W, 3) uint8 arrays
        model.embed_text(["a red church in Denver"])
        model.embed_gps([[40.7, -74.0]])                   # lat, lon in degrees

    each an (N, D) float32 tensor of unit vectors, made with the checkpoint's own
    preprocessing and tokenizer, on the best device. They also take what `evaluate_encoders`
    hands over ((B, 3, H, H) uint8 images at the checkpoint's img_size, sentences, points),
    so scoring them there gives `eval`'s numbers; `eval` embeds through the same encoders."""

    def __init__(self, ckpt, device=None, clip: str = "", batch: int = 256, workers: int = 0,
                 cache: str = ""):
        if not isinstance(batch, int) or batch < 1:
            raise UserError(f"batch {batch!r}: expected an integer of at least 1")
        self.path = Path(ckpt)
        saved = load_checkpoint(self.path)
        config = checkpoint_config(self.path, saved)
        self.cfg = dataclasses.replace(config, eval_batch=batch, workers=workers, cache=cache,
                                       clip=clip or config.clip)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = restore(self.path, saved, self.cfg).to(self.device).eval()
        self.tok = Tokenizer.from_str(saved["tokenizer"])
        self.step, self.epoch, self.config = saved["step"], saved["epoch"], saved["config"]
        # the protocol's batches, one through an encoder: what `eval` embeds with
        super().__init__({m: functools.partial(self.encode, m) for m in self.model.enc},
                         self.cfg)

    def width(self, m: str) -> int:
        return self.cfg.embed_dim  # every encoder's: known without running one

    def encoder(self, m: str) -> Encoder:
        if m not in self.model.enc:
            raise UserError(f"{self.path}: has no {MODALITY[m]} encoder (trained on "
                            f"{self.cfg.modalities})")
        return self.model.enc[m]

    @torch.no_grad()
    def encode(self, m: str, x) -> torch.Tensor:
        """One batch of modality m through its encoder, on the device: (B, D)."""
        if m == "T":
            x = tokenize(self.tok, [str(s) for s in x])  # (B, L)
        x = to_device(torch.as_tensor(x), self.device)
        with autocast_for(self.device, self.cfg):
            return self.encoder(m)(x)

    def embed_images(self, images, kind: str = "ground") -> torch.Tensor:
        """(N, D): images as paths, decoded (H, W, 3) uint8 arrays of any size, or a (B, 3,
        H, H) uint8 tensor at the checkpoint's img_size. Anything else is one line."""
        m, size, how = LETTER.get(kind, kind), self.cfg.img_size, self.cfg.resize
        self.encoder(m)  # an error now, not after reading the images
        if torch.is_tensor(images):
            if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, size, size):
                raise UserError(f"embed_images: a {tuple(images.shape)} {images.dtype} tensor; "
                                f"expected (B, 3, {size}, {size}) uint8")
            x = images
        else:
            pixels = []
            for n, image in enumerate(images):
                array = None if isinstance(image, (str, Path)) else np.asarray(image)
                if array is not None and (array.dtype != np.uint8 or array.shape[2:] != (3,)):
                    raise UserError(f"embed_images: image {n} is a {array.shape} {array.dtype} "
                                    f"array; expected (H, W, 3) uint8 (or a path)")
                pixels.append(read_image(Path(image), size, how) if array is None else
                              to_square(Image.fromarray(array), size, how))
            x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)  # (N, 3, H, H)
        return embed(self.fns[m], x, f"{kind} images", self.cfg, self.device, spread=False)

    def embed_text(self, sentences: list[str]) -> torch.Tensor:
        self.encoder("T")
        return embed(self.fns["T"], list(sentences), "sentences", self.cfg, self.device,
                     spread=False)

    def embed_gps(self, latlon) -> torch.Tensor:
        self.encoder("C")
        points = torch.as_tensor(np.asarray(latlon, dtype=np.float64)).view(-1, 2)
        return embed(self.fns["C"], points, "points", self.cfg, self.device, spread=False)

    def embed_side(self, side: Side) -> torch.Tensor:
        """A side of the protocol: images through a frozen CLIP tower run through its cache,
        once per image; everything else as any encoder's."""
        enc = self.encoder(side.modality)
        frozen_tower = f"enc.{side.modality}.trunk." in self.model.towers()
        if side.modality not in "GS" or not frozen_tower:
            return super().embed_side(side)
        features = torch.cat([self.tower_features(enc, part) for part in side.items])
        with autocast_for(self.device, self.cfg):
            return embed(enc.project, features, side.name, self.cfg, self.device)

    def tower_features(self, enc: Encoder, part: tuple) -> torch.Tensor:
        """(n, E) outputs of a frozen CLIP tower for one split's images, from the tower cache
        when it holds them. The key covers the towers, the preprocessing, the precision and
        the image list: a second checkpoint on the same towers runs only its heads, and a
        cache made by anything else is never used."""
        split_dir, kind, ids = part
        precision = "bf16" if bf16_on(self.device, self.cfg) else "fp32"
        key = hashlib.sha256(json.dumps([self.model.tower_digest, self.cfg.img_size,
                                         self.cfg.resize, precision, kind, ids]).encode())
        key, name = key.hexdigest(), f"{split_dir.name}_{kind}"
        path = cache_dir(self.cfg, split_dir.parent) / "towers" / f"{name}-{key[:16]}.pt"
        features = read_cache(path, key, (len(ids), enc.width))
        if features is None:
            with autocast_for(self.device, self.cfg):
                features = embed(lambda x: enc.features(to_device(x, self.device)),
                                 ImageList([part], self.cfg), f"{name} (CLIP tower)", self.cfg,
                                 self.device)
            if is_master():
                write_cache(path, key, features)
        return features.to(self.device)

def read_image(path: Path, size: int, resize: str) -> np.ndarray:
    """An image handed in by a user (API, `locate`): (H, H, 3) uint8, or one line naming it."""
    try:
        return load_image(path, size, resize)
    except Exception as e:  # missing, not an image: decoders raise all sorts
        raise UserError(f"{path}: cannot read it as an image ({e})") from None

def read_cache(path: Path, key: str, shape: tuple) -> torch.Tensor | None:
    """A cache that write_cache wrote, or None when it is absent, unreadable, made for another
    key, or of another shape or dtype: then the caller rebuilds it, never uses it."""
    with contextlib.suppress(UserError):
        cached = load_tensors(path, "cache")
        tensor = cached.get("tensor")
        if (cached.get("key") == key and torch.is_tensor(tensor)
                and tuple(tensor.shape) == shape and tensor.dtype == torch.float32):
            return tensor
    return None

def write_cache(path: Path, key: str, tensor: torch.Tensor):
    try:
        writable_folder(path.parent, "cache")
        save_checkpoint({"key": key, "tensor": tensor.float().cpu()}, path)
    except UserError as e:  # a read-only or full disk: the answer comes anyway, uncached
        print(f"not cached: {e}", file=sys.stderr)

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
    unknown = sorted(set(encoders) - set("GSTC"))
    if unknown:
        raise UserError(f"evaluate_encoders: modalities {unknown}; expected some of G, S, T, C")
    # bf16 off: the functions run in whatever precision they choose themselves
    cfg = dataclasses.replace(Config(), data=str(data), out=str(out), tasks=tasks,
                              img_size=img_size, resize=resize, eval_batch=batch,
                              device=device, workers=workers, viz=viz, bf16=False)
    check_config(cfg, "evaluate_encoders: ")
    writable_folder(Path(cfg.out) / "eval", "out")
    return score(Protocol(Path(cfg.data)), Functions(encoders, cfg), cfg,
                 {"data": str(cfg.data), "encoders": name})

# ---- outside models: CLIP, torchvision's weights, the authors', GeoCLIP -------------------
# CLIP's vision and text towers in plain torch from the model section's Block, sized by a
# Hugging Face folder the user fetched once (mml never downloads it), filled from its weights,
# tokenising with its tokenizer.json; torchvision's ImageNet weights; `convert`, which makes
# the field's models mml checkpoints. A file handed in is checked before it is trusted: a
# regular file of bounded size, sizes within bounds before anything is allocated, the
# byte ranges of safetensors inside the file and apart.

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
        x = e.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, patches, W)
        first = e.class_embedding.to(x.dtype).expand(len(x), 1, -1)  # (B, 1, W)
        x = self.pre_layrnorm(torch.cat([first, x], 1) + e.position_embedding.weight)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.projection(self.post_layernorm(x[:, 0]))  # (B, E)

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
        end = ids.argmax(1) if self.end == 2 else (ids == self.end).int().argmax(1)  # (B,)
        x = self.final_layer_norm(x[torch.arange(len(x), device=x.device), end])
        return self.projection(x)  # (B, E)

def clip_tower(folder: str, part: str) -> tuple[nn.Module, int]:
    """The --clip folder's vision or text tower (random weights until load_pretrained), E."""
    c = clip_config(folder)
    tower = (CLIPVision if part == "vision" else CLIPText)(c[part], c["projection_dim"])
    return tower, c["projection_dim"]

def load_pretrained(model: MML, cfg: Config) -> dict | None:
    """A fresh model's pretrained parts: CLIP's towers from --clip, and with --pretrained
    torchvision's ImageNet weights through its weights API (taken from its cache,
    TORCH_HOME/hub/checkpoints, when there; read with weights_only=True like every file mml
    loads). Returns the frozen towers' record {folder, digest}: what checkpoints keep instead
    of 1.7 GB of frozen weights."""
    towers = None
    if "clip" in (cfg.image_backbone, cfg.text_backbone):
        state, digest = load_clip_weights(cfg.clip)
        install_towers(model, state, cfg.clip)
        if model.towers():
            towers = {"folder": str(Path(cfg.clip).resolve()), "digest": digest}
    if cfg.pretrained and cfg.image_backbone not in ("small", "clip"):
        weights = backbone_weights(cfg.image_backbone)
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        try:
            state = weights.get_state_dict(progress=is_master(), check_hash=True,
                                           weights_only=True)
        except Exception as e:  # no network, a truncated download, a file of another format
            why = (str(e).splitlines() or [""])[0]
            raise UserError(f"--pretrained: {cfg.image_backbone}'s ImageNet weights are not "
                            f"usable at {path} and not downloadable from {weights.url} "
                            f"({type(e).__name__}: {why}); put that file there") from None
        for m in {"G", "S"} & set(model.enc):  # a shared trunk loads twice: the same weights
            own = model.enc[m].trunk.state_dict()  # the classifier's keys are dropped
            load_matching(model.enc[m].trunk, {k: v for k, v in state.items() if k in own},
                          f"--pretrained {path}")
    return towers

def read_bounded(path: Path, limit: int, what: str) -> str:
    """A small text file handed in (a CLIP folder's, a run's metrics.json), read by read_text:
    one line naming it when it is not a regular UTF-8 file of at most `limit` bytes."""
    try:
        return read_text(path, limit)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable {what} ({e})") from None

# Hugging Face's defaults (CLIPVisionConfig, CLIPTextConfig): a saved config.json leaves out
# the values that equal them
CLIP_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
             "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407}
# Bounds far above every CLIP (ViT-bigG: 48 layers, width 1,664), checked before anything is
# allocated: a config.json asking for 10**6 layers or a width of 10**9 is one line.
CLIP_BOUNDS = {"num_hidden_layers": 64, "hidden_size": 16384, "intermediate_size": 65536,
               "num_attention_heads": 256, "vocab_size": 10**6, "max_position_embeddings": 4096,
               "image_size": 1024, "patch_size": 1024, "eos_token_id": 10**6,
               "projection_dim": 16384}

def clip_config(folder: str) -> dict:
    """A CLIP folder's config.json as {"vision": sizes, "text": sizes, "projection_dim": E},
    checked to be the architecture the towers implement, of sizes within CLIP_BOUNDS."""
    if not folder:
        raise UserError("--clip: name the Hugging Face CLIP folder (such as "
                        "clip-vit-large-patch14-336) that the clip backbones read")
    path = Path(folder) / "config.json"
    try:
        c = json.loads(read_bounded(path, 1 << 20, "CLIP config"))
    except ValueError as e:
        raise UserError(f"{path}: not a readable CLIP config ({e})") from None
    if not isinstance(c, dict) or c.get("model_type") != "clip":
        raise UserError(f"{path}: model_type {c.get('model_type') if isinstance(c, dict) else c!r}"
                        f"; supported: Hugging Face CLIPModel folders (model_type \"clip\")")
    out = {"projection_dim": c.get("projection_dim", 512)}
    for part, defaults in (("vision", CLIP_VISION), ("text", CLIP_TEXT)):
        # old configs keep sizes in *_config_dict, which override *_config (as transformers)
        given = [c.get(f"{part}_config") or {}, c.get(f"{part}_config_dict") or {}]
        if not all(isinstance(g, dict) for g in given):
            raise UserError(f"{path}: {part}_config is not an object of sizes")
        out[part] = {**defaults, **given[0], **given[1]}
    for part, sizes in (("vision_config ", out["vision"]), ("text_config ", out["text"]),
                        ("", out)):
        for k, bound in CLIP_BOUNDS.items():
            v = sizes.get(k, 1)
            if type(v) is not int or not 0 < v <= bound:  # type: True is an int too
                raise UserError(f"{path}: {part}{k} {v!r}: expected an integer in "
                                f"[1, {bound:,}]")
    for part in ("vision", "text"):
        s = out[part]
        if s["hidden_act"] not in ("quick_gelu", "gelu") or s["hidden_size"] % s[
                "num_attention_heads"] or not isinstance(s["layer_norm_eps"], float):
            raise UserError(f"{path}: {part}_config hidden_act {s['hidden_act']!r}, heads "
                            f"{s['num_attention_heads']}, layer_norm_eps {s['layer_norm_eps']!r}"
                            f": not what these towers implement (quick_gelu or gelu, heads "
                            f"dividing the width)")
    if out["vision"]["image_size"] % out["vision"]["patch_size"]:
        raise UserError(f"{path}: image_size {out['vision']['image_size']} is not a multiple "
                        f"of patch_size {out['vision']['patch_size']}")
    return out

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}

def read_safetensors(path: Path) -> dict:
    """A .safetensors file without the safetensors package: 8 bytes of header length, a JSON
    header of each tensor's dtype, shape and byte range, then the bytes. The ranges must lie
    in the file, fit their shapes and not overlap; then the file is mapped copy-on-write and
    each tensor is a view of the map, copied only when loaded."""
    def unreadable(why) -> UserError:
        return UserError(f"{path}: not a readable safetensors file ({why})")
    with open(path, "rb") as f:
        size, n = os.fstat(f.fileno()).st_size, int.from_bytes(f.read(8), "little")
        if not 2 <= n <= size - 8:
            raise unreadable(f"a header of {n:,} bytes in a file of {size:,}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise unreadable(e) from None
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise unreadable("its header is not an object")
    tensors, ranges = {}, []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = SAFETENSORS_DTYPES[t["dtype"]], t["shape"]
            begin, end = t["data_offsets"]
            count = math.prod(shape)
            ok = all(type(v) is int and v >= 0 for v in [begin, end, *shape])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or begin + count * dtype.itemsize != end or end > size - 8 - n:
            raise unreadable(f"{name}: its dtype, shape or bytes ({t!s:.80}) do not fit")
        ranges.append((begin, end, name))
        tensors[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + begin)
                         if count else torch.empty(0, dtype=dtype)).reshape(shape)
    ranges.sort()
    clash = next((b for a, b in zip(ranges, ranges[1:]) if b[0] < a[1]), None)
    if clash:
        raise unreadable(f"{clash[2]} overlaps another tensor's bytes")
    return tensors

def tensor_digest(state: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()

def load_clip_weights(folder: str) -> tuple[dict, str]:
    """The folder's weights as Hugging Face's state dict (model.safetensors, else
    pytorch_model.bin read with weights_only=True), and the digest of the towers: their
    config and their weights. What a checkpoint records of its frozen towers, and what the
    tower cache is keyed by."""
    d, config = Path(folder), clip_config(folder)
    if (d / "model.safetensors").is_file():
        state = read_safetensors(d / "model.safetensors")
    elif (d / "pytorch_model.bin").is_file():
        state = load_tensors(d / "pytorch_model.bin", "CLIP state dict")
    else:
        raise UserError(f"{d}: no model.safetensors or pytorch_model.bin (the weights of the "
                        f"Hugging Face CLIP folder; README, Real data, says how to fetch them)")
    # older transformers also saved the towers' position index buffers: not weights
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    digest.update(tensor_digest(state).encode())
    return state, digest.hexdigest()

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
    CLIPTokenizer(padding="max_length", truncation=True) does. Its ids must all lie within
    the text tower's vocabulary."""
    path = Path(folder) / "tokenizer.json"
    try:
        tok = Tokenizer.from_str(read_bounded(path, 1 << 26, "tokenizer"))
    except UserError:
        raise
    except Exception as e:  # the tokenizers library raises its own exception types
        raise UserError(f"{path}: not a readable tokenizer ({str(e)[:80]}); a Hugging Face "
                        f"CLIP folder holds one") from None
    end, vocab = tok.token_to_id("<|endoftext|>"), clip_config(folder)["text"]["vocab_size"]
    if end is None or tok.get_vocab_size() > vocab:
        raise UserError(f"{path}: {tok.get_vocab_size()} tokens, end-of-text {end}: not "
                        f"CLIP's tokenizer for a text tower of {vocab} tokens")
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
    if out.exists() or out.is_symlink():  # never the 3.5 GB download it reads, nor any file
        if not cfg.overwrite:
            raise UserError(f"{out}: exists; --out names a new file (--overwrite replaces an "
                            f"mml checkpoint)")
        load_checkpoint(out)  # anything but an mml checkpoint is refused in one line
    kind = ("clip" if (src / "config.json").exists() else "geoclip" if (
        src / "location_encoder_weights.pth").is_file() else "authors" if src.is_file() else "")
    if not kind:
        raise UserError(f"{src}: not a model `convert` knows: a Hugging Face CLIP folder holds "
                        f"config.json; GeoCLIP's weights folder holds location_encoder_weights"
                        f".pth, image_encoder_mlp_weights.pth, logit_scale_weights.pth (with "
                        f"--clip); the authors' release is one file, weights_best.pth (with "
                        f"--clip)")
    if kind != "clip" and not cfg.clip:
        clip_config(cfg.clip)  # one line saying --clip is needed
    writable_folder(out.parent, "--out")
    folder = str((src if kind == "clip" else Path(cfg.clip)).resolve())
    weights, digest = load_clip_weights(folder)  # read once: 1.7 GB for ViT-L/14-336
    converter = {"clip": convert_clip, "geoclip": convert_geoclip, "authors": convert_authors}
    new, state, tok = converter[kind](src, folder, weights)
    model = MML(new)
    install_towers(model, weights, folder)
    load_matching(model, state, str(src), ignore=model.towers())
    save_checkpoint({"model": trained_state(model), "config": dataclasses.asdict(new),
                     "tokenizer": tok.to_str(), "step": 0, "epoch": 0,
                     "towers": {"folder": folder, "digest": digest},
                     "converted_from": str(src.resolve())}, out)
    print(f"{out}: {new.modalities} from {src}, towers from {folder} (digest {digest[:12]}); "
          f"evaluate it with `python mml.py eval --ckpt {out} --data ROOT`")

def clip_sized(folder: str, **fields) -> Config:
    """A Config of CLIP towers from a folder: its image size and its text's positions."""
    c = clip_config(folder)
    return dataclasses.replace(Config(), clip=folder, img_size=c["vision"]["image_size"],
                               max_len=c["text"]["max_position_embeddings"], **fields)

def convert_clip(src: Path, folder: str, weights: dict) -> tuple:
    """Off-the-shelf CLIP: both towers frozen, no heads, CLIP's own logit scale."""
    new = clip_sized(folder, modalities="GST", image_backbone="clip", text_backbone="clip",
                     share_image_trunk=True, freeze="GST", head="none", resize="clip",
                     embed_dim=clip_config(folder)["projection_dim"])
    if not torch.is_tensor(weights.get("logit_scale")):
        raise UserError(f"{src}: its weights hold no logit_scale: not a CLIPModel's")
    return new, {"logit_scale": weights["logit_scale"]}, clip_tokenizer(folder, new.max_len)

def convert_authors(src: Path, clip: str, weights: dict) -> tuple:
    """The authors' MmlCLIP state dict (their weights_best.pth): its two copies of CLIP must
    be the --clip folder's weights; its heads, GPS encoder and scale are renamed to mml's."""
    theirs = {k: v for k, v in load_tensors(src, "authors' MmlCLIP state dict").items()
              if not k.endswith("position_ids")}
    for copy in ("image_encoder.clip_model.", "text_encoder.clip_model."):
        mine = {k[len(copy):]: v for k, v in theirs.items() if k.startswith(copy)}
        if tensor_digest(mine) != tensor_digest(weights):
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
    new = clip_sized(clip, **PRESETS["paper"])
    return new, state, clip_tokenizer(clip, new.max_len)

def convert_geoclip(src: Path, clip: str, weights: dict) -> tuple:
    """GeoCLIP (its wheel's geoclip/model/weights): CLIP ViT-L/14's projected image embedding
    through an MLP (768-768-512) for ground and aerial images alike, its location encoder
    (with the SF/180 scaling) and its logit scale."""
    path = src / "image_encoder_mlp_weights.pth"
    mlp = load_tensors(path, "GeoCLIP image MLP state dict")
    location = load_tensors(src / "location_encoder_weights.pth",
                            "GeoCLIP location encoder state dict")
    scale = load_tensors(src / "logit_scale_weights.pth", "GeoCLIP logit scale", torch.Tensor)
    out = mlp.get("2.weight")
    if out is None or "0.weight" not in mlp or out.dim() != 2 or not 0 < out.shape[0] <= 16384:
        raise UserError(f"{path}: expected GeoCLIP's keys 0.weight, 0.bias, 2.weight, 2.bias, "
                        f"2.weight a (D, hidden) matrix with D in [1, 16,384]")
    new = clip_sized(clip, modalities="GSC", image_backbone="clip", share_image_trunk=True,
                     freeze="GS", head="geoclip", embed_dim=out.shape[0], gps_width=1024,
                     gps_depth=3, resize="clip")
    state = {f"enc.{m}.head.{k}": v for m in "GS" for k, v in mlp.items()}
    state |= {f"enc.C.{k}": v for k, v in location.items()} | {"logit_scale": scale.detach()}
    return new, state, Tokenizer(models.BPE())  # no text tower: an empty tokenizer

# ---- tools: compare, locate, the pictures, the image cache --------------------------------

# `compare`: runs side by side, with what a paper needs to tell a difference from noise: 95%
# bootstrap intervals that resample query landmarks (a landmark's photos are not independent
# queries; resampling photos would overstate the confidence), each run's difference to the
# first on the very same resamples (paired), and runs that differ only in --seed pooled.
HEADLINE = {False: ("R@1", "R@5", "R@10", "mAP@1k"),  # retrieval, official
            True: ("acc@1km", "acc@25km", "acc@200km", "acc@750km", "acc@2500km")}  # x2C
# options that change no result, or only the draw of one (--seed): runs that differ in these
# alone are seeds of one setting
NOT_A_SETTING = ("seed", "out", "resume", "overwrite", "workers", "device", "log_every",
                 "cache", "data", "ckpt", "compile")

def read_run(folder: Path) -> dict:
    """A run folder (holding eval/) or an eval folder: its metrics.json and, per task, the
    per-query values of the headline metrics from the task's CSV, which must be the very
    CSV its entry describes (not another evaluation's, not one cut short)."""
    path = next((p for p in (folder / "metrics.json", folder / "eval/metrics.json")
                 if p.exists()), None)
    if path is None:
        raise UserError(f"{folder}: no metrics.json there or in eval/ (run `mml.py eval`)")
    try:
        metrics = json.loads(read_bounded(path, 1 << 28, "metrics.json"))
        tasks, config = metrics["tasks"], metrics.get("config")
        if not isinstance(tasks, dict) or not isinstance(config, (dict, type(None))) or not all(
                isinstance(r, dict) for r in tasks.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: not a metrics.json of mml (run `mml.py eval`)") from None
    out = {}
    for name, r in tasks.items():
        if name not in TASK:  # names become file names: only the protocol's
            raise UserError(f"{path}: {name!r} is not a task of the protocol")
        csv_path, geo = path.parent / f"{name}.csv", TASK[name].geo
        if not csv_path.is_file() or hashlib.sha256(csv_path.read_bytes()).hexdigest() != r.get(
                "csv_sha256"):
            raise UserError(f"{csv_path}: not the CSV that {path} describes (missing, or "
                            f"another evaluation's); evaluate {name} again")
        columns = ["landmark_id"] + (["error_km"] if geo else ["rank_official", "ap_official"])
        rows = read_csv(csv_path, columns)
        x = {c: parse_numbers(csv_path, rows, [c], float)[:, 0] for c in columns}
        if geo:
            values = {f"acc@{t}km": 100.0 * (x["error_km"] <= t) for t in (1, 25, 200, 750, 2500)}
        else:
            values = {f"R@{k}": 100.0 * (x["rank_official"] <= k) for k in (1, 5, 10)}
            values["mAP@1k"] = 100 * x["ap_official"]
        out[name] = {"protocol": r.get("protocol"), "values": values,
                     "landmarks": x["landmark_id"].astype(np.int64)}
    label = folder.parent.name if folder.name == "eval" else folder.name
    return {"name": label, "path": path, "config": config, "tasks": out}

def cluster_weights(landmarks: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, Q): how often each query is drawn when the query landmarks are drawn with
    replacement, all of a landmark's queries together. A resampled mean is weights @ values
    / weights.sum()."""
    unique, landmark_of = np.unique(landmarks, return_inverse=True)
    picks = np.random.default_rng(seed).integers(0, len(unique), (resamples, len(unique)))
    counts = np.stack([np.bincount(p, minlength=len(unique)) for p in picks])  # (R, L)
    return counts[:, landmark_of].astype(np.float64)  # (R, Q)

def setting_groups(runs: list[dict]) -> list[list[dict]]:
    """Runs grouped by setting: the same training config but for NOT_A_SETTING, each with a
    seed of its own; a run without a config (outside encoders) is its own group."""
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

def comparison(runs: list[dict], resamples: int) -> tuple[list[str], dict]:
    """(group labels, {task: {metric: per group (value, std, lo, hi, diff, diff_lo,
    diff_hi) or None}}): a group's value is its runs' mean (std across them), lo and hi its
    95% bootstrap interval; diff and its interval are to the first group's own result on the
    same resamples (None where the first lacks the task). Runs evaluated on other queries or
    galleries are refused, naming both."""
    groups = setting_groups(runs)
    labels = [g[0]["name"] + (f" ({len(g)} seeds)" if len(g) > 1 else "") for g in groups]
    table = {}
    for name in dict.fromkeys(n for r in runs for n in r["tasks"]):
        having = [r for r in runs if name in r["tasks"]]
        odd = next((r for r in having if r["tasks"][name]["protocol"] !=
                    having[0]["tasks"][name]["protocol"]), None)
        if odd:
            raise UserError(f"{odd['path']} and {having[0]['path']} were evaluated on different "
                            f"queries or galleries for {name}: compare runs of one protocol")
        w = cluster_weights(having[0]["tasks"][name]["landmarks"], resamples)  # (R, Q)
        table[name] = {}
        for metric in HEADLINE[TASK[name].geo]:
            cells, base = [], None
            for k, g in enumerate(groups):
                if not all(name in r["tasks"] for r in g):
                    cells.append(None)
                    continue
                x = np.stack([r["tasks"][name]["values"][metric] for r in g])  # (runs, Q)
                boot = (w @ x.T / w.sum(1, keepdims=True)).mean(1)  # (R,)
                value = x.mean(1).mean()
                base = (boot, value) if k == 0 else base
                diff = (None,) * 3 if base is None else (
                    value - base[1], *np.percentile(boot - base[0], [2.5, 97.5]))
                cells.append((value, x.mean(1).std(ddof=1) if len(g) > 1 else 0.0,
                              *np.percentile(boot, [2.5, 97.5]), *diff))
            table[name][metric] = cells
    return labels, table

def compare(cfg: Config):
    """`compare RUN...`: per task, each run's headline metrics (official R@k and mAP@1k, or
    the geolocalisation's accuracies) with 95% intervals and, after the first, its paired
    difference to the first; two tables (retrieval, geolocalisation) of tasks by metrics,
    also in LaTeX with --latex."""
    runs = [read_run(Path(r)) for r in cfg.runs]
    labels, table = comparison(runs, cfg.resamples)
    for name, cells in table.items():
        lacking = [lab for lab, c in zip(labels, next(iter(cells.values()))) if c is None]
        if lacking:
            print(f"{name}: not evaluated in {', '.join(lacking)}")
    fmt = lambda c: (f"{c[0]:.2f}" + (f" +- {c[1]:.2f}" if c[1] else "")
                     + f" [{c[2]:.2f}, {c[3]:.2f}]")
    diff = lambda c: f"{c[4]:+.2f} [{c[5]:+.2f}, {c[6]:+.2f}]"
    for geo in (False, True):
        rows = []
        for name, cells in ((n, c) for n, c in table.items() if TASK[n].geo == geo):
            for k, label in enumerate(labels):
                got = [cells[m][k] for m in HEADLINE[geo]]
                if got[0] is not None:
                    rows.append([name, label, *map(fmt, got)])
                if k and got[0] is not None and got[0][4] is not None:
                    rows.append([name, f"{label} - {labels[0]}", *map(diff, got)])
        if rows:
            header = ["task", "run", *HEADLINE[geo]]
            widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
            print("\n" + "\n".join("  ".join(f"{v:<{w}}" for v, w in zip(r, widths))
                                   for r in [header] + rows))
            if cfg.latex:
                tex = lambda r: " & ".join(v.replace("+-", "$\\pm$").replace("_", "\\_")
                                           for v in r) + " \\\\"
                print(f"\\begin{{tabular}}{{ll{'r' * len(HEADLINE[geo])}}}\n\\toprule\n"
                      f"{tex(header)}\n\\midrule\n" + "\n".join(map(tex, rows))
                      + "\n\\bottomrule\n\\end{tabular}")
    print(f"\n95% intervals: {cfg.resamples} bootstrap resamples of the query landmarks")

# `locate`: where is this? The gallery is embedded each call (100,000 points in about 3 s on
# two CPU cores); inputs are read, embedded and scored LOCATE_CHUNK at a time, so memory
# stays bounded by that many rows of scores, however many inputs come.
LOCATE_CHUNK = 64

def read_gallery(path: Path) -> tuple[torch.Tensor, list[str]]:
    """A GPS gallery CSV: lat,lon and an optional name column, headers in any case
    (GeoCLIP's is LAT,LON)."""
    table = read_csv(path, ["lat", "lon"], lower=True, optional=("name",))
    if not table["lat"]:
        raise UserError(f"{path}: no places listed (expected rows of lat,lon[,name])")
    names = table.get("name", [""] * len(table["lat"]))
    return torch.as_tensor(parse_latlon(path, table)), names

@torch.no_grad()
def locate(cfg: Config):
    """`locate`: the top places of photos, aerial images (--satellite) or sentences (--text)
    in a GPS gallery, with the cosine score and the probability (a softmax over the gallery at
    the model's logit scale); one block per input, or one JSON list. An input that cannot be
    read gets its own error, the others are answered, and the exit status is 1."""
    if not cfg.inputs and not cfg.text:
        raise UserError("locate: give image paths, or sentences with --text")
    model = load(cfg.ckpt, cfg.device or None, cfg.clip, cfg.eval_batch)
    model.encoder("C")
    if not cfg.gallery and not model.cfg.data:
        raise UserError(f"{cfg.ckpt}: names no dataset (a converted model): give --gallery, a "
                        f"lat,lon CSV of places")
    latlon, names = (read_gallery(Path(cfg.gallery)) if cfg.gallery else
                     open_gallery(Path(model.cfg.data)))
    gallery = model.embed_gps(latlon)  # (N, D)
    kind = "satellite" if cfg.satellite else "ground"
    jobs = [(x, kind) for x in cfg.inputs] + [(x, "text") for x in cfg.text]
    results = [{"input": str(x)} for x, _ in jobs]
    for start in range(0, len(jobs), LOCATE_CHUNK):
        rows, pixels = list(range(start, min(start + LOCATE_CHUNK, len(jobs)))), {}
        for n in rows:
            if jobs[n][1] != "text":
                try:
                    pixels[n] = read_image(Path(jobs[n][0]), model.cfg.img_size,
                                           model.cfg.resize)
                except UserError as e:  # this input's error alone
                    results[n]["error"] = str(e)
        for what in (kind, "text"):
            chosen = [n for n in rows if jobs[n][1] == what and "error" not in results[n]]
            if not chosen:
                continue
            q = (model.embed_text([jobs[n][0] for n in chosen]) if what == "text" else
                 model.embed_images(torch.from_numpy(np.stack([pixels[n] for n in chosen]))
                                    .permute(0, 3, 1, 2), what))  # (n, D)
            scores = q @ gallery.T  # (n, N)
            probs = torch.softmax(model.model.logit_scale.exp() * scores, dim=1)
            best = scores.topk(min(cfg.top, len(names)), dim=1).indices
            for i, n in enumerate(chosen):
                results[n]["top"] = [{"lat": round(float(latlon[j, 0]), 6),
                                      "lon": round(float(latlon[j, 1]), 6),
                                      "score": float(scores[i, j]), "prob": float(probs[i, j]),
                                      "name": names[j]} for j in best[i].tolist()]
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

# The pictures (`eval --viz`), with Pillow alone: per retrieval task a grid of eight queries,
# their top 5 and, when it is not among them, their correct match; the training curves.
GRID_THUMB, GRID_GAP, GRID_LINE, GRID_ROWS = 96, 8, 18, 8  # px, px, px, queries
GREEN, RED = (0, 160, 0), (200, 30, 30)

def grid_cell(row: int, col: int) -> tuple[int, int]:
    """Top-left pixel of a grid's thumbnail: a caption line above each row, a line of scores
    under it; columns 0 the query, 1-5 its top 5, 6 its correct match."""
    return (GRID_GAP + col * (GRID_THUMB + GRID_GAP),
            GRID_LINE + row * (GRID_THUMB + GRID_GAP + 2 * GRID_LINE))

def grid_queries(n: int) -> list[int]:
    """The queries a grid shows: GRID_ROWS of n, drawn once with a fixed seed, in order."""
    return sorted(random.Random(0).sample(range(n), min(GRID_ROWS, n)))

def thumbnail(path) -> Image.Image:
    try:
        return Image.fromarray(load_image(Path(path), GRID_THUMB))
    except Exception:  # the grid still shows the rest
        return Image.new("RGB", (GRID_THUMB, GRID_THUMB), (128, 128, 128))

def draw_grid(task: Task, q: Side, g: Side, q_emb, g_emb, ranks: dict, columns: dict,
              path: Path):
    """A retrieval task's grid: eight queries (the same for every model), each its image or
    its sentence and its top 5 with their scores, bordered green where a result is the
    query's landmark, red otherwise, distractors marked; then, when the top 5 miss it, its
    best-scoring correct item and its rank."""
    if task.geo:
        return
    font, n_junk = ImageFont.load_default(size=13), int((g.labels == -1).sum())
    rows = grid_queries(len(q.ids))
    img = Image.new("RGB", (grid_cell(0, 7)[0], grid_cell(len(rows), 0)[1]), "white")
    draw = ImageDraw.Draw(img)

    def cell(r: int, c: int, j: int, colour, under: str):
        x, y = grid_cell(r, c)
        img.paste(thumbnail(g.show[j]), (x, y))
        draw.rectangle((x, y, x + GRID_THUMB - 1, y + GRID_THUMB - 1), outline=colour, width=4)
        if j < n_junk:
            draw.rectangle((x + 4, y + GRID_THUMB - 20, x + GRID_THUMB - 5, y + GRID_THUMB - 5),
                           fill="black")
            draw.text((x + 8, y + GRID_THUMB - 19), "distractor", fill="white", font=font)
        draw.text((x, y + GRID_THUMB + 2), under, fill="black", font=font)
    for r, i in enumerate(rows):
        x, y = grid_cell(r, 0)
        rank, official = columns["rank_strict"][i], columns["rank_official"][i]
        caption = (f"query {q.ids[i]}" if task.query != "T" else "sentence") + (
            f" (landmark {int(q.labels[i])}): correct match at rank {rank} (official {official})")
        draw.text((x, y - GRID_LINE + 2), caption[:110], fill="black", font=font)
        if task.query == "T":  # the sentence itself, wrapped into the query's cell
            draw.rectangle((x, y, x + GRID_THUMB - 1, y + GRID_THUMB - 1), fill=(235, 235, 235))
            lines = textwrap.wrap(str(q.show[i]), 15)[:7] or ["(empty)"]
            draw.multiline_text((x + 3, y + 3), "\n".join(lines), fill="black", font=font)
        else:
            img.paste(thumbnail(q.show[i]), (x, y))
        top = ranks["top"][i, :5].tolist()
        for c, (j, s) in enumerate(zip(top, (g_emb[top] @ q_emb[i]).tolist()), 1):
            cell(r, c, j, GREEN if g.labels[j] == q.labels[i] else RED, f"{s:.3f}")
        if rank > len(top):
            j = int(ranks["match"][i])
            cell(r, 6, j, GREEN, f"{float(g_emb[j] @ q_emb[i]):.3f}  #{rank}")
    img.save(path)

def draw_curves(log: Path, path: Path):
    """Training curves from a run's log.jsonl, 1200 x 540 px: the losses by step, validation
    loss and R@1 by epoch, the lr, the logit scale and the throughput."""
    if not log.is_file():
        return print(f"no training curves: {log} not found")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps, epochs = [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]
    series = lambda rows, x, keys: {k: ([r[x] for r in rows], [r[k] for r in rows])
                                    for k in keys}
    first_step, first_epoch = (steps or [{}])[0], (epochs or [{}])[0]
    panels = [("training loss by step", series(steps, "step", [k for k in first_step
                                                              if k.startswith("loss")])),
              ("validation loss by epoch", series(epochs, "epoch", ["val_loss"])),
              ("validation R@1 (%) by epoch", series(epochs, "epoch", [
                  k for k in first_epoch if k.startswith("val_") and "R@1" in k])),
              ("learning rate by step", series(steps, "step", ["lr"])),
              ("logit scale by step", series(steps, "step", ["logit_scale"])),
              ("samples/s by step", series(steps, "step", ["samples_per_s"]))]
    img, font = Image.new("RGB", (1200, 540), "white"), ImageFont.load_default(size=13)
    draw, palette = ImageDraw.Draw(img), [(0, 0, 0), (31, 119, 180), (255, 127, 14),
                                          (44, 160, 44), (214, 39, 40), (148, 103, 189),
                                          (140, 86, 75)]  # seven: the total and six pairs
    for n, (title, lines) in enumerate(panels):
        x0, y0 = 400 * (n % 3), 270 * (n // 3)
        left, top, right, bottom = x0 + 58, y0 + 26, x0 + 388, y0 + 248  # the plotting area
        draw.text((x0 + 8, y0 + 4), title, fill="black", font=font)
        draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
        points = [(x, y) for xs, ys in lines.values() for x, y in zip(xs, ys)
                  if math.isfinite(y)]
        if not points:
            continue
        (lo_x, lo_y), (hi_x, hi_y) = np.min(points, 0), np.max(points, 0)
        hi_x, hi_y = max(hi_x, lo_x + 1e-12), max(hi_y, lo_y + 1e-12)
        for value, y in ((hi_y, top), (lo_y, bottom - 12)):
            draw.text((x0 + 4, y), f"{value:.3g}", fill="black", font=font)
        for value, x in ((lo_x, left), (hi_x, right - 30)):
            draw.text((x, bottom + 4), f"{value:g}", fill="black", font=font)
        for k, (name, (xs, ys)) in enumerate(lines.items()):
            line = [(left + (x - lo_x) / (hi_x - lo_x) * (right - left),
                     bottom - (y - lo_y) / (hi_y - lo_y) * (bottom - top))
                    for x, y in zip(xs, ys) if math.isfinite(y)]
            draw.line(line + line[-1:], fill=palette[k % len(palette)], width=2)
            label = name.removeprefix("val_").removeprefix("loss_").removesuffix("_R@1")
            draw.text((right - 90, top + 4 + 14 * k), {"R@1": "mean"}.get(label, label),
                      fill=palette[k % len(palette)], font=font)
    img.save(path)

# `prepare` decodes every image of the chosen splits once into one uint8 array per split and
# kind, with its JSON manifest of ids written last; `ImageStore` reads it back.

def decode_or_none(job: tuple) -> np.ndarray | None:
    try:
        return load_image(*job)
    except Exception:  # counted as broken in the manifest: see ImageStore
        return None

def build_cache(split_dir: Path, kind: str, ids: list[str], size: int, cache: Path, pool,
                resize: str = "crop") -> int:
    """Decode images into cache/{split}_{kind}.u8 (n, H, H, 3), then write the manifest, so
    that an interrupted build is never taken for a whole one; return how many were broken.
    An existing array is replaced only if its manifest says mml made it. Written as a stream,
    not through a memory map: a full disk is then an error, not a SIGBUS."""
    array = cache / f"{split_dir.name}_{kind}.u8"
    manifest = array.with_suffix(".json")
    head = manifest.read_bytes()[:100] if manifest.is_file() else b""
    if (array.exists() or manifest.exists()) and b'"generator": "mml.py prepare"' not in head:
        raise UserError(f"{array}: exists and was not made by `mml.py prepare`; refusing to "
                        f"replace it (--cache names another folder)")
    broken, blank = [], np.zeros((size, size, 3), np.uint8)

    def decode_all(tmp: Path):
        with open(tmp, "wb") as f:
            jobs = ((shard(split_dir, kind, i), size, resize) for i in ids)
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
    """`prepare`: decode every image of --splits once into the cache, so that training and
    evaluation read pixels, not JPEGs."""
    root = Path(cfg.data)
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
    n = sum(len(ids) for *_, ids in jobs)
    print0(f"prepare: {n} images at {cfg.img_size}x{cfg.img_size} px "
           f"({n * cfg.img_size ** 2 * 3 / 1e9:.2f} GB) into {cache}")
    with torch.multiprocessing.get_context("fork").Pool(max(1, cfg.workers)) as pool:
        for split_dir, kind, ids in jobs:
            t = time.time()
            broken = build_cache(split_dir, kind, ids, cfg.img_size, cache, pool, cfg.resize)
            print0(f"  {split_dir.name} {kind}: {len(ids)} images, {broken} unreadable, "
                   f"{len(ids) / (time.time() - t):.0f} images/s")

# ---- tools: the bench ---------------------------------------------------------------------
# `python mml.py bench` times each phase on this machine, each the very code a run calls.
# Ratios between rows of one run are meaningful; absolute numbers only with their device.

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

def random_batch(cfg: Config, B: int) -> dict:
    """A batch of the configured shape with random content, as the loader delivers it: on the
    CPU, pinned for a GPU."""
    gen, side = torch.Generator().manual_seed(0), cfg.img_size
    vocab = clip_config(cfg.clip)["text"]["vocab_size"] if cfg.text_backbone == "clip" else (
        cfg.vocab_size)
    batch = {m: torch.randint(0, 256, (B, 3, side, side), dtype=torch.uint8, generator=gen)
             for m in "GS"}
    batch["T"] = torch.randint(1, vocab, (B, cfg.max_len), generator=gen)
    batch["C"] = torch.rand(B, 2, generator=gen) * 20 + torch.tensor([28.0, -110.0])
    pin = torch.cuda.is_available()
    return {m: x.pin_memory() if pin else x for m, x in batch.items()
            if m in cfg.modalities} | {"bad": [""] * B}

def step_rate(cfg: Config, device, sync, label: str) -> float:
    """Training samples/s of the model cfg describes: `train_step` itself, the function the
    loop calls (jitter, forward, loss, all-reduce, backward, clipping, update, the scale's
    cap), on random inputs copied from the CPU as the loader's are."""
    torch.manual_seed(0)
    raw = MML(cfg).to(device)
    if device.type == "cuda":
        raw = raw.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats()
    model = torch.compile(raw) if cfg.compile else raw
    optimizer, pairs = make_optimizer(raw, cfg), loss_pairs(cfg.modalities, cfg.loss)
    batch, steps = random_batch(cfg, cfg.batch_size), itertools.count()
    step = lambda: train_step(model, raw, optimizer, batch, cfg, pairs, 0, next(steps), cfg.lr)
    with matmul_precision("high"):  # as the training loop
        rate = cfg.batch_size / timed(step, 3.0 if device.type == "cuda" else 5.0, sync)
    trained = sum(p.numel() for p in raw.parameters() if p.requires_grad) / 1e6
    peak = (f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
            if device.type == "cuda" else "")
    report(label, rate, "samples/s", f"{device.type}, batch {cfg.batch_size}, H {cfg.img_size}, "
           f"{trained:.1f}M trained parameters{peak}")
    return rate

def bench_steps(cfg: Config, device, sync, done: dict) -> float:
    """Training steps: fp32, and on a GPU bf16 and bf16 + compile; returns the fastest."""
    rates = [step_rate(dataclasses.replace(cfg, bf16=False), device, sync, "train step, fp32")]
    if device.type == "cuda":
        rates.append(step_rate(cfg, device, sync, "train step, bf16"))
        rates.append(step_rate(dataclasses.replace(cfg, compile=True), device, sync,
                               "train step, bf16 + compile"))
    return max(rates)

def bench_loader(cfg: Config, device, sync, done: dict):
    """`training_loader` on the dataset: batches as the loop's single iterator delivers them
    (collated, pinned on a GPU), for at least 3 s, epoch after epoch."""
    data, _, _ = training_sets(cfg, None)
    B = min(cfg.batch_size, len(data))
    batches = iter(training_loader(data, EpochSampler(len(data), B, 0, stop=10**9), cfg, device))
    next(batches)  # the workers' start-up is not loading time
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3:
        n += len(next(batches)["bad"])
    rate = n / (time.perf_counter() - t0)
    source = "from the cache" if data.stores["G"].row_of is not None else "decoding"
    pace = "keeps up with" if rate >= done.get("steps", 0) else "slower than"
    report(f"training loader, {cfg.workers} workers", rate, "samples/s",
           f"{cfg.data}, {source}, batch {B}; {pace} the fastest step")

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
    around a random centre per landmark (positives rank high, as with a trained model),
    distractors anywhere -> (q, g, q_labels, g_labels), distractors first. Rounded to
    multiples of 2^-10, so that every score is exact in float32 in any summation order (a
    GEMM and a GEMV, a CPU and a GPU agree): the bench compares rankings, not roundings."""
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
    """Ranking at full scale, G2S 18,688 x (99,539 + 1,000) and S2G 1,000 x (714,554 +
    18,688): against the bare score GEMM (the floor) and the authors' per-query argsort on
    a sample of queries, which must give the same metrics."""
    for task, nq, n_lm, n_lab, n_junk in (("G2S", 18688, 1000, 1000, 99539),
                                          ("S2G", 1000, 1000, 18688, 714554)):
        q, g, ql, gl = fake_embeddings(nq, n_lm, n_lab, n_junk, 512, device)
        rank_queries(q[:64], g, ql[:64], gl)  # warm-up: library start-up is not ranking time
        with matmul_precision("highest"):
            gemm = timed(lambda: [part @ g.T for part in q.split(cfg.chunk)], 0.5, sync)
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
        how = f"{device.type}, D = 512, --chunk {cfg.chunk}"
        report(f"rank {task} {nq} x {len(g)}, chunked counts", fast, "s", how)
        report(f"rank {task}, the score GEMM alone", gemm, "s",
               f"the counts take {fast / gemm:.1f}x its time")
        report(f"rank {task}, per-query argsort loop", slow, "s",
               f"{len(sample)} queries timed, x {nq / len(sample):.0f}")
        report(f"rank {task}, speed-up (metrics {'identical' if same else 'DIFFER'})", slow / fast,
               "x", "same device, same run")
        if not same:
            raise SystemExit("bench: the chunked ranking disagrees with the per-query loop")

def write_clip_folder(folder: Path, vision: dict, text: dict, projection: int,
                      weights: bool = True) -> Path:
    """A Hugging Face-style CLIP folder with random weights: config.json, pytorch_model.bin
    (unless not `weights`) and the test fixture's small CLIP tokenizer.json (664 tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).parent / "assets/fixtures/clip-tiny/tokenizer.json", folder)
    text = {**text, "vocab_size": 664, "eos_token_id": 663}  # the fixture's <|endoftext|>
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
    """`eval` of G2S and S2G with frozen CLIP towers (a random-weight 4-layer ViT at 112 px),
    twice on the dataset, as whole commands: the first runs the towers on every image and
    caches their output; the second, as another checkpoint on the same towers would, runs
    only the heads and the ranking."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_clip_folder(tmp / "clip", {
            "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
            "num_attention_heads": 4, "image_size": 112, "patch_size": 16}, {
            "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 2}, 128)
        seconds = []
        with contextlib.redirect_stdout(io.StringIO()):
            main(["convert", str(folder), "--out", str(tmp / "clip.pt")])
        for label in ("towers run", "towers cached"):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                main(["eval", "--ckpt", str(tmp / "clip.pt"), "--data", cfg.data, "--out",
                      str(tmp), "--cache", str(tmp / "cache"), "--tasks", "G2S,S2G",
                      "--workers", str(cfg.workers), "--device", device.type])
            seconds.append(time.perf_counter() - t0)
            report(f"eval G2S+S2G, frozen CLIP, {label}", seconds[-1], "s",
                   f"{device.type}, {cfg.data}, whole commands")
        report("eval on cached towers, speed-up", seconds[0] / seconds[1], "x", "same run")

def bench_paper(cfg: Config, device, sync, done: dict):
    """--preset paper at full size with random weights (no --clip needed): the training step
    on frozen ViT-L/14-336 towers (a batch of 2 on the CPU), the tower's images/s, and from
    those the time of the authors' 20 epochs of 16,533 landmarks and of a full evaluation's
    833,781 images on this device: estimates from the step and the tower alone."""
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_clip_folder(Path(tmp), {  # openai/clip-vit-large-patch14-336's sizes
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 336, "patch_size": 14}, {
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12}, 768, weights=False)
        run = dataclasses.replace(cfg, **{
            **PRESETS["paper"], "clip": str(folder), "img_size": 336, "max_len": 77,
            "batch_size": cfg.batch_size if cuda else 2,
            "eval_batch": cfg.eval_batch if cuda else 2})
        rate = step_rate(run, device, sync, "train step, --preset paper, ViT-L/14-336")
        tower, side = MML(run).enc["G"].to(device).eval(), run.img_size
        x = torch.randint(0, 256, (run.eval_batch, 3, side, side), dtype=torch.uint8,
                          device=device)
        with torch.no_grad(), autocast_for(device, run):
            images = run.eval_batch / timed(lambda: tower.features(x), 2.0, sync)
    report("CLIP ViT-L/14-336 vision tower", images, "images/s",
           f"{device.type}, batch {run.eval_batch}, {'bf16' if bf16_on(device, run) else 'fp32'}")
    report("estimate: the paper's 20 epochs' steps", 20 * 16533 / rate / 3600, "h",
           f"{device.type}, batch {run.batch_size}")
    report("estimate: a full evaluation's towers", 833781 / images / 60, "min",
           f"{device.type}, each image once (the tower cache)")

BENCH_PHASES = {"steps": bench_steps, "loader": bench_loader, "rank": bench_rank,
                "towers": bench_towers, "paper": bench_paper}

def bench(cfg: Config):
    """`bench`: one table of throughputs on this machine, a phase at a time (--phases): the
    training step, the loader against it, ranking against its floor and the authors' loop,
    evaluation on cached CLIP towers, the paper's setting at full size."""
    device = device_of(cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"bench on {name}, torch {torch.__version__}; H = {cfg.img_size}, "
          f"B = {cfg.batch_size}, D = {cfg.embed_dim}")
    done = {}
    for phase in cfg.phases.split(","):
        done[phase] = BENCH_PHASES[phase](cfg, device, sync, done)

# ---- the synthetic world -----------------------------------------------------------------
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
    cold = np.clip((lat - 42) / 4, 0, 1)  # the north
    wave = 0.5 + 0.5 * math.sin(lat * 0.9) * math.cos(lon * 0.7)  # farm or forest
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

def write_csv(path: Path, header: list[str], rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

def synthetic_root(scale: float) -> Path:
    """Where `train`, `prepare` and `synth` put the synthetic world of a given --scale."""
    return Path("data") / ("synthetic" if scale == 1 else f"synthetic-x{scale:g}")

def synthetic_world(scale: float) -> Path:
    """The data of `train`, `prepare` and `bench` without --data: the synthetic world of
    --scale, written on first use by process 0 while the others wait."""
    root = synthetic_root(scale)
    if is_master() and not root.exists():  # renamed into place when whole
        t = time.time()
        print0(f"no --data given: generating a synthetic world in {root} ...")
        counts = synthesize(root, scale)
        print0(f"  done in {time.time() - t:.0f}s: {json.dumps(counts)}")
    barrier()  # every process, whether or not the world had to be written
    return root

# ---- command line -------------------------------------------------------------------------

COMMANDS = {  # command: its --help line, and the Config fields it takes beyond `train`'s
    "train": ("train a model (on a synthetic world made on first use, without --data)", ""),
    "eval": ("evaluate a checkpoint on every task of the protocol",
             "ckpt data out tasks chunk eval_batch viz cache workers device clip"),
    "locate": ("the likeliest places of photos, aerial images or sentences",
               "inputs text satellite top gallery json ckpt out eval_batch device clip"),
    "synth": ("write a synthetic world in the released layout", "out scale seed"),
    "prepare": ("decode every image once into a cache that training and eval read",
                "data scale splits img_size resize cache workers"),
    "bench": ("time each phase of a run on this machine (and every `train` option)",
              "phases chunk eval_batch bench_queries"),
    "convert": ("make an mml checkpoint of CLIP, the authors' released model or GeoCLIP",
                "source out overwrite clip"),
    "compare": ("set runs side by side, with bootstrap intervals over query landmarks",
                "runs latex resamples"),
}
FIELDS = [f.name for f in dataclasses.fields(Config)]
TRAIN_FIELDS = FIELDS[:FIELDS.index("select") + 1]
# what a checkpoint decides: a model, and the preprocessing it was trained with
MODEL_FIELDS = FIELDS[FIELDS.index("preset"):FIELDS.index("gps_scaling") + 1] + [
    "img_size", "resize"]
POSITIONAL = {"inputs": "*", "source": "?", "runs": "+"}

def parse_args(argv=None) -> tuple[str, Config, set]:
    """Command, Config and the names of the options given. Each field's --help is the comment
    beside it in Config; an option a command does not take is an error naming the closest."""
    p = argparse.ArgumentParser(prog="mml.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)  # abbreviations would hide typos too
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(Config), re.M))
    types, flags = {f.name: f.type for f in dataclasses.fields(Config)}, {}
    for command, (about, extra) in COMMANDS.items():
        sub = commands.add_parser(command, help=about, description=about, allow_abbrev=False)
        names = (TRAIN_FIELDS if command in ("train", "bench") else []) + extra.split()
        flags[command] = ["--" + n.replace("_", "-") for n in names]
        for name, flag in zip(names, flags[command]):
            default, kind = getattr(Config, name), types[name]
            choices = typing.get_args(kind)
            # a default worth saying (0 is one, False is not: the flag's absence says it)
            shown = "" if default is False or default in ("", ()) or "default" in helps[
                name] else f" (default: {default})"
            # not given: not set at all, so that `given` knows what the user said
            args = {"help": helps[name] + shown, "default": argparse.SUPPRESS}
            if name in POSITIONAL:
                sub.add_argument(name, nargs=POSITIONAL[name], metavar=name.upper(), **args)
            elif kind is bool:
                sub.add_argument(flag, action=argparse.BooleanOptionalAction, **args)
            elif kind is tuple:
                sub.add_argument(flag, action="append", metavar="TEXT", **args)
            else:  # choices: argparse names them in --help and in its errors
                sub.add_argument(flag, type=str if choices else kind, choices=choices or None,
                                 metavar=None if choices else kind.__name__.upper(), **args)
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

# Bounds of the numbers where a wrong one does harm (memory asked for, a crash at hour five):
# the command line's, and a checkpoint's config before anything is allocated from it.
BOUNDS = {"scale": (0.01, 100), "n_val": (2, None), "img_size": (16, 1024),
          "workers": (0, 256), "embed_dim": (2, 16384), "img_width": (8, 4096),
          "vocab_size": (32, 10**6), "max_len": (2, 4096), "text_width": (8, 16384),
          "text_layers": (1, 64), "gps_width": (1, 16384), "gps_depth": (0, 64),
          "batch_size": (2, 10**6), "epochs": (1, None), "max_steps": (0, None),
          "lr": (0, None), "weight_decay": (0, None), "log_every": (1, None),
          "chunk": (1, None), "eval_batch": (1, None), "top": (1, None),
          "resamples": (100, 10**5), "bench_queries": (1, None)}

def check_config(cfg: Config, where: str = "--"):
    """Each field of its type and among its choices, the numbers within BOUNDS, and the
    settings that must agree: one line naming the option, or the checkpoint's field (where:
    "PATH: config field ")."""
    name = lambda k: where + (k.replace("_", "-") if where == "--" else k)
    for f in dataclasses.fields(Config):
        value, choices = getattr(cfg, f.name), typing.get_args(f.type)
        kind = str if choices else {float: (int, float), tuple: (tuple, list)}.get(f.type, f.type)
        if not isinstance(value, kind) or isinstance(value, bool) != (f.type is bool):
            raise UserError(f"{name(f.name)} {value!r}: expected a "
                            f"{getattr(f.type, '__name__', 'str')}")
        if choices and value not in choices:
            raise UserError(f"{name(f.name)} {value!r}: expected one of "
                            f"{', '.join(map(repr, choices))}")
        low, high = BOUNDS.get(f.name, (None, None))
        if f.type is float and not math.isfinite(value):
            raise UserError(f"{name(f.name)} {value}: expected a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            kind = "an integer" if f.type is int else "a number"
            raise UserError(f"{name(f.name)} {value}: expected {kind} "
                            + (f">= {low}" if high is None else f"in [{low}, {high}]"))
    mods = cfg.modalities.upper()
    if len(set(mods)) < 2 or set(mods) - set("GSTC") or len(set(mods)) != len(mods):
        raise UserError(f"{name('modalities')} {cfg.modalities}: expected two or more distinct "
                        f"letters of GSTC")
    if cfg.img_width % 8:  # GroupNorm(8, ...) in the image CNN
        raise UserError(f"{name('img_width')} {cfg.img_width}: expected a multiple of 8")
    if cfg.text_width > 64 and cfg.text_width % 64:  # one attention head per 64 channels
        raise UserError(f"{name('text_width')} {cfg.text_width}: expected a multiple of 64, "
                        f"or at most 64")
    if cfg.loss == "imagebind" and "G" not in mods:
        raise UserError(f"{name('loss')} imagebind pairs ground with the others: needs G")
    if cfg.share_image_trunk and not {"G", "S"} <= set(mods):
        raise UserError(f"{name('share_image_trunk')}: needs both G and S in the modalities")

def checkpoint_config(path: Path, ckpt: dict) -> Config:
    """The Config a checkpoint was trained with, held to the command line's checks. Options
    added to mml.py since take their defaults; one this mml.py does not know is an error."""
    saved, defaults = ckpt["config"], dataclasses.asdict(Config())
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise UserError(f"{path}: its config does not fit this mml.py (unknown options: "
                        f"{', '.join(map(str, unknown))})")
    cfg = Config(**(defaults | saved))
    check_config(cfg, f"{path}: config field ")
    return cfg

def resolve(command: str, cfg: Config, given: set) -> Config:
    """Settings that follow from others, all in one place: a preset's, modalities and
    --freeze as letters, the image size and tokens pretrained weights were made for, where
    eval reads and writes, the run folder's state and the data (by default the synthetic
    world)."""
    check_config(cfg)
    out = Path(cfg.out)
    if command == "train" and cfg.resume:  # the run's own settings, but those given now
        if cfg.overwrite:
            raise UserError("--resume continues the run in --out, --overwrite replaces it: "
                            "give one of them")
        if not (out / "last.pt").is_file():
            raise UserError(f"{out / 'last.pt'}: no run to resume there (--resume continues "
                            f"the run in --out: name its folder with --out)")
        saved = checkpoint_config(out / "last.pt", load_checkpoint(out / "last.pt", True))
        for k in MODEL_FIELDS:
            if k in given and getattr(cfg, k) != getattr(saved, k):
                raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)}: {out / 'last.pt'} "
                                f"was trained with {getattr(saved, k)}; leave it out to resume")
        return dataclasses.replace(saved, **{k: getattr(cfg, k) for k in given})
    held = [n for n in ("last.pt", "best.pt", "log.jsonl") if (out / n).exists()]
    if command == "train" and held and not cfg.overwrite:
        raise UserError(f"{out}: holds a run already ({', '.join(held)}): continue it with "
                        f"--resume, or start over with --overwrite")
    if command == "train" and cfg.preset:  # a preset sets what the options given leave unsaid
        cfg = dataclasses.replace(cfg, **{k: v for k, v in PRESETS[cfg.preset].items()
                                         if k not in given})
    letters = "".join(LETTER.get(n.strip().lower(), n.strip().upper())
                      for n in cfg.freeze.split(","))
    if set(letters) - set("GSTC"):
        raise UserError(f"--freeze {cfg.freeze}: expected some of ground, satellite, text, gps "
                        f"(or G, S, T, C)")
    in_order = lambda s: "".join(m for m in "GSTC" if m in s.upper())
    cfg = dataclasses.replace(cfg, modalities=in_order(cfg.modalities),
                              freeze=in_order(letters))
    if cfg.share_image_trunk and len({"G", "S"} & set(cfg.freeze)) == 1:
        raise UserError(f"--freeze {cfg.freeze}: the ground and aerial encoders share one "
                        f"backbone (--share-image-trunk): freeze both or neither")
    if command in ("train", "bench", "prepare"):
        cfg = resolve_sizes(cfg, given)
        # the checkpoint records the data as an absolute path: eval reads it from anywhere
        data = Path(cfg.data) if cfg.data else synthetic_root(cfg.scale)  # made by `main`
        cfg = dataclasses.replace(cfg, data=str(data.resolve()))
    if command == "synth" and "out" not in given:
        cfg.out = str(synthetic_root(cfg.scale))
    if command in ("eval", "locate") and "ckpt" not in given:
        cfg.ckpt = str(out / "best.pt")
    elif command == "eval" and "out" not in given:  # eval writes beside its checkpoint
        cfg.out = str(Path(cfg.ckpt).parent)
    if command == "convert" and not {"source", "out"} <= given:
        raise UserError("convert: name what to convert (SRC) and the checkpoint to write "
                        "(--out)")
    return cfg

def resolve_sizes(cfg: Config, given: set) -> Config:
    """The image size and tokens of pretrained backbones: CLIP's from its folder, torchvision's
    from its weights (224 px); a size given otherwise is one line where it cannot work."""
    if "clip" in (cfg.image_backbone, cfg.text_backbone):
        c = clip_config(cfg.clip)
        side, tokens = c["vision"]["image_size"], c["text"]["max_position_embeddings"]
        if cfg.image_backbone == "clip" and "img_size" in given and cfg.img_size != side:
            raise UserError(f"--img-size {cfg.img_size}: the vision tower of {cfg.clip} takes "
                            f"{side} px images")
        if cfg.text_backbone == "clip" and "max_len" in given and cfg.max_len > tokens:
            raise UserError(f"--max-len {cfg.max_len}: the text tower of {cfg.clip} takes at "
                            f"most {tokens} tokens")
        return dataclasses.replace(
            cfg, img_size=side if cfg.image_backbone == "clip" else cfg.img_size,
            max_len=cfg.max_len if "max_len" in given or cfg.text_backbone != "clip" else tokens)
    if cfg.image_backbone != "small":
        crop = backbone_weights(cfg.image_backbone).transforms().crop_size[0]
        cfg = cfg if "img_size" in given else dataclasses.replace(cfg, img_size=crop)
        vit = cfg.image_backbone == "vit_b_16"
        if vit and (cfg.img_size % 16 or cfg.pretrained and cfg.img_size != crop):
            raise UserError(f"--img-size {cfg.img_size}: vit_b_16 takes {crop} px images with "
                            f"--pretrained, and multiples of 16 without")
    return cfg

def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after use
    command, cfg, given = parse_args(argv)
    try:
        setup_distributed(cfg)
        cfg = resolve(command, cfg, given)
        if command in ("train", "prepare", "bench") and "data" not in given and not cfg.resume:
            synthetic_world(cfg.scale)  # the default data, written on first use
        run = {"train": fit, "eval": evaluate, "locate": locate, "synth": synth,
               "prepare": prepare, "bench": bench, "convert": convert, "compare": compare}
        run[command](cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
