"""mml.py: the MMLandmarks benchmark (CVPR 2026) in one readable file.

18,557 US landmarks, each seen four ways: ground photos (G), aerial images (S, "satellite"),
a Wikipedia text (T) and a GPS point (C, "coordinates"). One model embeds all four into one
space with a CLIP-style contrastive loss, so a photo finds its aerial view (G2S), an aerial
view its photos (S2G), a photo, an aerial view or a sentence its location (G2C, S2C, T2C),
and a sentence its images (T2G, T2S).

    pip install -r requirements.txt
    python mml.py train   # no data: writes a synthetic world, then trains (3 min, 2 cores)
    python mml.py eval    # all 13 tasks, official and strict (8 s); --viz: pictures
    python mml.py train --data /data/MMLandmarks --preset paper --clip DIR  # the authors'
    torchrun --standalone --nproc_per_node=8 mml.py train --data /data/MMLandmarks ...

The main path comes first, as the data flows: config, geometry, data, model, loss, metrics,
train. Then eval, checkpoints and the Python API, outside models (CLIP, torchvision,
`convert`), tools (pictures, the image cache, `bench`), the synthetic world, the command
line. PROTOCOL N cites section N of the protocol in README.md. Shapes: B batch, D embedding
width, E a backbone's width, H image side, L tokens, Q queries, N gallery, P positives.
"""
import argparse, contextlib, csv, dataclasses, datetime, difflib, fcntl, functools, hashlib
import io, itertools, json, math, mmap, os, pickle, random, re, shutil, signal, subprocess
import sys, textwrap, time, typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np, torch, torchvision
import torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

# ---- config -------------------------------------------------------------------------------
# One dataclass is the whole configuration; the comment beside a field is its --help
# (`parse_args`). A checkpoint's Config is held to the command line's types and bounds.

BACKBONE = Literal["small", "resnet18", "resnet50", "convnext_tiny", "vit_b_16", "clip"]

@dataclass
class Config:
    # data (the fields from here to `select` are `train`'s options)
    data: str = ""  # dataset root, released layout (default: the synthetic world)
    scale: float = 1.0  # size of the synthetic world (1: 1,600 train, 100 query landmarks)
    n_val: int = 1024  # training landmarks held out for validation (at most a tenth, or 2)
    holdout: Literal["seeded", "authors"] = "seeded"  # by --seed, or the authors' own draw
    train_text: Literal["first", "random"] = "first"  # the training sentence (PROTOCOL 2)
    img_size: int = 64  # images are resized to H x H (pretrained backbones: their size)
    resize: Literal["crop", "squash", "clip"] = "crop"  # centre square, whole, or as CLIP
    cache: str = ""  # the image caches' root (default: DATA/cache), filled by `prepare`
    workers: int = min(8, os.cpu_count() or 1)  # DataLoader worker processes
    seed: int = 0  # seeds the hold-out, the sampling, the jitter and the initial weights
    device: Literal["", "cuda", "cpu"] = ""  # where to compute (default: cuda if visible)
    # model
    preset: Literal["", "paper"] = ""  # paper: the authors' baseline (needs --clip)
    clip: str = ""  # a Hugging Face CLIP folder, read for CLIP's towers
    modalities: str = "GSTC"  # the modalities to train: two or more of G S T C
    embed_dim: int = 128  # width D of the shared space (the authors: 512)
    image_backbone: BACKBONE = "small"  # small: a CNN; clip: CLIP's; or torchvision's
    text_backbone: Literal["small", "clip"] = "small"  # small: a transformer; or CLIP's
    pretrained: bool = False  # torchvision's backbones start from their ImageNet weights
    freeze: str = ""  # encoders whose backbone stays fixed, heads trained: G,S or ground,...
    head: Literal["linear", "mlp", "none"] = "linear"  # G, S, T projection heads
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
    batch_size: int = 128  # the global batch, split across torchrun's processes
    epochs: int = 25  # passes over the training landmarks, one sample of each
    max_steps: int = 0  # the run's length in steps (0: --epochs)
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    recipe: Literal["mml", "paper"] = "mml"  # optimiser, schedule and jitter
    bf16: bool = True  # bf16 autocast on GPUs that have it (the CPU: float32)
    compile: bool = False  # torch.compile the model
    log_every: int = 10  # steps between log lines
    out: str = "runs/mml"  # the run folder
    resume: bool = False  # continue the run in --out from its last.pt, exactly
    overwrite: bool = False  # start over in an --out that holds a run
    select: Literal["recall", "loss"] = "recall"  # best.pt: best validation R@1, or loss
    # evaluation and the tools
    ckpt: str = ""  # the checkpoint (default: best.pt in --out, runs/mml)
    tasks: str = ""  # comma-separated tasks, e.g. G2S,T2C-no_cues (default: all 13)
    chunk: int = 512  # queries scored at once: memory about 6 bytes x chunk x gallery
    eval_batch: int = 256  # batch of embedding in evaluation
    viz: bool = False  # also draw each retrieval task's grid of results
    source: str = ""  # a Hugging Face CLIP folder, or the authors' weights_best.pth
    splits: str = "train,query,index"  # splits `prepare` decodes into the cache
    phases: str = "steps,loader,rank"  # what `bench` times, in order

# The authors' baseline (PROTOCOL 5; their train.py, configs/mml_clip.yaml): frozen CLIP
# towers (one for both image views), MLP heads, GeoCLIP's GPS encoder from scratch without
# its scaling, their images, optimisation, jitter and selection; sizes from --clip.
PRESETS = {"paper": {
    "image_backbone": "clip", "text_backbone": "clip", "share_image_trunk": True,
    "freeze": "GST", "head": "mlp", "embed_dim": 512, "gps_width": 1024, "gps_depth": 3,
    "gps_scaling": False, "resize": "squash", "modalities": "GSTC",
    "train_text": "first", "lr": 1e-4, "weight_decay": 5e-4, "recipe": "paper",
    "batch_size": 512, "epochs": 20, "n_val": 1024, "holdout": "authors", "select": "loss"}}

# The modalities by letter, and the names the command line and API accept too.
MODALITY = {"G": "ground", "S": "satellite", "T": "text", "C": "gps"}
LETTER = {name: m for m, name in MODALITY.items()}

def as_letters(text: str) -> str:
    """"ground,S", "sg" -> "GS": names or letters, GSTC's order; else as given (checked)."""
    names = [n.strip() for n in text.split(",")]
    letters = "".join(LETTER.get(n.lower(), n.upper()) for n in names)
    in_order = "".join(m for m in "GSTC" if m in letters)
    return in_order if set(in_order) == set(letters) else text

class UserError(Exception):
    """A mistake in the input (a path, a file, an option): one line, exit status 1."""

def rank_and_world() -> tuple[int, int]:  # (0, 1) without torchrun
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def print0(*args):
    if rank_and_world()[0] == 0:  # one line per event, not one per process
        print(*args, flush=True)

# ---- geometry -----------------------------------------------------------------------------

def equal_earth(latlon: torch.Tensor, scaled: bool = True) -> torch.Tensor:
    """(..., 2) degrees (lat, lon) -> (..., 2) Equal Earth (x, y) (Savric et al. 2018), as
    GeoCLIP feeds its location encoder: scaled by SF/180 to x in [-1, 1]. The authors' copy
    leaves the scaling out (scaled=False), and their encoder was trained without it."""
    a1, a2, a3, a4, sf = 1.340264, -0.081106, 0.000893, 0.003796, 66.50336
    lat, lon = torch.deg2rad(latlon[..., 0]), torch.deg2rad(latlon[..., 1])
    theta = torch.asin(math.sqrt(3) / 2 * torch.sin(lat))
    x = (2 * math.sqrt(3) * lon * torch.cos(theta)
         / (3 * (9 * a4 * theta**8 + 7 * a3 * theta**6 + 3 * a2 * theta**2 + a1)))
    y = a4 * theta**9 + a3 * theta**7 + a2 * theta**3 + a1 * theta
    return torch.stack((x, y), dim=-1) * (sf / 180 if scaled else 1)

def haversine_km(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Great-circle distance in km (R = 6371.0) of (..., 2) lat/lon degrees."""
    a, b = torch.deg2rad(a.double()), torch.deg2rad(b.double())
    dlat, dlon = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    h = (torch.sin(dlat / 2) ** 2
         + torch.cos(a[..., 0]) * torch.cos(b[..., 0]) * torch.sin(dlon / 2) ** 2)
    return 2 * 6371.0 * torch.asin(torch.sqrt(h.clamp(0, 1)))

# ---- data ---------------------------------------------------------------------------------
# The released layout (PROTOCOL 1): per split, mml_{split}.csv lists landmark_id, lat, lon,
# mml_{split}_{ground,satellite,text}.csv each landmark's photo ids, aerial ids (oldest
# first) and article id, the files at {split}/{kind}/a/b/c/{id}.{jpg,png,json} (a/b/c: the
# id's first letters); index/ holds the distractors. A bad cell is one line naming it.

def shard(split_dir: Path, kind: str, file_id: str) -> Path:
    ext = {"ground": ".jpg", "satellite": ".png", "text": ".json"}[kind]
    return split_dir / kind / file_id[0] / file_id[1] / file_id[2] / (file_id + ext)

def ok(value, test):  # value if it passes its test (read_csv names the line of a failure)
    if not test:
        raise ValueError
    return value

# Each column mml reads: a cell's parser and what it must be. Ids become file names: plain
# names only, so that no path built from a CSV leaves the dataset root (no separator, no
# "..", never absolute). The release's ids are 16 hex digits; -1 labels a distractor.
PLAIN = re.compile(r"[A-Za-z0-9_-]{3,}")
IDS = "letters, digits, _ or -, at least 3"
CELLS = {"landmark_id": (lambda c: ok(int(c), 0 <= int(c) < 2**63), "an integer in [0, 2**63)"),
         "lat": (lambda c: ok(float(c), abs(float(c)) <= 90), "a latitude in [-90, 90]"),
         "lon": (lambda c: ok(float(c), abs(float(c)) <= 180), "a longitude in [-180, 180]"),
         "json": (lambda c: ok(c, PLAIN.fullmatch(c)), f"a plain id ({IDS})"),
         "images": (lambda c: ok(c.split(), all(map(PLAIN.fullmatch, c.split()))),
                    f"space-separated plain ids ({IDS})")}

def read_csv(path: Path, columns: list[str]) -> dict[str, list]:
    """{column: its cells parsed by CELLS} of a UTF-8 CSV (a byte-order mark allowed), each
    landmark once (a repeated row would count its queries twice)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found (a CSV with columns {','.join(columns)})")
    data = path.read_bytes()
    csv.field_size_limit(max(csv.field_size_limit(), len(data)))  # a cell of 8,000 photos
    try:
        lines = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
        header = next(lines, [])  # rows by file line; blank ones skipped, as pandas does
        rows = [(lines.line_num, row) for row in lines if row]
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte {data[e.start]:#04x})"
                        ) from None
    except csv.Error as e:
        raise UserError(f"{path}, line {lines.line_num}: not a CSV row ({e})") from None
    table, first = {}, {}
    for c in columns:
        if header.count(c) != 1:  # pandas would read the first of two
            raise UserError(f"{path}: {'a repeated' if c in header else 'no'} column {c!r} "
                            f"(expected {','.join(columns)}, found {','.join(header)})")
        (parse, rule), k, table[c] = CELLS.get(c, (str, "")), header.index(c), []
        for n, row in rows:
            try:
                table[c].append(parse(row[k]))
            except (ValueError, IndexError):
                what = (f"{c} {row[k]!r:.60}: expected {rule}" if k < len(row) else
                        f"{len(row)} fields, expected {len(header)}")
                raise UserError(f"{path}, line {n}: {what}") from None
    for (n, _), landmark in zip(rows, table.get("landmark_id", [])):
        if first.setdefault(landmark, n) != n:
            raise UserError(f"{path}, line {n}: landmark {landmark} again (first on line "
                            f"{first[landmark]})")
    return table

def by_landmark(listing: Path, name: str, column: str, ids: list[int]) -> dict:
    """{landmark id: cell} of the listing's mml_{split}_{name}.csv, checked both ways against
    the listing: each landmark in both, or one line naming the first few."""
    path = listing.with_name(f"{listing.stem}_{name}.csv")
    cells, listed = dict(zip(*read_csv(path, ["landmark_id", column]).values())), set(ids)
    for missing, here, there in (([i for i in cells if i not in listed], listing, path.name),
                                 ([i for i in ids if i not in cells], path, listing.name)):
        if missing:
            more = f" and {len(missing) - 5} more" * (len(missing) > 5)
            raise UserError(f"{here}: landmark {', '.join(map(str, missing[:5]))}{more} "
                            f"listed in {there} but missing here")
    return cells

def check_root(root: Path, split: str) -> Path:  # ROOT/split, or which folder is missing
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found (expected train/, query/, index/)")
    if not (root / split).is_dir():  # --data ROOT/train, say, for ROOT
        hint = f"; the root is {root.parent}" if (root.parent / split).is_dir() else ""
        raise UserError(f"{root / split}: split folder not found (expected mml_{split}*.csv "
                        f"and ground/, satellite/ inside{hint})")
    return root / split

@dataclass
class Split:
    """One split's landmarks: row i of every field describes landmark i."""
    dir: Path  # ROOT/train or ROOT/query
    ids: np.ndarray  # (n,) landmark ids
    latlon: np.ndarray  # (n, 2) degrees
    ground: list[list[str]]  # its photos' ids
    sat: list[list[str]]  # its aerial images' ids, every year, oldest first
    text: list[str]  # its article's id
    latest = property(lambda s: [years[-1] for years in s.sat])  # evaluation's view

    def take(self, rows) -> "Split":
        pick = lambda column: [column[i] for i in rows]
        return Split(self.dir, self.ids[rows], self.latlon[rows], pick(self.ground),
                     pick(self.sat), pick(self.text))

def read_split(root: Path, split: str) -> Split:
    """ROOT/train or ROOT/query: each landmark's GPS, photos, aerial images and article."""
    d, query = check_root(root, split), split == "query"
    listing = d / f"mml_{split}.csv"
    table = read_csv(listing, ["landmark_id", "lat", "lon"])
    ids = table["landmark_id"]
    ground = by_landmark(listing, "ground", "images", ids)
    # every year's aerial ids, oldest first; the query split's: the latest, evaluation's view
    sat = by_landmark(listing, "satellite", "images", ids)
    if query and (two := next((i for i in ids if len(sat[i]) > 1), None)) is not None:
        raise UserError(f"{d}/mml_query_satellite.csv: landmark {two} has "
                        f"{len(sat[two])} tiles; expected the latest alone")
    text = by_landmark(listing, "text", "json", ids)
    kept = [i for i in ids if ground[i] and sat[i]]
    if len(kept) < len(ids):
        print0(f"{d}: {len(ids) - len(kept)} landmarks without photo or tile skipped")
    latlon = dict(zip(ids, zip(table["lat"], table["lon"])))
    return Split(d, np.array(kept, dtype=np.int64),
                 np.array([latlon[i] for i in kept], dtype=np.float64).reshape(-1, 2),
                 [ground[i] for i in kept], [sat[i] for i in kept], [text[i] for i in kept])

def read_train(cfg: Config, root: Path) -> tuple[Split, Split]:
    """The training split less a hold-out: (train, validation), seeded by --seed, or the
    authors' (train_dataset.py): random.Random(42) shuffles the sorted ids' positions and
    the first n_val are held out (1,024 of 17,557 on the real data)."""
    split = read_split(root, "train")
    n_val = min(cfg.n_val, max(2, len(split.ids) // 10))
    if cfg.holdout == "authors":
        order = list(range(len(split.ids)))
        random.Random(42).shuffle(order)
        perm = np.argsort(split.ids, kind="stable")[order]
    else:
        perm = np.random.default_rng(cfg.seed).permutation(len(split.ids))
    return split.take(np.sort(perm[n_val:])), split.take(np.sort(perm[:n_val]))

# A file past these bounds is unreadable, as a corrupt one is (the release's photos are about
# 800 px, its articles under a megabyte).
MAX_PIXELS = 50_000_000  # a decoded image (after draft): 50 megapixels, 150 MB of RGB
MAX_ARTICLE_BYTES = 1 << 24  # an article: 16 MiB of JSON
MAX_PIECES = 100_000  # an article's paragraphs and sentences (a long real one: thousands)

class UnreadableFile(Exception):  # an image or article: skipped in training, fatal in eval
    pass

def regular_file(path: Path) -> Path:  # a FIFO would block a read, /dev/zero never end it
    if not path.is_file():
        raise ValueError("not a regular file" if path.exists() else "not found")
    return path

def read_text(path: Path, limit: int) -> str:  # else ValueError or OSError
    if (size := regular_file(path).stat().st_size) > limit:
        raise ValueError(f"{size:,} bytes, over the {limit:,} allowed")
    return path.read_text(encoding="utf-8")

def to_square(im: Image.Image, size: int, resize: str = "crop") -> np.ndarray:
    """An RGB image -> (H, H, 3) uint8. crop: short side to H, centre square. squash: whole
    image to H x H, bit for bit the authors' OpenCV INTER_LINEAR_EXACT (PIL's bilinear: up to
    96 grey levels off). clip: as CLIP's processor (bicubic short side, centre square)."""
    if resize == "crop":
        return np.array(ImageOps.fit(im, (size, size), Image.BILINEAR))
    if resize == "squash":  # OpenCV's fixed point: weights in 1/256, one rounding
        x = np.asarray(im, dtype=np.int32)  # (h, w, 3)
        for _ in "xy":  # along x, then y: each pass turns the image, (h, w) -> (H, h)
            n = x.shape[1]
            # source positions as OpenCV computes them; past the edge centres, one pixel
            t = (np.arange(size) + 0.5) * (1 / (size / n)) - 0.5
            i = np.floor(t).astype(np.int64)
            w = np.rint((t - i) * 256).astype(np.int32)[:, None]  # i + 1's, half to even
            w[(i < 0) | (i + 1 >= n)] = 0
            i = i.clip(0, n - 1)
            x = (x[:, i] * (256 - w) + x[:, np.minimum(i + 1, n - 1)] * w).transpose(1, 0, 2)
        return ((x + 32768) >> 16).astype(np.uint8)  # in 1/65536, to the nearest
    short, long = sorted(im.size)
    long = int(size * long / short)  # as transformers' get_resize_output_image_size rounds
    if long * size > MAX_PIXELS:  # a 10^6 x 1 strip would first become 10^8 x 100
        raise ValueError(f"{im.width}x{im.height} px: too thin to resize as CLIP does")
    im = im.resize((size, long) if im.width == short else (long, size), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.array(im.crop((left, top, left + size, top + size)))

def load_image(path: Path, size: int, resize: str = "crop") -> np.ndarray:
    """(H, H, 3) uint8. For crop, draft() lets JPEGs decode at 1/2, 1/4 or 1/8 scale, never
    below H (2-3x faster); the others in full, as their models do."""
    with Image.open(regular_file(path)) as im:
        if resize == "crop":
            im.draft("RGB", (size, size))
        if im.width * im.height > MAX_PIXELS:  # known from the header, before decoding
            raise ValueError(f"{im.width}x{im.height} px, over the {MAX_PIXELS:,}-pixel limit")
        if im.mode.startswith(("I", "F")):  # 16-bit or float: convert("RGB") would clip
            raise ValueError(f"a {im.mode} image; 8-bit images only")
        return to_square(im.convert("RGB"), size, resize)

class ImageStore:
    """One split's ground or aerial images as (H, H, 3) uint8, by id: from the `prepare`
    cache when there is one (`Cache`, with the tools), else decoded from the files."""

    def __init__(self, split_dir: Path, kind: str, cfg: Config, needed=()):
        self.dir, self.kind, self.size = split_dir, kind, cfg.img_size
        self.resize = cfg.resize
        self.cache = Cache.open(split_dir, kind, cfg, needed)  # None: no cache

    def path(self, image_id: str) -> Path:
        return shard(self.dir, self.kind, image_id)

    def __call__(self, image_id: str, out: np.ndarray | None = None) -> np.ndarray:
        """The image, written into `out` when given (a batch's slot)."""
        out = np.empty((self.size, self.size, 3), np.uint8) if out is None else out
        if self.cache:
            return self.cache.read(image_id, out, self)
        try:
            out[...] = load_image(self.path(image_id), self.size, self.resize)
        except Exception as e:  # missing, truncated, not an image: decoders raise anything
            raise UnreadableFile(f"{self.path(image_id)}: {e}") from None
        return out

def read_articles(split_dir: Path, ids: list[str]) -> tuple[list[dict | None], list[str]]:
    """A split's articles by id, each {section title: text} or None where unreadable; and why
    each unreadable one failed."""
    articles, bad = [], []
    for path in (shard(split_dir, "text", i) for i in ids):
        try:
            article = json.loads(read_text(path, MAX_ARTICLE_BYTES))
            if not (isinstance(article, dict) and article and all(
                    isinstance(text, str) for text in article.values())):
                raise ValueError("expected a JSON object {section title: text}")
            if sum(t.count("\n") + t.count(". ") for t in article.values()) > MAX_PIECES:
                raise ValueError(f"over {MAX_PIECES:,} paragraphs and sentences")
            "".join(article.values()).encode()  # lone surrogates: no UTF-8
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: too deep
            article = bad.append(f"{path}: {type(e).__name__}: {e}")
        articles.append(article)
    return articles, bad

def train_tokenizer(texts, cfg: Config) -> Tokenizer:
    """A lower-cased BPE tokenizer learnt from training text, carried by every checkpoint.
    Not WordPiece, whose trainer numbers tied tokens differently from run to run."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=["[PAD]", "[UNK]"], show_progress=False,
        limit_alphabet=cfg.vocab_size - 2))  # else a CJK text overflows it
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=cfg.max_len)  # SmallText masks 0
    tok.enable_truncation(cfg.max_len)
    return tok

def tokenize(tok: Tokenizer, sentences: list[str]) -> torch.Tensor:
    return torch.tensor([e.ids for e in tok.encode_batch(sentences)], dtype=torch.long)

class Sentences:
    """A split's sentences, cut the authors' way (PROTOCOL 2; naive, so numbers compare):
    sections, paragraphs at newlines, pieces at '. '; tree[i] holds article i's rows of
    `texts` (and `tokens`), mode "first" only the first piece:

        {"Lead": "A. B\\nC", "Past": "D"}  ->  texts [A, B, C, D], tree[0] [[[0, 1], [2]], [[3]]]
    """

    def __init__(self, articles: list[dict | None], tok: Tokenizer | None, mode: str):
        # keep: each level's first branch (1) or all ([:None])
        self.texts, self.tree, keep = [], [], 1 if mode == "first" else None
        for article in articles:  # an unreadable article (None) gives one empty sentence
            self.tree.append([])
            for section in list((article or {"": ""}).values())[:keep]:
                self.tree[-1].append([])
                for paragraph in section.split("\n")[:keep]:
                    pieces, n = paragraph.split(". ")[:keep], len(self.texts)
                    self.tree[-1][-1].append(list(range(n, n + len(pieces))))
                    self.texts += pieces
        if tok is not None:  # (pieces, L), 64k at a time
            self.tokens = torch.cat([tokenize(tok, self.texts[i:i + 65536])
                                     for i in range(0, len(self.texts), 65536)])

    def pick(self, i: int, mode: str, rng: random.Random) -> int:
        """Article i's row: the first or a random branch at each level of its tree; randrange
        (n) draws what the authors' rng.choice of n items draws."""
        node = self.tree[i]
        while isinstance(node, list):
            node = node[rng.randrange(len(node)) if mode == "random" else 0]
        return node

class LandmarkSet(torch.utils.data.Dataset):
    """[(epoch, row), ...] -> {"G", "S": (B, 3, H, H) uint8, "T": (B, L), "C": (B, 2), "bad":
    B strings}, a row's unreadable files. Training draws a photo, a year's tile, a --train-text
    sentence by (seed, epoch, row), in any worker; validation the first photo, latest tile,
    first sentence. Images go into a shared-memory batch (no collating: 2x faster), stored
    (B, H, H, 3): (B, 3, H, H) is then channels-last, as GPU convolutions prefer."""

    def __init__(self, split: Split, stores: dict, sentences: Sentences, cfg: Config,
                 train: bool):
        self.split, self.stores, self.sentences, self.cfg = split, stores, sentences, cfg
        self.train, self.mode = train, cfg.train_text if train else "first"

    def __len__(self):
        return len(self.split.ids)

    def view(self, m: str, ids: list[str], rng: random.Random, out: np.ndarray, bad: list):
        """One of ids (a random one when training) read into out (H, H, 3)."""
        for image_id in rng.sample(ids, len(ids)) if self.train else ids:
            try:
                return self.stores[m](image_id, out)
            except UnreadableFile as e:
                bad.append(str(e))
        out[...] = 0  # no readable view at all: a black image

    def __getitem__(self, keys: list[tuple[int, int]]) -> dict:
        s, H, mods, B = self.split, self.cfg.img_size, self.cfg.modalities, len(keys)
        images = {m: torch.empty(B, H, H, 3, dtype=torch.uint8) for m in "GS" if m in mods}
        if torch.utils.data.get_worker_info():  # in a worker: shared memory
            images = {m: x.share_memory_() for m, x in images.items()}
        rows, text_rows, bad = [i for _, i in keys], [], []
        for j, (epoch, i) in enumerate(keys):
            rng, problems = random.Random(f"{self.cfg.seed}/{epoch}/{i}"), []
            views = {"G": s.ground[i], "S": s.sat[i] if self.train else s.sat[i][-1:]}
            for m, x in images.items():  # G, then S: the draws' order
                self.view(m, views[m], rng, x[j].numpy(), problems)
            text_rows.append(self.sentences.pick(i, self.mode, rng) if "T" in mods else 0)
            bad.append("\n".join(problems))
        out = {m: x.permute(0, 3, 1, 2) for m, x in images.items()}  # (B, 3, H, H)
        if "T" in mods:
            out["T"] = self.sentences.tokens[text_rows]  # (B, L)
        if "C" in mods:
            out["C"] = torch.tensor(s.latlon[rows], dtype=torch.float32)  # (B, 2)
        return out | {"bad": bad}

def epoch_batches(n: int, batch: int, seed: int, rank: int = 0, world: int = 1,
                  start: int = 0, stop: int = 0):
    """Process r's (epoch, row) keys for steps start to stop: the r-th of W slices of global
    batches cut from a permutation per epoch, seeded by (seed, epoch), the last partial one
    dropped. The same for any W, resumable, one iterator for the run (no worker restarts)."""
    per_epoch, local = n // batch, batch // world
    for step in range(start, stop):
        epoch, b = divmod(step, per_epoch)
        if b == 0 or step == start:
            perm = np.random.default_rng([seed, epoch]).permutation(n)
        first = b * batch + rank * local
        yield [(epoch, int(i)) for i in perm[first:first + local]]

def augment_params(seed: int, epoch: int, step: int, n: int, recipe: str = "mml"):
    """(n, 2, 7) jitter of a global batch's ground and aerial views: brightness, contrast,
    saturation, r (blur if r < 0.2, sharpen if < 0.4), blur sigma, quarter turns, hue shift.
    mml: factors in [0.8, 1.2]; paper (the authors' settings): ColorJitter(0.15 x 4) on
    half, blur, sharpen 15% each. Keyed by (seed, epoch, step) and place: any W, resume."""
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

def augment(images: torch.Tensor, params: torch.Tensor, rotate: bool,
            hue: bool = False) -> torch.Tensor:
    """(B, 3, H, H) uint8 -> float in [0, 1], each image by its row of params, all at once on
    its device: torchvision's adjust_brightness, _contrast, _saturation, gaussian_blur (3x3),
    adjust_sharpness (2), rot90 (tested against them); aerial views turned (no north).
    `hue`: whether any shift was drawn (known on the CPU: no sync asks the device)."""
    x = images.float() / 255
    # params (B, 7) -> seven (B, 1, 1, 1)
    bright, contrast, saturation, r, sigma, turns, shift = (p.view(-1, 1, 1, 1) for p in params.T)
    gray = lambda x: (0.2989 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])  # ITU-R 601
    x = (x * bright).clamp(0, 1)
    x = (contrast * x + (1 - contrast) * gray(x).mean((2, 3), keepdim=True)).clamp(0, 1)
    x = (saturation * x + (1 - saturation) * gray(x)).clamp(0, 1)
    if hue:  # a rotation of RGB about its grey axis (Rodrigues' formula): greys and
        # brightness stay: HSV's hue shift, without a round trip through HSV
        c, s = torch.cos(2 * math.pi * shift[:, 0]), torch.sin(2 * math.pi * shift[:, 0])
        cross = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=x.device)
        rotation = c * torch.eye(3, device=x.device) + s * cross / math.sqrt(3) + (1 - c) / 3
        x = torch.einsum("bij,bjhw->bihw", rotation, x).clamp(0, 1)  # rotation (B, 3, 3)
    # blur (r < 0.2) with the separable Gaussian kernel [w, 1, w] / (1 + 2w), w = exp(-1 /
    # (2 sigma^2)), over a reflect-padded image, along rows then columns
    blur = (r < 0.2).view(-1)
    w = torch.exp(-0.5 / sigma[blur]**2)
    pad = F.pad(x[blur], (1, 1, 1, 1), mode="reflect")  # (b, 3, H+2, H+2)
    rows = (pad[..., :-2] + pad[..., 2:]) * w + pad[..., 1:-1]  # (b, 3, H+2, H)
    blurred = (rows[..., :-2, :] + rows[..., 2:, :]) * w + rows[..., 1:-1, :]
    blurred = blurred / (1 + 2 * w)**2
    # sharpen (0.2 <= r < 0.4): 2x - smooth, where smooth is x under the 3x3 kernel
    # [[1,1,1],[1,5,1],[1,1,1]] / 13, border pixels kept (the kernel's 3x3 box sum, + 4 x)
    sharp = ((r >= 0.2) & (r < 0.4)).view(-1)
    y = x[sharp]  # (b', 3, H, H)
    rows = y[..., :-2] + y[..., 1:-1] + y[..., 2:]  # (b', 3, H, H-2)
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]  # (b', 3, H-2, H-2)
    smooth = y.clone()
    smooth[..., 1:-1, 1:-1] = (box + 4 * y[..., 1:-1, 1:-1]) / 13
    x[blur], x[sharp] = blurred, (2 * y - smooth).clamp(0, 1)
    for k in (1, 2, 3) if rotate else ():
        chosen = turns.view(-1) == k
        x[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    return x

# ---- model --------------------------------------------------------------------------------
# Four encoders, one per modality, each a backbone (the trunk), a projection head to the
# shared width D and an L2 normalisation: the dot product of two embeddings is their
# cosine similarity. Backbones: a small CNN (or torchvision's or CLIP's) for images, a small
# transformer (or CLIP's) for text, GeoCLIP's location encoder for GPS. GroupNorm, not
# BatchNorm: an embedding must not depend on the rest of its batch.

class ResBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut: (B, c, h, h) -> (B, c', h/2, h/2)."""

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
    """(B, 3, H, H) -> (B, 8 * width): a stem and three residual stages, then the mean."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, width),
        nn.GELU(), ResBlock(width, 2 * width), ResBlock(2 * width, 4 * width),
        ResBlock(4 * width, 8 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())

class Block(nn.Module):
    """A pre-norm transformer layer, (B, L, E) -> (B, L, E): x + attention(norm(x)), then x +
    MLP(norm(x)); in Hugging Face CLIP's module names, so that CLIP's weights load."""

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
        """keep: (B, L), False at padding; causal: a token sees itself and those before."""
        B, L, E = x.shape
        y = self.layer_norm1(x)
        q, k, v = (self.self_attn[p](y).view(B, L, self.heads, -1).transpose(1, 2)
                   for p in ("q_proj", "k_proj", "v_proj"))  # (B, heads, L, E/heads)
        mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        x = x + self.self_attn["out_proj"](y.transpose(1, 2).reshape(B, L, E))
        y = self.mlp["fc1"](self.layer_norm2(x))
        # quick_gelu, x sigmoid(1.702 x): CLIP's approximation of gelu
        y = y * torch.sigmoid(1.702 * y) if self.act == "quick_gelu" else F.gelu(y)
        return x + self.mlp["fc2"](y)

class SmallText(nn.Module):
    """(B, L) token ids, 0 = padding -> (B, width): a small transformer, mean-pooled."""

    def __init__(self, vocab: int, max_len: int, width: int, layers: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, max(1, width // 64), 4 * width)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        keep = ids != 0  # (B, L)
        keep[:, 0] = True  # an empty sentence keeps one token: an all-masked row is NaN
        x = self.tokens(ids) + self.pos[: ids.shape[1]]  # (B, L, width)
        for block in self.blocks:
            x = block(x, keep)
        weight = keep.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (self.norm(x) * weight).sum(1) / weight.sum(1)  # (B, width)

def projection_head(cfg: Config, width: int) -> nn.Module:
    """(B, E) -> (B, D): a Linear (mml's), Linear-ReLU-Linear (the authors') or none (CLIP's
    towers end in a projection of their own)."""
    if cfg.head == "none":
        if width != cfg.embed_dim:
            raise UserError(f"--head none: the backbone is {width}-d, not {cfg.embed_dim}")
        return nn.Identity()
    if cfg.head == "linear":
        return nn.Linear(width, cfg.embed_dim)
    return nn.Sequential(nn.Linear(width, cfg.embed_dim), nn.ReLU(),
                         nn.Linear(cfg.embed_dim, cfg.embed_dim))

class Encoder(nn.Module):
    """A backbone (trunk) and its head: (B, ...) -> (B, D) unit vectors. Images are normalised
    by `pixels` (mean, std) from uint8 (eval: 4x less to copy) or float in [0, 1]."""

    def __init__(self, trunk: nn.Module, width: int, pixels: tuple, cfg: Config):
        super().__init__()
        self.trunk, self.width, self.head = trunk, width, projection_head(cfg, width)
        self.stats = pixels
        for name, stat in zip(("mean", "std"), pixels):  # not saved: the backbone's own
            self.register_buffer(name, torch.tensor(stat).view(3, 1, 1), persistent=False)

    def features(self, x):  # (B, E): what eval's frozen-tower cache holds
        if self.stats:
            x = ((x.float() / 255 if x.dtype == torch.uint8 else x) - self.mean) / self.std
        return self.trunk(x)

    def project(self, features):
        return F.normalize(self.head(features).float(), dim=-1)

    def forward(self, x):
        return self.project(self.features(x))

def encoder(cfg: Config, m: str, share_with: Encoder | None = None) -> Encoder:
    """Modality m's (G, S or T): the small CNN (pixels to [-1, 1]) or transformer, else an
    outside tower (CLIP's, torchvision's); with share_with, its backbone under a new head."""
    if share_with:
        return Encoder(share_with.trunk, share_with.width, share_with.stats, cfg)
    if m == "T" and cfg.text_backbone == "small":
        trunk = SmallText(cfg.vocab_size, cfg.max_len, cfg.text_width, cfg.text_layers)
        return Encoder(trunk, cfg.text_width, (), cfg)
    if m != "T" and cfg.image_backbone == "small":
        pixels = ((0.5,) * 3,) * 2  # mean = std = 0.5: [0, 1] to [-1, 1]
        return Encoder(image_trunk(cfg.img_width), 8 * cfg.img_width, pixels, cfg)
    return Encoder(*outside_backbone(cfg, "text" if m == "T" else "vision"), cfg)

class RandomFourierFeatures(nn.Module):
    """(B, 2) -> (B, 2n): [cos(2 pi v b^T), sin(2 pi v b^T)], b ~ N(0, sigma^2) a saved buffer
    (GeoCLIP's `capsule.0.b`). At sigma 256 the phases reach thousands of radians: float32
    even under bf16 autocast, which would round them to noise; a multiply-add (on CPUs the
    matmul's bits), as training's TF32 would round a matmul."""

    def __init__(self, n: int, sigma: float):
        super().__init__()
        self.register_buffer("b", torch.randn(n, 2) * sigma)

    def forward(self, v):
        with torch.autocast(v.device.type, enabled=False):
            x, b = 2 * math.pi * v.float(), self.b  # (B, 2), (n, 2)
            phase = torch.addcmul(x[:, :1] * b[:, 0], x[:, 1:], b[:, 1])  # (B, n)
            return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)

class GPSEncoder(nn.Module):
    """(B, 2) lat/lon degrees -> (B, D): GeoCLIP's location encoder (Vivanco et al. 2023):
    Equal Earth, then per sigma in (2^0, 2^4, 2^8) random Fourier features and an MLP with a
    head, the three summed. GeoCLIP's names (LocEnc{k}.capsule, .head): at width 1024, depth
    3, D 512 its weights load as they are. `scaled`: Equal Earth's SF/180 (PROTOCOL 6)."""
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
        out = sum(enc["head"](enc["capsule"](v)) for enc in self.children())  # (B, D)
        return F.normalize(out.float(), dim=-1)

def is_head(name: str) -> bool:  # a parameter or module of a head: what --freeze trains
    return "head" in name.split(".")

class MML(nn.Module):
    """The encoders and the learnt temperature: batch -> ({m: (B, D)}, scale). The --freeze
    encoders' backbones get no gradient and stay in eval mode; their heads train."""

    def __init__(self, cfg: Config):
        super().__init__()
        enc = {}
        for m in (m for m in "GST" if m in cfg.modalities):  # the order fixes initial draws
            shared = enc["G"] if m == "S" and cfg.share_image_trunk else None
            enc[m] = encoder(cfg, m, shared)
        if "C" in cfg.modalities:
            enc["C"] = GPSEncoder(cfg.gps_width, cfg.gps_depth, cfg.embed_dim,
                                  cfg.gps_scaling)
        self.enc = nn.ModuleDict(enc)
        # CLIP's initial temperature 0.07, learnt in log space (Radford et al. 2021)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.frozen = [f for f in cfg.freeze if f in self.enc]  # letters, by `resolve`
        backbone = {"G": cfg.image_backbone, "S": cfg.image_backbone, "T": cfg.text_backbone}
        # frozen CLIP towers come from their folder, never saved (ViT-L/14-336: 1.7 GB)
        self.towers = tuple(f"enc.{f}.trunk." for f in self.frozen if backbone.get(f) == "clip")
        for f in self.frozen:
            for name, p in self.enc[f].named_parameters():
                p.requires_grad_(is_head(name))
        self.train()  # modules start in training mode: frozen backbones must not

    def train(self, mode: bool = True):
        super().train(mode)
        for f in self.frozen:  # module by module: a frozen backbone's BatchNorm stays fixed
            for name, module in self.enc[f].named_modules():
                module.training = mode and is_head(name)
        return self

    def forward(self, batch: dict):
        # the scale is returned, not read off the module: DDP must see it used in forward
        return {m: self.enc[m](batch[m]) for m in self.enc}, self.logit_scale.exp()

# ---- loss ---------------------------------------------------------------------------------

def loss_pairs(modalities: str) -> list[str]:
    """Every pair of the modalities: the authors' "complete" loss."""
    return [a + b for a, b in itertools.combinations(modalities, 2)]

class GatherWithGrad(torch.autograd.Function):
    """(B, D) on each of W processes -> (W*B, D) on all, gradients flowing back. A
    plain all_gather's tensors have no history: each loss would push gradient into its own
    rows only, learning from a fraction of the negatives. A row is in every process's loss,
    so its gradient is the sum over processes: backward all-reduces and keeps our slice."""

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
    """Symmetric InfoNCE (CLIP) per pair, averaged: (loss, {pair: loss}); emb {m: (B, D)},
    row i of every modality one landmark. Under torchrun a process scores its B rows against
    all W*B, labels offset by rank*B (open_clip's local loss); DDP's mean of the gradients
    is then the global batch's (scaling by W too would be open_clip issue 616). float32:
    logits reach 100."""
    world = dist.get_world_size() if gather and dist.is_initialized() else 1
    cols = {m: GatherWithGrad.apply(e) if world > 1 else e  # (W*B, D)
            for m, e in emb.items()}
    B = next(iter(emb.values())).shape[0]
    offset = dist.get_rank() * B if world > 1 else 0  # our rows among the gathered ones
    labels = torch.arange(B, device=scale.device) + offset
    parts = {}
    for a, b in pairs:
        logits_ab = scale * emb[a] @ cols[b].T  # (B, W*B)
        logits_ba = scale * emb[b] @ cols[a].T  # (B, W*B)
        parts[a + b] = (F.cross_entropy(logits_ab, labels)
                        + F.cross_entropy(logits_ba, labels)) / 2
    return sum(parts.values()) / len(parts), parts

# ---- metrics ------------------------------------------------------------------------------
# PROTOCOL 4. A positive is a gallery item of the query's landmark; label -1 marks an index
# distractor. The authors' official numbers treat distractors as junk, removed from the
# ranking before R@k and mAP@1k (for mAP, after taking the top 1,000): only medR sees them.
# The strict numbers rank them like any item. Ties go against the query: an item scoring a
# positive's score ranks before it, unless it is a positive too.

@contextlib.contextmanager
def matmul_precision(level: str):
    """Float32 matmuls at "high" (TF32) for training's speed, or "highest" for scores, as
    TF32's rounding ties 100k+ gallery items."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)

def argsort_ranks(q, g, q_labels, g_labels, map_top: int = 1000) -> dict:
    """The definition `rank_queries` is held to (tests, `bench`), query by query: score,
    sort (positives after the items they tie with), walk. Per query (Q,): its first
    positive's 0-based position with distractors ranked ("first_strict") and removed
    ("first_official"); its AP: over hits j at positions r in the top map_top, the mean of
    the precision before and at each, over all its positives."""
    res = {k: [] for k in ("first_strict", "first_official", "ap_strict", "ap_official")}
    for i in range(len(q)):
        scores, positive = g @ q[i], g_labels == q_labels[i]  # (N,)
        by_kind = torch.cat([torch.nonzero(~positive)[:, 0], torch.nonzero(positive)[:, 0]])
        order = by_kind[torch.argsort(scores[by_kind], descending=True, stable=True)]
        hit, junk = positive[order], g_labels[order] == -1
        strict, official = torch.nonzero(hit)[:, 0], torch.nonzero(hit[~junk])[:, 0]
        kept = int((strict < map_top).sum())  # the top map_top of the full ranking
        for name, rows in (("strict", strict), ("official", official)):
            res[f"first_{name}"].append(int(rows[0]))
            terms = [((j / r if r else 1) + (j + 1) / (r + 1)) / 2
                     for j, r in enumerate(rows[:kept].tolist())]
            res[f"ap_{name}"].append(sum(terms) / len(strict))
    return {k: torch.tensor(v, dtype=torch.float64 if k[:2] == "ap" else torch.long)
            for k, v in res.items()}

def positives(q_labels: torch.Tensor, g_labels: torch.Tensor) -> tuple:
    """Each query's positives, from the labels sorted once: (Q, P) gallery indices, (Q, P)
    which are real (P: the most any query has), (Q,) how many."""
    by_label = torch.argsort(g_labels, stable=True)
    start = torch.searchsorted(g_labels[by_label], q_labels)
    n_good = torch.searchsorted(g_labels[by_label], q_labels, right=True) - start  # (Q,)
    if bool((n_good == 0).any()):
        raise ValueError(f"query {int(torch.nonzero(n_good == 0)[0])} has no positive")
    slots = torch.arange(int(n_good.max()), device=g_labels.device)  # (P,)
    index = by_label[(start[:, None] + slots).clamp(max=len(g_labels) - 1)]  # (Q, P)
    return index, slots < n_good[:, None], n_good

def rank_queries(q: torch.Tensor, g: torch.Tensor, q_labels: torch.Tensor,
                 g_labels: torch.Tensor, map_top: int = 1000, chunk: int = 512,
                 top: int = 5) -> dict:
    """argsort_ranks' numbers without a sort, and each query's `top` best items ("top") and
    best positive ("match"). A positive's position is a count of the items scoring at least
    as high: in the whole gallery for the first (medR), else among the top K = map_top
    scores (AP sees no further), the gallery only for a tie at the K-th. 6 bytes x chunk x N."""
    junk = g_labels == -1
    n_junk, order = int(junk.sum()), None
    if not bool(junk[:n_junk].all()):  # distractors first: counting them is then a slice
        order = torch.argsort((~junk).int(), stable=True)
        g, g_labels = g[order], g_labels[order]
    pos_index, is_pos, n_good = positives(q_labels, g_labels)  # (Q, P) (Q, P) (Q,)
    K, n_top = min(map_top, len(g)), min(top, len(g))
    count = lambda above: (above[:, :n_junk].sum(1), above[:, n_junk:].sum(1))  # junk, others
    out = {k: [] for k in ("first_strict", "first_official", "ap_strict", "ap_official",
                           "top", "match")}
    with matmul_precision("highest"):
        for rows in (slice(s, s + chunk) for s in range(0, len(q), chunk)):
            scores = q[rows].float() @ g.float().T  # (c, N)
            top_scores, top_index = scores.topk(max(K, n_top), dim=1)  # (c, K) best first
            out["top"].append(top_index[:, :n_top])
            top_scores, top_junk = top_scores[:, :K], top_index[:, :K] < n_junk
            cutoff = top_scores[:, -1:]  # (c, 1): lower scores are out of the top K
            pos = scores.gather(1, pos_index[rows]).masked_fill(~is_pos[rows], -math.inf)
            out["match"].append(pos_index[rows].gather(1, pos.argmax(1, keepdim=True))[:, 0])
            pos = pos.sort(dim=1, descending=True).values  # (c, P)
            ap = [0.0, 0.0]  # strict, official
            for j in range(pos.shape[1]):
                t, real = pos[:, j:j + 1], j < n_good[rows]  # (c, 1), (c,)
                in_top = real & (t >= cutoff)[:, 0]
                if j and not bool(in_top.any()):
                    break  # the other positives all lie below the top K
                if j == 0:  # items scoring >= t: distractors and others
                    junk_above, others_above = count(scores >= t)
                else:
                    above = top_scores >= t
                    junk_above = (above & top_junk).sum(1)
                    others_above = (above & ~top_junk).sum(1)
                    tied = real & (t == cutoff)[:, 0]  # the tie may go on past the top K
                    if bool(tied.any()):
                        junk_above[tied], others_above[tied] = count(scores[tied] >= t[tied])
                # 0-based: after the non-positives >= t (ties go against it), j positives
                official = others_above - (pos >= t).sum(1) + j  # (c,)
                strict = official + junk_above
                if j == 0:
                    out["first_official"].append(official)
                    out["first_strict"].append(strict)
                hit = in_top & (strict < map_top)
                for k, p in enumerate((strict.double(), official.double())):
                    before = torch.where(p > 0, j / p.clamp(min=1), 1.0)  # the AP term of j
                    ap[k] = ap[k] + torch.where(hit, (before + (j + 1) / (p + 1)) / 2, 0.0)
            out["ap_strict"].append(ap[0] / n_good[rows])
            out["ap_official"].append(ap[1] / n_good[rows])
    out = {k: torch.cat(v) for k, v in out.items()}
    if order is not None:  # back to the gallery's own order
        out["top"], out["match"] = order[out["top"]], order[out["match"]]
    return out

def summarise(ranks: dict, ks=(1, 5, 10), map_top: int = 1000) -> dict:
    """Per-query ranks -> {"official": {R@k, mAP, medR}, "strict": ...}, percent but medR, the
    median 1-based position in the full ranking (as the authors'), numpy's median."""
    med = float(np.median(ranks["first_strict"].cpu().numpy() + 1))
    m = "mAP@1k" if map_top == 1000 else f"mAP@{map_top}"
    percent = lambda x: 100 * x.double().mean().item()
    return {p: {**{f"R@{k}": percent(ranks[f"first_{p}"] < k) for k in ks},
                m: percent(ranks[f"ap_{p}"]), "medR": med} for p in ("official", "strict")}

def retrieval_metrics(query_emb, gallery_emb, query_labels, gallery_labels, ks=(1, 5, 10),
                      map_top=1000) -> dict:
    """Official and strict R@k, mAP@map_top and medR of a retrieval task (PROTOCOL 4)."""
    ranks = rank_queries(query_emb, gallery_emb, query_labels, gallery_labels, map_top)
    return summarise(ranks, ks, map_top)

def geo_metrics(km: torch.Tensor) -> dict:
    """From each query's error in km (Q,): % within 1, 25, 200, 750, 2500 km, the median."""
    within = {f"acc@{t}km": 100 * (km <= t).double().mean().item()
              for t in (1, 25, 200, 750, 2500)}
    return within | {"median_km": float(np.median(km.cpu().numpy()))}

# ---- train --------------------------------------------------------------------------------
# One process per GPU under torchrun, as nanoGPT: RANK in the environment means
# distributed; process 0 logs, validates and saves while the others wait. Without torchrun,
# rank 0 of 1. `train_step` is a step's work, `fit` the loop; checkpoints (`restore`,
# `load_pretrained`, `save_checkpoint`) and CLIP's towers come after eval.

def device_of(cfg: Config) -> torch.device:
    """Where this process computes (--device, else its GPU if visible), after joining
    torchrun's group if there is one: NCCL on GPUs, gloo on the CPU."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

def bf16_on(device: torch.device, cfg: Config) -> bool:
    """bf16 where the GPU has it natively (Ampere on): emulated (V100, T4) it is slower."""
    return device.type == "cuda" and cfg.bf16 and (
        torch.cuda.get_device_capability(device)[0] >= 8)

def autocast_for(device: torch.device, cfg: Config):
    """bf16 autocast on a GPU that has it, else a no-op: the one precision switch."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_on(device, cfg))

def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor to the device (async from pinned memory); images channels-last on a
    GPU (faster convolutions), plain on the CPU (faster jitter: 1.4x)."""
    x = x.to(device, non_blocking=True)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return x.contiguous(memory_format=layout) if x.dim() == 4 else x

def batch_to(batch: dict, device: torch.device) -> dict:
    return {m: to_device(x, device) for m, x in batch.items() if torch.is_tensor(x)}

def jitter(inputs: dict, params: torch.Tensor) -> dict:
    """A batch's image views, on their device, jittered by their rows of params (B, 2, 7)."""
    hue = bool(params[..., 6].any())  # on the CPU: no sync
    for k, m in enumerate("GS"):
        if m in inputs:
            x = augment(inputs[m], params[:, k].to(inputs[m].device), m == "S", hue)
            inputs[m] = to_device(x, x.device)  # the device's layout again
    return inputs

def training_sets(cfg: Config, ckpt: dict | None) -> tuple:
    """(training set, validation set, tokenizer), each article read, tokenised once."""
    root = Path(cfg.data)
    splits = read_train(cfg, root)
    if min(len(s.ids) for s in splits) < 2:
        raise UserError(f"{root}: {len(splits[0].ids)} training and {len(splits[1].ids)} "
                        f"validation landmarks; need at least 2 of each")
    (articles, bad), (val_articles, val_bad) = (
        read_articles(split.dir, split.text) for split in splits)
    if bad + val_bad:
        print0(f"{len(bad + val_bad)} unreadable articles, their sentences empty (first: "
               f"{(bad + val_bad)[0]})")
    # the tokenizer: the checkpoint's on --resume, CLIP's with its text tower, else learnt on
    # process 0 from the training articles, sent to all: all must agree
    if ckpt or cfg.text_backbone == "clip":
        tok = Tokenizer.from_str(ckpt["tokenizer"]) if ckpt else clip_tokenizer(cfg.clip,
                                                                                cfg.max_len)
    else:
        texts = (text for a in articles if a for text in a.values())
        learnt = [train_tokenizer(texts, cfg).to_str() if rank_and_world()[0] == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(learnt)
        tok = Tokenizer.from_str(learnt[0])
    needed = {m: [i for s in splits for ids in (s.ground if m == "G" else s.sat) for i in ids]
              for m in "GS"}
    stores = {m: ImageStore(splits[0].dir, MODALITY[m], cfg, needed[m]) for m in "GS"}
    train = Sentences(articles, tok, cfg.train_text)
    val = Sentences(val_articles, tok, "first")
    return (LandmarkSet(splits[0], stores, train, cfg, True),
            LandmarkSet(splits[1], stores, val, cfg, False), tok)

def make_optimizer(raw: MML, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the trained parameters. mml: decay on matrices only, CLIP's betas.
    The authors: AdamW(model.parameters(), lr, weight_decay)."""
    trained = [p for p in raw.parameters() if p.requires_grad]
    if cfg.recipe == "paper":
        return torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW([
        {"params": [p for p in trained if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98))

def lr_at(step: int, total: int, cfg: Config) -> float:
    """mml: a linear warmup (5% of the steps), then a cosine decay. The authors: constant."""
    warmup = max(1, round(0.05 * total))
    if cfg.recipe == "paper":
        return cfg.lr
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

@contextlib.contextmanager
def stop_signals():
    """SIGTERM (a cluster's preemption) or SIGINT (Ctrl-C) asks the loop to save last.pt
    after its step; a second one exits at once. Yields {"signal": 0 until then}."""
    state = {"signal": 0}

    def handle(signum, frame):
        if state["signal"]:
            raise SystemExit(128 + signum)
        state["signal"] = signum
        print(f"{signal.Signals(signum).name}: stopping after this step (again: at once)",
              file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

def ignore_stop_signals(worker_id: int):
    """In loader workers: a scheduler signals the process group, and a worker killed by it
    would take the last step with it. The main process decides."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)

def batch_loader(data: LandmarkSet, sampler, workers: int, device):
    """Training's and validation's batches from workers (batch_size None: the sampler gives
    whole batches), which leave a stop signal to the main process: they start with
    signals held until they ignore them (one at a worker's birth would kill it)."""
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))
    try:
        return iter(loader)  # the workers start here
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)

# The validation batch (the authors' batch_size_eval), fixed: the loss depends on how many
# negatives a batch holds, and runs of other batches must compare.
VAL_BATCH = 128

@torch.no_grad()
def validate(model: MML, val_set: LandmarkSet, cfg: Config, pairs: list[str], device) -> dict:
    """The held-out landmarks' loss, and per pair an in-set R@1 (the first modality
    searching the second) and their mean "val_R@1" (--select recall's)."""
    model.eval()
    n, B = len(val_set), min(VAL_BATCH, len(val_set))
    batches = [[(0, i) for i in range(s, min(s + B, n))] for s in range(0, n, B)]
    total, embs = 0.0, []
    for batch in batch_loader(val_set, batches, min(cfg.workers, 2), device):
        with autocast_for(device, cfg):
            emb, scale = model(batch_to(batch, device))
        rows = len(batch["bad"])  # one "bad" entry a row
        total += contrastive_loss(emb, scale, pairs, False)[0].item() * rows
        embs.append(emb)
    model.train()
    emb, labels = {m: torch.cat([e[m] for e in embs]) for m in embs[0]}, torch.arange(n)
    r1 = {f"val_{a}2{b}_R@1": retrieval_metrics(emb[a], emb[b], labels.to(device),
                                                labels.to(device))["official"]["R@1"]
          for a, b in pairs}
    return {"val_loss": total / n, "val_R@1": sum(r1.values()) / len(r1), **r1,
            "chance_R@1": 100 / n}

def train_step(model: nn.Module, raw: MML, optimizer, batch: dict, cfg: Config, pairs: list,
               epoch: int, step: int, lr: float,
               stop: bool = False) -> tuple[list[float], torch.Tensor, bool]:
    """One step on this process's rows of a global batch: jitter on the device, forward, the
    loss, one all-reduce of the losses and the stop vote, backward and update unless the
    loss is not finite. Returns ([loss, per-pair losses] averaged over the processes, the
    logit scale, whether any process was told to stop). `bench` times this function."""
    rank, world = rank_and_world()
    device, local = raw.logit_scale.device, len(batch["bad"])  # this process's rows
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = augment_params(cfg.seed, epoch, step, local * world, cfg.recipe)
    inputs = jitter(batch_to(batch, device), params[rank * local:(rank + 1) * local])
    with autocast_for(device, cfg):
        emb, scale = model(inputs)
    loss, parts = contrastive_loss(emb, scale, pairs)  # float32, outside autocast
    # One all-reduce carries the losses and whether any process was told to stop, so that
    # all skip the same steps and stop after the same one.
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
        if cfg.recipe == "mml":  # CLIP caps the scale at 100: no blow-up
            with torch.no_grad():
                raw.logit_scale.clamp_(max=math.log(100.0))
    return losses, scale.detach(), stop_votes > 0

def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"

def log_step(log, epoch: int, step: int, total: int, losses: dict, lr: float, scale: float,
             rate: float, elapsed: float, eta: float):
    """A line and a log.jsonl record: the losses, lr, the logit scale (watched to diagnose
    collapse), samples/s, elapsed time and ETA."""
    rec = {"epoch": epoch, "step": step, "loss": losses.pop("loss"),
           **{f"loss_{k}": v for k, v in losses.items()}, "lr": lr, "logit_scale": scale,
           "samples_per_s": rate, "elapsed_s": elapsed}
    print(f"epoch {epoch} step {step}/{total} | loss {rec['loss']:.3f} ("
          + " ".join(f"{k} {v:.2f}" for k, v in losses.items()) + f") | lr {lr:.2e} | scale "
          f"{scale:.1f} | {rate:.0f} samples/s | {fmt_time(elapsed)} elapsed, ETA "
          f"{fmt_time(eta)}", flush=True)
    log.write(json.dumps(rec) + "\n")

def end_of_epoch(raw: MML, optimizer, saved: dict, cfg: Config, epoch: int, step: int,
                 best: float, unreadable: list, val_set, pairs: list, device, log,
                 epoch_done: bool) -> float:
    """At an epoch's end, or stopping: unreadable files reported; process 0 validates (at
    an epoch's end), saves best.pt if better, then last.pt, while the others wait. Returns
    the best validation value so far (process 0's value is used)."""
    n_bad = torch.tensor(len(unreadable), device=device)  # NCCL: GPU tensors only
    if dist.is_initialized():
        dist.all_reduce(n_bad)
    if n_bad:
        first = unreadable[0] if unreadable else "on another process"
        print0(f"epoch {epoch}: {int(n_bad)} unreadable files skipped for other views (first: "
               f"{first})")
    if log:
        state = {"model": trained_state(raw), "optimizer": optimizer.state_dict(),
                 "step": step, "epoch": epoch, "best": best,
                 "torch_rng": torch.get_rng_state(), **saved}
        if epoch_done:
            val = validate(raw, val_set, cfg, pairs, device)
            value = val["val_loss" if cfg.select == "loss" else "val_R@1"]
            improved = value < best if cfg.select == "loss" else value > best
            best = value if improved else best
            print(f"epoch {epoch} | " + " | ".join(f"{k} {v:.3f}" for k, v in val.items())
                  + " | new best" * improved, flush=True)
            log.write(json.dumps({"epoch": epoch, "step": step, **val,
                                  "unreadable": int(n_bad)}) + "\n")
            state |= {"best": best, "val": val}
            # best.pt first: a crash between the saves leaves last.pt at the epoch before,
            # whose resume redoes this epoch and rewrites best.pt the same
            if improved:
                save_checkpoint(state, Path(cfg.out) / "best.pt")
        save_checkpoint(state, Path(cfg.out) / "last.pt")
    if dist.is_initialized():
        dist.barrier()
    return best

# Non-finite losses in a row that stop a run: one is skipped, ten mean it diverged.
MAX_BAD_STEPS = 10

def fit(cfg: Config):
    """`train`: the data, the model (fresh, or last.pt's on --resume), then the loop: per
    step `train_step`, per --log-every a log line, per epoch (or signal) `end_of_epoch`."""
    (rank, world), out, device = rank_and_world(), Path(cfg.out), device_of(cfg)
    writable_folder(out, "--out")  # before any data is read, not at the first save
    ckpt = load_checkpoint(out / "last.pt", resume=True) if cfg.resume else None
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must divide "
                        f"evenly over {world} processes")
    train_set, val_set, tok = training_sets(cfg, ckpt)
    ids = np.sort(np.concatenate([train_set.split.ids, val_set.split.ids]))
    landmarks = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
    if ckpt and ckpt.get("landmarks", landmarks) != landmarks:
        raise UserError(f"{cfg.data}: not the landmarks {out / 'last.pt'} was trained on")
    B = min(cfg.batch_size, len(train_set)) // world * world  # at most the landmarks
    if B < cfg.batch_size:
        print0(f"batch {cfg.batch_size} > {len(train_set)} training landmarks: using {B}")
    per_epoch = len(train_set) // B
    total, step = cfg.max_steps or cfg.epochs * per_epoch, ckpt["step"] if ckpt else 0
    sampler = epoch_batches(len(train_set), B, cfg.seed, rank, world, step, total)
    # One seed on every process: identical initial weights. No per-rank offset (nanoGPT's
    # data has one): each draw of the data is keyed by (seed, epoch, row) or a place in the
    # global batch.
    torch.manual_seed(cfg.seed)
    raw = restore(out / "last.pt", ckpt, cfg) if ckpt else MML(cfg)
    tower_record = ckpt.get("towers") if ckpt else load_pretrained(raw, cfg)
    raw = raw.to(device)
    if device.type == "cuda":
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(raw, cfg)
    if ckpt:
        resume_state(optimizer, ckpt, out / "last.pt")
        print0(f"resumed {out / 'last.pt'} at step {step}")
    elif cfg.overwrite:  # only what mml wrote, all checked before any goes
        wrote = [f"eval/{t.name}.{x}" for t in ALL_TASKS for x in ("csv", "png")]
        names = ["last.pt", "best.pt", "log.jsonl", "eval/metrics.json", *wrote]
        if folder := next((n for n in names if (out / n).is_dir()), None):
            raise UserError(f"{out / folder}: a folder, where mml writes a file")
        for name in names if rank == 0 else ():
            (out / name).unlink(missing_ok=True)
    # best.pt: the lowest validation loss, or the highest mean R@1
    best = ckpt["best"] if ckpt else (math.inf if cfg.select == "loss" else -math.inf)
    # Keep `raw` for saving: checkpoints then never carry compile's `_orig_mod.` or DDP's
    # `module.` prefixes (nanoGPT, open_clip patched them out later).
    model = torch.compile(raw) if cfg.compile else raw
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    pairs = loss_pairs(cfg.modalities)
    if cfg.preset:
        print0(f"--preset {cfg.preset}: " + " ".join(
            f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in PRESETS[cfg.preset]))
    n_all = sum(p.numel() for p in raw.parameters()) / 1e6
    n_trained = sum(p.numel() for p in raw.parameters() if p.requires_grad) / 1e6
    print0(f"training {cfg.modalities} (pairs {' '.join(pairs)}), {n_all:.2f}M "
           f"parameters ({n_trained:.2f}M trained), {len(train_set)} landmarks ({len(val_set)} "
           f"held out) from {cfg.data}, batch {B} on {world} x {device.type}, {per_epoch} "
           f"steps/epoch, {total} steps")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a", buffering=1) if rank == 0 else None
    saved = {"config": dataclasses.asdict(cfg), "tokenizer": tok.to_str(),  # in every one
             "landmarks": landmarks} | ({"towers": tower_record} if tower_record else {})
    t_start = t_last = time.time()
    first, last, bad_in_row, skipped, unreadable = step, step, 0, 0, []
    with stop_signals() as stop, matmul_precision("high"):  # TF32 for training, not scores
        # the loader in no variable: a crash's traceback would keep its workers, which ignore
        # SIGTERM, and the exit would wait on them for ever
        for batch in batch_loader(train_set, sampler, cfg.workers, device):
            epoch, lr = step // per_epoch, lr_at(step, total, cfg)
            unreadable += [line for s in batch["bad"] for line in s.split("\n") if line]
            losses, scale, stopping = train_step(model, raw, optimizer, batch, cfg, pairs,
                                                 epoch, step, lr, stop["signal"] > 0)
            bad_in_row = 0 if math.isfinite(losses[0]) else bad_in_row + 1
            if bad_in_row:
                skipped += 1
                print0(f"step {step + 1}: loss is {losses[0]}, step skipped")
                if bad_in_row >= MAX_BAD_STEPS:
                    raise UserError(f"{bad_in_row} non-finite losses in a row at step "
                                    f"{step + 1}; {out / 'last.pt'} is the last good one (try a "
                                    f"lower --lr)")
            step += 1
            if log and (step % cfg.log_every == 0 or step == total or stopping):
                now = time.time()
                log_step(log, epoch, step, total, dict(zip(["loss", *pairs], losses)), lr,
                         scale.item(), (step - last) * B / (now - t_last), now - t_start,
                         (total - step) * (now - t_start) / (step - first))
                t_last, last = now, step
            epoch_done = step % per_epoch == 0 or step >= total
            if epoch_done or stopping:
                best = end_of_epoch(raw, optimizer, saved, cfg, epoch, step, best, unreadable,
                                    val_set, pairs, device, log, epoch_done)
                unreadable, t_last, last = [], time.time(), step  # rates without validation
            if stopping and step < total:
                print0(f"stopped at step {step} of {total}, saved {out / 'last.pt'}: continue "
                       f"with `python mml.py train --out {out} --resume`")
                raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    took = time.time() - t_start
    print0(f"done: {step - first} steps in {fmt_time(took)} ({(step - first) * B / took:.0f} "
           f"samples/s with validation), {skipped} skipped; best validation {cfg.select} "
           f"{best:.3f}; checkpoints in {out}/")

# ---- eval ---------------------------------------------------------------------------------
# PROTOCOL 3: the queries are every query photo and each query landmark's latest tile. A
# gallery is the index's distractors (label -1), then the query split's items (for GPS: the
# index tiles' centres, then the landmarks' points; a guess is the top-1 point). A task's
# two sides are embedded by `Functions` (a checkpoint is one); `score` ranks and writes.

@dataclass(frozen=True)
class Task:
    """What queries (G, S, T), what is searched (G, S, C), the sentences (T2x)."""
    query: str
    gallery: str
    text: str = ""
    name = property(lambda t: f"{t.query}2{t.gallery}" + f"-{t.text}" * bool(t.text))
    # its sides' names: query_ground ... query_text_first; gallery_ground ...
    sides = property(lambda t: (
        f"query_{MODALITY[t.query]}" + f"_{t.text}" * bool(t.text),
        f"gallery_{MODALITY[t.gallery]}"))

ALL_TASKS = [Task(q, g) for q, g in ("GS", "SG", "GC", "SC")] + [
    Task("T", g, text) for g in "GSC" for text in ("first", "random", "no_cues")]

def task_list(names: str) -> list[Task]:
    """All tasks, or those named in any case (T2C: in every sentence mode)."""
    chosen = []
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        match = [t for t in ALL_TASKS if name in (t.name.upper(), t.name[:3])]
        if not match:
            known = ", ".join(t.name for t in ALL_TASKS)
            raise UserError(f"--tasks: no task {name!r} (known: {known})")
        chosen += match
    return list(dict.fromkeys(chosen)) or ALL_TASKS

@dataclass
class Index:
    """The distractors: index/mml_index_{ground,satellite}.csv, an image a row."""
    dir: Path
    ground: list[str]
    sat: list[str]
    sat_latlon: np.ndarray  # (n, 2): the tiles' centres, the GPS distractors

def read_index(root: Path) -> Index:
    """One image id a row (the authors read the cell whole): a tile beside its lat, lon, that
    the GPS gallery pairs row by row."""
    d = check_root(root, "index")
    ground = read_csv(d / "mml_index_ground.csv", ["images"])
    sat = read_csv(d / "mml_index_satellite.csv", ["images", "lat", "lon"])
    for name, table in (("ground", ground), ("satellite", sat)):
        if line := next((n for n, ids in enumerate(table["images"], 2) if len(ids) != 1), 0):
            raise UserError(f"{d}/mml_index_{name}.csv, line {line}: expected one image id")
    latlon = np.array([sat["lat"], sat["lon"]], dtype=np.float64).T.reshape(-1, 2)
    return Index(d, [ids[0] for ids in ground["images"]], [ids[0] for ids in sat["images"]],
                 latlon)

@dataclass
class Side:
    """One side of a task: its items in a fixed order, the same for every model."""
    name: str
    modality: str  # what embeds it: G, S (images), T (sentences), C (points)
    labels: torch.Tensor  # (N,) landmark ids; -1 marks a distractor
    ids: list[str]  # image ids; landmark ids for sentences and query points
    latlon: torch.Tensor | None  # (N, 2) float64 degrees, where known
    show: list  # what a row is: a file path or a sentence
    items: object  # images: [(split folder, kind, ids)]; sentences; points

class Protocol:
    """The sides of the protocol's tasks on one dataset, each built once when asked."""

    def __init__(self, root: Path):
        self.query, self.index = read_split(root, "query"), read_index(root)
        if not len(self.query.ids):
            raise UserError(f"{self.query.dir}: no query landmark with a photo and a tile")
        self.lm = torch.as_tensor(self.query.ids)  # (Q,)
        self.latlon = torch.as_tensor(self.query.latlon, dtype=torch.float64)
        self.side = functools.cache(self.build)  # side(name): built once, when asked

    def build(self, name: str) -> Side:
        q, index, kind = self.query, self.index, name.split("_")[-1]
        landmarks = [str(i) for i in q.ids.tolist()]
        if name.startswith("query_text_"):  # a sentence a landmark
            texts = self.sentences(name.removeprefix("query_text_"))
            return Side(name, "T", self.lm, landmarks, self.latlon, texts, texts)
        if name == "gallery_gps":
            points = torch.cat([torch.as_tensor(index.sat_latlon), self.latlon])
            labels = torch.cat([torch.full((len(index.sat),), -1), self.lm])
            ids = index.sat + landmarks
            return Side(name, "C", labels, ids, points, [""] * len(ids), points)
        if name == "query_ground":  # every photo, labelled with its landmark
            n = torch.tensor([len(g) for g in q.ground])
            parts = [(q.dir, kind, [i for g in q.ground for i in g])]
            labels = self.lm.repeat_interleave(n)
            latlon = self.latlon.repeat_interleave(n, 0)
        elif name == "query_satellite":  # each landmark's latest tile
            parts, labels, latlon = [(q.dir, kind, q.latest)], self.lm, self.latlon
        else:  # gallery_ground or _satellite
            own = self.side(f"query_{kind}")
            junk = index.ground if kind == "ground" else index.sat
            parts, latlon = [(index.dir, kind, junk), *own.items], None
            labels = torch.cat([torch.full((len(junk),), -1), own.labels])
        ids = [i for *_, part in parts for i in part]
        show = [shard(d, k, i) for d, k, part in parts for i in part]
        return Side(name, LETTER[kind], labels, ids, latlon, show, parts)

    def sentences(self, mode: str) -> list[str]:
        """A sentence per query landmark: first, random, or mml_query_text_sentences.csv's
        no_cues (read for these tasks alone, as the authors do). Random is the authors' own
        draw (eval_dataset.py): one Random(42) over every row of mml_query_text.csv in
        order (a skipped landmark's too), a section, paragraph and piece each."""
        q = self.query
        if mode == "no_cues":
            listing = q.dir / "mml_query.csv"  # checked against all it lists, skipped or not
            listed = read_csv(listing, ["landmark_id"])["landmark_id"]
            cells = by_landmark(listing, "text_sentences", "sentences", listed)
            return [cells[i] for i in q.ids.tolist()]
        rows = read_csv(q.dir / "mml_query_text.csv", ["landmark_id", "json"])
        articles, bad = read_articles(q.dir, rows["json"])
        if bad:
            raise UserError(f"{bad[0]} (evaluation needs every file of the protocol)")
        table, rng = Sentences(articles, None, "random"), random.Random(42)
        texts = {i: table.texts[table.pick(n, mode, rng)]
                 for n, i in enumerate(rows["landmark_id"])}
        return [texts[i] for i in q.ids.tolist()]

class ImageList(torch.utils.data.Dataset):
    """An image side's parts -> ((3, H, H) uint8, "" or why a file is unreadable)."""

    def __init__(self, parts: list, cfg: Config):
        stores = [ImageStore(d, kind, cfg, ids) for d, kind, ids in parts]
        self.rows = [(s, i) for s, (*_, ids) in zip(stores, parts) for i in ids]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, n):
        store, image_id = self.rows[n]
        try:
            return torch.from_numpy(store(image_id)).permute(2, 0, 1), ""
        except UnreadableFile as e:
            return torch.zeros(3, store.size, store.size, dtype=torch.uint8), str(e)

@torch.no_grad()
def embed(fn, data, what: str, cfg: Config, device, spread=True) -> torch.Tensor:
    """(N, D) float32 on `device`: an ImageList, sentences, points or features through
    fn, --eval-batch at a time, each batch's answer checked. Under torchrun (and
    `spread`) each process embeds its share and all receive every row."""
    rank, world = rank_and_world() if spread else (0, 1)
    n, B = len(data), cfg.eval_batch
    lo, hi = n * rank // world, n * (rank + 1) // world
    if isinstance(data, ImageList):
        batches = torch.utils.data.DataLoader(
            torch.utils.data.Subset(data, range(lo, hi)), batch_size=B,
            num_workers=cfg.workers, pin_memory=device.type == "cuda")
    else:
        batches = ((data[s:min(s + B, hi)], ()) for s in range(lo, hi, B))
    parts, t0, t_print = [], time.time(), time.time()
    for x, errors in batches:
        if bad := [e for e in errors if e]:  # unlike training: a gap changes the task
            raise UserError(f"{bad[0]} (evaluation needs every file of the protocol)")
        done = lo + sum(map(len, parts))
        width = parts[0].shape[1] if parts else 0
        # copied: an encoder may reuse one output buffer
        parts.append(batch_rows(fn(x), len(x), what, width, done).to(device, copy=True))
        if time.time() - t_print > 10:
            rate = (done - lo) * world / (time.time() - t0)
            eta, t_print = fmt_time((n - done * world) / max(rate, 1e-9)), time.time()
            print0(f"  embedding {what}: {done * world}/{n}, {rate:.0f}/s, ETA {eta}")
    emb = torch.cat(parts) if parts else torch.zeros(0, 1, device=device)
    if world == 1:
        return emb
    sizes = [n * (r + 1) // world - n * r // world for r in range(world)]
    width = torch.tensor(emb.shape[1], device=device)  # a process with no rows: 1
    dist.all_reduce(width, dist.ReduceOp.MAX)
    mine = emb.new_zeros(max(sizes), int(width))
    mine[:len(emb)] = emb
    padded = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(padded, mine)
    return torch.cat([p[:s] for p, s in zip(padded, sizes)])

def batch_rows(out, n: int, what: str, width=0, first=0) -> torch.Tensor:
    """An encoder's answer to a batch of n, held to the protocol: (n, D) floats, D
    as in its earlier batches, every row finite (rows numbered from `first`)."""
    found = f"a {type(out).__name__}"  # a string, a dict: nothing like an array
    with contextlib.suppress(TypeError, ValueError, OverflowError):
        if not torch.is_tensor(out):
            out = torch.as_tensor(np.asarray(out, dtype=float))
        found = f"{tuple(out.shape)} {out.dtype}"
    if not torch.is_tensor(out) or out.dim() != 2 or len(out) != n or (
            not out.is_floating_point() or width and out.shape[1] != width):
        raise UserError(f"{what}: the encoder returned {found} for a batch of {n}; "
                        f"expected ({n}, {width or 'D'}) floats")
    if not bool((finite := torch.isfinite(out).all(1)).all()):
        row = first + int(torch.nonzero(~finite)[0])
        raise UserError(f"{what}: the embedding of row {row} is not finite (NaN or inf)")
    return out.float()

def unit_rows(emb: torch.Tensor, side: Side) -> torch.Tensor:
    """A side's embeddings, each row normalised as by the authors' F.normalize (a warning if
    1e-3 off unit norm); a zero row has no direction. Norms in float64: float32's overflow
    past 1e19."""
    norms = emb.double().norm(dim=1, keepdim=True)  # (N, 1)
    if bool((norms == 0).any()):
        row = int(torch.nonzero(norms[:, 0] == 0)[0])
        raise UserError(f"{side.name}: the embedding of row {row} is zero (no direction)")
    if off := int(((norms - 1).abs() > 1e-3).sum()):
        print0(f"warning: {off} rows of {side.name} are not unit vectors; normalising them")
    return (emb.double() / norms).float()

@dataclass
class Functions:
    """Any encoders, as functions of a CPU batch -> (B, D) floats (a tensor or an
    array): "G", "S": (B, 3, H, H) uint8 images, decoded by --resize to img_size; "T": B
    strings; "C": (B, 2) float64 lat/lon."""
    fns: dict
    cfg: Config

    @torch.no_grad()  # as `embed`: a function may return .numpy() of it
    def width(self, m: str) -> int:
        """The width D of modality m's embeddings, from one input (not flat)."""
        H = self.cfg.img_size
        probe = {"T": ["a"], "C": torch.zeros(1, 2, dtype=torch.float64)}.get(
            m, (torch.arange(3 * H * H) % 251).to(torch.uint8).view(1, 3, H, H))
        return batch_rows(self.fns[m](probe), 1, f"{MODALITY[m]} encoder").shape[1]

    def embed_side(self, side: Side) -> torch.Tensor:
        m = side.modality
        data = ImageList(side.items, self.cfg) if m in "GS" else side.items
        what = f"{MODALITY[m]} encoder on {side.name}"
        return embed(self.fns[m], data, what, self.cfg, device_of(self.cfg))

def score(protocol: Protocol, embedder: Functions, cfg: Config, source: dict) -> dict:
    """The tasks of --tasks the embedder has encoders for (others named and skipped),
    each side embedded once, ranked, summarised and written: its CSV, then its entry in
    metrics.json (--viz: its picture). A task whose sides differ in width is named before
    anything is embedded; the others run, then it ends in an error."""
    device, out = device_of(cfg), Path(cfg.out) / "eval"
    tasks, results, embedded = [], {}, {}
    for task in task_list(cfg.tasks):
        absent = [MODALITY[m] for m in task.query + task.gallery if m not in embedder.fns]
        if not absent:
            tasks.append(task)
        elif cfg.tasks:  # asked for by name
            raise UserError(f"task {task.name}: no {absent[0]} encoder")
        else:
            print0(f"skipping {task.name}: no {absent[0]} encoder")
    modalities = dict.fromkeys("".join(t.query + t.gallery for t in tasks))
    width = {m: embedder.width(m) for m in modalities}  # in the order tasks meet them
    clash = [f"{t.name}: {MODALITY[t.query]} embeddings are {width[t.query]}-d, "
             f"{MODALITY[t.gallery]} {width[t.gallery]}-d; a task's two sides share one space"
             for t in tasks if width[t.query] != width[t.gallery]]
    for line in clash:
        print0(f"skipping {line}")
    for name in {n for t in tasks for n in t.sides}:  # all files listed, read first
        protocol.side(name)
    for task in (t for t in tasks if width[t.query] == width[t.gallery]):
        for side in (protocol.side(n) for n in task.sides if n not in embedded):
            embedded[side.name] = unit_rows(embedder.embed_side(side), side)
        if rank_and_world()[0] != 0:  # every process embeds its share; 0 scores
            continue
        (q, g), t0 = map(protocol.side, task.sides), time.time()
        q_emb, g_emb = embedded[q.name], embedded[g.name]
        ranks = rank_queries(q_emb, g_emb, q.labels.to(q_emb.device),
                             g.labels.to(q_emb.device), chunk=cfg.chunk)
        res = summarise(ranks) | {"queries": len(q.ids), "gallery": len(g.ids),
                                  "distractors": int((g.labels < 0).sum())}
        columns = per_query(ranks, q, g)  # the CSV, by column
        if task.gallery == "C":  # the guess is the top-1 point
            pred = g.latlon[ranks["top"][:, 0].cpu()]
            res["geo"] = geo_metrics(km := haversine_km(pred, q.latlon))
            columns |= {"pred_lat": decimals(pred[:, 0], 6),
                        "pred_lon": decimals(pred[:, 1], 6), "error_km": decimals(km, 3)}
        print(f"{task.name}: {len(q.ids)} queries x {len(g.ids)} gallery "
              f"({res['distractors']} distractors) ranked in {time.time() - t0:.2f}s",
              flush=True)
        text = io.StringIO()  # the CSV, then its entry: a task's two go together
        csv.writer(text).writerows([list(columns), *zip(*columns.values())])
        write_atomically(out / f"{task.name}.csv", lambda p: p.write_text(text.getvalue()))
        results[task.name] = res | source
        write_metrics(out / "metrics.json", results, cfg, device, source)
        if cfg.viz and task.gallery != "C":
            draw_grid(task, q, g, q_emb, g_emb, ranks, columns, out / f"{task.name}.png")
    if results:
        print_tables(results)
        print(f"\nper-query results{', pictures' * cfg.viz} and metrics.json in {out}/")
    if dist.is_initialized():
        dist.barrier()
    if clash:
        raise UserError(clash[0] + f" (and {len(clash) - 1} more)" * (len(clash) > 1))
    return results

def decimals(x: torch.Tensor, places: int) -> list[str]:
    return [f"{v:.{places}f}" for v in x.tolist()]

def per_query(ranks: dict, q: Side, g: Side) -> dict:
    """A task's CSV by column: per query its 1-based ranks, APs, its top 5 and which of
    them are of its landmark; for a sentence task the sentence."""
    top, both = ranks["top"].cpu(), ("strict", "official")  # top: (Q, 5)
    hits = (g.labels[top] == q.labels[:, None]).int()
    return {"query_id": q.ids, "landmark_id": q.labels.tolist(),
            **({"query_text": q.show} if q.modality == "T" else {}),
            **{f"rank_{p}": (ranks[f"first_{p}"] + 1).tolist() for p in both},
            **{f"ap_{p}": decimals(ranks[f"ap_{p}"], 6) for p in both},
            "top5": [" ".join(g.ids[j] for j in row) for row in top.tolist()],
            "top5_hits": [" ".join(map(str, row)) for row in hits.tolist()]}

@functools.cache
def code_record() -> dict:
    """mml.py's sha256 and, in a git checkout, its commit: asked once a process."""
    here, commit = Path(__file__).resolve(), None
    git = ["git", "-C", str(here.parent), "rev-parse", "HEAD"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # no git or checkout
        commit = subprocess.run(git, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
    return {"mml_sha256": hashlib.sha256(here.read_bytes()).hexdigest(), "git": commit}

def write_metrics(path: Path, results: dict, cfg: Config, device, source: dict):
    """metrics.json, merged by task (earlier ones stay, each naming its source),
    under this evaluation's record: options, code, torch, device and date."""
    earlier, now = {}, datetime.datetime.now(datetime.timezone.utc)
    with contextlib.suppress(UserError, KeyError, TypeError, ValueError):
        earlier = dict(read_json(path, "metrics file", 1 << 28)["tasks"])
    options = ("tasks", "chunk", "eval_batch", "img_size", "resize")
    merged = source | {
        "eval": {k: getattr(cfg, k) for k in options}, "code": code_record(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": now.isoformat(timespec="seconds"), "tasks": earlier | results}
    write_atomically(path, lambda p: p.write_text(json.dumps(merged, indent=1)))

def evaluate(cfg: Config):
    """`eval`: the protocol on the checkpoint's data (or --data)."""
    writable_folder(Path(cfg.out) / "eval", "--out")  # before hours of work
    model = Checkpoint(cfg.ckpt, device_of(cfg), cfg.clip, cfg.eval_batch,
                       cfg.workers, cfg.cache)
    cfg = dataclasses.replace(cfg, data=cfg.data or model.cfg.data,
                              img_size=model.cfg.img_size, resize=model.cfg.resize)
    if not cfg.data:
        raise UserError(f"--data: name the dataset root ({cfg.ckpt} names none)")
    print0(f"evaluating {cfg.ckpt} on {cfg.data}")
    source = {"data": cfg.data, "checkpoint": str(cfg.ckpt)} | model.record
    score(Protocol(Path(cfg.data)), model, cfg, source)

def print_tables(results: dict):
    """The results as the authors' tables (PROTOCOL 5), then geolocalisation."""
    cols = ("mAP@1k", "R@1", "R@5", "R@10")
    row = lambda head, cell: print(head + " | " + "   | ".join(
        "".join(cell(p, c) for c in cols) for p in ("official", "strict")))
    print(f"\n{'task':<16}{'medR':>8} | official (distractors as junk)      | "
          f"strict (distractors ranked)")
    row(" " * 24, lambda p, c: f"{c:>8}")
    for task, r in results.items():
        medR = r["official"]["medR"]
        row(f"{task:<16}{medR:>8.1f}", lambda p, c: f"{r[p][c]:>8.2f}")
    if geo := {t: r["geo"] for t, r in results.items() if "geo" in r}:
        keys = list(next(iter(geo.values())))  # acc@1km ... acc@2500km, median_km
        print("\ngeolocalisation: % of queries within, and the median error\n"
              + " " * 16 + "".join(f"{k.split('@')[-1]:>11}" for k in keys))
        for task, g in geo.items():
            print(f"{task:<16}" + "".join(f"{g[k]:>11.1f}" for k in keys))

# ---- checkpoints and the Python API -------------------------------------------------------
# A checkpoint is one dict (model, optimizer, step, epoch, config, tokenizer, RNG state,
# best value), written atomically, read back checked, never unpickled. `load` makes one
# an embedder (for `eval` and a researcher's script); `evaluate_encoders` scores any.

def writable_folder(path: Path, option: str) -> Path:
    """path, proven before any work to be a folder mml can write in (or make: at its
    first write, so that a refused command leaves no folder behind)."""
    there = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: not a writable folder ({there} is not one)")
    return path

def write_atomically(path: Path, write):
    """write(tmp), then rename tmp to path: a crash never leaves a half-written file; a
    failed write (a full disk) is one line and leaves no .tmp."""
    tmp = path.with_name(path.name + ".tmp")  # torch.save's archive holds its name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a crash's, or a link: not written through
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save's full disk is a RuntimeError
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: could not be written ({why})") from None
    finally:
        with contextlib.suppress(OSError):  # a folder: named by the error above
            tmp.unlink(missing_ok=True)

def save_checkpoint(state: dict, path: Path):
    write_atomically(path, lambda tmp: torch.save(state, tmp))

def trained_state(model: MML) -> dict:
    """What a checkpoint keeps of the model: all but its frozen CLIP towers."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(model.towers)}

def load_tensors(path: Path, what: str) -> dict:
    """torch.load that never runs code: weights_only=True loads tensors and plain data,
    and a file needing more (it could run anything) is refused."""
    if not path.is_file():
        raise UserError(f"{path}: no {what} there")
    with open(path, "rb") as f:  # torch.save: a zip (PK); old torch: a pickle (0x80 2)
        if f.read(2) not in (b"PK", b"\x80\x02"):
            raise UserError(f"{path}: not a {what} (not a file torch.save writes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: not a plain {what}: it may contain code, so it is "
                        f"not unpickled") from None
    except Exception as e:  # truncated, corrupt
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a {what} (a {type(obj).__name__})")
    if what.endswith("state dict") and (bad := not_tensors(obj)):
        raise UserError(f"{path}: not a {what} (entry {bad[0]!r} is not a named real tensor)")
    return obj

def not_tensors(state: dict) -> list:
    """The keys of a state dict that are not names of real, dense tensors."""
    return [k for k, v in state.items()
            if not isinstance(k, str) or not torch.is_tensor(v)
            or v.is_complex() or v.layout != torch.strided or v.is_meta]

# A checkpoint's parts and their types; the last three only --resume reads.
PARTS = {"model": dict, "config": dict, "tokenizer": str, "step": int, "epoch": int,
         "optimizer": dict, "torch_rng": torch.Tensor, "best": (int, float)}

def load_checkpoint(path: Path, resume: bool = False) -> dict:
    """A checkpoint, its parts checked before use: one line naming the part."""
    if path.is_dir():
        inside = ", ".join(sorted(p.name for p in path.glob("*.pt")))
        raise UserError(f"{path}: a folder; name a checkpoint in it"
                        + f" (it holds {inside})" * bool(inside))
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there (train one with `python mml.py "
                        f"train`, or name one with --ckpt)")
    ckpt = load_tensors(path, "checkpoint")
    for part, kind in list(PARTS.items())[:8 if resume else 5]:
        if not isinstance(value := ckpt.get(part), kind) or isinstance(value, bool):
            found = f"a {type(value).__name__}" if part in ckpt else "missing"
            raise UserError(f"{path}: not an mml checkpoint{' to resume' * resume} "
                            f"({part} is {found})")
    bad, rng, now = not_tensors(ckpt["model"]), ckpt.get("torch_rng"), torch.get_rng_state()
    wrong = {f"model entry {bad[0]!r}" if bad else "model": bool(bad),
             f"step {ckpt['step']}": ckpt["step"] < 0,
             f"epoch {ckpt['epoch']}": ckpt["epoch"] < 0,
             f"best {ckpt.get('best')}": resume and math.isnan(ckpt["best"]),
             "RNG state": resume and (rng.shape, rng.dtype) != (now.shape, now.dtype)}
    if bad := [what for what, is_wrong in wrong.items() if is_wrong]:
        raise UserError(f"{path}: not an mml checkpoint (its {bad[0]} is not what mml saves)")
    try:
        Tokenizer.from_str(ckpt["tokenizer"])
    except Exception as e:  # tokenizers raises its own exception types
        raise UserError(f"{path}: not an mml checkpoint (its tokenizer does not load: "
                        f"{str(e)[:80]})") from None
    return ckpt

def checkpoint_config(path: Path, ckpt: dict) -> Config:
    """The Config a checkpoint was trained with, held to the command line's checks.
    Options added since take their defaults; one this mml.py does not know: an error."""
    defaults = dataclasses.asdict(Config())
    saved = {k: v for k, v in ckpt["config"].items() if k not in RETIRED}
    if unknown := sorted(str(k) for k in saved if k not in defaults):
        raise UserError(f"{path}: its config does not fit this mml.py (unknown options: "
                        f"{', '.join(unknown)})")
    return check_config(Config(**(defaults | saved)), f"{path}: config field ")

# Options of earlier mml.py that change nothing a checkpoint holds: dropped.
RETIRED = {"outdoor_only", "last_sat_only", "loss", "inputs", "text", "satellite", "top",
           "gallery", "json", "runs", "latex", "resamples", "bench_queries"}

def load_matching(module: nn.Module, state: dict, what: str, ignore: tuple = ()):
    """load_state_dict, but a mismatch names the first key missing, unexpected or of
    another shape. Keys under `ignore` (frozen towers) are not in `state`."""
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore)}
    for key in list(own) + [k for k in state if k not in own]:
        mine, theirs = own.get(key), state.get(key)
        if mine is None or theirs is None or mine.shape != theirs.shape:
            file, model = ("absent" if t is None else tuple(t.shape) for t in (theirs, mine))
            raise UserError(f"{what}: does not fit this model: {key} is {file} in the file "
                            f"and {model} in the model")
    if not any(p.is_meta for p in module.parameters()):  # on meta: only shapes
        module.load_state_dict(state, strict=not ignore)

# A model mml builds holds at most this many numbers (ViT-bigG's CLIP: 2.5 billion),
# counted on the meta device before anything is allocated: sizes each within their
# bounds can still multiply into a 65 GB tensor.
MAX_PARAMETERS = 3 * 10**9

def sized(cfg: Config, what: str) -> nn.Module:
    """The model cfg describes, on the meta device (no memory), unless too large."""
    with torch.device("meta"):
        model = MML(cfg)
    if (n := sum(p.numel() for p in model.parameters())) > MAX_PARAMETERS:
        raise UserError(f"{what}: a model of {n:,} parameters, over the "
                        f"{MAX_PARAMETERS:,} allowed")
    return model

def restore(path: Path, ckpt: dict, cfg: Config) -> MML:
    """A checkpoint's model on the CPU, its shapes compared on the meta device first;
    its frozen CLIP towers from their folder (the checkpoint's or --clip), refused
    unless they are the very towers it was trained with."""
    if "clip" in (cfg.image_backbone, cfg.text_backbone) and not Path(cfg.clip).is_dir():
        raise UserError(f"{cfg.clip}: the CLIP folder {path} was trained with is not "
                        f"there (moved?); name it with --clip")
    meta = sized(cfg, str(path))
    load_matching(meta, ckpt["model"], str(path), ignore=meta.towers)
    if "T" in meta.enc:  # a token past the text tower's vocabulary indexes nothing
        tok = Tokenizer.from_str(ckpt["tokenizer"])
        vocab = next(m for m in meta.enc["T"].modules() if isinstance(m, nn.Embedding))
        top = max(tok.get_vocab().values(), default=0)  # ids may have gaps
        if top >= vocab.num_embeddings:
            raise UserError(f"{path}: its tokenizer's ids reach {top}, its text encoder's "
                            f"{vocab.num_embeddings - 1}")
        pad, cut = tok.padding or {}, tok.truncation or {}
        want = {"length": cfg.max_len, "direction": "right"} | (
            {"pad_id": 0} if cfg.text_backbone == "small" else {})
        cuts = {"max_length": cfg.max_len, "direction": "right", "stride": 0}
        if any(pad.get(k) != v for k, v in want.items()) or any(
                cut.get(k) != v for k, v in cuts.items()):
            raise UserError(f"{path}: its tokenizer does not pad and cut on the right to "
                            f"{cfg.max_len} tokens (the small text encoder pads with id 0)")
    model = MML(cfg)
    if model.towers:
        state, digest = load_clip_weights(cfg.clip)
        want = ckpt["towers"].get("digest") if isinstance(ckpt.get("towers"), dict) else None
        if digest != want:
            raise UserError(f"{cfg.clip}: its config and weights ({digest[:12]}) are not "
                            f"the CLIP towers {path} was trained with ({str(want)[:12]}); "
                            f"name their folder with --clip")
        install_towers(model, state, cfg.clip)
        model.tower_digest = digest  # what evaluation's tower cache is keyed by
    load_matching(model, ckpt["model"], str(path), ignore=model.towers)
    return model

def resume_state(optimizer, ckpt: dict, path: Path):
    """last.pt's AdamW moments and torch RNG, checked to fit the model (the
    optimizer's settings stay this run's, whatever the file holds)."""
    ours = [dict(group) for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(optimizer.param_groups, ours):
            group.update(own)  # the same params, in the same order
        for p, state in optimizer.state.items():
            got = {k: torch.is_tensor(v) and tuple(v.shape) for k, v in state.items()}
            if got != {"step": (), "exp_avg": p.shape, "exp_avg_sq": p.shape}:
                raise ValueError(f"a {tuple(p.shape)} weight's state is {got}"[:200])
        torch.set_rng_state(ckpt["torch_rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: its optimizer state does not fit the model ({e})") from None

class Checkpoint(Functions):
    """An mml checkpoint ready to embed, the Python API: `model = mml.load(CKPT)`, then

        model.embed_images(["photo.jpg"], kind="ground")  # or (H, W, 3) uint8 arrays
        model.embed_text(["a red church in Denver"])
        model.embed_gps([[40.7, -74.0]])                   # lat, lon in degrees

    each (N, D) float32 unit vectors, by the checkpoint's own preprocessing and
    tokenizer; `evaluate_encoders(model, ...)` scores it as `eval` does."""

    def __init__(self, ckpt, device=None, clip: str = "", batch: int = 256,
                 workers: int = 0, cache: str = ""):
        if not isinstance(batch, int) or batch < 1:
            raise UserError(f"batch {batch!r}: expected an integer of at least 1")
        self.path = Path(ckpt)
        saved = load_checkpoint(self.path)
        try:  # an absent device fails here, not mid-way
            default = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(device or default)
            torch.empty(0, device=self.device)
        except (RuntimeError, NotImplementedError) as e:
            raise UserError(f"device {device!r}: not usable ({str(e)[:80]})") from None
        cfg = checkpoint_config(self.path, saved)  # its --device is training's, not ours
        cfg = dataclasses.replace(cfg, eval_batch=batch, workers=workers, cache=cache,
                                  clip=clip or cfg.clip, device=self.device.type)
        self.model = restore(self.path, saved, cfg).to(self.device).eval()
        self.tok = Tokenizer.from_str(saved["tokenizer"])
        self.record = {k: saved[k] for k in ("step", "epoch", "config")}  # metrics.json's
        super().__init__({m: functools.partial(self.encode, m) for m in self.model.enc}, cfg)

    def width(self, m: str) -> int:
        return self.cfg.embed_dim  # every encoder's, known without running one

    def encoder(self, m: str) -> Encoder:
        if m not in self.model.enc:
            raise UserError(f"{self.path}: has no {MODALITY.get(m, m)} encoder "
                            f"(trained on {self.cfg.modalities})")
        return self.model.enc[m]

    @torch.no_grad()
    def encode(self, m: str, x) -> torch.Tensor:
        """A batch of modality m through its encoder: (B, D). Images of other sizes are
        resized to the checkpoint's own (antialiased bilinear)."""
        if m == "T":
            x = tokenize(self.tok, [str(s) for s in x])  # (B, L)
        x, H = to_device(torch.as_tensor(x), self.device), self.cfg.img_size
        if m in "GS" and x.shape[-1] != H:
            x = F.interpolate(x.float(), (H, H), mode="bilinear", antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        # points in float32, as the authors': bf16 blurs places km apart;
        # images and text in bf16 (theirs: fp16)
        with autocast_for(self.device, self.cfg) if m != "C" else contextlib.nullcontext():
            return self.encoder(m)(x)

    def embed_images(self, images, kind: str = "ground") -> torch.Tensor:
        """(N, D): images as paths (read as eval reads them: a JPEG drafted for crop),
        decoded (H, W, 3) uint8 arrays of any size, or a (B, 3, H, H) uint8 tensor."""
        if (m := LETTER.get(kind, kind)) not in ("G", "S"):
            raise UserError(f"embed_images: kind {kind!r}; expected ground or satellite")
        self.encoder(m)  # an error now, not after reading the images
        if not torch.is_tensor(x := images):
            one = isinstance(x, (str, Path)) or isinstance(x, np.ndarray) and x.ndim == 3
            listed = [x] if one else list(x)
            H, images = self.cfg.img_size, [self.image(n, im) for n, im in enumerate(listed)]
            x = np.stack(images) if images else np.zeros((0, H, H, 3), np.uint8)
            x = torch.from_numpy(x).permute(0, 3, 1, 2)  # (N, 3, H, H)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3 or (
                x.shape[2] != x.shape[3] or not x.shape[2]):
            raise UserError(f"embed_images: a {tuple(x.shape)} {x.dtype} tensor; "
                            f"expected (B, 3, H, H) uint8")
        return self.embed_inputs(m, x, f"{kind} images")

    def image(self, n: int, image) -> np.ndarray:
        """Image n handed in: a path or an (H, W, 3) uint8 array -> (H, H, 3) uint8."""
        size, how = self.cfg.img_size, self.cfg.resize
        if not isinstance(image, (str, Path)):
            a = np.asarray(image)
            if a.dtype != np.uint8 or a.shape[2:] != (3,) or not a.size:
                raise UserError(f"embed_images: image {n} is a {a.shape} {a.dtype} "
                                f"array; expected (H, W, 3) uint8 (or a path)")
            return to_square(Image.fromarray(a), size, how)
        try:
            return load_image(Path(image), size, how)
        except Exception as e:  # missing, not an image: decoders raise all sorts
            raise UserError(f"{Path(image)}: cannot read it as an image ({e})") from None

    def embed_text(self, sentences) -> torch.Tensor:
        """(N, D) of sentences, or of one."""
        self.encoder("T")
        sentences = [sentences] if isinstance(sentences, str) else list(sentences)
        if not all(isinstance(s, str) for s in sentences):  # bytes: their numbers
            raise UserError("embed_text: expected a sentence (str) or sentences")
        return self.embed_inputs("T", sentences, "sentences")

    def embed_gps(self, latlon) -> torch.Tensor:
        """(N, D) of (N, 2) points, or of one, in degrees (lat, lon)."""
        self.encoder("C")
        try:  # ragged lists, dicts, tensors needing grad
            points = torch.as_tensor(np.asarray(latlon, dtype=np.float64))
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise UserError(f"embed_gps: not an array of numbers ({str(e)[:80]})") from None
        points = points.reshape(-1, 2) if points.shape in ((2,), (0,)) else points
        if points.dim() != 2 or points.shape[1] != 2 or not bool(
                (points.abs() <= torch.tensor([90, 180])).all()):  # NaN too
            raise UserError(f"embed_gps: a {tuple(points.shape)} array; expected (N, 2) of "
                            f"latitudes in [-90, 90] and longitudes in [-180, 180]")
        return self.embed_inputs("C", points, "points")

    def embed_inputs(self, m: str, x, what: str) -> torch.Tensor:  # in this process
        if not len(x):  # (0, D), as N inputs give (N, D)
            return torch.zeros(0, self.cfg.embed_dim, device=self.device)
        return embed(self.fns[m], x, what, self.cfg, self.device, spread=False)

    def embed_side(self, side: Side) -> torch.Tensor:
        """A side of the protocol; images through a frozen CLIP tower, cached."""
        m, enc = side.modality, self.encoder(side.modality)
        if m not in "GS" or f"enc.{m}.trunk." not in self.model.towers:
            return super().embed_side(side)
        features = torch.cat([self.tower_features(enc, p) for p in side.items if p[2]])
        with autocast_for(self.device, self.cfg):
            return embed(enc.project, features, side.name, self.cfg, self.device)

    def tower_features(self, enc: Encoder, part: tuple) -> torch.Tensor:
        """(n, E) outputs of a frozen CLIP tower for one split's images, cached: keyed
        by the towers, preprocessing, precision and image ids, so that a second
        checkpoint on the same towers runs only its heads."""
        split_dir, kind, ids = part
        cfg, device = self.cfg, self.device
        precision = "bf16" if bf16_on(device, cfg) else "fp32"
        key = [self.model.tower_digest, cfg.img_size, cfg.resize, precision, kind, ids]
        key, name = hashlib.sha256(json.dumps(key).encode()).hexdigest(), split_dir.name
        path = cache_dir(cfg, split_dir.parent) / f"towers/{name}_{kind}-{key[:16]}.pt"
        with contextlib.suppress(UserError):  # another key, shape or dtype: rebuilt
            cached = load_tensors(path, "cache")
            t = cached.get("tensor")
            if cached.get("key") == key and torch.is_tensor(t) and (
                    t.dtype == torch.float32 and t.shape == (len(ids), enc.width)):
                return t.to(device)
        with autocast_for(device, cfg):
            features = embed(lambda x: enc.features(to_device(x, device)),
                             ImageList([part], cfg), f"{name}_{kind} (CLIP tower)", cfg,
                             device)
        if rank_and_world()[0] == 0:
            try:
                save_checkpoint({"key": key, "tensor": features.float().cpu()}, path)
            except UserError as e:  # a read-only or full disk: the answer comes anyway
                print(f"not cached: {e}", file=sys.stderr)
        return features

load = Checkpoint  # mml.load(CKPT): a trained checkpoint, or one `convert` made

def evaluate_encoders(encoders, data, out="runs/encoders", tasks: str = "",
                      img_size: int = 224, resize: str = "crop", batch: int = 256,
                      device: str = "", workers: int = 0, viz: bool = False,
                      name: str = "encoders") -> dict:
    """Any model on the benchmark, from Python: a Checkpoint (as `load` set it) or a dict mapping
    some of "G", "S", "T", "C" to functions of a batch (see Functions; tasks needing
    others are named and skipped). Writes what `eval` writes to OUT/eval/; returns
    {task: results}."""
    if isinstance(encoders, Checkpoint):  # its own preprocessing, batch, workers, device
        c, name, device = encoders.cfg, encoders.path, encoders.cfg.device
        img_size, resize, batch, workers = c.img_size, c.resize, c.eval_batch, c.workers
    elif not isinstance(encoders, dict) or set(encoders) - set("GSTC"):
        raise UserError("evaluate_encoders: expected a Checkpoint or {G|S|T|C: function}")
    # bf16 off: the functions run in the precision they choose
    cfg = check_config(Config(
        data=str(data), out=str(out), tasks=tasks, img_size=img_size, resize=resize,
        eval_batch=batch, device=device, workers=workers, viz=viz, bf16=False),
        "evaluate_encoders: ")
    writable_folder(Path(cfg.out) / "eval", "out")
    embedder = encoders if isinstance(encoders, Checkpoint) else Functions(encoders, cfg)
    source = {"data": cfg.data, "encoders": str(name)}
    return score(Protocol(Path(cfg.data)), embedder, cfg, source)

# ---- outside models: torchvision, CLIP, the authors' -------------------------------------
# torchvision's ImageNet backbones; CLIP's towers in plain torch, from a Hugging
# Face folder; `convert`, which makes the field's models mml checkpoints. A file
# handed in is checked before it is trusted: a bounded regular file, sizes in
# bounds, the byte ranges of safetensors inside the file and apart.

def backbone_weights(name: str):
    """torchvision's ImageNet weights: their URL, image size, pixel statistics."""
    return torchvision.models.get_model_weights(name).DEFAULT

def outside_backbone(cfg: Config, part: str) -> tuple[nn.Module, int, tuple]:
    """(backbone, its width E, its pixel statistics): --clip's vision or text
    tower, or a torchvision classifier less its last layer (our head projects
    to D). Random weights: `train` loads pretrained ones, `eval` its own."""
    if "clip" in (cfg.image_backbone if part == "vision" else cfg.text_backbone):
        c = clip_config(cfg.clip)
        build = CLIPVision if part == "vision" else CLIPText
        tower = build(c[part], c["projection_dim"])
        return tower, c["projection_dim"], (CLIP_MEAN, CLIP_STD) * (part == "vision")
    # no stochastic depth in convnext_tiny: it draws on torch's generator,
    # alike on every process, so a run would depend on the process count
    extra = {"vit_b_16": {"image_size": cfg.img_size},
             "convnext_tiny": {"stochastic_depth_prob": 0.0}}.get(cfg.image_backbone, {})
    net = torchvision.models.get_model(cfg.image_backbone, weights=None, **extra)
    # the classifier: each family's last Linear (fc, classifier.2, heads.head)
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, leaf = name.rpartition(".")
    width = net.get_submodule(name).in_features
    setattr(net.get_submodule(parent), leaf, nn.Identity())
    stats = backbone_weights(cfg.image_backbone).transforms()
    return net, width, (stats.mean, stats.std)

def load_pretrained(model: MML, cfg: Config) -> dict | None:
    """A fresh model's pretrained parts: CLIP's towers from --clip; torchvision's
    ImageNet weights with --pretrained (from torch's cache, else fetched into it).
    Returns the frozen towers' {folder, digest}: checkpoints keep it, not them."""
    towers = None
    if "clip" in (cfg.image_backbone, cfg.text_backbone):
        state, digest = load_clip_weights(cfg.clip)
        install_towers(model, state, cfg.clip)
        if model.towers:
            towers = {"folder": str(Path(cfg.clip).resolve()), "digest": digest}
    if cfg.pretrained and cfg.image_backbone not in ("small", "clip"):
        weights = backbone_weights(cfg.image_backbone)
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        try:  # weights_only=True, like every file mml loads
            state = weights.get_state_dict(progress=rank_and_world()[0] == 0,
                                           check_hash=True, weights_only=True)
        except Exception as e:  # no network, a truncated download, another format
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            raise UserError(f"--pretrained: {path} is not usable, nor {weights.url} "
                            f"downloadable ({why}); put that file there") from None
        for m in {"G", "S"} & set(model.enc):  # a shared trunk loads twice: the same
            own = model.enc[m].trunk.state_dict()  # the classifier's keys drop
            # 2017's files lack num_batches_tracked (BatchNorm's loading fills it in)
            theirs = {k: state.get(k, v) for k, v in own.items() if k in state or "num_b" in k}
            load_matching(model.enc[m].trunk, theirs, f"--pretrained {path}")
    return towers

def clip_layers(c: dict) -> nn.Module:
    """A CLIP tower's layers, at Hugging Face's key `encoder.layers.{i}`."""
    encoder = nn.Module()
    encoder.layers = nn.ModuleList(
        Block(c["hidden_size"], c["num_attention_heads"], c["intermediate_size"],
              c["hidden_act"], c["layer_norm_eps"]) for _ in range(c["num_hidden_layers"]))
    return encoder

class CLIPVision(nn.Module):
    """CLIP's vision tower (Radford et al. 2021): (B, 3, H, H) pixels -> (B, E).
    The image is cut into patches, each a token; a learnt class token goes first,
    and its state after the layers, normed and projected, is the image's (Hugging
    Face's `pooler_output`, then `visual_projection`)."""
    hf_keys = ("vision_model.", "visual_projection.weight")  # in a CLIPModel

    def __init__(self, c: dict, projection: int):
        super().__init__()
        W, patch, eps = c["hidden_size"], c["patch_size"], c["layer_norm_eps"]
        n = (c["image_size"] // patch) ** 2 + 1  # the patches and the class token
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.randn(W) * 0.02)
        self.embeddings.patch_embedding = nn.Conv2d(3, W, patch, stride=patch, bias=False)
        self.embeddings.position_embedding = nn.Embedding(n, W)
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
    """CLIP's text tower: (B, L) CLIP token ids -> (B, E). Causal layers; the
    sentence's embedding is the state at its first end-of-text token, normed and
    projected. The padding comes after it: the causal mask never attends to it."""
    hf_keys = ("text_model.", "text_projection.weight")

    def __init__(self, c: dict, projection: int):
        super().__init__()
        W = c["hidden_size"]
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(c["vocab_size"], W)
        self.embeddings.position_embedding = nn.Embedding(c["max_position_embeddings"], W)
        self.encoder = clip_layers(c)
        self.final_layer_norm = nn.LayerNorm(W, eps=c["layer_norm_eps"])
        self.projection = nn.Linear(W, projection, bias=False)
        # Hugging Face's rule: an end-of-text id of 2 (old configs) means "the
        # largest id", which in CLIP's vocabulary is the end-of-text token
        self.end = c["eos_token_id"]

    def forward(self, ids):
        e = self.embeddings
        x = e.token_embedding(ids) + e.position_embedding.weight[: ids.shape[1]]  # (B, L, W)
        for layer in self.encoder.layers:
            x = layer(x, causal=True)
        end = ids.argmax(1) if self.end == 2 else (ids == self.end).int().argmax(1)  # (B,)
        x = self.final_layer_norm(x[torch.arange(len(x), device=x.device), end])
        return self.projection(x)  # (B, E)

# CLIP's pixel statistics (its image processor's image_mean and image_std)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# Hugging Face's defaults, for sizes a config.json omits
CLIP_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
             "num_hidden_layers": 12, "num_attention_heads": 8,
             "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5, "eos_token_id": 49407}
# Each size's bound, far above every CLIP's (ViT-bigG: 48 layers, width 1,664):
# 10**6 layers is one line, not an allocation (`sized` bounds the product).
CLIP_BOUNDS = {"num_hidden_layers": 64, "hidden_size": 16384,
               "intermediate_size": 65536, "num_attention_heads": 256,
               "vocab_size": 10**6, "max_position_embeddings": 4096, "image_size": 1024,
               "patch_size": 1024, "eos_token_id": 10**6, "projection_dim": 16384}

def read_json(path: Path, what: str, limit: int = 1 << 30):
    """A JSON file handed in, or one line naming it (RecursionError: too deep)."""
    try:
        return json.loads(read_text(path, limit))
    except (OSError, ValueError, RecursionError) as e:
        why = f"{type(e).__name__}: {e}"[:200]
        raise UserError(f"{path}: not a readable {what} ({why})") from None

def clip_config(folder: str) -> dict:
    """A CLIP folder's config.json as {"vision": sizes, "text": sizes,
    "projection_dim": E}, held to CLIP_BOUNDS and to what the towers do."""
    if not folder:
        raise UserError("--clip: name the Hugging Face CLIP folder to read (such as "
                        "clip-vit-large-patch14-336)")
    path = Path(folder) / "config.json"
    c = read_json(path, "CLIP config", 1 << 20)
    if (kind := c.get("model_type") if isinstance(c, dict) else c) != "clip":
        raise UserError(f"{path}: model_type {kind!r}; supported: Hugging Face CLIPModel")
    out = {"projection_dim": c.get("projection_dim", 512)}
    for part, defaults in (("vision", CLIP_VISION), ("text", CLIP_TEXT)):
        # old configs hold *_config_dict, which replaces *_config whole (transformers)
        names = (f"{part}_config_dict", f"{part}_config")
        sizes = next((c[n] for n in names if c.get(n) is not None), {})
        if not isinstance(sizes, dict):
            raise UserError(f"{path}: {part}_config is not an object of sizes")
        # null reads as absent (2022's configs: vision eos_token_id null)
        out[part] = defaults | {k: v for k, v in sizes.items() if v is not None}
    parts = [("vision_config ", out["vision"]), ("text_config ", out["text"]), ("", out)]
    for part, sizes in parts:
        for k, bound in CLIP_BOUNDS.items():  # an absent size reads 1: in bounds
            if type(v := sizes.get(k, 1)) is not int or not 0 < v <= bound:  # True: not int
                raise UserError(f"{path}: {part}{k} {v!r}: expected an integer in "
                                f"[1, {bound:,}]")
        act, eps = sizes.get("hidden_act", "gelu"), sizes.get("layer_norm_eps", 0.1)
        heads = sizes.get("num_attention_heads", 1)
        if act not in ("quick_gelu", "gelu") or type(eps) is not float or not (
                0 < eps < 1) or sizes.get("hidden_size", 1) % heads:
            raise UserError(f"{path}: {part}hidden_act {act!r}, heads {heads}, "
                            f"layer_norm_eps {eps!r}: not what these towers implement "
                            f"(quick_gelu or gelu, heads dividing the width, 0 < eps < 1)")
    if (v := out["vision"])["image_size"] % v["patch_size"]:
        raise UserError(f"{path}: image_size {v['image_size']} is not a multiple of "
                        f"patch_size {v['patch_size']}")
    return out

SAFETENSORS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
               "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}

def read_safetensors(path: Path) -> dict:
    """A .safetensors file without the safetensors package: 8 bytes of header
    length, a JSON header of each tensor's dtype, shape and byte range, the bytes.
    The ranges must lie in the file, fit their shapes and not overlap; a tensor
    is a view of the file mapped copy-on-write, copied only when loaded."""
    def unreadable(why) -> UserError:
        return UserError(f"{path}: not a readable safetensors file ({why})")
    with open(path, "rb") as f:
        size, n = os.fstat(f.fileno()).st_size, int.from_bytes(f.read(8), "little")
        if not 2 <= n <= size - 8:
            raise unreadable(f"a header of {n:,} bytes in a file of {size:,}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # RecursionError: too deep
            raise unreadable(f"{type(e).__name__}: {e}"[:200]) from None
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise unreadable("its header is not an object")
    header.pop("__metadata__", None)
    tensors, ranges = {}, []
    for name, t in header.items():
        try:  # whole numbers, and the bytes its shape needs, inside the file
            dtype, shape = SAFETENSORS[t["dtype"]], t["shape"]
            begin, end = t["data_offsets"]
            count = math.prod(shape)
            fits = all(type(v) is int and v >= 0 for v in [begin, end, *shape]) and (
                begin + count * dtype.itemsize == end <= size - 8 - n)
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise unreadable(f"{name}: its dtype, shape or bytes ({t!s:.80}) do not fit")
        ranges.append((begin, end, name))
        view = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + begin)
        tensors[name] = (view if count else torch.empty(0, dtype=dtype)).reshape(shape)
    ranges.sort()
    if clash := next((b for a, b in zip(ranges, ranges[1:]) if b[0] < a[1]), None):
        raise unreadable(f"{clash[2]} overlaps another tensor's bytes")
    return tensors

def tensor_digest(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()

def load_clip_weights(folder: str) -> tuple[dict, str]:
    """The folder's CLIPModel state dict (model.safetensors, else
    pytorch_model.bin) and the towers' digest, of their config and weights."""
    d, config = Path(folder), clip_config(folder)
    if (d / "model.safetensors").is_file():
        state = read_safetensors(d / "model.safetensors")
    elif (d / "pytorch_model.bin").is_file():
        state = load_tensors(d / "pytorch_model.bin", "CLIP state dict")
    else:
        raise UserError(f"{d}: no model.safetensors or pytorch_model.bin (README, "
                        f"Real data, says how to fetch a CLIP)")
    # older transformers also saved the position index buffers: not weights
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    towers = json.dumps(config, sort_keys=True) + tensor_digest(state)
    return state, hashlib.sha256(towers.encode()).hexdigest()

def install_towers(model: nn.Module, state: dict, what: str):
    """Fill a model's CLIP towers from a CLIPModel's state dict, by `hf_keys`."""
    for enc in model.enc.values():
        tower = getattr(enc, "trunk", None)  # the GPS encoder has no trunk
        if isinstance(tower, (CLIPVision, CLIPText)):
            prefix, projection = tower.hf_keys
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if projection in state:
                own["projection.weight"] = state[projection]
            load_matching(tower, own, what)

def clip_tokenizer(folder: str, max_len: int) -> Tokenizer:
    """The folder's tokenizer.json: CLIP's byte-level BPE, a sentence between start and
    end-of-text, cut to max_len, padded with end-of-text: the authors' CLIPTokenizer(
    padding="max_length", truncation=True) but for CJK and control characters."""
    path = Path(folder) / "tokenizer.json"
    try:
        tok = Tokenizer.from_str(read_text(path, 1 << 26))
    except Exception as e:  # the tokenizers library raises its own types
        raise UserError(f"{path}: not a readable tokenizer ({str(e)[:80]})") from None
    end, vocab = tok.token_to_id("<|endoftext|>"), clip_config(folder)["text"]["vocab_size"]
    if end is None or (top := max(tok.get_vocab().values())) >= vocab:
        raise UserError(f"{path}: ids up to {top}, end-of-text {end}: "
                        f"not CLIP's tokenizer for a text tower of {vocab} tokens")
    tok.enable_padding(pad_id=end, pad_token="<|endoftext|>", length=max_len)
    tok.enable_truncation(max_len)
    return tok

def convert(cfg: Config):
    """`convert SRC --out CKPT`: an outside model as an mml checkpoint, which
    `eval` and `load` use unchanged. SRC: a Hugging Face CLIP folder (CLIP as it
    is, no GPS), or the authors' weights_best.pth with --clip of their CLIP."""
    src, out = Path(cfg.source), Path(cfg.out)
    if out.exists() or out.is_symlink():  # never the download it reads, nor any file
        if not cfg.overwrite:
            raise UserError(f"{out}: exists; --out names a new file (--overwrite "
                            f"replaces an mml checkpoint)")
        load_checkpoint(out)  # anything but an mml checkpoint is refused in one line
    if not (is_clip := (src / "config.json").exists()) and not src.is_file():
        raise UserError(f"{src}: not a model `convert` knows: a Hugging Face CLIP folder "
                        f"(config.json) or the authors' weights_best.pth (with --clip)")
    if not is_clip and not cfg.clip:
        clip_config(cfg.clip)  # one line saying --clip is needed
    writable_folder(out.parent, "--out")
    folder = str((src if is_clip else Path(cfg.clip)).resolve())
    weights, digest = load_clip_weights(folder)  # read once: 1.7 GB for ViT-L/14-336
    c = clip_config(folder)  # the towers' sizes decide the images' and sentences'
    sizes = dict(clip=folder, img_size=c["vision"]["image_size"],
                 max_len=c["text"]["max_position_embeddings"])
    if is_clip:  # both towers frozen, no heads, CLIP's own logit scale
        new = Config(modalities="GST", image_backbone="clip", text_backbone="clip",
                     share_image_trunk=True, freeze="GST", head="none",
                     resize="clip", embed_dim=c["projection_dim"], **sizes)
        if not torch.is_tensor(weights.get("logit_scale")):
            raise UserError(f"{src}: its weights hold no logit_scale: not a CLIPModel's")
        state = {"logit_scale": weights["logit_scale"]}
    else:
        new, state = Config(**PRESETS["paper"], **sizes), authors_state(src, folder, weights)
    tok = clip_tokenizer(folder, new.max_len)
    sized(new, str(src))
    model = MML(new)
    install_towers(model, weights, folder)
    load_matching(model, state, str(src), ignore=model.towers)
    save_checkpoint({"model": trained_state(model), "config": dataclasses.asdict(new),
                     "tokenizer": tok.to_str(), "step": 0, "epoch": 0,
                     "towers": {"folder": folder, "digest": digest},
                     "converted_from": str(src.resolve())}, out)
    print(f"{out}: {new.modalities} from {src}, towers from {folder} (digest "
          f"{digest[:12]}); evaluate it with `python mml.py eval --ckpt {out} --data ROOT`")

# the authors' MmlCLIP's names of mml's heads, GPS encoder and scale
AUTHORS = {"ground_projector.": "enc.G.head.", "satellite_projector.": "enc.S.head.",
           "text_projector.": "enc.T.head.", "location_encoder.": "enc.C.",
           "logit_scale": "logit_scale"}

def authors_state(src: Path, clip: str, weights: dict) -> dict:
    """The authors' MmlCLIP state dict (weights_best.pth) in mml's names, less
    its two copies of CLIP, which must be the --clip folder's weights."""
    theirs = {k: v for k, v in load_tensors(src, "authors' MmlCLIP state dict").items()
              if not k.endswith("position_ids")}
    for copy in ("image_encoder.clip_model.", "text_encoder.clip_model."):
        mine = {k[len(copy):]: v for k, v in theirs.items() if k.startswith(copy)}
        if tensor_digest(mine) != tensor_digest(weights):
            raise UserError(f"{src}: its {copy[:-1]} is not the CLIP of {clip}; give the "
                            f"one they trained from (openai/clip-vit-large-patch14-336)")
    state = {}
    for k, v in theirs.items():
        if k.startswith(("image_encoder.", "text_encoder.")):
            continue
        prefix = next((p for p in AUTHORS if k.startswith(p)), None)
        if prefix is None:
            raise UserError(f"{src}: {k} is not a key of the authors' MmlCLIP")
        # their GPS heads are bare Linears, GeoCLIP's and mml's a Sequential
        name = AUTHORS[prefix] + k[len(prefix):]
        state[re.sub(r"(LocEnc\d+\.head)\.", r"\1.0.", name)] = v
    return state

# ---- tools: the pictures, the image cache, the bench --------------------------------------

# `eval --viz`, with Pillow alone: per retrieval task a grid of eight queries,
# their top 5 and, when not among them, their correct match.
GRID_THUMB, GRID_GAP, GRID_LINE, GRID_ROWS = 96, 8, 18, 8  # px, px, px, queries
GREEN, RED = (0, 160, 0), (200, 30, 30)

def grid_cell(row: int, col: int) -> tuple[int, int]:
    """A thumbnail's top-left pixel: a caption above each row, scores under it;
    columns 0 the query, 1-5 its top 5, 6 its correct match."""
    return (GRID_GAP + col * (GRID_THUMB + GRID_GAP),
            GRID_LINE + row * (GRID_THUMB + GRID_GAP + 2 * GRID_LINE))

def grid_queries(n: int) -> list[int]:
    """The queries a grid shows: GRID_ROWS of n, fixed by a seed, in order."""
    return sorted(random.Random(0).sample(range(n), min(GRID_ROWS, n)))

def thumbnail(path) -> Image.Image:
    try:
        return Image.fromarray(load_image(Path(path), GRID_THUMB))
    except Exception:  # grey: the grid still shows the rest
        return Image.new("RGB", (GRID_THUMB, GRID_THUMB), (128, 128, 128))

def draw_grid(task: Task, q: Side, g: Side, q_emb, g_emb, ranks: dict, columns: dict,
              path: Path):
    """A retrieval task's grid: eight queries (the same for every model), each
    its image or sentence, its top 5 with scores, bordered green when of its
    landmark, red if not, distractors marked; when the top 5 miss, its match."""
    font, side = ImageFont.load_default(size=13), GRID_THUMB
    rows, n_junk = grid_queries(len(q.ids)), int((g.labels == -1).sum())
    img = Image.new("RGB", (grid_cell(0, 7)[0], grid_cell(len(rows), 0)[1]), "white")
    draw = ImageDraw.Draw(img)

    def cell(r: int, c: int, j: int, colour, under: str):
        x, y = grid_cell(r, c)
        img.paste(thumbnail(g.show[j]), (x, y))
        draw.rectangle((x, y, x + side - 1, y + side - 1), outline=colour, width=4)
        if j < n_junk:  # distractors come first in the gallery
            draw.rectangle((x + 4, y + side - 20, x + side - 5, y + side - 5), fill="black")
            draw.text((x + 8, y + side - 19), "distractor", fill="white", font=font)
        draw.text((x, y + side + 2), under, fill="black", font=font)
    for r, i in enumerate(rows):
        x, y = grid_cell(r, 0)
        rank, official = columns["rank_strict"][i], columns["rank_official"][i]
        who = f"query {q.ids[i]}" if task.query != "T" else "sentence"
        caption = (f"{who} (landmark {int(q.labels[i])}): correct match at rank {rank} "
                   f"(official {official})")
        draw.text((x, y - GRID_LINE + 2), caption[:110], fill="black", font=font)
        if task.query == "T":  # the sentence itself, wrapped into the query's cell
            draw.rectangle((x, y, x + side - 1, y + side - 1), fill=(235, 235, 235))
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
    write_atomically(path, lambda tmp: img.save(tmp, format="PNG"))

# The image cache: `prepare` decodes each image of a split and kind once into a
# uint8 array (n, H, H, 3), CACHE/SIZE-RESIZE/{split}_{kind}.u8, then writes its
# JSON manifest of ids, so that an interrupted build is never taken for a whole
# one; `Cache` reads it back.
MANIFEST = {"size": int, "resize": str, "ids": list, "broken": list}  # field: type

def cache_dir(cfg: Config, root: Path) -> Path:
    """The caches of one size and resize: --cache (or ROOT/cache)/SIZE-RESIZE."""
    folder = Path(cfg.cache) if cfg.cache else root / "cache"
    return folder / f"{cfg.img_size}-{cfg.resize}"

class Cache:
    """One split's and kind's cached images, refused (never used) when made for
    another size or --resize, lacking an image of this run, or not whole."""

    @staticmethod
    def open(split_dir: Path, kind: str, cfg: Config, needed) -> "Cache | None":
        array = cache_dir(cfg, split_dir.parent) / f"{split_dir.name}_{kind}.u8"
        return Cache(array, cfg, needed) if array.with_suffix(".json").is_file() else None

    def __init__(self, array: Path, cfg: Config, needed):
        self.array, self.file, self.pid = array, None, None
        manifest = array.with_suffix(".json")
        m = read_json(manifest, "cache manifest")
        m = m if isinstance(m, dict) else {}
        bad = [k for k, t in MANIFEST.items() if not isinstance(m.get(k), t)] or [
            k for k in ("ids", "broken") if not all(isinstance(i, str) for i in m[k])]
        if bad:
            raise UserError(f"{manifest}: not a cache manifest mml wrote (no {bad[0]} "
                            f"{MANIFEST[bad[0]].__name__}); rerun `prepare`")
        if (m["size"], m["resize"]) != (cfg.img_size, cfg.resize):
            raise UserError(f"{manifest}: the cache holds {m['size']} px images made by "
                            f"--resize {m['resize']}, not --img-size {cfg.img_size} "
                            f"--resize {cfg.resize}")
        whole = max(1, len(m["ids"])) * cfg.img_size ** 2 * 3  # no ids: one blank row
        if (found := array.stat().st_size if array.is_file() else 0) != whole:
            raise UserError(f"{array}: {found} bytes where its manifest promises {whole} "
                            f"({len(m['ids'])} images): not whole; rerun `prepare`")
        self.row_of = {i: n for n, i in enumerate(m["ids"])}
        self.broken = set(m["broken"])
        if lacking := [i for i in needed if i not in self.row_of]:
            raise UserError(f"{manifest}: the cache lacks {len(lacking)} images of this "
                            f"run (first: {lacking[0]}); rerun `prepare`")

    def __getstate__(self):
        return {**self.__dict__, "file": None}  # each worker opens its own

    def read(self, image_id: str, out: np.ndarray, store) -> np.ndarray:
        """The image, read straight into `out`: 5-10x faster than copying out
        of a memory map, whose first touch of each page faults. Each process
        opens the file (forked workers sharing one would share its position)."""
        if image_id in self.broken:  # named by the file the store would have decoded
            raise UnreadableFile(f"{store.path(image_id)}: could not be decoded when cached")
        if self.pid != os.getpid():
            self.file, self.pid = open(self.array, "rb", buffering=0), os.getpid()
        self.file.seek(self.row_of[image_id] * out.nbytes)
        if self.file.readinto(out) != out.nbytes:  # the array was cut short since
            raise UnreadableFile(f"{self.array}: ends before image {image_id}")
        return out

def decoded_rows(jobs: list[tuple]) -> list[bytes]:
    """Images' rows of the cache, decoded in a loader worker; b"" for an unreadable one."""
    rows = []
    for job in jobs:
        try:
            rows.append(load_image(*job).tobytes())
        except Exception:  # counted as broken in the manifest
            rows.append(b"")
    return rows

def prepare(cfg: Config):
    """`prepare`: decode every image of --splits once into the cache. An array is
    replaced only if its manifest says mml made it; written as a stream, not through
    a memory map, so that a full disk is an error, not a SIGBUS."""
    root, size = Path(cfg.data), cfg.img_size
    blank = bytes(size * size * 3)  # an unreadable image's row
    jobs = []  # (split folder, kind, image ids)
    for split in cfg.splits.split(","):
        if split == "index":
            s = read_index(root)
            jobs += [(s.dir, "ground", s.ground), (s.dir, "satellite", s.sat)]
        else:
            s = read_split(root, split)
            tiles = dict.fromkeys(i for g in s.sat for i in g)
            jobs += [(s.dir, "ground", [i for g in s.ground for i in g]),
                     (s.dir, "satellite", list(tiles))]
    cache = writable_folder(cache_dir(cfg, root), "--cache")  # the data found first
    arrays = [cache / f"{split_dir.name}_{kind}.u8" for split_dir, kind, _ in jobs]
    for array in arrays:  # all refused before any is decoded
        head = (m := array.with_suffix(".json")).is_file() and m.read_bytes()[:100]
        if (array.exists() or m.exists()) and b'"mml.py prepare"' not in (head or b""):
            raise UserError(f"{array}: exists and was not made by `mml.py prepare`; "
                            f"refusing to replace it (--cache names another folder)")
    n = sum(len(ids) for *_, ids in jobs)
    print0(f"prepare: {n} images at {size}x{size} px ({n * len(blank) / 1e9:.2f} GB) "
           f"into {cache}")
    for (split_dir, kind, ids), array in zip(jobs, arrays):
        t, manifest, broken = time.time(), array.with_suffix(".json"), []
        # a DataLoader, not a Pool: a Pool stopped by an error (a full disk) can hang, as a
        # worker it kills may hold its queue's lock. collate_fn decodes, 32 images a call
        rows = torch.utils.data.DataLoader(
            [(shard(split_dir, kind, i), size, cfg.resize) for i in ids], batch_size=32,
            num_workers=cfg.workers, collate_fn=decoded_rows)

        def decode_all(tmp: Path):
            with open(tmp, "wb") as f:
                for i, row in zip(ids, itertools.chain.from_iterable(rows)):
                    if not row:  # a blank row keeps the others in place
                        broken.append(i)
                    f.write(row or blank)
                if not ids:  # one blank row: an empty array cannot be mapped
                    f.write(blank)
        # no ids until the array is whole: never taken for a cache, and an
        # interrupted build stays mml's to replace
        write_atomically(manifest, lambda p: p.write_text('{"generator": "mml.py prepare"}'))
        write_atomically(array, decode_all)
        record = {"generator": "mml.py prepare", "size": size, "resize": cfg.resize,
                  "ids": ids, "broken": broken}
        write_atomically(manifest, lambda tmp: tmp.write_text(json.dumps(record)))
        print0(f"  {split_dir.name} {kind}: {len(ids)} images, {len(broken)} "
               f"unreadable, {len(ids) / (time.time() - t):.0f} images/s")

# `python mml.py bench`: each phase times the very code a run calls, on this
# machine; trust ratios between rows, absolute numbers only with their device.

def timed(fn, sync, seconds: float = 1.0) -> float:
    """Seconds a call takes: warmed up, over `seconds` of calls (at 0: one call)."""
    if seconds:
        fn()
        sync()
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n

def fake_embeddings(n_queries, n_labelled, n_junk, dim, device, n_landmarks=1000) -> tuple:
    """A task's (q, g, q_labels, g_labels), distractors first and anywhere,
    the others near their landmark's centre (as a trained model's); multiples
    of 2^-10, so that every score is exact in float32 in any order of sums:
    rankings compare, not roundings."""
    gen = torch.Generator(device).manual_seed(0)
    noise = lambda n: torch.randn(n, dim, generator=gen, device=device)
    unit = lambda x: torch.round(F.normalize(x, dim=-1) * 1024) / 1024
    centres = F.normalize(noise(n_landmarks), dim=-1)
    near = lambda labels: unit(centres[labels] + 0.1 * noise(len(labels)))
    q_labels = torch.arange(n_queries, device=device) % n_landmarks
    labels = torch.arange(n_labelled, device=device) % n_landmarks
    return (near(q_labels), torch.cat([unit(noise(n_junk)), near(labels)]), q_labels,
            torch.cat([torch.full((n_junk,), -1, device=device), labels]))

def bench(cfg: Config):
    """`bench`: steps (`train_step` itself: fp32; on a GPU bf16, + compile),
    loader, rank (at full scale, against the bare GEMM and the per-query argsort,
    whose metrics must agree)."""
    device, rate = device_of(cfg), 0.0
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"bench on {torch.cuda.get_device_name() if cuda else 'the CPU'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    row = lambda what, value, how: print(f"  {what:<34}{value:>14} {how}", flush=True)
    if "steps" in cfg.phases:
        gen, B, H = torch.Generator().manual_seed(0), cfg.batch_size, cfg.img_size
        images = torch.randint(0, 256, (B, 3, H, H), dtype=torch.uint8, generator=gen)
        text = torch.randint(1, 32, (B, cfg.max_len), generator=gen)  # any vocabulary's
        gps = torch.rand(B, 2, generator=gen) * 20 + torch.tensor([28.0, -110.0])
        batch = {"G": images, "S": images, "T": text, "C": gps}
        batch = {m: batch[m] for m in cfg.modalities} | {"bad": [""] * B}
        pairs = loss_pairs(cfg.modalities)
        for bf16, compiled in [(False, False)] + [(True, False), (True, True)] * cuda:
            run = dataclasses.replace(cfg, bf16=bf16, compile=compiled)
            torch.manual_seed(0)
            raw, step = MML(run).to(device), itertools.count()
            model = torch.compile(raw) if compiled else raw
            optimizer = make_optimizer(raw, run)
            with matmul_precision("high"):  # as the training loop
                seconds = timed(lambda: train_step(model, raw, optimizer, batch, run, pairs, 0,
                                                   next(step), run.lr), sync, 3.0)
            rate = max(rate, B / seconds)
            row(f"train step, {'bf16' if bf16 else 'fp32'}{' + compile' * compiled}",
                f"{B / seconds:,.0f}", f"samples/s, batch {B}, H {H}")
    if "loader" in cfg.phases:
        data = training_sets(cfg, None)[0]
        B = min(cfg.batch_size, len(data))
        sampler = epoch_batches(len(data), B, 0, stop=10**9)  # epoch after epoch
        batches = batch_loader(data, sampler, cfg.workers, device)
        seconds = timed(lambda: next(batches), lambda: None, 3.0)  # workers started
        how = "cached" if data.stores["G"].cache else "decoding"
        row(f"training loader, {cfg.workers} workers", f"{B / seconds:,.0f}", f"samples/s, "
            f"{how}, {'faster' if B / seconds >= rate else 'slower'} than the step")
    tasks = [("G2S", 18688, 1000, 99539), ("S2G", 1000, 18688, 714554)]
    for task, nq, n_labelled, n_junk in tasks * ("rank" in cfg.phases):
        q, g, ql, gl = fake_embeddings(nq, n_labelled, n_junk, 512, device)
        pick = torch.Generator().manual_seed(0)
        some = torch.randperm(nq, generator=pick)[:200].to(device)
        with matmul_precision("highest"):
            gemm = timed(lambda: [part @ g.T for part in q.split(cfg.chunk)], sync)
            ranks = rank_queries(q[some], g, ql[some], gl)  # and a warm-up
            fast = timed(lambda: rank_queries(q, g, ql, gl, chunk=cfg.chunk), sync, 0)
            slow = {}  # the per-query argsort of 200 queries, its time scaled to all
            slow_s = timed(lambda: slow.update(argsort_ranks(q[some], g, ql[some], gl)),
                           sync, 0) * nq / len(some)
        same = all(torch.allclose(v.double(), ranks[k].cpu().double(), rtol=0, atol=1e-9)
                   for k, v in slow.items())
        row(f"rank {task} {nq} x {len(g)}", f"{fast:.2f} s", f"{fast / gemm:.1f}x the score "
            f"GEMM alone, {slow_s / fast:.0f}x faster than the argsort (200 queries timed); "
            f"metrics {'the same' if same else 'DIFFER'}")
        if not same:
            raise SystemExit("bench: the fast ranking differs from the per-query argsort")
# ---- the synthetic world -----------------------------------------------------------------
# A small world in the released layout, written where none is given, so that a
# demo run and every test read data through the code a real run does. It is
# learnable across modalities: a place's land colour shows from above and from
# the ground; a landmark's kind gives its shape, its colour the roof and the
# facade; its article names kind, colour, city and state. Landmarks share kinds
# and colours, so that retrieval has to combine cues.

CITIES = [("New York", "NY", 40.71, -74.01), ("Los Angeles", "CA", 34.05, -118.24),
          ("Chicago", "IL", 41.88, -87.63), ("Houston", "TX", 29.76, -95.37),
          ("Phoenix", "AZ", 33.45, -112.07), ("Seattle", "WA", 47.61, -122.33),
          ("Denver", "CO", 39.74, -104.99), ("Miami", "FL", 25.76, -80.19),
          ("Atlanta", "GA", 33.75, -84.39), ("Boise", "ID", 43.62, -116.20),
          ("Omaha", "NE", 41.26, -95.93), ("Boston", "MA", 42.36, -71.06)]
COLOURS = {"red": (178, 52, 44), "blue": (48, 82, 168), "white": (228, 228, 222),
           "black": (42, 42, 48), "yellow": (222, 190, 62), "teal": (40, 140, 140)}
# each kind's outline from the front, (x, y) in [-1, 1] x [0, 1], and the
# shape of its footprint (its roof from above)
KINDS = {"church": ([(-.4, 0), (-.4, .5), (0, 1), (.4, .5), (.4, 0)], "rectangle"),
         "tower": ([(-.12, 0), (0, 1), (.12, 0)], "rectangle"),
         "stadium": ([(-.5, 0), (-.44, .32), (.44, .32), (.5, 0)], "ellipse"),
         "dome": ([(-.45, 0), (-.45, .45), (0, .75), (.45, .45), (.45, 0)], "ellipse"),
         "castle": ([(-.4, 0), (-.4, .7), (-.1, .6), (.1, .6), (.4, .7), (.4, 0)], "rectangle")}

def landmark(rng: random.Random) -> dict:
    """A random landmark: its place (most near a city), kind, colour, size, year."""
    city, state, lat, lon = rng.choice(CITIES)
    spread = rng.uniform(1.0, 2.5) if rng.random() < 0.3 else 0.08
    colour = rng.choice(list(COLOURS))
    lat = min(48.5, max(25.5, lat + rng.gauss(0, spread)))  # in the lower 48
    lon = min(-67.5, max(-124, lon + rng.gauss(0, spread)))
    return {"lat": lat, "lon": lon, "city": city, "state": state, "colour": colour,
            "kind": rng.choice(list(KINDS)), "size": rng.uniform(0.25, 0.6),
            "rgb": np.array(COLOURS[colour]) + rng.gauss(0, 14), "year": rng.randint(1780, 2010)}

def land(lm: dict) -> np.ndarray:
    """The ground's colour at lm's place, smooth in location: drier to the
    south-west, forest or farmland elsewhere."""
    lat, lon = lm["lat"], lm["lon"]
    dry = np.clip((-lon - 97) / 12, 0, 1) * np.clip((43 - lat) / 6, 0, 1)
    farm = 0.5 + 0.5 * math.sin(lat * 0.9) * math.cos(lon * 0.7)
    green = np.array([40 + 110 * farm, 90 + 70 * farm, 50 + 40 * farm])
    return (1 - dry) * green + dry * np.array([206, 182, 136])

def paint(a) -> tuple:  # PIL's fill colour of any floats
    return tuple(int(v) for v in np.clip(a, 0, 255))

def aerial(lm: dict, rng: random.Random, building=True) -> Image.Image:
    """A 96-px tile centred on lm's place: its land, fields and (with the
    building) its roof, under a year's light and a slight turn."""
    tile = Image.new("RGB", (96, 96), paint(land(lm)))
    draw = ImageDraw.Draw(tile)
    # the fields are the place's own, the same in every year's tile
    fields = random.Random(f"{lm['lat']:.4f},{lm['lon']:.4f}")
    for _ in range(12):
        x, y = fields.uniform(0, 96), fields.uniform(0, 96)
        draw.rectangle((x, y, x + 20, y + 14), fill=paint(land(lm) + fields.gauss(0, 20)))
    if building:
        r = 48 * lm["size"]
        roof = getattr(draw, KINDS[lm["kind"]][1])  # a rectangle or an ellipse
        roof((48 - r, 48 - r / 2, 48 + r, 48 + r / 2), fill=paint(lm["rgb"]))
    tile = tile.rotate(rng.uniform(-20, 20), Image.BILINEAR, fillcolor=paint(land(lm)))
    return ImageEnhance.Brightness(tile).enhance(rng.uniform(0.75, 1.25))

def photo(lm: dict, rng: random.Random, building=True) -> Image.Image:
    """A 128 x 96 photo from the ground: sky, the land and (with the building)
    its outline in its facade's colour, from a random viewpoint and distance."""
    sky = [rng.uniform(90, 150), 170, rng.uniform(200, 250)]
    img, horizon = Image.new("RGB", (128, 96), paint(sky)), rng.uniform(58, 77)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, horizon, 128, 96), fill=paint(land(lm) * 0.85))
    if building:
        height = 96 * (0.4 + lm["size"]) * rng.uniform(0.75, 1.05)
        x, shape = rng.uniform(38, 90), KINDS[lm["kind"]][0]
        outline = [(x + u * height, horizon - v * height) for u, v in shape]
        draw.polygon(outline, fill=paint(lm["rgb"] * rng.uniform(0.8, 1.1)))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img

def made(path: Path) -> Path:  # path, its folders made
    path.parent.mkdir(parents=True, exist_ok=True)
    return path

def picture(split_dir: Path, kind: str, lm: dict, rng, building=True) -> str:
    """A new ground photo or aerial tile of lm, saved in split_dir: its id."""
    image_id = f"{rng.getrandbits(64):016x}"  # 16 hex digits, as the release's
    draw = photo if kind == "ground" else aerial
    draw(lm, rng, building).save(made(shard(split_dir, kind, image_id)))
    return image_id

# only mml writes it: a folder holding it is mml's to replace
SYNTH_MARKER = "mml_synthetic.json"
WORLD = {SYNTH_MARKER, "train", "query", "index", "cache"}  # cache: `prepare`'s

def synthesize(out: Path, scale: float = 1.0, seed: int = 0) -> dict:
    """A synthetic world in the released layout at `out`, its counts returned.
    Written to a folder beside it, then renamed into place: an interrupted run
    never leaves a half world that a later one would take for whole. mml
    replaces only a world it wrote (the marker)."""
    tmp = out.with_name(out.name + ".tmp")
    for folder in (out, tmp):
        if folder.is_symlink():  # replacing it would replace the link only
            raise UserError(f"{folder}: a symbolic link; name the folder itself with --out")
        if folder.exists() and not (folder / SYNTH_MARKER).is_file() and (
                not folder.is_dir() or any(folder.iterdir())):
            raise UserError(f"{folder}: not empty and not a synthetic world written "
                            f"by mml (no {SYNTH_MARKER}); refusing to replace it")
        if folder.is_dir() and (extra := {p.name for p in folder.iterdir()} - WORLD):
            raise UserError(f"{folder}: holds {min(extra)}, which mml did not write there; "
                            f"refusing to replace it")
    writable_folder(out.parent, "--out")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    tmp.mkdir(parents=True)
    marker = {"scale": scale, "seed": seed}
    # written first: from now on the folder is mml's to replace
    (tmp / SYNTH_MARKER).write_text(json.dumps(marker))
    rng, tables, counts = random.Random(seed), {}, {}
    # a row of a CSV table, its header written once
    row = lambda name, header, *cells: tables.setdefault(name, [header]).append(cells)
    images = ("landmark_id", "images")
    n_train, n_query = max(40, int(1600 * scale)), max(20, int(100 * scale))
    ids = rng.sample(range(10**5, 10**7), n_train + n_query)
    for split, lids in (("train", ids[:n_train]), ("query", ids[n_train:])):
        d, p, query = tmp / split, f"{split}/mml_{split}", split == "query"
        n = counts[split] = dict(landmarks=len(lids), text=len(lids), ground=0, satellite=0)
        for lid in lids:
            lm, text = landmark(rng), f"{rng.getrandbits(64):016x}"
            photos = [picture(d, "ground", lm, rng) for _ in range(rng.randint(3, 8))]
            # every year's aerial image, oldest first
            tiles = [picture(d, "satellite", lm, rng) for _ in range(rng.randint(2, 5))]
            n["ground"] += len(photos)
            n["satellite"] += 1 if query else len(tiles)  # those listed
            kind, colour, year = lm["kind"], lm["colour"], lm["year"]
            adjective = rng.choice(["Old", "Grand", "North", "Union"])
            name = f"The {adjective} {kind.title()}"
            first = f"{name} is a {colour} {kind}"  # no_cues: no city or state
            made(shard(d, "text", text)).write_text(json.dumps({
                "Introduction": f"{first} in {lm['city']}, {lm['state']}. It was completed "
                                f"in {year}.\nVisitors know it for its {colour} roof.",
                "History": f"Work on the {kind} began in {year - 3}. It lies near "
                           f"{lm['city']}.\nIt was restored in {year + 60}."}))
            row(f"{p}.csv", ("landmark_id", "CommonsCategory", "lat", "lon"), lid,
                f"{name} ({lm['city']})", f"{lm['lat']:.6f}", f"{lm['lon']:.6f}")
            row(f"{p}_ground.csv", images, lid, " ".join(photos))
            # the query split lists the latest tile alone, all years apart
            row(f"{p}_satellite.csv", images, lid, tiles[-1] if query else " ".join(tiles))
            row(f"{p}_text.csv", ("landmark_id", "json"), lid, text)
            if query:
                row(f"{p}_text_sentences.csv", ("landmark_id", "sentences"), lid, first)
    # The index: photos of other buildings and of plain land; aerial tiles at
    # random places, half with a building on them, whose centres are the GPS
    # gallery's distractors.
    counts["index"] = {"ground": max(60, int(2000 * scale)),
                       "satellite": max(60, int(1000 * scale))}
    for kind, n in counts["index"].items():
        for i in range(n):
            lm = landmark(rng)
            image_id = picture(tmp / "index", kind, lm, rng, building=i % 2)
            row(f"index/mml_index_{kind}.csv", ("images", "lat", "lon"), image_id,
                f"{lm['lat']:.6f}", f"{lm['lon']:.6f}")
    for name, rows in tables.items():
        with open(tmp / name, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    (tmp / SYNTH_MARKER).write_text(json.dumps(marker | counts))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return counts

def synth(cfg: Config):
    """`synth`: a synthetic world at --out (default: where `train` reads it)."""
    t = time.time()
    counts = json.dumps(synthesize(Path(os.path.abspath(cfg.out)), cfg.scale, cfg.seed))
    print(f"synthetic world in {cfg.out} ({time.time() - t:.0f}s): {counts}")

def synthetic_root(scale: float) -> Path:
    """Where `train`, `prepare` and `synth` put the world of a --scale."""
    return Path("data") / ("synthetic" if scale == 1 else f"synthetic-x{scale:g}")

def synthetic_world(scale: float) -> Path:
    """The data without --data: the synthetic world of --scale, written on
    first use by process 0 while the others wait."""
    root = synthetic_root(scale)
    # a world is renamed into place only when whole: one there is complete
    if rank_and_world()[0] == 0 and not root.exists():
        folder = writable_folder(root.parent, "--data (default)")
        folder.mkdir(parents=True, exist_ok=True)
        # two runs at once: one writes it, the other waits, then finds it
        with open(folder / f".{root.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not root.exists():
                t = time.time()
                print0(f"no --data given: generating a synthetic world in {root} ...")
                counts = json.dumps(synthesize(root, scale))
                print0(f"  done in {time.time() - t:.0f}s: {counts}")
    if dist.is_initialized():  # every process, the world written or not
        dist.barrier()
    return root

# ---- command line -------------------------------------------------------------------------

# command: its help, the Config fields it takes beyond train's, its own helps
COMMANDS = {
    "train": ("train a model (on a synthetic world made on first use, without --data)", "", {}),
    "eval": ("evaluate a checkpoint on every task of the protocol",
             "ckpt data out tasks chunk eval_batch viz cache workers device clip",
             {"out": "writes OUT/eval/ (default: the checkpoint's folder)",
              "data": "dataset root (default: the checkpoint's)"}),
    "synth": ("write a synthetic world in the released layout", "out scale seed",
              {"out": "the world's folder (default: data/synthetic, where train reads it)",
               "seed": "seeds the world's draws (default: 0)"}),
    "prepare": ("decode every image once into a cache that training and eval read",
                "data scale splits img_size resize cache workers", {}),
    "bench": ("time each phase of a run on this machine (and every `train` option)",
              "phases chunk", {}),
    "convert": ("make an mml checkpoint of CLIP or of the authors' released model",
                "source out overwrite clip", {"out": "the checkpoint to write (required)",
                                              "overwrite": "replace an mml checkpoint there"})}
FIELDS = [f.name for f in dataclasses.fields(Config)]
TRAIN_FIELDS = FIELDS[:FIELDS.index("select") + 1]
# What a checkpoint decides: the model and its preprocessing; on --resume also
# the run's data, recipe and validation set, so that "best" keeps its meaning, and
# the weight decay its optimizer state holds.
MODEL_FIELDS = FIELDS[FIELDS.index("preset"):FIELDS.index("gps_scaling") + 1] + [
    "img_size", "resize"]
RUN_FIELDS = [f for f in MODEL_FIELDS if f != "clip"] + [  # CLIP's towers: by their digest
    "data", "scale", "n_val", "holdout", "seed", "select", "batch_size",  # B: steps to data
    "train_text", "recipe", "weight_decay"]

def parse_args(argv=None) -> tuple[str, Config, set]:
    """(command, Config, the options given), each option's --help the comment
    beside its field; an option the command does not take is an error naming
    the closest."""
    p = argparse.ArgumentParser(prog="mml.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)  # abbreviations hide typos too
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    source = Path(__file__).read_text(encoding="utf-8").split("class Config:")[1]
    helps = dict(re.findall(r"^    (\w+): .*?  # (.*)$", source.split("\n\n")[0], re.M))
    flags = {}  # each command's options, to name the closest to a typo
    for command, (about, extra, own) in COMMANDS.items():
        sub = commands.add_parser(command, help=about, description=about, allow_abbrev=False)
        names = (TRAIN_FIELDS if command in ("train", "bench") else []) + extra.split()
        flags[command] = ["--" + n.replace("_", "-") for n in names]
        for name, flag in zip(names, flags[command]):
            kind, text = Config.__annotations__[name], own.get(name, helps[name])
            default, choices = getattr(Config, name), typing.get_args(kind)
            # a default worth saying (0 is; False is not: the flag's absence says so)
            if not (default is False or default == "" or name in own or "default" in text):
                text += f" (default: {default})"
            # an option not given is not set, so that `given` knows what was said
            args = {"help": text, "default": argparse.SUPPRESS}
            if name == "source":  # convert's SOURCE
                sub.add_argument(name, nargs="?", metavar="SOURCE", **args)
            elif kind is bool:
                sub.add_argument(flag, action=argparse.BooleanOptionalAction, **args)
            elif choices:  # argparse names them in --help and in its errors
                sub.add_argument(flag, choices=choices, **args)
            else:
                sub.add_argument(flag, type=kind, metavar=kind.__name__.upper(), **args)
    args, unknown = p.parse_known_args(argv)
    if unknown:  # argparse would not name the closest option
        flag = unknown[0].split("=")[0]
        if args.command == "eval" and flag in flags["train"]:
            p.error(f"eval: {flag} is the checkpoint's (a model and its training "
                    f"settings come from it)")
        elsewhere = " and ".join(c for c, names in flags.items() if flag in names)
        close = difflib.get_close_matches(flag, flags[args.command], n=1)
        p.error(f"{args.command}: unknown option {unknown[0]}" + (
            f" (an option of {elsewhere})" if elsewhere else
            f"; did you mean {close[0]}?" if close else ""))
    given = {k: v for k, v in vars(args).items() if k != "command"}
    return args.command, Config(**given), set(given)

# The bounds of the numbers where a wrong one does harm (memory asked for, a
# crash at hour five): the command line's and a checkpoint's config alike,
# before anything is allocated.
BOUNDS = {"scale": (0.01, 100), "n_val": (2, None), "img_size": (16, 1024), "workers": (0, 256),
          "seed": (0, 2**63 - 1), "embed_dim": (2, 16384), "img_width": (8, 4096),
          "vocab_size": (32, 10**6), "max_len": (2, 4096), "text_width": (8, 16384),
          "text_layers": (1, 64), "gps_width": (1, 16384), "gps_depth": (0, 64),
          "batch_size": (2, 10**6), "epochs": (1, None), "max_steps": (0, None), "lr": (0, None),
          "weight_decay": (0, None), "log_every": (1, None), "chunk": (1, None),
          "eval_batch": (1, None)}
# The settings that must agree: (is it wrong, the option to name, what is
# expected).
RULES = [
    (lambda c: len(set(c.modalities.upper())) < 2 or set(c.modalities.upper()) - set("GSTC")
     or len(set(c.modalities)) != len(c.modalities), "modalities",
     "two or more distinct letters of GSTC"),
    (lambda c: c.img_width % 8, "img_width", "a multiple of 8 (GroupNorm's 8 groups)"),
    (lambda c: c.text_width > 64 and c.text_width % 64, "text_width",
     "a multiple of 64 (one attention head each), or at most 64"),
    (lambda c: c.share_image_trunk and not {"G", "S"} <= set(c.modalities.upper()),
     "share_image_trunk", "both G and S in --modalities"),
    (lambda c: c.pretrained and c.image_backbone in ("small", "clip"), "pretrained",
     "a torchvision --image-backbone"),
    (lambda c: c.image_backbone == "convnext_tiny" and c.img_size < 32, "img_size",
     "at least 32 for convnext_tiny (its stages halve it to one pixel)")]

def check_config(cfg: Config, where: str = "--") -> Config:
    """Each field of its type and among its choices, the numbers within BOUNDS,
    the RULES kept: one line naming the option (or "PATH: config field" of a
    checkpoint's)."""
    name = lambda k: where + (k.replace("_", "-") if where == "--" else k)
    for f in dataclasses.fields(Config):
        v, choices = getattr(cfg, f.name), typing.get_args(f.type)
        # a float may be written as an int; True is an int to Python, not here
        kind = str if choices else {float: (int, float)}.get(f.type, f.type)
        low, high = BOUNDS.get(f.name, (None, None))
        if not isinstance(v, kind) or isinstance(v, bool) != (f.type is bool):
            wrong = f"{v!r}: expected a {getattr(f.type, '__name__', 'str')}"
        elif choices and v not in choices:
            wrong = f"{v!r}: expected one of {', '.join(map(repr, choices))}"
        elif f.type is float and not math.isfinite(v):
            wrong = f"{v}: expected a finite number"
        elif (low is not None and v < low) or (high is not None and v > high):
            number = "an integer" if f.type is int else "a number"
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            wrong = f"{v}: expected {number} {span}"
        else:
            continue
        raise UserError(f"{name(f.name)} {wrong}")
    for wrong, field, expected in RULES:
        if wrong(cfg):
            raise UserError(f"{name(field)} {getattr(cfg, field)}: expected {expected}")
    return cfg

def resolve(command: str, cfg: Config, given: set) -> Config:
    """Settings that follow from others, in one place: a resumed run's own, a
    preset's, modalities and --freeze as letters, the sizes pretrained weights
    were made for, where eval reads and writes, the data (by default the
    synthetic world); all checked."""
    out, train = Path(cfg.out), command == "train"
    last = out / "last.pt"
    # as checkpoints hold them (--resume compares)
    cfg.modalities, cfg.freeze = as_letters(cfg.modalities), as_letters(cfg.freeze)
    if train and cfg.resume:  # the run's own settings, and those given now
        if cfg.overwrite:
            raise UserError("--resume continues the run in --out, --overwrite "
                            "replaces it: give one of them")
        if not last.is_file():
            raise UserError(f"{last}: no run to resume there (--resume continues the "
                            f"run in --out: name its folder with --out)")
        saved = checkpoint_config(last, load_checkpoint(last, True))
        if "data" in given:
            cfg.data = str(data_root(cfg.data))
        for k in RUN_FIELDS:
            if k in given and getattr(cfg, k) != getattr(saved, k):
                raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)}: {last} was "
                                f"trained with {getattr(saved, k)}; leave it out to resume")
        now = {k: getattr(cfg, k) for k in given | {"out"}}  # out: where last.pt is
        if "epochs" in given and "max_steps" not in given:  # the length, said in epochs
            now["max_steps"] = 0
        return check_config(dataclasses.replace(saved, **now))
    # an empty log: a first step that failed (out of memory, say) made no run
    held = [n for n in ("last.pt", "best.pt", "log.jsonl")
            if (out / n).exists() and (out / n).stat().st_size]
    if train and held and not cfg.overwrite:
        raise UserError(f"{out}: holds a run already ({', '.join(held)}): continue "
                        f"it with --resume, or start over with --overwrite")
    if command in ("train", "bench") and cfg.preset:  # what the options given leave unsaid
        chosen = PRESETS[cfg.preset].items()
        cfg = dataclasses.replace(cfg, **{k: v for k, v in chosen if k not in given})
    try:
        check_config(cfg)
    except UserError as e:  # say which values the preset chose
        preset = f" (with --preset {cfg.preset})" if cfg.preset else ""
        raise UserError(f"{e}{preset}") from None
    if set(cfg.freeze) - set("GSTC"):
        raise UserError(f"--freeze {cfg.freeze}: expected some of ground, satellite, "
                        f"text, gps (or G, S, T, C)")
    if cfg.share_image_trunk and len({"G", "S"} & set(cfg.freeze)) == 1:
        raise UserError(f"--freeze {cfg.freeze}: the ground and aerial encoders share "
                        f"one backbone (--share-image-trunk): freeze both or neither")
    if command in ("train", "bench", "prepare"):
        cfg = resolve_sizes(cfg, given)
        # absolute in the checkpoint: eval reads them from anywhere
        cfg.data = str(data_root(cfg.data or synthetic_root(cfg.scale)))
        cfg.clip = cfg.clip and os.path.abspath(cfg.clip)
        if command != "prepare":
            sized(cfg, "the model of these options")
    if command == "bench" and set(cfg.phases.split(",")) - {"steps", "loader", "rank"}:
        raise UserError(f"--phases {cfg.phases}: expected some of steps, loader, rank")
    if command == "synth" and "out" not in given:
        cfg.out = str(synthetic_root(cfg.scale))
    if command == "eval" and "ckpt" not in given:
        cfg.ckpt = str(out / "best.pt")
    elif command == "eval" and "out" not in given:  # beside its checkpoint
        cfg.out = str(Path(cfg.ckpt).parent)
    if command == "convert" and not {"source", "out"} <= given:
        raise UserError("convert: name what to convert (SOURCE) and the checkpoint "
                        "to write (--out)")
    return cfg

def data_root(path) -> Path:
    """--data as an absolute path, or one line (a symbolic link that loops)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a loop (Python 3.11)
        raise UserError(f"--data {path}: not a usable path ({e})") from None

def resolve_sizes(cfg: Config, given: set) -> Config:
    """The image size and tokens of pretrained backbones: CLIP's from its
    folder, torchvision's from its weights (224 px); a size given otherwise is
    one line where it cannot work."""
    image, text = cfg.image_backbone, cfg.text_backbone
    if "clip" in (image, text):
        c = clip_config(cfg.clip)
        side, tokens = c["vision"]["image_size"], c["text"]["max_position_embeddings"]
        if image == "clip" and "img_size" in given and cfg.img_size != side:
            raise UserError(f"--img-size {cfg.img_size}: the vision tower of "
                            f"{cfg.clip} takes {side} px images")
        if text == "clip" and "max_len" in given and cfg.max_len > tokens:
            raise UserError(f"--max-len {cfg.max_len}: the text tower of {cfg.clip} "
                            f"takes at most {tokens} tokens")
        cfg = dataclasses.replace(
            cfg, img_size=side if image == "clip" else cfg.img_size,
            max_len=tokens if text == "clip" and "max_len" not in given else cfg.max_len)
    if image not in ("small", "clip"):  # torchvision's, also beside CLIP's text tower
        crop = backbone_weights(image).transforms().crop_size[0]
        cfg = cfg if "img_size" in given else dataclasses.replace(cfg, img_size=crop)
        wrong = cfg.img_size % 16 or cfg.pretrained and cfg.img_size != crop
        if image == "vit_b_16" and wrong:
            raise UserError(f"--img-size {cfg.img_size}: vit_b_16 takes {crop} px "
                            f"images with --pretrained, and multiples of 16 without")
    return cfg

def main(argv=None):
    # the tokenizer's threads would deadlock the DataLoader's forked workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command, cfg, given = parse_args(argv)
    try:
        cfg = resolve(command, cfg, given)  # a resumed run's --device too
        if "RANK" in os.environ and command not in ("train", "eval"):  # one writer, one timer
            raise UserError(f"{command}: run it once, without torchrun")
        device_of(cfg)  # joins torchrun's group, if there is one
        if command in ("train", "prepare", "bench") and "data" not in given and not cfg.resume:
            synthetic_world(cfg.scale)  # the default data, written on first use
        {"train": fit, "eval": evaluate, "synth": synth, "prepare": prepare,
         "bench": bench, "convert": convert}[command](cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
