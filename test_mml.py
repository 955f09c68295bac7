"""Tests for mml.py: pure functions against brute-force references and known values, the data
layer against a hand-written fixture, the real commands on a tiny synthetic world, and the
distributed loss and evaluation against a single process.  Run: python -m pytest -q"""
import csv
import dataclasses
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tokenizers import Tokenizer

import mml

HERE = Path(__file__).resolve().parent
# The gloo tests talk over loopback; left to itself gloo resolves the host's name, which can
# hang in a sandbox or VM without DNS.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# a model small enough that a CPU trains it in seconds
TINY = ["--img-size", "32", "--img-width", "8", "--embed-dim", "32", "--text-width", "32",
        "--gps-width", "32", "--vocab-size", "300", "--max-len", "16", "--workers", "0",
        "--batch-size", "16", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def in_an_empty_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so the checkout's runs/ and data/ (a newcomer
    runs `python mml.py train` before the tests) neither change a test nor are changed by one."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A tiny synthetic world (80 train, 20 query landmarks), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("world") / "w"
    mml.synthesize(root, scale=0.05, seed=0)
    return root


def run(*argv):
    mml.main([str(a) for a in argv])


# ---- geometry -----------------------------------------------------------------------------


def equal_earth_by_hand(lat: float, lon: float) -> tuple:
    """The Equal Earth formulas of PROTOCOL section 6, written out again in plain floats."""
    A1, A2, A3, A4, SF = 1.340264, -0.081106, 0.000893, 0.003796, 66.50336
    th = math.asin(math.sqrt(3) / 2 * math.sin(math.radians(lat)))
    x = 2 * math.sqrt(3) * math.radians(lon) * math.cos(th) / (3 * (9 * A4 * th**8 + 7 * A3 * th**6 + 3 * A2 * th**2 + A1))
    y = A4 * th**9 + A3 * th**7 + A2 * th**3 + A1 * th
    return x * SF / 180, y * SF / 180


def test_equal_earth_known_points():
    points = [(0.0, 0.0), (40.71, -74.01), (-33.87, 151.21), (64.15, -21.94), (0.0, 180.0)]
    got = mml.equal_earth(torch.tensor(points, dtype=torch.float64))
    for (lat, lon), (x, y) in zip(points, got.tolist()):
        assert (x, y) == pytest.approx(equal_earth_by_hand(lat, lon), abs=1e-12)
    assert got[0].tolist() == [0.0, 0.0]
    assert got[4, 0].item() == pytest.approx(1.0, abs=1e-5)  # GeoCLIP's scaling: lon 180 -> x = 1


def test_haversine_known_distances():
    quarter = mml.haversine_km(torch.tensor([0.0, 0.0]), torch.tensor([90.0, 0.0])).item()
    assert quarter == pytest.approx(math.pi / 2 * 6371.0, rel=1e-12)
    pairs = torch.tensor([[[40.7128, -74.0060], [34.0522, -118.2437]],   # New York - Los Angeles
                          [[51.5074, -0.1278], [48.8566, 2.3522]],       # London - Paris
                          [[41.8781, -87.6298], [41.8781, -87.6298]]])   # same place
    km = mml.haversine_km(pairs[:, 0], pairs[:, 1])
    assert km[0].item() == pytest.approx(3936, abs=5)
    assert km[1].item() == pytest.approx(343.5, abs=1.5)
    assert km[2].item() == 0


# ---- metrics ------------------------------------------------------------------------------


def brute_force(q, g, ql, gl, map_top=1000, strict=False):
    """The protocol, one query at a time with a full argsort (no ties in random data)."""
    out = {"first": [], "ap": []}
    for i in range(len(q)):
        order = np.argsort(-(g @ q[i]).numpy(), kind="stable")
        labels = gl.numpy()[order]
        top = labels[:map_top]
        ranked, top = (labels, top) if strict else (labels[labels != -1], top[top != -1])
        out["first"].append(int(np.flatnonzero(ranked == int(ql[i]))[0]))
        n_good = int((gl == ql[i]).sum())
        ap = 0.0
        for hit, row in enumerate(np.flatnonzero(top == int(ql[i]))[:n_good]):
            ap += ((hit / row if row > 0 else 1) + (hit + 1) / (row + 1)) / 2 / n_good
        out["ap"].append(ap)
    first = np.array(out["first"])
    return {**{f"R@{k}": 100 * np.mean(first < k) for k in (1, 5, 10)},
            "mAP@1k": 100 * np.mean(out["ap"]), "medR": None}


def random_task(n_q, n_lm, per_lm, n_junk, dim=16, seed=0, noise=0.8):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_lm, dim, generator=gen)
    ql = torch.randint(0, n_lm, (n_q,), generator=gen)
    gl_lab = torch.arange(n_lm).repeat_interleave(per_lm)
    near = lambda lab: F.normalize(centres[lab] + noise * torch.randn(len(lab), dim, generator=gen), dim=-1)
    g = torch.cat([near(gl_lab), F.normalize(torch.randn(n_junk, dim, generator=gen), dim=-1)])
    gl = torch.cat([gl_lab, torch.full((n_junk,), -1)])
    perm = torch.randperm(len(g), generator=gen)  # distractors mixed in, not first
    return near(ql), g[perm], ql, gl[perm]


@pytest.mark.parametrize("per_lm,n_junk", [(1, 0), (1, 300), (4, 0), (4, 300)])
def test_retrieval_metrics_match_brute_force(per_lm, n_junk):
    q, g, ql, gl = random_task(60, 30, per_lm, n_junk)
    got = mml.retrieval_metrics(q, g, ql, gl)
    for protocol in ("official", "strict"):
        want = brute_force(q, g, ql, gl, strict=protocol == "strict")
        for k in ("R@1", "R@5", "R@10", "mAP@1k"):
            assert got[protocol][k] == pytest.approx(want[k], abs=1e-9), (protocol, k)
    # medR: position in the full ranking, distractors counted, under both protocols
    firsts = [int(np.flatnonzero(gl.numpy()[np.argsort(-(g @ q[i]).numpy())] == int(ql[i]))[0]) + 1 for i in range(len(q))]
    assert got["official"]["medR"] == got["strict"]["medR"] == np.median(firsts)
    if n_junk:  # distractors only ever hurt
        assert got["strict"]["R@1"] <= got["official"]["R@1"]


@pytest.mark.parametrize("map_top", [20, 5])  # 5: fewer than a query's 6 positives
def test_map_cut_at_top_and_chunking_do_not_change_results(map_top):
    q, g, ql, gl = random_task(50, 10, 6, 200, noise=1.5)
    for protocol in ("official", "strict"):
        want = brute_force(q, g, ql, gl, map_top=map_top, strict=protocol == "strict")
        got = mml.summarise(mml.rank_queries(q, g, ql, gl, map_top=map_top, chunk=7), map_top=map_top)
        assert got[protocol][f"mAP@{map_top}"] == pytest.approx(want["mAP@1k"], abs=1e-9)
        assert got[protocol]["R@5"] == pytest.approx(want["R@5"], abs=1e-9)


def test_medr_is_numpys_median_on_an_even_count():
    # four queries whose positive sits at positions 1, 2, 3 and 10: median 2.5, not torch's 2
    g = torch.eye(10)
    q = torch.stack([g[0], 0.9 * g[0] + 0.5 * g[1], 0.9 * g[0] + 0.8 * g[1] + 0.5 * g[2],
                     torch.linspace(1, 0.1, 10)])  # scores against the identity are q itself
    q = F.normalize(q, dim=-1)
    gl = torch.arange(10)
    ql = torch.tensor([0, 1, 2, 9])  # each query's landmark
    ranks = mml.rank_queries(q, g, ql, gl)
    assert (ranks["first_strict"] + 1).tolist() == [1, 2, 3, 10]
    assert mml.summarise(ranks)["strict"]["medR"] == 2.5


def test_ties_go_against_the_query():
    """The documented policy: an item scoring exactly the positive's score ranks before it,
    unless it is a positive too; a tied distractor counts only in the strict ranking."""
    e = torch.eye(4)
    g = torch.stack([e[0], e[0], e[0], e[1]])  # three identical items, then another
    q = e[0:1]
    # gallery: distractor, negative, positive, all tied at score 1
    r = mml.rank_queries(q, g, torch.tensor([7]), torch.tensor([-1, 3, 7, 5]))
    assert r["first_strict"].item() == 2 and r["first_official"].item() == 1
    # two tied positives and a tied negative: the positives take positions 1 and 2 (0-based)
    r = mml.rank_queries(q, g, torch.tensor([7]), torch.tensor([7, 3, 7, 5]))
    assert r["first_strict"].item() == 1
    assert r["ap_strict"].item() == pytest.approx(((0 / 1 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)


def test_geo_metrics_known_errors():
    true = torch.tensor([[40.0, -100.0]] * 4)
    # 0 km, ~11.1 km (0.1 degree of latitude), ~111 km, ~1112 km
    pred = torch.tensor([[40.0, -100.0], [40.1, -100.0], [41.0, -100.0], [50.0, -100.0]])
    m = mml.geo_metrics(mml.haversine_km(pred, true))
    assert (m["acc@1km"], m["acc@25km"], m["acc@200km"], m["acc@750km"], m["acc@2500km"]) == (25, 50, 75, 75, 100)
    assert m["median_km"] == pytest.approx((11.1195 + 111.195) / 2, abs=0.01)


# ---- loss and model -----------------------------------------------------------------------


def test_loss_equals_an_explicit_loop():
    gen = torch.Generator().manual_seed(0)
    emb = {m: F.normalize(torch.randn(6, 8, generator=gen), dim=-1) for m in "GSTC"}
    scale = torch.tensor(10.0)
    for kind, pairs in (("complete", ["GS", "GT", "GC", "ST", "SC", "TC"]), ("imagebind", ["GS", "GT", "GC"])):
        assert mml.loss_pairs("GSTC", kind) == pairs
        total, parts = mml.contrastive_loss(emb, scale, pairs)
        want = []
        for a, b in pairs:
            terms = []
            for x, y in ((a, b), (b, a)):
                for i in range(6):
                    logits = [scale.item() * float(emb[x][i] @ emb[y][j]) for j in range(6)]
                    terms.append(-logits[i] + math.log(sum(math.exp(v) for v in logits)))
            want.append(sum(terms) / len(terms))
            assert parts[a + b].item() == pytest.approx(want[-1], rel=1e-5)
        assert total.item() == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_gps_encoder_equals_hand_computation():
    torch.manual_seed(0)
    enc = mml.GPSEncoder(width=16, depth=2, dim=8, n_freq=4)
    points = [(40.71, -74.01), (29.76, -95.37), (47.61, -122.33)]
    got = enc(torch.tensor(points))
    for p, row in zip(points, got):
        v = torch.tensor(equal_earth_by_hand(*p), dtype=torch.float32)
        total = 0
        for k in range(3):
            scale = getattr(enc, f"LocEnc{k}")
            b = scale["capsule"][0].b
            phase = 2 * math.pi * (b @ v)
            h = torch.cat([torch.cos(phase), torch.sin(phase)])  # all cosines first
            for layer in (1, 3):
                lin = scale["capsule"][layer]
                h = torch.relu(lin.weight @ h + lin.bias)
            total = total + scale["head"][0].weight @ h + scale["head"][0].bias
        assert torch.allclose(row, F.normalize(total, dim=0), atol=1e-4)
    wide = mml.GPSEncoder(width=4, depth=1, dim=4, n_freq=4096)  # each sigma from 8,192 draws
    for k, sigma in enumerate((1, 16, 256)):
        assert getattr(wide, f"LocEnc{k}").capsule[0].b.std().item() == pytest.approx(sigma, rel=0.05)


def geoclip_state_dict() -> dict:
    """Random tensors in GeoCLIP's location-encoder key layout and sizes."""
    geoclip = {}
    for k in range(3):
        geoclip[f"LocEnc{k}.capsule.0.b"] = torch.randn(256, 2)
        for i, (o, n) in zip((1, 3, 5), ((1024, 512), (1024, 1024), (1024, 1024))):
            geoclip[f"LocEnc{k}.capsule.{i}.weight"] = torch.randn(o, n)
            geoclip[f"LocEnc{k}.capsule.{i}.bias"] = torch.randn(o)
        geoclip[f"LocEnc{k}.head.0.weight"] = torch.randn(512, 1024)
        geoclip[f"LocEnc{k}.head.0.bias"] = torch.randn(512)
    return geoclip


def test_gps_encoder_loads_geoclip_key_layout():
    """At GeoCLIP's sizes, a state dict with GeoCLIP's keys and shapes loads strictly."""
    geoclip = geoclip_state_dict()
    enc = mml.GPSEncoder(width=1024, depth=3, dim=512)
    enc.load_state_dict(geoclip, strict=True)
    assert torch.equal(enc.LocEnc2.capsule[0].b, geoclip["LocEnc2.capsule.0.b"])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torchvision cache, and any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in the tests ({url})")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home/hub/checkpoints"


@pytest.mark.parametrize("backbone,extra", [
    ("resnet18", ["--freeze", "G,S"]),
    ("convnext_tiny", ["--share-image-trunk", "--freeze", "ground,satellite"]),
    ("vit_b_16", ["--share-image-trunk", "--freeze", "G,S"]),  # 32 px: 2x2 patches, untrained
])
def test_every_backbone_trains_a_step_and_evaluates_from_its_checkpoint(world, tmp_path, offline,
                                                                       backbone, extra):
    run("train", "--data", world, "--out", tmp_path / "run", *TINY, "--image-backbone", backbone,
        "--modalities", "GSC", "--max-steps", 1, "--batch-size", 4, *extra)
    ckpt = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert ckpt["config"]["image_backbone"] == backbone and ckpt["step"] == 1
    run("eval", "--ckpt", tmp_path / "run/last.pt", "--tasks", "S2C,G2S", "--workers", 0)
    tasks = json.loads((tmp_path / "run/eval/metrics.json").read_text())["tasks"]
    assert set(tasks) == {"S2C", "G2S"} and not offline.exists()  # nothing was downloaded


def test_pretrained_weights_come_from_torchvisions_cache_and_frozen_backbones_stay(
        world, tmp_path, offline, capsys):
    """resnet18 from a weights file under torchvision's name in TORCH_HOME, no network; after
    steps with ground, aerial and text frozen, their backbones (BatchNorm statistics
    included) are bit-identical, and their heads and the GPS encoder have moved."""
    weights = mml.backbone_weights("resnet18")
    args = ["train", "--data", world, *TINY, "--image-backbone", "resnet18", "--pretrained"]
    err = fails_in_one_line(capsys, *args, "--out", tmp_path / "none")
    assert str(offline / "resnet18-f37072fd.pth") in err and weights.url in err
    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18().state_dict()
    offline.mkdir(parents=True, exist_ok=True)  # the failed download made it
    torch.save(imagenet, offline / os.path.basename(weights.url))
    run(*args, "--out", tmp_path / "run", "--freeze", "ground,satellite,text", "--max-steps", 3,
        "--lr", "1e-2")
    trained = torch.load(tmp_path / "run/last.pt", weights_only=True)["model"]
    for m in "GS":
        for k, v in imagenet.items():
            if not k.startswith("fc."):
                assert torch.equal(trained[f"enc.{m}.trunk.{k}"], v), (m, k)
    cfg = mml.Config(**torch.load(tmp_path / "run/last.pt", weights_only=True)["config"])
    torch.manual_seed(cfg.seed)
    start = mml.MML(cfg).state_dict()  # the initial weights, as training made them
    for k, v in start.items():
        if k.startswith("enc.T.") and not mml.is_head(k):
            assert torch.equal(trained[k], v), k
    moved = [k for k, v in start.items() if not torch.equal(trained[k], v)]
    assert {"enc.G.head.weight", "enc.S.head.weight", "enc.T.head.weight"} <= set(moved)
    assert any(k.startswith("enc.C.LocEnc0.capsule") for k in moved)  # not frozen: trains
    assert "--img-size 32: vit_b_16 takes 224 px images with --pretrained" in fails_in_one_line(
        capsys, "train", "--out", tmp_path / "x", "--image-backbone", "vit_b_16", "--pretrained",
        "--img-size", 32)



def test_parse_args_builds_config_and_names_the_nearest_option(capsys):
    cmd, cfg, given = mml.parse_args(["train", "--batch-size", "7", "--no-bf16", "--modalities", "GS"])
    assert (cmd, cfg.batch_size, cfg.bf16, cfg.modalities, given) == ("train", 7, False, "GS", {"batch_size", "bf16", "modalities"})
    with pytest.raises(SystemExit):
        mml.parse_args(["train", "--batchsize", "7"])
    assert "did you mean --batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a choice: argparse names the valid ones
        mml.parse_args(["train", "--select", "accuracy"])
    assert "invalid choice: 'accuracy' (choose from 'recall', 'loss')" in capsys.readouterr().err
    with pytest.raises(mml.UserError, match="modalities"):
        mml.resolve("train", mml.Config(modalities="G"), set())


@pytest.mark.parametrize("command,shown,hidden", [
    ("train", ["--batch-size", "--image-backbone", "--freeze", "--select", "--resume"],
     ["--tasks", "--chunk", "--bench-queries", "--top", "--viz"]),
    ("eval", ["--ckpt", "--tasks", "--chunk", "--viz", "--data"],
     ["--batch-size", "--lr", "--bench-queries", "--embed-dim", "--seed"]),
    ("locate", ["INPUTS", "--text", "--top", "--json", "--gallery"], ["--tasks", "--lr"]),
    ("convert", ["SOURCE", "--out", "--overwrite", "--clip"], ["--tasks", "--lr"]),
])
def test_help_by_command_shows_its_own_options_with_each_default_once(capsys, command, shown,
                                                                      hidden):
    with pytest.raises(SystemExit):
        mml.parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert all(o in text for o in shown) and not any(o + " " in text for o in hidden)
    assert mml.COMMANDS[command][0] in text.replace("\n", " ")
    assert "(default: 128)" in text if command == "train" else True
    assert not re.search(r"\(default:[^)]*\)\s*\(default:", text)


# ---- data ---------------------------------------------------------------------------------



def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def image(path: Path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def authors_sentence(article: dict, mode: str, rng: random.Random) -> str:
    """The authors' sentence picking, as they wrote it, one article at a time."""
    if mode == "first":
        return str(next(iter(article.values()))).split("\n")[0].split(". ")[0]
    paragraph = rng.choice(str(rng.choice(list(article.values()))).split("\n"))
    return rng.choice(paragraph.split(". "))


def test_sentence_table_picks_what_the_authors_rule_picks(world):
    """Every article of the world, tokenised once: the same rng picks the same sentence as
    the authors' per-article code, and its token row is that sentence tokenised."""
    split = mml.read_split(world, "query")
    articles, bad = mml.read_articles(split)
    tok = mml.train_tokenizer([str(v) for a in articles for v in a.values()], mml.Config())
    table = mml.Sentences(articles, tok, "random")
    first = mml.Sentences(articles, tok, "first")
    assert not bad and len(first.texts) == len(articles) < len(table.texts)
    for i, article in enumerate(articles):
        for mode, t in (("first", first), ("random", table), ("first", table)):
            row = t.pick(i, mode, random.Random(f"0/{i}"))
            want = authors_sentence(article, mode, random.Random(f"0/{i}"))
            assert t.texts[row] == want
            assert torch.equal(t.tokens[row], mml.tokenize(tok, [want])[0])


@pytest.fixture
def fixture_root(tmp_path) -> Path:
    """Two query landmarks and one index, written by hand in the released layout."""
    r = tmp_path / "mml"
    q = r / "query"
    write(r / "mmlandmarks.csv", "landmark_id,CommonsCategory,WikipediaPage,lat,lon\n")
    write(q / "mml_query.csv", "landmark_id,CommonsCategory,lat,lon\n11,Alpha Tower,40.5,-73.25\n22,Beta Dome,-10,120\n")
    write(q / "mml_query_ground.csv", "landmark_id,images\n11,aaa0000000000001 aaa0000000000002\n22,bbb0000000000001\n")
    write(q / "mml_query_satellite.csv", "landmark_id,images\n22,ddd0000000000002\n11,ccc0000000000003\n")
    write(q / "mml_query_all_satellite.csv",
          "landmark_id,images\n11,ccc0000000000001 ccc0000000000002 ccc0000000000003\n22,ddd0000000000001 ddd0000000000002\n")
    write(q / "mml_query_text.csv", "landmark_id,json\n11,eee0000000000001\n22,fff0000000000001\n")
    write(q / "mml_query_text_sentences.csv", "landmark_id,sentences\n11,A tall tower\n22,\"A dome, white\"\n")
    write(q / "text/e/e/e/eee0000000000001.json", json.dumps(
        {"Introduction": "Alpha is a tower in Ohio. It is tall.\nSecond paragraph.", "History": "Built once. Then again."}))
    image(q / "ground/a/a/a/aaa0000000000001.jpg", (200, 0, 0))
    image(q / "satellite/c/c/c/ccc0000000000003.png", (0, 200, 0), (50, 50))
    write(r / "index/mml_index_ground.csv", "images,gldv2_id\n9990000000000001,x\n9990000000000002,y\n")
    write(r / "index/mml_index_satellite.csv", "images,lat,lon,year\n8880000000000001,30.25,-90.5,2015\n")
    return r


def test_reader_on_a_hand_written_fixture(fixture_root):
    s = mml.read_split(fixture_root, "query")
    assert s.ids.tolist() == [11, 22]
    assert s.latlon.tolist() == [[40.5, -73.25], [-10.0, 120.0]]
    assert s.ground == [["aaa0000000000001", "aaa0000000000002"], ["bbb0000000000001"]]
    assert s.latest == ["ccc0000000000003", "ddd0000000000002"]  # matched by id, not by row
    assert s.sat[0] == ["ccc0000000000001", "ccc0000000000002", "ccc0000000000003"]
    assert s.no_cues == ["A tall tower", "A dome, white"]
    store = mml.ImageStore(s.dir, "ground", 16, None)
    assert store.path("aaa0000000000001") == fixture_root / "query/ground/a/a/a/aaa0000000000001.jpg"
    assert store("aaa0000000000001").shape == (16, 16, 3)
    assert abs(int(store("aaa0000000000001")[8, 8, 0]) - 200) < 4
    article = mml.read_article(mml.shard(s.dir, "text", s.text[0]))
    tok = mml.train_tokenizer(["Alpha is a tower in Ohio. It is tall."], mml.Config(vocab_size=60))
    for mode in ("first", "random"):
        table = mml.Sentences([article], tok, mode)
        picks = {table.texts[table.pick(0, mode, random.Random(i))] for i in range(200)}
        assert picks == {authors_sentence(article, mode, random.Random(i)) for i in range(200)}
        assert picks == ({"Alpha is a tower in Ohio"} if mode == "first" else {
            "Alpha is a tower in Ohio", "It is tall.", "Second paragraph.", "Built once",
            "Then again."})
    index = mml.read_index(fixture_root)
    assert index.ground == ["9990000000000001", "9990000000000002"]
    assert index.sat_latlon.tolist() == [[30.25, -90.5]]


@pytest.mark.parametrize("break_it,message", [
    (lambda r: os.rename(r, r.with_name("gone")), r"mml: dataset root not found"),
    (lambda r: os.rename(r / "query", r / "q2"), r"query: split folder not found"),
    (lambda r: os.remove(r / "query/mml_query_text.csv"), r"mml_query_text.csv: file not found"),
    (lambda r: write(r / "query/mml_query.csv", "landmark_id,CommonsCategory,lat\n11,A,40\n"), r"mml_query.csv: no column 'lon'"),
    (lambda r: write(r / "query/mml_query_ground.csv", "landmark_id,images\n11,aaa0000000000009\n"),
     r"mml_query_ground.csv: landmark 22 listed in mml_query.csv but missing here"),
    (lambda r: write(r / "query/mml_query_text.csv", "landmark_id,json\n" + "".join(f"{i},xyz\n" for i in [11, 22, 1, 2, 3, 4, 5, 6, 7])),
     r"mml_query.csv: landmark 1, 2, 3, 4, 5 and 2 more listed in mml_query_text.csv but missing here"),
    (lambda r: write(r / "query/mml_query.csv", "landmark_id,CommonsCategory,lat,lon\n11,A,40,-73\n22,B,nan,120\n"),
     r"mml_query.csv, line 3: GPS \(nan, 120.0\) is not a latitude"),
    (lambda r: write(r / "index/mml_index_satellite.csv", "images,lat,lon,year\n888,30,-190,2015\n"),
     r"mml_index_satellite.csv, line 2: GPS \(30.0, -190.0\)"),
])
def test_bad_input_gives_one_clear_line(fixture_root, capsys, break_it, message):
    break_it(fixture_root)
    with pytest.raises(SystemExit) as exit:  # prepare reads the query split, then the index
        run("prepare", "--data", fixture_root, "--splits", "query,index", "--cache", fixture_root.parent / "c")
    err = capsys.readouterr().err
    assert exit.value.code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and re.search(message, err), err


def test_synthetic_world_reads_back_with_the_generators_counts(tmp_path):
    counts = mml.synthesize(tmp_path / "a", scale=0.03, seed=3)
    for split in ("train", "query"):
        s = mml.read_split(tmp_path / "a", split)
        assert counts[split] == {"landmarks": len(s.ids), "text": len(s.text),
                                 "ground": sum(map(len, s.ground)), "satellite": sum(map(len, s.sat))}
        assert all(mml.shard(s.dir, "text", t).is_file() for t in s.text)
        assert all(mml.shard(s.dir, "ground", i).is_file() for g in s.ground for i in g)
    index = mml.read_index(tmp_path / "a")
    assert counts["index"] == {"ground": len(index.ground), "satellite": len(index.sat)}
    assert counts["index"]["ground"] > counts["query"]["landmarks"] and counts["index"]["satellite"] > counts["query"]["landmarks"]
    # the outdoor subset leaves out indoor photos; no-cue sentences lose city and state
    outdoor = mml.read_split(tmp_path / "a", "train", outdoor_only=True)
    assert sum(map(len, outdoor.ground)) < counts["train"]["ground"]
    q = mml.read_split(tmp_path / "a", "query")
    first = authors_sentence(mml.read_article(mml.shard(q.dir, "text", q.text[0])), "first", None)
    assert first.startswith(q.no_cues[0]) and len(first) > len(q.no_cues[0])
    # deterministic for a seed: byte for byte
    mml.synthesize(tmp_path / "b", scale=0.03, seed=3)
    for f in ["train/mml_train.csv", "index/mml_index_satellite.csv", "query/mml_query_ground.csv"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    photo = mml.shard(q.dir, "ground", q.ground[0][0]).relative_to(tmp_path / "a")
    assert (tmp_path / "a" / photo).read_bytes() == (tmp_path / "b" / photo).read_bytes()


def test_image_cache_is_used_checked_and_exact(world, tmp_path):
    cache = tmp_path / "cache"
    run("prepare", "--data", world, "--img-size", 24, "--splits", "query", "--cache", cache, "--workers", 1)
    q = mml.read_split(world, "query")
    photos, tiles = [i for g in q.ground for i in g], q.latest
    direct = mml.ImageStore(q.dir, "ground", 24, None)
    cached = mml.ImageStore(q.dir, "ground", 24, cache, photos)
    for i in photos[:10]:  # the same decode: identical pixels
        assert np.array_equal(cached(i), direct(i))
        # draft() decodes the JPEG at reduced scale: close to a full decode, not identical
        full = mml.to_square(Image.open(direct.path(i)).convert("RGB"), 24)
        assert np.abs(cached(i).astype(int) - full).mean() < 6
    tile_store = mml.ImageStore(q.dir, "satellite", 24, cache, tiles)
    path = tile_store.path(tiles[0])
    exact = np.asarray(Image.open(path).convert("RGB").resize((24, 24), Image.BILINEAR))
    assert np.array_equal(tile_store(tiles[0]), mml.load_image(path, 24))
    assert np.abs(tile_store(tiles[0]).astype(int) - exact).max() <= 1  # a PNG is lossless
    # used: the pixels come from the cache even when the file is gone
    moved = tmp_path / "moved.png"
    os.rename(path, moved)
    assert np.array_equal(tile_store(tiles[0]), mml.load_image(moved, 24))
    os.rename(moved, path)
    with pytest.raises(mml.UnreadableFile):
        direct(photos[0] + "x")
    # refused: another image size, or a file list the cache does not cover
    with pytest.raises(mml.UserError, match="holds 24 px images made by --resize crop, not --img-size 32 --resize crop"):
        mml.ImageStore(q.dir, "ground", 32, cache, photos)
    with pytest.raises(mml.UserError, match="not --img-size 24 --resize squash"):
        mml.ImageStore(q.dir, "ground", 24, cache, photos, "squash")
    with pytest.raises(mml.UserError, match="lacks 1 images"):
        mml.ImageStore(q.dir, "ground", 24, cache, photos + ["0000000000000000"])


# ---- training -----------------------------------------------------------------------------



def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def tiny_config(world: Path, *argv) -> mml.Config:
    """The Config `train` would run with on the tiny world and TINY's sizes."""
    return mml.resolve("train", mml.parse_args(["train", "--data", str(world), *TINY, *argv])[1], {"data"})


def image_stores(cfg: mml.Config, split: mml.Split) -> dict:
    return {m: mml.ImageStore(split.dir, mml.MODALITY[m], cfg.img_size) for m in "GS"}


@pytest.mark.parametrize("crash_after", ["last.pt", "best.pt"])
def test_resume_is_exact(world, tmp_path, monkeypatch, crash_after):
    """3 epochs straight == 2 epochs, a crash, --resume, 1 more: bit-identical weights. The
    crash comes right after last.pt, or between best.pt and last.pt: best.pt is right too."""
    args = ["--data", world, *TINY, "--epochs", 3, "--train-text", "random", "--select", "loss"]
    run("train", "--out", tmp_path / "a", *args)
    real_save = mml.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        if state["epoch"] == 1 and path.name == crash_after:
            raise KeyboardInterrupt  # as if the machine went down right after the save
    monkeypatch.setattr(mml, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run("train", "--out", tmp_path / "b", *args)
    monkeypatch.setattr(mml, "save_checkpoint", real_save)
    run("train", "--out", tmp_path / "b", "--resume")  # the run's own settings come from last.pt
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(tmp_path / x / name, weights_only=True) for x in "ab")
        assert a["step"] == b["step"] and a["best"] == b["best"]
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k]), k
    assert a["step"] == 3 * (72 // 16)


def train_until_sigterm(cmd: list, after_step: int, env=None) -> tuple[int, str]:
    """Start a training command, send SIGTERM to its whole process group (as a scheduler
    does) once it logs `after_step`; return (last step logged, its output)."""
    proc = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.PIPE, text=True, env=env,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.match(rf"epoch \d+ step {after_step}/", line):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    lines.append(proc.stdout.read())
    proc.wait(timeout=120)
    logged = [int(s) for s in re.findall(r"epoch \d+ step (\d+)/", "".join(lines))]
    return (max(logged) if logged else 0), "".join(lines)


def test_sigterm_saves_the_step_and_resume_matches_an_uninterrupted_run(world, tmp_path):
    """SIGTERM mid-run (loader worker included): last.pt at a step no earlier than the last
    one logged, and --resume reaches the weights of an uninterrupted run, bit for bit."""
    args = ["--data", world, *TINY, "--batch-size", 8, "--epochs", 1, "--workers", 1]
    run("train", "--out", tmp_path / "a", *args)
    logged, output = train_until_sigterm(
        [sys.executable, HERE / "mml.py", "train", "--out", tmp_path / "b", *args], 3)
    assert "Traceback" not in output and "--resume`" in output, output
    assert torch.load(tmp_path / "b/last.pt", weights_only=True)["step"] >= logged >= 3
    run("train", "--out", tmp_path / "b", "--resume")
    a, b = (torch.load(tmp_path / x / "last.pt", weights_only=True) for x in "ab")
    assert a["step"] == b["step"] == 72 // 8 and a["best"] == b["best"]
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_best_pt_is_the_epoch_of_best_validation_recall_or_loss(world, tmp_path):
    """mml's default keeps the epoch of the highest mean validation R@1; --select loss (the
    authors' rule, and --preset paper's) the lowest validation loss."""
    run("train", "--data", world, "--out", tmp_path / "r", *TINY, "--epochs", 3)
    epochs = [r for r in log_records(tmp_path / "r") if "val_R@1" in r]
    pairs = ["GS", "GT", "GC", "ST", "SC", "TC"]
    for r in epochs:  # the mean over the trained pairs
        assert r["val_R@1"] == pytest.approx(np.mean([r[f"val_{p[0]}2{p[1]}_R@1"] for p in pairs]))
    best = torch.load(tmp_path / "r/best.pt", weights_only=True)
    want = max(epochs, key=lambda r: r["val_R@1"])  # the first of equals, as training keeps it
    assert best["epoch"] == want["epoch"] and best["best"] == want["val_R@1"]
    # --resume keeps the best value so far: past an unbeatable one, best.pt stays as it was
    last, before = torch.load(tmp_path / "r/last.pt", weights_only=True), (tmp_path / "r/best.pt").read_bytes()
    torch.save(last | {"best": 100.0}, tmp_path / "r/last.pt")
    run("train", "--out", tmp_path / "r", "--resume", "--epochs", 4)
    assert (tmp_path / "r/best.pt").read_bytes() == before
    assert torch.load(tmp_path / "r/last.pt", weights_only=True)["best"] == 100.0
    run("train", "--data", world, "--out", tmp_path / "l", *TINY, "--epochs", 3, "--select", "loss")
    epochs = [r for r in log_records(tmp_path / "l") if "val_loss" in r]
    best = torch.load(tmp_path / "l/best.pt", weights_only=True)
    want = min(epochs, key=lambda r: r["val_loss"])
    assert best["epoch"] == want["epoch"] and best["best"] == want["val_loss"]


@pytest.mark.parametrize("modalities", ["GS", "GT", "SC", "TC", "GSC", "GSTC"])
def test_every_modality_set_and_loss_trains(world, modalities):
    """One optimiser step on a real batch: finite loss, every encoder's weights move."""
    cfg = tiny_config(world, "--modalities", modalities)
    tr, _ = mml.read_train(cfg, world)
    tok = mml.train_tokenizer(["a tower in a city", "a red dome"], cfg)
    sentences = mml.Sentences(mml.read_articles(tr)[0], tok, "first")
    data = mml.LandmarkSet(tr, image_stores(cfg, tr), sentences, cfg, train=True)
    batch = data[[(0, i) for i in range(8)]]
    batch = mml.jitter(batch, mml.augment_params(0, 0, 0, 8))
    for loss in ["complete"] + (["imagebind"] if "G" in modalities else []):
        torch.manual_seed(0)
        model = mml.MML(cfg)
        before = {m: [p.clone() for p in e.parameters()] for m, e in model.enc.items()}
        assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)  # CLIP's temperature
        emb, scale = model(mml.batch_to(batch, torch.device("cpu")))
        total, parts = mml.contrastive_loss(emb, scale, mml.loss_pairs(cfg.modalities, loss))
        assert math.isfinite(total.item()) and len(parts) == (len(modalities) - 1 if loss == "imagebind" else math.comb(len(modalities), 2))
        total.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        for m, e in model.enc.items():
            assert any(not torch.equal(p, q) for p, q in zip(e.parameters(), before[m])), (loss, m)


def test_the_loops_step_caps_the_logit_scale_at_clips_100(world):
    """train_step, the function the loop calls each step (and the bench times), caps the
    learnt scale at ln(100) after the update, CLIP's cap; --recipe paper (the authors') does
    not cap it."""
    cfg = tiny_config(world)
    batch, pairs = mml.random_batch(cfg, 8), mml.loss_pairs(cfg.modalities, cfg.loss)
    for recipe in ("mml", "paper"):
        torch.manual_seed(0)
        raw = mml.MML(cfg)
        with torch.no_grad():
            raw.logit_scale.fill_(math.log(400))
        run_cfg = dataclasses.replace(cfg, recipe=recipe)
        mml.train_step(raw, raw, mml.make_optimizer(raw, run_cfg), batch, run_cfg, pairs, 0, 0, 1e-3)
        if recipe == "mml":
            assert raw.logit_scale.item() == torch.tensor(math.log(100)).item()
        else:
            assert raw.logit_scale.item() > math.log(390)


def test_validation_sees_each_landmarks_first_photo_latest_tile_and_first_sentence(world):
    """Validation must not depend on a draw: the held-out landmarks' first ground photo, latest
    aerial tile and first sentence, whatever the epoch; so best.pt is chosen on one fixed set."""
    cfg = tiny_config(world)
    _, val, tok = mml.training_sets(cfg, None)
    s, rows = val.split, list(range(len(val)))
    first, later = val[[(0, i) for i in rows]], val[[(7, i) for i in rows]]
    assert max(len(g) for g in s.ground) > 1 and max(len(t) for t in s.sat) > 1  # there is a choice
    for i in rows:
        assert np.array_equal(first["G"][i].permute(1, 2, 0).numpy(), val.stores["G"](s.ground[i][0]))
        assert np.array_equal(first["S"][i].permute(1, 2, 0).numpy(), val.stores["S"](s.latest[i]))
        article = mml.read_article(mml.shard(s.dir, "text", s.text[i]))
        assert torch.equal(first["T"][i], mml.tokenize(tok, [authors_sentence(article, "first", None)])[0])
    assert all(torch.equal(first[m], later[m]) for m in "GSTC")
    # what validation embeds: these very pixels, unaugmented, however the jitter is called
    seen, model = [], mml.MML(cfg)
    model.forward = lambda batch: seen.append(batch) or mml.MML.forward(model, batch)
    mml.validate(model, val, cfg, mml.loss_pairs(cfg.modalities, cfg.loss), torch.device("cpu"))
    assert all(torch.equal(torch.cat([b[m] for b in seen]), first[m]) for m in "GSTC")


def test_nonfinite_losses_are_skipped_then_stop_the_run(world, tmp_path, monkeypatch, capsys):
    real = mml.contrastive_loss
    calls = {"n": 0}

    def sometimes_nan(emb, scale, pairs, gather=True):
        loss, parts = real(emb, scale, pairs, gather)
        calls["n"] += gather  # training calls gather; validation does not
        return (loss * float("nan") if gather and calls["n"] in (2, 3) else loss), parts
    monkeypatch.setattr(mml, "contrastive_loss", sometimes_nan)
    run("train", "--data", world, "--out", tmp_path, *TINY, "--epochs", 1)
    out = capsys.readouterr().out
    assert "step 1: loss is nan, step skipped" in out and "2 skipped" in out
    good = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["model"].values())

    monkeypatch.setattr(mml, "contrastive_loss", lambda e, s, p, gather=True: (real(e, s, p, gather)[0] * float("inf"), {}))
    monkeypatch.setattr(mml, "MAX_BAD_STEPS", 3)
    with pytest.raises(SystemExit):
        run("train", "--out", tmp_path, "--resume", "--epochs", 2)
    assert "3 non-finite losses in a row" in capsys.readouterr().err
    kept = torch.load(tmp_path / "last.pt", weights_only=True)  # the good checkpoint survives
    assert all(torch.equal(v, good["model"][k]) for k, v in kept["model"].items())


def test_unreadable_images_are_skipped_in_training_and_fatal_in_eval(world, tmp_path, capsys):
    root = tmp_path / "w"
    shutil.copytree(world, root)
    cfg = tiny_config(root)
    tr, _ = mml.read_train(cfg, root)
    for photo in tr.ground[0][:-1]:  # landmark 0 keeps one good photo
        mml.shard(tr.dir, "ground", photo).write_bytes(b"not a jpeg")
    for tile in tr.sat[1]:  # landmark 1 has no readable aerial image at all
        os.remove(mml.shard(tr.dir, "satellite", tile))
    sentences = mml.Sentences(mml.read_articles(tr)[0], mml.train_tokenizer(["a b"], cfg), "first")
    data = mml.LandmarkSet(tr, image_stores(cfg, tr), sentences, cfg, train=True)
    batch = data[[(0, 0), (0, 1)]]
    assert batch["G"][0].float().mean() > 10  # another view of the same landmark stood in
    assert all(line.split(":")[0].endswith(".jpg") for line in batch["bad"][0].splitlines())
    assert len(batch["bad"][1].splitlines()) == len(tr.sat[1])
    assert batch["S"][1].eq(0).all()  # no readable aerial view at all: a black image
    run("train", "--data", root, "--out", tmp_path / "run", *TINY, "--epochs", 2)
    assert "unreadable files skipped for other views" in capsys.readouterr().out
    counts = [r["unreadable"] for r in log_records(tmp_path / "run") if "unreadable" in r]
    assert len(counts) == 2 and all(c >= len(tr.sat[1]) for c in counts)  # counted each epoch
    q = mml.read_split(root, "query")
    mml.shard(q.dir, "ground", q.ground[3][1]).write_bytes(b"")
    with pytest.raises(SystemExit):
        run("eval", "--data", root, "--ckpt", tmp_path / "run/last.pt", "--tasks", "G2S", "--workers", 0, "--device", "cpu")
    err = capsys.readouterr().err
    assert q.ground[3][1] in err and "evaluation needs every file" in err


def torchvision_jitter(image: torch.Tensor, p: list, rotate: bool) -> torch.Tensor:
    """The jitter one image at a time with torchvision's functions: the reference."""
    b, c, s, r, sigma, turns = p[:6]  # p[6], the hue shift, is 0 here (see the paper test)
    y = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
    if r < 0.2:
        y = TF.gaussian_blur(y, [3, 3], [sigma])
    elif r < 0.4:
        y = TF.adjust_sharpness(y, 2.0)
    return torch.rot90(y, int(turns), dims=(1, 2)) if rotate else y


def test_batched_augmentation_equals_torchvision_per_image():
    """Each transformation alone, then all together with drawn parameters: torchvision's
    per-image functions on float images give the same pixels to 1e-6 (float rounding)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=gen)
    x = images.float() / 255
    none = [1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0]  # factors 1, no filter, no turn, no hue: the identity
    alone = {0: [0.8, 1.2], 1: [0.8, 1.2], 2: [0.8, 1.2], 3: [0.1, 0.3], 4: [0.3, 1.0], 5: [1, 3]}
    assert torch.equal(mml.augment(images, torch.tensor([none] * 6), rotate=True), x)
    for k, values in alone.items():
        for v in values:
            p = list(none)
            p[k] = v
            if k == 4:
                p[3] = 0.1  # a sigma matters when blurring
            got = mml.augment(images, torch.tensor([p] * 6), rotate=True)
            want = torch.stack([torchvision_jitter(im, p, True) for im in x])
            assert (got - want).abs().max() < 1e-6, (k, v)
    params = mml.augment_params(3, 1, 7, 6)[:, 1]  # (6, 7): all kinds of draws
    assert params[:, 5].unique().numel() > 1 and (params[:, 3] < 0.4).any()
    got = mml.augment(images, params, rotate=True)
    want = torch.stack([torchvision_jitter(im, p.tolist(), True) for im, p in zip(x, params)])
    assert (got - want).abs().max() < 1e-6


def test_the_papers_augmentation_strengths_and_hue_rotation():
    """--augment paper: the authors' albumentations settings, drawn after mml's own (which
    therefore stay as they were); the hue shift is a rotation about the grey axis: a third of
    a turn sends red to green exactly, and greys never change."""
    mine, theirs = mml.augment_params(5, 2, 3, 4000), mml.augment_params(5, 2, 3, 4000, "paper")
    assert torch.equal(mine[..., :6], mml.augment_params(5, 2, 3, 4000)[..., :6]) and not mine[..., 6].any()
    jittered = (theirs[..., :3] != 1).all(-1)
    assert 0.47 < jittered.float().mean() < 0.53  # ColorJitter(p=0.5)
    assert ((theirs[..., :3] - 1).abs() <= 0.15 + 1e-6).all() and (theirs[..., 6].abs() <= 0.15 + 1e-6).all()
    assert (theirs[..., 6][~jittered] == 0).all() and (theirs[..., 6][jittered] != 0).all()
    r = theirs[..., 3]
    assert 0.13 < (r < 0.2).float().mean() < 0.17 and 0.13 < ((r >= 0.2) & (r < 0.4)).float().mean() < 0.17
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(mml.rotate_hue(x, torch.tensor([1 / 3, 1 / 3])), x[:, [2, 0, 1]], atol=1e-6)
    grey = x[:, :1].expand(2, 3, 5, 5)
    assert torch.allclose(mml.rotate_hue(grey, torch.tensor([0.1, -0.13])), grey, atol=1e-6)


def test_aerial_views_are_turned_and_ground_photos_are_not():
    gen = torch.Generator().manual_seed(1)
    batch = {m: torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen) for m in "GS"}
    params = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 0.0]]).expand(4, 2, 7)  # one turn each
    out = mml.jitter(dict(batch), params)
    assert torch.equal(out["G"], batch["G"].float() / 255)
    assert torch.equal(out["S"], torch.rot90(batch["S"].float() / 255, 1, dims=(2, 3)))


def record_training_inputs(argv: list, out: Path, monkeypatch=None):
    """Train with argv, saving every (pixels, jitter params) that `augment` receives."""
    seen, real = [], mml.augment

    def recording(images, params, rotate, hue=False):
        seen.append((images.clone(), params.clone()))
        return real(images, params, rotate, hue)
    if monkeypatch:
        monkeypatch.setattr(mml, "augment", recording)
    else:
        mml.augment = recording
    run(*argv)
    torch.save(seen, out)


def record_as_process(rank: int, port: int, argv: list, out: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    record_training_inputs([*argv, "--out", f"{out}/run{rank}"], Path(f"{out}/{rank}.pt"))


def test_a_samples_pixels_and_jitter_do_not_depend_on_workers_or_processes(world, tmp_path,
                                                                            monkeypatch,
                                                                            two_processes):
    argv = ["train", "--data", world, *TINY, "--epochs", 1]
    for workers in (0, 2):
        record_training_inputs([*argv, "--workers", workers, "--out", tmp_path / f"w{workers}"],
                               tmp_path / f"w{workers}.pt", monkeypatch)
    one = torch.load(tmp_path / "w0.pt")
    assert len(one) == 2 * (72 // 16)  # two image views a step
    other = torch.load(tmp_path / "w2.pt")
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(one, other))
    halves = [torch.load(two_processes / f"{rank}.pt") for rank in (0, 1)]
    for (pixels, params), (p0, j0), (p1, j1) in zip(one, *halves):  # rows split in two halves
        assert torch.equal(pixels, torch.cat([p0, p1])) and torch.equal(params, torch.cat([j0, j1]))


def test_tokenizer_is_deterministic_and_pads_to_max_len():
    cfg = mml.Config(vocab_size=120, max_len=12)
    texts = [f"The {w} tower is a red church in Denver, Colorado. It was built." for w in ("old", "grand", "oak")] * 5
    a, b = mml.train_tokenizer(texts, cfg), mml.train_tokenizer(texts, cfg)
    assert a.to_str() == b.to_str()
    ids = mml.tokenize(a, ["red church", ""])
    assert ids.shape == (2, 12) and ids[1].eq(0).all() and ids[0, 0] != 0


# ---- evaluation ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(world, tmp_path_factory) -> Path:
    """A tiny model trained for three epochs on the tiny world."""
    out = tmp_path_factory.mktemp("run")
    run("train", "--data", world, "--out", out, *TINY, "--epochs", 3)
    return out


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_runs_every_task_with_the_protocols_galleries(world, trained, tmp_path):
    run("eval", "--data", world, "--ckpt", trained / "best.pt", "--out", tmp_path, "--workers", 0, "--device", "cpu", "--chunk", 7)
    tasks = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]
    text = [f"{t}-{m}" for t in ("T2G", "T2S", "T2C") for m in ("first", "random", "no_cues")]
    assert list(tasks) == ["G2S", "S2G", "G2C", "S2C"] + text
    q, index = mml.read_split(world, "query"), mml.read_index(world)
    photos = sum(map(len, q.ground))
    gallery = {"S": (len(index.sat) + len(q.ids), len(index.sat)), "G": (len(index.ground) + photos, len(index.ground)),
               "C": (len(index.sat) + len(q.ids), len(index.sat))}
    for name, r in tasks.items():
        assert (r["gallery"], r["distractors"]) == gallery[name[2]], name
        assert r["queries"] == (photos if name[0] == "G" else len(q.ids))
        rows = read_rows(tmp_path / f"eval/{name}.csv")
        assert len(rows) == r["queries"]
        ranks = np.array([int(x["rank_strict"]) for x in rows])
        official = np.array([int(x["rank_official"]) for x in rows])
        # the summary is the per-query file, summarised
        for k in (1, 5, 10):
            assert r["strict"][f"R@{k}"] == pytest.approx(100 * np.mean(ranks <= k))
            assert r["official"][f"R@{k}"] == pytest.approx(100 * np.mean(official <= k))
        assert r["strict"]["medR"] == r["official"]["medR"] == np.median(ranks)
        assert (official <= ranks).all()
        if name[2] == "C":
            true = torch.tensor(q.latlon, dtype=torch.float64)[torch.tensor(
                [list(q.ids).index(int(x["landmark_id"])) for x in rows])]
            pred = torch.tensor([[float(x["pred_lat"]), float(x["pred_lon"])] for x in rows], dtype=torch.float64)
            km = mml.haversine_km(pred, true).numpy()
            assert np.allclose(km, [float(x["error_km"]) for x in rows], atol=2e-3)
            assert r["geo"]["acc@750km"] == pytest.approx(100 * np.mean(km <= 750), abs=1e-6)
    # a later evaluation of some tasks (any case, spaces after commas) keeps the others
    run("eval", "--data", world, "--ckpt", trained / "last.pt", "--out", tmp_path, "--workers", 0,
        "--device", "cpu", "--tasks", "t2c, g2s")
    again = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]
    assert list(again) == list(tasks)
    for name, r in again.items():
        updated = name.startswith("T2C") or name == "G2S"
        assert r["checkpoint"] == str(trained / ("last.pt" if updated else "best.pt")), name
    # a sentence query carries its landmark id and its sentence; a photo query its own id
    sentences = mml.Protocol(world).side("query_text_random")
    rows = read_rows(tmp_path / "eval/T2S-random.csv")
    assert [r["query_id"] for r in rows] == sentences.ids and rows[0]["query_id"] == str(q.ids[0])
    assert [r["query_text"] for r in rows] == sentences.show
    assert read_rows(tmp_path / "eval/G2S.csv")[0]["query_id"] == q.ground[0][0]
    # each task's entry names its CSV by digest: written together
    for name, r in again.items():
        assert r["csv_sha256"] == hashlib.sha256((tmp_path / f"eval/{name}.csv").read_bytes()).hexdigest()


def test_eval_recomputes_g2s_exactly(world, trained, tmp_path):
    """G2S from the command equals the brute force on embeddings made by hand."""
    run("eval", "--data", world, "--ckpt", trained / "best.pt", "--out", tmp_path, "--tasks", "G2S", "--workers", 0, "--device", "cpu")
    got = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]["G2S"]
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    cfg = mml.Config(**ckpt["config"])
    model = mml.MML(cfg).eval()
    model.load_state_dict(ckpt["model"])
    q, index = mml.read_split(world, "query"), mml.read_index(world)

    def emb(split_dir, kind, ids, enc):
        store = mml.ImageStore(split_dir, kind, cfg.img_size, None)
        with torch.no_grad():
            return enc(torch.stack([torch.from_numpy(store(i)).permute(2, 0, 1) for i in ids]))
    qe = emb(q.dir, "ground", [i for g in q.ground for i in g], model.enc["G"])
    ge = torch.cat([emb(index.dir, "satellite", index.sat, model.enc["S"]), emb(q.dir, "satellite", q.latest, model.enc["S"])])
    ql = torch.tensor(np.repeat(q.ids, [len(g) for g in q.ground]))
    gl = torch.cat([torch.full((len(index.sat),), -1), torch.tensor(q.ids)])
    for protocol in ("official", "strict"):
        want = brute_force(qe, ge, ql, gl, strict=protocol == "strict")
        for k in ("R@1", "R@5", "R@10", "mAP@1k"):
            assert got[protocol][k] == pytest.approx(want[k], abs=1e-6), (protocol, k)


def test_eval_bad_input(world, trained, tmp_path, capsys):
    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            run("eval", "--workers", 0, "--device", "cpu", *argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and len(err.strip().splitlines()) == 1
        return err
    assert "no checkpoint there" in fails("--data", world, "--ckpt", tmp_path / "nope.pt")
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    del ckpt["model"]["enc.T.head.weight"]
    torch.save(ckpt, tmp_path / "broken.pt")
    assert "enc.T.head.weight is absent in the file and (32, 32)" in fails("--data", world, "--ckpt", tmp_path / "broken.pt")
    ckpt["config"]["no_such_option"] = 1
    torch.save(ckpt, tmp_path / "other.pt")
    assert "no_such_option" in fails("--data", world, "--ckpt", tmp_path / "other.pt")
    # without an index ground list: the tasks searching ground photos are skipped, or fail by name
    root = tmp_path / "w"
    shutil.copytree(world, root)
    os.remove(root / "index/mml_index_ground.csv")
    assert "mml_index_ground.csv: file not found" in fails("--data", root, "--ckpt", trained / "best.pt", "--tasks", "G2S")
    # a model without an encoder of a task: the task is skipped by name, or fails when asked for
    run("train", "--data", world, "--out", tmp_path / "gs", *TINY, "--modalities", "GS", "--max-steps", 1)
    assert "task T2G-first: no text encoder" in fails("--data", world, "--ckpt", tmp_path / "gs/last.pt", "--tasks", "T2G")
    run("eval", "--ckpt", tmp_path / "gs/last.pt", "--workers", 0, "--device", "cpu")
    assert "skipping G2C: no gps encoder" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "gs/eval/metrics.json").read_text())["tasks"]) == ["G2S", "S2G"]


# ---- locate, the open world, pictures -----------------------------------------------------


def locate(capsys, *argv) -> list[dict]:
    """`locate ... --json`, its answers."""
    with contextlib.suppress(SystemExit):
        run("locate", *argv, "--json")
    return json.loads(capsys.readouterr().out)


def test_locate_answers_what_the_model_says_by_hand(world, trained, capsys):
    """Each photo's top places are the open gallery's points of highest cosine score with it,
    recomputed by hand from the checkpoint's encoders; prob is the softmax over the whole
    gallery at the model's logit scale; training landmarks answer with their names."""
    q = mml.read_split(world, "query")
    photos = [mml.shard(q.dir, "ground", g[0]) for g in q.ground]
    answers = locate(capsys, "--ckpt", trained / "best.pt", *photos, "--top", 3)
    gallery, names = mml.open_gallery(world)  # what `locate` searches by default
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    model = mml.MML(mml.Config(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        images = torch.stack([torch.from_numpy(mml.load_image(p, 32)).permute(2, 0, 1) for p in photos])
        scores = model.enc["G"](images) @ model.enc["C"](gallery.float()).T
        probs = torch.softmax(model.logit_scale.exp() * scores, dim=1)
    for answer, row, prob in zip(answers, scores, probs):
        best = row.topk(3).indices.tolist()
        assert [(p["lat"], p["lon"]) for p in answer["top"]] == [
            (round(float(gallery[j, 0]), 6), round(float(gallery[j, 1]), 6)) for j in best]
        assert [p["prob"] for p in answer["top"]] == pytest.approx(prob[best].tolist(), rel=1e-4)
        assert [p["name"] for p in answer["top"]] == [names[j] for j in best]
    assert any(p["name"] for a in answers for p in a["top"])  # some are training landmarks
    run("train", "--data", world, "--out", "gs", *TINY, "--modalities", "GS", "--max-steps", 1)
    assert "has no gps encoder" in fails_in_one_line(capsys, "locate", "--ckpt", "gs/last.pt", "--text", "a red tower")


def test_locate_answers_every_input_in_json(world, trained, tmp_path, capsys):
    q = mml.read_split(world, "query")
    photos = [mml.shard(q.dir, "ground", g[0]) for g in q.ground[:3]]
    with pytest.raises(SystemExit) as e:  # the exit status is 1: an input failed
        run("locate", "--ckpt", trained / "best.pt", *photos, tmp_path / "missing.jpg", "--json",
            "--top", 3, "--text", "a tower")
    assert e.value.code == 1
    answers = json.loads(capsys.readouterr().out)  # standard output: the JSON alone
    assert [a["input"] for a in answers] == [str(p) for p in photos] + [
        str(tmp_path / "missing.jpg"), "a tower"]
    assert "missing.jpg" in answers[-2]["error"] and "top" not in answers[-2]
    for a in answers[:-2] + answers[-1:]:
        assert len(a["top"]) == 3 and set(a["top"][0]) == {"lat", "lon", "score", "prob", "name"}
        assert a["top"][0]["score"] >= a["top"][1]["score"] >= a["top"][2]["score"]
        assert 0 < a["top"][2]["prob"] <= a["top"][0]["prob"] < 1
    run("locate", "--ckpt", trained / "best.pt", photos[0])  # all answered: exit status 0
    assert capsys.readouterr().out.startswith(f"{photos[0]}\n  1. ")
    # a gallery of one's own, headers in any case (GeoCLIP's is LAT,LON)
    (tmp_path / "g.csv").write_text("LAT,LON\n40.7,-74.0\n34.05,-118.25\n")
    [answer] = locate(capsys, "--ckpt", trained / "best.pt", "--gallery", tmp_path / "g.csv", "--text", "a red tower")
    assert len(answer["top"]) == 2 and answer["top"][0]["name"] == ""
    assert sum(p["prob"] for p in answer["top"]) == pytest.approx(1)
    (tmp_path / "header.csv").write_text("lat,lon\n")
    err = fails_in_one_line(capsys, "locate", "--ckpt", trained / "best.pt", "--gallery", tmp_path / "header.csv", "--text", "x")
    assert "header.csv: no places listed" in err


def test_open_world_geolocalisation_leaves_the_query_landmarks_out(world, trained, tmp_path):
    run("eval", "--ckpt", trained / "best.pt", "--out", tmp_path, "--tasks", "S2C",
        "--workers", 0)
    gallery, _ = mml.open_gallery(world)
    q = mml.read_split(world, "query")
    assert not (mml.haversine_km(gallery[None], torch.tensor(q.latlon)[:, None]) < 1e-6).any()
    # the open numbers are the open gallery's top-1 point, recomputed by hand
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    model = mml.MML(mml.Config(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["model"])
    store = mml.ImageStore(q.dir, "satellite", 32, None)
    with torch.no_grad():
        tiles = model.enc["S"](torch.stack([torch.from_numpy(store(i)).permute(2, 0, 1)
                                            for i in q.latest]))
        points = model.enc["C"](gallery.float())
    pred = gallery[(tiles @ points.T).argmax(1)]  # float64 degrees, as eval keeps them
    want = mml.geo_metrics(mml.haversine_km(pred, torch.tensor(q.latlon)))
    got = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]["S2C"]
    assert got["geo_open"] == pytest.approx(want, abs=1e-9)
    # the protocol's gallery: the index tiles' centres, then the query landmarks; the guess is
    # its top-1 point, right or wrong (the best-scoring true point would always be right)
    protocol = torch.cat([torch.tensor(mml.read_index(world).sat_latlon), torch.tensor(q.latlon)])
    with torch.no_grad():
        pred = protocol[(tiles @ model.enc["C"](protocol.float()).T).argmax(1)]
    want = mml.geo_metrics(mml.haversine_km(pred, torch.tensor(q.latlon)))
    assert got["geo"] == pytest.approx(want, abs=1e-9) and want["acc@1km"] < 100
    rows = read_rows(tmp_path / "eval/S2C.csv")
    assert [float(r["open_pred_lat"]) for r in rows] == pytest.approx(pred[:, 0].tolist(), abs=1e-5)



def test_pictures_show_what_the_csv_says(world, trained, tmp_path):
    run("eval", "--ckpt", trained / "best.pt", "--out", tmp_path, "--tasks", "G2S,T2S-first,G2C",
        "--workers", 0, "--viz")
    for task in ("G2S", "T2S-first"):
        grid = Image.open(tmp_path / f"eval/{task}.png").convert("RGB")
        rows = read_rows(tmp_path / f"eval/{task}.csv")
        ranks = [int(r["rank_strict"]) for r in rows]
        chosen = mml.grid_queries(len(rows))
        assert grid.size == (mml.grid_cell(0, 7)[0], mml.grid_cell(len(chosen), 0)[1])
        for r, i in enumerate(chosen):
            for c, hit in enumerate(rows[i]["top5_hits"].split(), 1):
                x, y = mml.grid_cell(r, c)
                assert grid.getpixel((x + 1, y + 1)) == (mml.GREEN if hit == "1" else mml.RED)
            x, y = mml.grid_cell(r, 6)  # the correct match, when the top 5 miss it
            assert grid.getpixel((x + 1, y + 1)) == (mml.GREEN if ranks[i] > 5 else (255, 255, 255))
    assert not (tmp_path / "eval/G2C.png").exists()  # geolocalisation has no grid
    picture = np.asarray(Image.open(tmp_path / "eval/curves.png").convert("RGB"))
    assert picture.shape == (540, 1200, 3)
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 10  # lines and text, not blank


# ---- any model on the benchmark: the Python API, compare --------------------------------


def task_results(folder: Path) -> dict:
    """metrics.json's per-task results, without what names their source."""
    tasks = json.loads((folder / "eval/metrics.json").read_text())["tasks"]
    source = ("checkpoint", "step", "epoch", "encoders", "config", "data")
    return {t: {k: v for k, v in r.items() if k not in source} for t, r in tasks.items()}


def test_the_api_composes_and_any_encoders_give_evals_metrics(world, trained, tmp_path):
    """load(ckpt)'s embed_* functions, handed to evaluate_encoders as they are, give eval's
    very metrics and per-query CSVs (their digests); so do the bare encoders; the tasks a
    subset of the modalities cannot run are named and skipped."""
    run("eval", "--ckpt", trained / "best.pt", "--out", tmp_path / "eval", "--workers", 0)
    want = task_results(tmp_path / "eval")
    model = mml.load(trained / "best.pt", device="cpu")
    got = mml.evaluate_encoders({"G": model.embed_images, "T": model.embed_text, "C": model.embed_gps,
                                 "S": lambda x: model.embed_images(x, "satellite")},
                                data=world, out=tmp_path / "api", img_size=32)
    assert task_results(tmp_path / "api") == want and set(got) == set(want)
    enc = model.model.enc  # the bare encoders, tokenising the sentences as the checkpoint does
    mml.evaluate_encoders({"G": enc["G"], "S": enc["S"], "C": enc["C"],
                           "T": lambda texts: enc["T"](mml.tokenize(model.tok, texts))},
                          data=world, out=tmp_path / "fns", img_size=32)
    assert task_results(tmp_path / "fns") == want
    mml.evaluate_encoders({"G": enc["G"], "S": enc["S"]}, data=world, out=tmp_path / "gs", img_size=32)
    assert set(task_results(tmp_path / "gs")) == {"G2S", "S2G"}
    # an image as a path, an (H, W, 3) array or a (1, 3, H, H) tensor: one embedding
    q = mml.read_split(world, "query")
    photo = mml.shard(q.dir, "ground", q.ground[0][0])
    by_path = model.embed_images([photo])  # decoded at reduced scale (JPEG draft)
    assert torch.allclose(by_path, model.embed_images(
        torch.from_numpy(mml.load_image(photo, 32)).permute(2, 0, 1)[None]), atol=1e-6)
    full = np.asarray(Image.open(photo).convert("RGB"))  # decoded in full
    assert torch.allclose(model.embed_images([full]), model.embed_images(
        torch.from_numpy(mml.to_square(Image.fromarray(full), 32)).permute(2, 0, 1)[None]), atol=1e-6)


def test_the_readme_section_runs_as_written(world, tmp_path):
    """README's "Evaluate your own model", its Python block executed as written, here on the
    tiny world where the README's data/synthetic would be."""
    readme = (HERE / "README.md").read_text()
    section = readme.split("## Evaluate your own model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    (tmp_path / "data").mkdir()
    (tmp_path / "data/synthetic").symlink_to(world)
    exec(compile(code, "README.md", "exec"), {})
    results = task_results(tmp_path / "runs/mine")
    assert {"G2S", "S2G"} <= set(results) and results["G2S"]["official"]["R@1"] >= 0


def test_the_random_sentences_are_the_authors_draw(world, tmp_path):
    """Their eval_dataset.py: random.seed(42), then per row of mml_query_text.csv in file
    order one choice of section, of paragraph, of piece. The draw follows the file's order."""
    def theirs(root: Path) -> dict:
        random.seed(42)
        out = {}
        for row in read_rows(root / "query/mml_query_text.csv"):
            j = row["json"]
            sections = json.loads((root / f"query/text/{j[0]}/{j[1]}/{j[2]}/{j}.json").read_text())
            section = sections[random.choice(list(sections.keys()))]
            out[row["landmark_id"]] = random.choice(random.choice(section.split("\n")).split(". "))
        return out
    root = copy_world(world, tmp_path)
    for attempt in range(2):
        side = mml.Protocol(root).sentences("random")
        assert dict(zip(side.ids, side.show)) == theirs(root)
        rows = read_rows(root / "query/mml_query_text.csv")  # the same rows, another order
        random.Random(attempt).shuffle(rows)
        with open(root / "query/mml_query_text.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["landmark_id", "json"])
            w.writeheader()
            w.writerows(rows)


def test_metrics_record_the_evaluation(trained, tmp_path):
    run("eval", "--ckpt", trained / "best.pt", "--out", tmp_path, "--workers", 0, "--tasks", "S2C")
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["eval"]["chunk"] == 512 and metrics["eval"]["tasks"] == "S2C" and metrics["device"] == "cpu"
    assert metrics["code"]["mml_sha256"] == hashlib.sha256((HERE / "mml.py").read_bytes()).hexdigest()
    assert metrics["torch"] == torch.__version__ and metrics["date"][:4].isdigit()
    assert metrics["config"]["seed"] == 0 and metrics["tasks"]["S2C"]["config"] == metrics["config"]


def brute_force_interval(landmarks: np.ndarray, values: np.ndarray, resamples: int) -> tuple:
    """The cluster bootstrap written out: per resample, draw landmarks with replacement (the
    draws mml documents: numpy's default_rng(0).integers over the sorted landmarks), gather
    every query of each drawn landmark, take the mean; then the 2.5th and 97.5th percentiles."""
    unique = np.unique(landmarks)
    picks = np.random.default_rng(0).integers(0, len(unique), (resamples, len(unique)))
    means = []
    for p in picks:
        drawn = np.concatenate([values[landmarks == unique[i]] for i in p])
        means.append(drawn.mean())
    return tuple(np.percentile(means, [2.5, 97.5]))


@pytest.fixture(scope="session")
def seeds(world, tmp_path_factory) -> Path:
    """Three runs that differ only in --seed, each evaluated on G2S and S2C."""
    root = tmp_path_factory.mktemp("seeds")
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        run("train", "--data", world, "--out", root / name, *TINY, "--epochs", 1, "--seed", seed)
        run("eval", "--out", root / name, "--workers", 0, "--tasks", "G2S,S2C")
    return root


def test_compare_matches_a_brute_force_cluster_bootstrap(world, seeds, tmp_path, capsys):
    shutil.copytree(seeds / "a", tmp_path / "a")
    shutil.copytree(seeds / "a", tmp_path / "a_again")
    labels, table = mml.comparison([mml.read_run(tmp_path / x) for x in ("a", "a_again")], 200)
    g2s = read_rows(tmp_path / "a/eval/G2S.csv")
    lms = np.array([int(r["landmark_id"]) for r in g2s])
    r1 = np.array([100.0 * (int(r["rank_official"]) <= 1) for r in g2s])
    mine = table["G2S"]["R@1"][0]
    assert labels == ["a", "a_again"] and mine[0] == pytest.approx(r1.mean())
    assert mine[2:4] == pytest.approx(brute_force_interval(lms, r1, 200))
    again = [cells[1] for metrics in table.values() for cells in metrics.values()]
    assert len(again) == 9 and all(c[4:] == (0, 0, 0) for c in again)  # paired: exactly 0
    run("compare", tmp_path / "a", tmp_path / "a_again", "--resamples", 200, "--latex")
    out = capsys.readouterr().out
    # a paper's table: tasks as rows, metrics as columns
    assert "task & run & R@1 & R@5 & R@10 & mAP@1k \\\\" in out
    assert "task & run & acc@1km & acc@25km & acc@200km & acc@750km & acc@2500km \\\\" in out
    assert re.search(r"^G2S & a & [\d.]+ \[[\d.]+, [\d.]+\] & ", out, re.M)
    assert re.search(r"^G2S & a\\_again - a & \+0.00 \[\+0.00, \+0.00\] & ", out, re.M)
    # runs that differ only in --seed are one setting: mean +- std over them
    labels, table = mml.comparison([mml.read_run(seeds / s) for s in "abc"], 100)
    accs = [np.mean([100.0 * (float(x["error_km"]) <= 750) for x in read_rows(seeds / s / "eval/S2C.csv")])
            for s in "abc"]
    assert labels == ["a (3 seeds)"]
    assert table["S2C"]["acc@750km"][0][:2] == pytest.approx((np.mean(accs), np.std(accs, ddof=1)))


def tree_bytes(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fails_in_one_line(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        run(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    return err


def test_synth_never_replaces_what_mml_did_not_write(fixture_root, tmp_path, capsys):
    before = tree_bytes(fixture_root)  # a folder in the released layout, with mmlandmarks.csv
    assert "not a synthetic world written by mml" in fails_in_one_line(
        capsys, "synth", "--out", fixture_root, "--scale", 0.01)
    assert tree_bytes(fixture_root) == before
    (tmp_path / "fresh.tmp").mkdir()  # nor a foreign folder where it would stage its work
    (tmp_path / "fresh.tmp/notes.txt").write_text("mine")
    assert "fresh.tmp: not empty" in fails_in_one_line(
        capsys, "synth", "--out", tmp_path / "fresh", "--scale", 0.01)
    assert (tmp_path / "fresh.tmp/notes.txt").read_text() == "mine"
    # a world mml wrote is regenerated in place
    run("synth", "--out", tmp_path / "own", "--scale", 0.01, "--seed", 1)
    run("synth", "--out", tmp_path / "own", "--scale", 0.01, "--seed", 2)
    assert json.loads((tmp_path / f"own/{mml.SYNTH_MARKER}").read_text())["seed"] == 2
    # synth writes where train reads, whatever the scale
    for scale in (1.0, 0.5):
        cfg = mml.resolve("synth", mml.Config(scale=scale), {"scale"})
        assert Path(cfg.out) == mml.synthetic_root(scale)
    # nor does prepare replace a file it did not make
    (tmp_path / "c").mkdir()
    (tmp_path / "c/query_ground.u8").write_bytes(b"someone's")
    assert "not made by `mml.py prepare`" in fails_in_one_line(
        capsys, "prepare", "--data", fixture_root, "--splits", "query", "--cache", tmp_path / "c")
    assert (tmp_path / "c/query_ground.u8").read_bytes() == b"someone's"


class Trap:
    """A pickle that creates a file when loaded: what a crafted checkpoint could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_that_would_run_code_is_refused_unopened(world, trained, tmp_path, capsys):
    sprung = tmp_path / "sprung"
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    torch.save({**ckpt, "extra": Trap(sprung)}, tmp_path / "trap.pt")
    (tmp_path / "run").mkdir()
    torch.save({**ckpt, "extra": Trap(sprung)}, tmp_path / "run/last.pt")
    for argv in (["eval", "--ckpt", tmp_path / "trap.pt"],
                 ["train", "--out", tmp_path / "run", "--resume"],
                 ["locate", "--ckpt", tmp_path / "trap.pt", "--text", "a tower"]):
        assert "may contain code, so it is not unpickled" in fails_in_one_line(capsys, *argv)
        assert not sprung.exists()


def test_eval_reads_the_checkpoints_data_from_anywhere(world, trained, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here: nothing may be generated either
    run("eval", "--ckpt", trained / "best.pt", "--out", tmp_path / "e", "--tasks", "S2C",
        "--workers", 0)
    assert f"on {world}" in capsys.readouterr().out.splitlines()[0]
    metrics = json.loads((tmp_path / "e/eval/metrics.json").read_text())
    saved = torch.load(trained / "best.pt", weights_only=True)
    assert metrics["data"] == str(world) and metrics["config"]["embed_dim"] == 32
    assert (metrics["step"], metrics["epoch"]) == (saved["step"], saved["epoch"])
    assert metrics["tasks"]["S2C"]["checkpoint"] == str(trained / "best.pt")
    assert sorted(os.listdir(tmp_path)) == ["e"]  # nothing generated
    # the model is the checkpoint's: eval takes no model option, --resume none that differs
    with pytest.raises(SystemExit):
        run("eval", "--ckpt", trained / "best.pt", "--embed-dim", 64)
    assert "eval: --embed-dim is the checkpoint's" in capsys.readouterr().err
    shutil.copytree(trained, tmp_path / "run")
    err = fails_in_one_line(capsys, "train", "--out", tmp_path / "run", "--resume",
                            "--embed-dim", 64)
    assert "--embed-dim 64" in err and "trained with 32" in err


def test_a_second_train_into_a_run_leaves_it_untouched(world, trained, capsys):
    before = tree_bytes(trained)
    err = fails_in_one_line(capsys, "train", "--data", world, "--out", trained, *TINY)
    assert "holds a run already" in err and "--resume" in err and "--overwrite" in err
    assert tree_bytes(trained) == before


def test_overwrite_starts_over(world, tmp_path):
    run("train", "--data", world, "--out", tmp_path, *TINY, "--epochs", 2)
    run("train", "--data", world, "--out", tmp_path, *TINY, "--epochs", 1, "--overwrite")
    assert [r["epoch"] for r in log_records(tmp_path) if "val_loss" in r] == [0]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 72 // 16


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", 0], "--batch-size 0: expected an integer in [2, "),
    (["--epochs", 0], "--epochs 0: expected an integer >= 1"),
    (["--scale", 0], "--scale 0.0: expected a number in [0.01, 100]"),
    (["--lr", "nan"], "--lr nan: expected a finite number"),
    (["--img-width", 12], "--img-width 12: expected a multiple of 8"),
    (["--modalities", "TC", "--share-image-trunk"], "--share-image-trunk: needs both G and S"),
    (["--resume"], "no run to resume there (--resume continues the run in --out"),
])
def test_options_out_of_range_fail_in_one_line(tmp_path, capsys, argv, message):
    err = fails_in_one_line(capsys, "train", "--out", tmp_path / "none", *argv)
    assert message in err, err


def test_an_unreadable_article_is_skipped_and_counted(world, tmp_path, capsys):
    root = tmp_path / "w"
    shutil.copytree(world, root)
    train = mml.read_split(root, "train")
    mml.shard(train.dir, "text", train.text[0]).write_text("{not json")
    run("train", "--data", root, "--out", tmp_path / "run", *TINY, "--epochs", 1)
    assert "1 unreadable articles" in capsys.readouterr().out


# ---- the field's models: CLIP, the authors' MmlCLIP, GeoCLIP, against their own code -----

FIXTURES = HERE / "assets/fixtures"
# Sentences the tokenizer must split as CLIP's does: plain, long (truncated to 77), accented,
# emoji, empty, odd whitespace, capitals.
SENTENCES = ["a red church in Denver", " ".join(["the old harbor lighthouse"] * 40),
             "Café Noël à São Paulo: naïve façade", "🏛️ museum 🗽 & 🌉!", "",
             "Mixed   whitespace\tand\nnewlines", "THE GRAND CAPITOL"]

LATLON = torch.tensor([[40.71, -74.01], [34.05, -118.24], [47.61, -122.33], [25.76, -80.19]])


def seeded(spec: dict, seed: int) -> dict:
    """Random weights that the fixtures' maker and the tests both draw: numpy's PCG64 stream in
    sorted key order, each tensor standard normal times its scale. Drawn, not committed: the
    authors' and GeoCLIP's location encoders alone hold 9.4M numbers."""
    rng, out = np.random.default_rng(seed), {}
    for key in sorted(spec):
        shape, scale = spec[key]
        out[key] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * np.float32(scale))
    return out


def location_spec(prefix: str, head: str) -> dict:
    """GeoCLIP's location encoder, keyed as the authors' (head) or GeoCLIP's (head.0)."""
    spec = {}
    for k, sigma in enumerate((1, 16, 256)):
        p = f"{prefix}LocEnc{k}."
        spec[p + "capsule.0.b"] = ((256, 2), sigma)
        for i, (o, n) in zip((1, 3, 5), ((1024, 512), (1024, 1024), (1024, 1024))):
            spec |= {p + f"capsule.{i}.weight": ((o, n), n ** -0.5), p + f"capsule.{i}.bias": ((o,), 0.02)}
        spec |= {p + f"{head}.weight": ((512, 1024), 1024 ** -0.5), p + f"{head}.bias": ((512,), 0.02)}
    return spec


def authors_weights(clip_state: dict) -> dict:
    """A weights_best.pth of the authors' MmlCLIP on the tiny CLIP: model.state_dict() of their
    code, two full copies of CLIP (image_encoder.clip_model.*, text_encoder.clip_model.*), drawn
    heads and location encoder, and the position_ids that older transformers saved."""
    spec = location_spec("location_encoder.", "head")
    for head in ("ground_projector", "satellite_projector", "text_projector"):
        spec |= {f"{head}.0.weight": ((512, 32), 32 ** -0.5), f"{head}.0.bias": ((512,), 0.02),
                 f"{head}.2.weight": ((512, 512), 512 ** -0.5), f"{head}.2.bias": ((512,), 0.02)}
    state = seeded(spec, 17) | {"logit_scale": torch.tensor(2.5)}
    for copy in ("image_encoder.clip_model.", "text_encoder.clip_model.", ):
        state |= {copy + k: v for k, v in clip_state.items()}
        state[copy + "vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        state[copy + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def geoclip_weights() -> tuple[dict, dict]:
    """GeoCLIP's image MLP (768-768-512) and location encoder, drawn: (mlp, location)."""
    mlp = seeded({"0.weight": ((768, 768), 768 ** -0.5), "0.bias": ((768,), 0.02),
                  "2.weight": ((512, 768), 768 ** -0.5), "2.bias": ((512,), 0.02)}, 23)
    return mlp, seeded(location_spec("", "head.0"), 29)


def fixture_images() -> list[Path]:
    return sorted((FIXTURES / "images").glob("*.png"))


def references() -> dict:
    """What transformers 4.57.6, the authors' MmlCLIP and geoclip 1.3.0 computed, in a separate
    virtual environment (never in requirements.txt), from assets/fixtures:
    - clip-tiny: CLIPModel(CLIPConfig(vision 32 wide, 2 layers, 2 heads, patch 8, 32 px; text
      32 wide, 2 layers, vocabulary 664, 77 positions, eos_token_id 2 as openai's configs;
      projection 32)) with torch.manual_seed(0), saved by save_pretrained in both formats;
      its tokenizer.json from CLIPTokenizerFast on a CLIP-style byte-level BPE (vocab.json,
      merges.txt) of 150 merges learnt from synthetic-world sentences. "pixels": a standard
      normal (2, 3, 32, 32), "image": normalize(get_image_features(pixels)); "ids":
      CLIPTokenizer (the slow, python one the authors used, without ftfy) of SENTENCES with
      padding="max_length", truncation=True, max_length=77, which the fast one matched;
      "text": normalize(get_text_features(ids, attention_mask)); "processor_pixels" and
      "processor_image": CLIPImageProcessor (shortest_edge 32, crop 32) on images/*.png.
    - "authors": their MmlCLIP(model_name=clip-tiny, output_dim=512) loaded with
      authors_weights(clip-tiny's state dict) (strict=False, as their train.py), on
      images/*.png through their get_transforms(..., "val") (albumentations Resize with
      cv2.INTER_LINEAR_EXACT, CLIP's Normalize), CLIPTokenizer.from_pretrained(clip-tiny) on
      SENTENCES and LATLON: each of the four outputs, normalised.
    - "geoclip": geoclip's ImageEncoder(clip_path=clip-tiny-768, a CLIP with projection 768
      and a 16-wide vision tower) with geoclip_weights()'s MLP, on images/*.png through its
      own preprocess_image; its LocationEncoder with geoclip_weights()'s location encoder on
      LATLON; both normalised."""
    return torch.load(FIXTURES / "references.pt", weights_only=True)


def clip_folder(tmp_path: Path, name: str = "clip-tiny", drop=()) -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    for f in drop:
        (folder / f).unlink()
    return folder


def restored(ckpt: Path) -> mml.MML:
    saved = torch.load(ckpt, weights_only=True)
    return mml.restore(ckpt, saved, mml.checkpoint_config(ckpt, saved)).eval()


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_converted_clip_equals_transformers(tmp_path, weights):
    ref, other = references(), {"model.safetensors": "pytorch_model.bin"}.get(weights, "model.safetensors")
    folder = clip_folder(tmp_path, drop=[other])  # one weights format at a time
    run("convert", folder, "--out", tmp_path / "clip.pt")
    model = restored(tmp_path / "clip.pt")
    saved = torch.load(tmp_path / "clip.pt", weights_only=True)
    assert list(saved["model"]) == ["logit_scale"]  # the frozen towers are named, not copied
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in (mml.CLIP_MEAN, mml.CLIP_STD))
    with torch.no_grad():  # the encoders normalise pixels in [0, 1] by CLIP's statistics
        image = model.enc["G"](ref["pixels"] * std + mean)
        ids = mml.tokenize(Tokenizer.from_str(saved["tokenizer"]), SENTENCES)
        text = model.enc["T"](ids)
    assert torch.equal(ids, ref["ids"])  # long, accented, emoji, empty: CLIPTokenizer's ids
    assert (image - ref["image"]).abs().max() < 1e-5 and (text - ref["text"]).abs().max() < 1e-5
    assert torch.equal(model.enc["S"].trunk.embeddings.patch_embedding.weight,
                       model.enc["G"].trunk.embeddings.patch_embedding.weight)  # one tower
    # its image processor's resizing (bicubic short side, centre crop), within a grey level
    pixels = torch.stack([torch.from_numpy(mml.load_image(p, 32, "clip")).permute(2, 0, 1)
                          for p in fixture_images()])
    theirs = (ref["processor_pixels"] * std + mean) * 255
    assert (pixels.float() - theirs).abs().max() <= 1.01
    with torch.no_grad():
        assert cosines(model.enc["G"](pixels), ref["processor_image"]).min() > 0.9999


def test_the_authors_released_model_converts_to_their_embeddings(tmp_path, capsys):
    ref, folder = references()["authors"], clip_folder(tmp_path)
    clip_state = mml.read_safetensors(folder / "model.safetensors")
    torch.save(authors_weights(clip_state), tmp_path / "weights_best.pth")
    run("convert", tmp_path / "weights_best.pth", "--clip", folder, "--out", tmp_path / "authors.pt")
    model, saved = restored(tmp_path / "authors.pt"), torch.load(tmp_path / "authors.pt", weights_only=True)
    assert mml.Config(**saved["config"]).preset == "" and saved["config"]["gps_scaling"] is False
    images = torch.stack([torch.from_numpy(mml.load_image(p, 32, "squash")).permute(2, 0, 1)
                          for p in fixture_images()])
    with torch.no_grad():
        ours = {"G": model.enc["G"](images), "S": model.enc["S"](images),
                "T": model.enc["T"](mml.tokenize(Tokenizer.from_str(saved["tokenizer"]), SENTENCES)),
                "C": model.enc["C"](LATLON)}
    for m in "GSTC":
        assert cosines(ours[m], ref[m]).min() > 0.9999, m
    # their file with another CLIP in it, or a key missing, is refused in one line
    wrong = authors_weights({k: v + 1e-3 if k.startswith("vision_model.") else v for k, v in clip_state.items()})
    torch.save(wrong, tmp_path / "other.pth")
    assert "its image_encoder.clip_model is not the CLIP of" in fails_in_one_line(
        capsys, "convert", tmp_path / "other.pth", "--clip", folder, "--out", tmp_path / "x.pt")
    state = authors_weights(clip_state)
    del state["text_projector.2.bias"]
    torch.save(state, tmp_path / "partial.pth")
    assert "enc.T.head.2.bias is absent in the file and (512,) in the model" in fails_in_one_line(
        capsys, "convert", tmp_path / "partial.pth", "--clip", folder, "--out", tmp_path / "x.pt")
    assert "weights_best.pth" in fails_in_one_line(capsys, "convert", tmp_path / "nothing", "--out", tmp_path / "x.pt")


def test_geoclip_converts_to_its_embeddings(tmp_path):
    ref, folder = references()["geoclip"], clip_folder(tmp_path, "clip-tiny-768")
    mlp, location = geoclip_weights()
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(mlp, weights / "image_encoder_mlp_weights.pth")
    torch.save(location, weights / "location_encoder_weights.pth")
    torch.save(torch.nn.Parameter(torch.tensor(3.2)), weights / "logit_scale_weights.pth")
    run("convert", weights, "--clip", folder, "--out", tmp_path / "geoclip.pt")
    model = restored(tmp_path / "geoclip.pt")
    images = torch.stack([torch.from_numpy(mml.load_image(p, 32, "clip")).permute(2, 0, 1)
                          for p in fixture_images()])
    with torch.no_grad():
        assert cosines(model.enc["G"](images), ref["G"]).min() > 0.9999
        assert cosines(model.enc["S"](images), ref["G"]).min() > 0.9999  # one encoder for any image
        assert cosines(model.enc["C"](LATLON), ref["C"]).min() > 0.9999
    assert model.logit_scale.item() == pytest.approx(3.2)


@pytest.mark.parametrize("break_it,message", [
    (lambda f: (f / "config.json").unlink(), "config.json: not a readable CLIP config"),
    (lambda f: [(f / w).unlink() for w in ("model.safetensors", "pytorch_model.bin")], "no model.safetensors or pytorch_model.bin"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json: not a readable tokenizer"),
    (lambda f: (f / "config.json").write_text('{"model_type": "siglip"}'), "model_type 'siglip'; supported: Hugging Face CLIPModel"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()), "vision_config": {
        **json.loads((f / "config.json").read_text())["vision_config"], "hidden_act": "silu"}})), "vision_config hidden_act 'silu'"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]), "not a readable safetensors file"),
])
def test_a_bad_clip_folder_is_one_line(world, tmp_path, capsys, break_it, message):
    folder = clip_folder(tmp_path)
    break_it(folder)
    err = fails_in_one_line(capsys, "train", "--preset", "paper", "--clip", folder, "--data", world,
                            "--out", tmp_path / "run", "--workers", 0, "--max-steps", 1)
    assert message in err, err


def test_the_paper_preset_trains_on_frozen_towers_and_evaluates(world, tmp_path, capsys):
    folder = clip_folder(tmp_path)
    run("train", "--preset", "paper", "--clip", folder, "--data", world, "--out", tmp_path / "run",
        "--epochs", 2, "--batch-size", 16, "--workers", 0, "--device", "cpu", "--log-every", 1)
    out = capsys.readouterr().out
    first = out.splitlines()[0]  # the first line names every setting the preset chose
    for setting in ("--image-backbone clip", "--head mlp", "--gps-scaling False", "--resize squash",
                    "--lr 0.0001", "--recipe paper", "--select loss", "--holdout authors",
                    "--batch-size 16"):  # and what the command line overrode
        assert setting in first, (setting, first)
    saved = torch.load(tmp_path / "run/last.pt", weights_only=True)
    cfg = mml.Config(**saved["config"])
    assert (cfg.img_size, cfg.max_len, cfg.embed_dim, cfg.gps_width, cfg.freeze) == (32, 77, 512, 1024, "GST")
    assert not [k for k in saved["model"] if ".trunk." in k]  # what trains, not the towers
    assert saved["towers"]["digest"] == mml.load_clip_weights(str(folder))[1]
    lrs = {r["lr"] for r in log_records(tmp_path / "run") if "lr" in r}
    assert lrs == {1e-4}  # no schedule
    # the authors' hold-out: random.Random(42).shuffle of the sorted ids' positions
    ids = sorted(mml.read_split(world, "train").ids.tolist())
    order = list(range(len(ids)))
    random.Random(42).shuffle(order)
    _, val = mml.read_train(cfg, world)
    assert sorted(val.ids.tolist()) == sorted(ids[i] for i in order[:8])
    run("eval", "--ckpt", tmp_path / "run/best.pt", "--tasks", "G2S,T2C-first", "--workers", 0, "--out", tmp_path / "e")
    assert json.loads((tmp_path / "e/eval/metrics.json").read_text())["tasks"]["G2S"]["queries"] > 0
    # towers whose weights differ from the checkpoint's are refused, by name
    other = clip_folder(tmp_path / "elsewhere")
    state = mml.read_safetensors(other / "model.safetensors")
    (other / "model.safetensors").unlink()
    torch.save({k: v * 1.001 for k, v in state.items()}, other / "pytorch_model.bin")
    err = fails_in_one_line(capsys, "eval", "--ckpt", tmp_path / "run/best.pt", "--clip", other, "--workers", 0)
    assert "are not the CLIP towers" in err and "--clip" in err
    # --resume with another preset is the checkpoint's option, differing
    err = fails_in_one_line(capsys, "train", "--out", tmp_path / "run", "--resume", "--preset", "")
    assert "--preset : " in err and "was trained with paper" in err


def test_frozen_towers_run_once_per_image_in_evaluation(world, tmp_path, monkeypatch):
    run("convert", clip_folder(tmp_path), "--out", tmp_path / "clip.pt")
    calls, real = [], mml.Encoder.features
    monkeypatch.setattr(mml.Encoder, "features", lambda self, x: calls.append(len(x)) or real(self, x))
    argv = ["eval", "--ckpt", tmp_path / "clip.pt", "--data", world, "--tasks", "G2S,S2G", "--workers", 0,
            "--cache", tmp_path / "cache"]
    run(*argv, "--out", tmp_path / "a")
    images = sum(calls)
    run(*argv, "--out", tmp_path / "b")
    assert images > 0 and sum(calls) == images  # the second: heads only
    tasks = [json.loads((tmp_path / f"{d}/eval/metrics.json").read_text())["tasks"] for d in "ab"]
    assert tasks[0]["G2S"]["official"] == tasks[1]["G2S"]["official"]
    for f in (tmp_path / "cache/towers").iterdir():  # a damaged cache is rebuilt, not used
        f.write_bytes(f.read_bytes()[:100])
    run(*argv, "--out", tmp_path / "c")
    assert sum(calls) == 2 * images
    assert json.loads((tmp_path / "c/eval/metrics.json").read_text())["tasks"]["S2G"] == tasks[0]["S2G"]



OPENED = []  # files opened while a test records them (an audit hook sees every open)
sys.addaudithook(lambda event, args: OPENED.append(str(args[0])) if event == "open" and
                 OPENED and isinstance(args[0], (str, bytes, os.PathLike)) else None)


def copy_world(world: Path, tmp_path: Path) -> Path:
    root = tmp_path / "w"
    shutil.copytree(world, root)
    return root


def rewrite_row(path: Path, row: int, column: str, value: str):
    """Set one cell of a CSV (row 0 is the first data row)."""
    rows = read_rows(path)
    rows[row][column] = value
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_truncated_image_cache_is_refused(world, trained, tmp_path, capsys):
    cache = tmp_path / "cache"
    run("prepare", "--data", world, "--img-size", 32, "--splits", "query", "--cache", cache, "--workers", 1)
    argv = ["eval", "--ckpt", trained / "best.pt", "--out", tmp_path, "--tasks", "G2S", "--workers", 0, "--cache", cache]
    run(*argv)
    whole = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]["G2S"]["official"]
    array = cache / "query_ground.u8"
    data = array.read_bytes()
    array.write_bytes(data[:len(data) // 2])
    err = fails_in_one_line(capsys, *argv)
    assert f"{array}: {len(data) // 2} bytes where its manifest promises {len(data)}" in err
    array.write_bytes(data)
    (cache / "query_ground.json").write_text('{"generator": "mml.py prepare", "size": 32, "ids": ')
    assert "query_ground.json: not a cache manifest mml wrote (JSONDecodeError" in fails_in_one_line(capsys, *argv)
    (cache / "query_ground.json").write_text('{"generator": "mml.py prepare", "size": 32}')
    assert "query_ground.json: not a cache manifest mml wrote (KeyError: 'ids')" in fails_in_one_line(capsys, *argv)
    shutil.rmtree(cache)
    run(*argv)  # the metrics of the whole data are unchanged
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]["G2S"]["official"] == whole


@pytest.mark.parametrize("csv_name,column,value", [
    ("query/mml_query_text.csv", "json", "{secret}"),
    ("index/mml_index_ground.csv", "images", "../../../../{secret}"),
    ("query/mml_query_ground.csv", "images", "ab"),
])
def test_ids_never_lead_outside_the_dataset(world, trained, tmp_path, capsys, csv_name, column, value):
    root = copy_world(world, tmp_path)
    secret = tmp_path / "outside" / "secret"
    for ext in (".json", ".jpg"):  # planted where a path built from the id would lead
        image(secret.with_suffix(ext), (1, 2, 3)) if ext == ".jpg" else write(secret.with_suffix(ext), '{"a": "b"}')
    rewrite_row(root / csv_name, 0, column, value.format(secret=str(secret).lstrip("/")))
    OPENED[:] = ["recording"]
    try:
        err = fails_in_one_line(capsys, "eval", "--ckpt", trained / "best.pt", "--data", root, "--out",
                                tmp_path / "e", "--workers", 0, "--viz")
        assert f"{root / csv_name}, line 2: {column} " in err and "is not a plain id" in err
        err = fails_in_one_line(capsys, "prepare", "--data", root, "--cache", tmp_path / "c")
        assert "is not a plain id" in err
    finally:
        opened, OPENED[:] = OPENED[1:], []
    assert opened and not [p for p in opened if p.startswith(str(secret.parent))]


def test_repeated_landmark_rows_are_refused(fixture_root, capsys):
    for name, extra in (("mml_query.csv", "11,Alpha Tower,40.5,-73.25\n"), ("mml_query_text.csv", "22,fff0000000000002\n")):
        path = fixture_root / "query" / name
        before = path.read_text()
        path.write_text(before + extra)
        err = fails_in_one_line(capsys, "prepare", "--data", fixture_root, "--splits", "query", "--cache", fixture_root / "c")
        assert f"{path}, line 4: landmark " in err and "again (first on line" in err
        path.write_text(before)


def test_csv_bytes_a_user_might_hand_in(fixture_root, capsys):
    path = fixture_root / "query/mml_query.csv"
    text = path.read_text()
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte-order mark: read as if absent
    assert mml.read_split(fixture_root, "query").ids.tolist() == [11, 22]
    path.write_bytes(text.encode().replace(b"Beta", b"B\xe9ta"))  # Latin-1, not UTF-8
    err = fails_in_one_line(capsys, "prepare", "--data", fixture_root, "--splits", "query", "--cache", fixture_root / "c")
    assert f"{path}, line 3: not UTF-8 text (byte 0xe9)" in err


def corrupt(ckpt: dict, where: str, value) -> dict:
    ckpt = {**ckpt, "config": dict(ckpt["config"])}
    if where.startswith("config."):
        ckpt["config"][where[7:]] = value
    elif value is None:
        del ckpt[where]
    else:
        ckpt[where] = value
    return ckpt


@pytest.mark.parametrize("where,value,message", [
    ("config.img_size", 100000, "config field img_size 100000: expected an integer in [16, 1024]"),
    ("config.image_backbone", "resnet9000", "config field image_backbone 'resnet9000': expected one of"),
    ("config.embed_dim", "32", "config field embed_dim '32': expected a int"),
    ("config.lr", float("nan"), "config field lr nan: expected a finite number"),
    ("config.modalities", "GX", "config field modalities GX: expected two or more"),
    ("step", "20", "(step is a str)"),
    ("model", [1, 2], "(model is a list)"),
    ("tokenizer", "{garbage", "its tokenizer does not load"),
    ("optimizer", None, "not an mml checkpoint to resume (optimizer is missing)"),
    ("torch_rng", None, "not an mml checkpoint to resume (torch_rng is missing)"),
])
def test_a_checkpoint_is_checked_before_use(world, trained, tmp_path, capsys, where, value, message):
    ckpt = corrupt(torch.load(trained / "last.pt", weights_only=True), where, value)
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run/last.pt")
    commands = [["train", "--out", tmp_path / "run", "--resume"]]
    if where not in ("optimizer", "torch_rng"):  # what eval and locate do not need
        commands += [["eval", "--ckpt", tmp_path / "run/last.pt", "--workers", 0],
                     ["locate", "--ckpt", tmp_path / "run/last.pt", "--text", "a tower"]]
    for argv in commands:
        err = fails_in_one_line(capsys, *argv)
        assert str(tmp_path / "run/last.pt") in err and message in err, (argv, err)


def test_a_deeply_nested_article_is_an_unreadable_one(world, trained, tmp_path, capsys):
    root = copy_world(world, tmp_path)
    for split in ("train", "query"):
        s = mml.read_split(root, split)
        mml.shard(s.dir, "text", s.text[0]).write_text("[" * 100_000)
    run("train", "--data", root, "--out", tmp_path / "run", *TINY, "--epochs", 1)
    assert "1 unreadable articles" in capsys.readouterr().out  # skipped and counted
    err = fails_in_one_line(capsys, "eval", "--ckpt", trained / "best.pt", "--data", root, "--out", tmp_path,
                            "--tasks", "T2S-first", "--workers", 0)
    assert "RecursionError" in err and "evaluation needs every file" in err


def run_limited(max_bytes: int, *argv) -> tuple[int, str]:
    """mml.main(argv) in a forked child that may not write files past max_bytes (a full disk,
    as it looks to a writer): (exit status, its standard error). Forked, not started anew:
    it needs no second import of torch."""
    import resource
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        sys.stderr = open(write, "w", buffering=1)  # not pytest's capture
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
        code = 0
        try:
            run(*argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_a_full_disk_is_one_line_and_leaves_no_tmp(world, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    code, err = run_limited(200_000, "prepare", "--data", world, "--img-size", 64, "--splits", "query",
                            "--cache", cache, "--workers", 1)
    assert code == 1 and err.count("\n") == 1 and "query_ground.u8: could not be written" in err, err
    assert not list(cache.glob("*.tmp")) and not (cache / "query_ground.json").exists()
    # a checkpoint save that fails keeps the old checkpoint and leaves no .tmp
    run("train", "--data", world, "--out", tmp_path / "run", *TINY, "--epochs", 1)
    before = (tmp_path / "run/last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    err = fails_in_one_line(capsys, "train", "--out", tmp_path / "run", "--resume", "--epochs", 2)
    assert "last.pt: could not be written" in err or "best.pt: could not be written" in err
    assert (tmp_path / "run/last.pt").read_bytes() == before and not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_locate_reads_only_bounded_regular_files_in_chunks(world, trained, tmp_path, monkeypatch, capsys):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    big = tmp_path / "big.png"
    Image.new("1", (12000, 12000)).save(big)  # 144 megapixels, under PIL's own bomb limit
    q = mml.read_split(world, "query")
    photos = [mml.shard(q.dir, "ground", i) for g in q.ground for i in g][:5]
    with within(30), pytest.raises(SystemExit) as e:
        run("locate", "--ckpt", trained / "best.pt", fifo, big, photos[0], "--json")
    answers = json.loads(capsys.readouterr().out)
    assert e.value.code == 1 and "not a regular file" in answers[0]["error"]
    assert "12000x12000 px, over the 50,000,000-pixel limit" in answers[1]["error"] and "top" in answers[2]
    whole = locate(capsys, "--ckpt", trained / "best.pt", *photos)
    monkeypatch.setattr(mml, "LOCATE_CHUNK", 2)  # 5 inputs in 3 chunks: the same answers
    chunked = locate(capsys, "--ckpt", trained / "best.pt", *photos)
    for a, b in zip(whole, chunked):
        assert [(t["lat"], t["lon"]) for t in a["top"]] == [(t["lat"], t["lon"]) for t in b["top"]]
        assert [t["prob"] for t in a["top"]] == pytest.approx([t["prob"] for t in b["top"]], rel=1e-5)


def test_out_and_cache_are_checked_before_any_data_is_read(world, trained, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for argv in (["train", "--out", tmp_path / "a_file", "--data", tmp_path / "no_data"],
                 ["prepare", "--cache", tmp_path / "a_file", "--data", world],
                 ["eval", "--ckpt", trained / "best.pt", "--out", tmp_path / "a_file", "--data", tmp_path / "no_data"]):
        err = fails_in_one_line(capsys, *argv)
        assert f"{tmp_path / 'a_file'}" in err and ": not a writable folder" in err
    link = tmp_path / "link"
    (tmp_path / "elsewhere").mkdir()
    link.symlink_to(tmp_path / "elsewhere")
    assert "link: a symbolic link" in fails_in_one_line(capsys, "synth", "--out", link, "--scale", 0.01)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "elsewhere", "link"] and not os.listdir(tmp_path / "elsewhere")


# ---- untrusted input, round two (issue 24): no wrong number, no file replaced, no hang ----


def as_setting(run_folder: Path, lr: float):
    """Make a run folder's metrics.json say it was trained with another --lr: another setting."""
    path = run_folder / "eval/metrics.json"
    metrics = json.loads(path.read_text())
    metrics["config"]["lr"] = lr
    path.write_text(json.dumps(metrics))


def test_compare_differences_are_only_against_the_first_runs_own_result(seeds, tmp_path, capsys):
    """The first run lacks S2C (as off-the-shelf CLIP lacks every x2C task): S2C is said to be
    missing there and has no differences, not differences against the next run under the
    first's name; and every run of a task is checked against every other, not the first."""
    for name, lr in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        shutil.copytree(seeds / name, tmp_path / name)
        as_setting(tmp_path / name, lr)
    path = tmp_path / "a/eval/metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["tasks"]["S2C"]
    path.write_text(json.dumps(metrics))
    run("compare", *(tmp_path / x for x in "abc"), "--resamples", 100)
    out = capsys.readouterr().out
    assert "S2C: not evaluated in a" in out and "b - a" in out
    s2c = [line for line in out.splitlines() if line.startswith("S2C  ")]
    assert len(s2c) == 2 and not any(" - " in line for line in s2c)  # b and c, no differences
    labels, table = mml.comparison([mml.read_run(tmp_path / x) for x in "abc"], 100)
    assert table["S2C"]["acc@750km"][0] is None and table["S2C"]["acc@750km"][1][4] is None
    path = tmp_path / "c/eval/metrics.json"  # c's S2C on other data than b's
    metrics = json.loads(path.read_text())
    metrics["tasks"]["S2C"]["protocol"] = "another"
    path.write_text(json.dumps(metrics))
    err = fails_in_one_line(capsys, "compare", *(tmp_path / x for x in "abc"))
    assert "evaluated on different queries or galleries for S2C" in err and str(tmp_path / "c") in err


def test_compare_refuses_a_csv_its_metrics_do_not_describe(world, seeds, tmp_path, capsys):
    shutil.copytree(seeds / "a", tmp_path / "a")
    csv_path = tmp_path / "a/eval/G2S.csv"
    whole = csv_path.read_bytes()
    for damage in (whole[:len(whole) // 2], (seeds / "b/eval/G2S.csv").read_bytes()):
        csv_path.write_bytes(damage)  # cut short, or another evaluation's
        err = fails_in_one_line(capsys, "compare", tmp_path / "a")
        assert f"{csv_path}: not the CSV that" in err
    csv_path.write_bytes(whole)
    # an eval of b stopped on its second task (an article is missing) wrote its first task's
    # CSV and its entry together: what compare reads is b's G2S beside a's S2C, each named
    root = copy_world(world, tmp_path)
    q = mml.read_split(root, "query")
    mml.shard(q.dir, "text", q.text[0]).unlink()
    with pytest.raises(SystemExit):
        run("eval", "--ckpt", seeds / "b/best.pt", "--data", root, "--out", tmp_path / "a",
            "--tasks", "G2S,T2S-first", "--workers", 0)
    tasks = json.loads((tmp_path / "a/eval/metrics.json").read_text())["tasks"]
    assert tasks["G2S"]["checkpoint"] == str(seeds / "b/best.pt") and "T2S-first" not in tasks
    assert tasks["S2C"]["checkpoint"] == str(seeds / "a/best.pt")
    assert mml.read_run(tmp_path / "a")["tasks"]["G2S"]["values"]["R@1"].tolist() == [
        100.0 * (int(r["rank_official"]) <= 1) for r in read_rows(seeds / "b/eval/G2S.csv")]


@pytest.mark.parametrize("damage,message", [
    (lambda m: m | {"tasks": list(m["tasks"])}, "not a metrics.json of mml"),
    (lambda m: m | {"tasks": None}, "not a metrics.json of mml"),
    (lambda m: m | {"tasks": {**m["tasks"], "G2S": 3}}, "not a metrics.json of mml"),
    (lambda m: m | {"config": "lr=1"}, "not a metrics.json of mml"),
    (lambda m: m | {"tasks": {"../../other/eval/G2S": m["tasks"]["G2S"]}},
     "'../../other/eval/G2S' is not a task of the protocol"),
])
def test_compare_of_a_broken_metrics_json_is_one_line(seeds, tmp_path, capsys, damage, message):
    shutil.copytree(seeds / "a", tmp_path / "a")
    path = tmp_path / "a/eval/metrics.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    assert message in fails_in_one_line(capsys, "compare", tmp_path / "a")


def test_the_towers_digest_covers_their_config_and_dtypes(world, tmp_path, capsys):
    """The same weight bytes under another config.json (4 heads, not 2; gelu, not quick_gelu)
    or with a tensor's dtype relabelled are other towers: eval refuses them, naming --clip."""
    folder = clip_folder(tmp_path)
    run("convert", folder, "--out", tmp_path / "clip.pt")
    digest = mml.load_clip_weights(str(folder))[1]
    config = json.loads((folder / "config.json").read_text())
    for part, key, value in (("vision_config", "num_attention_heads", 4), ("text_config", "hidden_act", "gelu")):
        other = clip_folder(tmp_path / f"{key}")
        changed = json.loads(json.dumps(config))
        changed[part][key] = value
        (other / "config.json").write_text(json.dumps(changed))
        assert mml.load_clip_weights(str(other))[1] != digest
        err = fails_in_one_line(capsys, "eval", "--ckpt", tmp_path / "clip.pt", "--clip", other,
                                "--data", world, "--tasks", "G2S", "--workers", 0)
        assert "are not the CLIP towers" in err and "--clip" in err
    relabelled = clip_folder(tmp_path / "dtype", drop=["pytorch_model.bin"])
    data = (relabelled / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"F32"', b'"I32"', 1)  # one tensor's bytes read as int32
    (relabelled / "model.safetensors").write_bytes(data[:8] + header + data[8 + n:])
    assert mml.load_clip_weights(str(relabelled))[1] != digest


def test_the_python_api_takes_uint8_images_and_batches_of_one_or_more(trained):
    model = mml.load(trained / "best.pt", device="cpu")
    for bad in ([np.full((50, 60, 3), 0.5)], [np.full((50, 60, 3), 300)], [np.zeros((50, 60))]):
        with pytest.raises(mml.UserError, match=r"expected \(H, W, 3\) uint8"):
            model.embed_images(bad)
    with pytest.raises(mml.UserError, match=r"expected \(B, 3, 32, 32\) uint8"):
        model.embed_images(torch.zeros(2, 3, 32, 32))
    with pytest.raises(mml.UserError, match="batch -5: expected an integer of at least 1"):
        mml.load(trained / "best.pt", batch=-5)


def test_rows_of_any_norm_are_normalised_and_a_zero_row_is_one_line(world, trained, tmp_path):
    """Embeddings scaled by 3 or by 1e20 (a float32 norm of such rows overflows to inf) give
    the unit vectors' metrics, with a warning; a row of zeros has no direction: one line."""
    enc = mml.load(trained / "best.pt", device="cpu").model.enc
    want = mml.evaluate_encoders({"G": enc["G"], "S": enc["S"]}, data=world, out=tmp_path / "u", img_size=32)
    for scale in (3.0, 1e20):
        got = mml.evaluate_encoders({"G": lambda x: scale * enc["G"](x), "S": lambda x: scale * enc["S"](x)},
                                    data=world, out=tmp_path / f"x{scale}", img_size=32)
        assert {t: r["official"] for t, r in got.items()} == {t: r["official"] for t, r in want.items()}
    zero_row = lambda x: enc["G"](x) * (torch.arange(len(x)) != 3)[:, None]
    with pytest.raises(mml.UserError, match="query_ground: the embedding of row 3 is zero"):
        mml.evaluate_encoders({"G": zero_row, "S": enc["S"]}, data=world, out=tmp_path / "z", img_size=32)


def wider_after(calls: int):
    """An encoder whose width changes from 8 to 9 after its first `calls` batches."""
    seen = []
    return lambda x: seen.append(1) or torch.randn(len(x), 8 if len(seen) <= calls else 9)


@pytest.mark.parametrize("encoder,message", [
    # the first batch is the probe of one blank image that learns the width
    (lambda x: torch.zeros(len(x) - 1, 8), "ground encoder: the encoder returned (0, 8) torch.float32 for a batch of 1; expected (1, D) floats"),
    (lambda x: torch.zeros(len(x), 8, dtype=torch.int64), "returned (1, 8) torch.int64 for a batch of 1; expected (1, D) floats"),
    (lambda x: torch.randn(len(x), 8) * torch.where(torch.arange(len(x))[:, None] == 1, float("nan"), 1.0),
     "ground encoder on query_ground: the embedding of row 1 is not finite"),
    (wider_after(2), "ground encoder on query_ground: the encoder returned (2, 9) torch.float32 for a batch of 2; expected (2, 8) floats"),
])
def test_what_an_encoder_returns_is_checked_batch_by_batch(world, tmp_path, encoder, message):
    with pytest.raises(mml.UserError) as e:
        mml.evaluate_encoders({"G": encoder, "S": lambda x: torch.randn(len(x), 8)}, data=world,
                              out=tmp_path, img_size=32, batch=2, tasks="G2S")
    assert message in str(e.value)


def test_a_width_mismatch_is_named_before_any_gallery_is_embedded(world, trained, tmp_path, capsys):
    """Text embeddings 16-d, images 32-d: the T2G and T2S tasks are named before anything is
    embedded, the others run and are written, and the run ends in one line, status 1."""
    enc, seen = mml.load(trained / "best.pt", device="cpu").model.enc, []
    record = lambda m, fn: lambda x: seen.append(m) or fn(x)
    fns = {"G": record("G", enc["G"]), "S": record("S", enc["S"]), "T": record("T", lambda s: torch.randn(len(s), 16))}
    with pytest.raises(mml.UserError, match=r"T2G-first: text embeddings are 16-d, ground 32-d; a task's two sides"):
        mml.evaluate_encoders(fns, data=world, out=tmp_path, img_size=32)
    out = capsys.readouterr().out
    assert out.index("skipping T2S-no_cues: text embeddings are 16-d") < out.index("G2S: ")
    assert set(task_results(tmp_path)) == {"G2S", "S2G"}
    assert seen[:3] == ["G", "S", "T"] and seen.count("T") == 1  # one blank probe each, first


def test_locate_refuses_an_embedding_that_is_not_finite(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    ckpt["model"]["enc.C.LocEnc0.head.0.bias"][:] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    err = fails_in_one_line(capsys, "locate", "--ckpt", tmp_path / "nan.pt", "--text", "a tower", "--json")
    assert "points: the embedding of row 0 is not finite" in err and capsys.readouterr().out == ""


def test_convert_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    folder = clip_folder(tmp_path)
    source = folder / "model.safetensors"
    before = source.read_bytes()
    for argv in (["--out", source], ["--out", source, "--overwrite"]):  # its own source
        assert str(source) in fails_in_one_line(capsys, "convert", folder, *argv)
        assert source.read_bytes() == before
    run("convert", folder, "--out", tmp_path / "clip.pt")
    assert "exists; --out names a new file" in fails_in_one_line(capsys, "convert", folder, "--out", tmp_path / "clip.pt")
    run("convert", folder, "--out", tmp_path / "clip.pt", "--overwrite")  # an mml checkpoint: replaced


def fifo_or_zero(path: Path, kind: str):
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")


@contextlib.contextmanager
def within(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a read that would never end."""
    def stuck(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name,kind", [("config.json", "fifo"), ("config.json", "zero"),
                                       ("tokenizer.json", "fifo"), ("tokenizer.json", "zero")])
def test_only_bounded_regular_files_of_a_clip_folder_are_read(tmp_path, capsys, name, kind):
    folder = clip_folder(tmp_path)
    fifo_or_zero(folder / name, kind)
    with within(30):
        err = fails_in_one_line(capsys, "convert", folder, "--out", tmp_path / "x.pt")
    assert f"{name}: not a readable" in err and "not a regular file" in err


def edit_config(folder: Path, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change,message", [
    (lambda c: c["vision_config"].update(num_hidden_layers=10**6), "vision_config num_hidden_layers 1000000: expected an integer in [1, 64]"),
    (lambda c: c["text_config"].update(hidden_size=10**9), "text_config hidden_size 1000000000: expected an integer in [1, 16,384]"),
    (lambda c: c["text_config"].update(vocab_size=10**9), "vocab_size 1000000000"),
    (lambda c: c["text_config"].update(max_position_embeddings=10**9), "max_position_embeddings 1000000000"),
    (lambda c: c.update(projection_dim=10**9), "projection_dim 1000000000: expected an integer in [1, 16,384]"),
    (lambda c: c["vision_config"].update(image_size=10**9), "image_size 1000000000"),
    (lambda c: c.update(projection_dim=True), "projection_dim True: expected an integer"),
    (lambda c: c.update(vision_config=[1, 2]), "vision_config is not an object of sizes"),
    (lambda c: c.update(vision_config="big"), "vision_config is not an object of sizes"),
    (lambda c: c["text_config"].update(vocab_size=100), "tokenizer.json: 664 tokens, end-of-text 663: not CLIP's tokenizer for a text tower of 100"),
])
def test_a_clip_config_is_bounded_and_checked_before_anything_is_allocated(tmp_path, capsys, change, message):
    folder = clip_folder(tmp_path)
    edit_config(folder, change)
    t0 = time.time()
    assert message in fails_in_one_line(capsys, "convert", folder, "--out", tmp_path / "x.pt")
    assert time.time() - t0 < 30


def write_safetensors(path: Path, header: dict, data: bytes = b"\0" * 64, n: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw) if n is None else n).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("header,n,message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 10**12, "a header of 1,000,000,000,000 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 2**63 - 1, "a header of 9,223,372,036,854,775,807 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, None, "a: its dtype, shape or bytes"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, None, "overlaps another tensor's bytes"),
    ({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, None, "a: its dtype, shape or bytes"),
])
def test_safetensors_byte_ranges_are_checked(tmp_path, header, n, message):
    write_safetensors(tmp_path / "w.safetensors", header, n=n)
    with pytest.raises(mml.UserError, match="not a readable safetensors file") as e:
        mml.read_safetensors(tmp_path / "w.safetensors")
    assert message in str(e.value)


def test_the_authors_and_geoclips_files_of_the_wrong_form_are_one_line(tmp_path, capsys):
    folder = clip_folder(tmp_path)
    state = authors_weights(mml.read_safetensors(folder / "model.safetensors"))
    for broken, message in ((state | {"logit_scale": 2.5}, "entry 'logit_scale' is not a named tensor"),
                            (state | {"logit_scale": "2.5"}, "entry 'logit_scale' is not a named tensor"),
                            (state | {7: torch.zeros(1)}, "entry 7 is not a named tensor"),
                            (state | {(1, 2): torch.zeros(1)}, "entry (1, 2) is not a named tensor")):
        torch.save(broken, tmp_path / "w.pth")
        assert message in fails_in_one_line(capsys, "convert", tmp_path / "w.pth", "--clip", folder, "--out", tmp_path / "x.pt")
    mlp, location = geoclip_weights()
    weights = tmp_path / "geoclip"
    weights.mkdir()
    torch.save(location, weights / "location_encoder_weights.pth")
    torch.save(torch.tensor(3.2), weights / "logit_scale_weights.pth")
    clip768 = clip_folder(tmp_path / "768", "clip-tiny-768")
    for weight, message in ((torch.tensor(1.0), "2.weight a (D, hidden) matrix"), ([1, 2], "entry '2.weight' is not a named tensor"),
                            (torch.zeros(10**9, 0), "2.weight a (D, hidden) matrix")):
        torch.save(mlp | {"2.weight": weight}, weights / "image_encoder_mlp_weights.pth")
        assert message in fails_in_one_line(capsys, "convert", weights, "--clip", clip768, "--out", tmp_path / "x.pt")


def test_a_tower_cache_of_another_dtype_is_rebuilt(tmp_path):
    torch.save({"key": "k", "tensor": torch.zeros(3, 4, dtype=torch.float64)}, tmp_path / "c.pt")
    assert mml.read_cache(tmp_path / "c.pt", "k", (3, 4)) is None
    torch.save({"key": "k", "tensor": torch.zeros(3, 4)}, tmp_path / "c.pt")
    assert mml.read_cache(tmp_path / "c.pt", "k", (3, 4)) is not None


def test_messages_say_what_the_user_most_likely_meant(world, trained, tmp_path, capsys):
    err = fails_in_one_line(capsys, "eval", "--ckpt", trained)
    assert "a folder; name a checkpoint in it (it holds best.pt, last.pt)" in err
    err = fails_in_one_line(capsys, "eval", "--ckpt", trained / "log.jsonl")
    assert "log.jsonl: not a checkpoint (not a file torch.save writes)" in err and "code" not in err
    err = fails_in_one_line(capsys, "train", "--data", world / "train", "--out", tmp_path / "r", *TINY)
    assert f"the root is {world}" in err
    folder = clip_folder(tmp_path)
    run("convert", folder, "--out", tmp_path / "clip.pt")
    shutil.move(folder, tmp_path / "moved")
    err = fails_in_one_line(capsys, "eval", "--ckpt", tmp_path / "clip.pt", "--data", world, "--workers", 0)
    assert "is not there (moved?); name it with --clip" in err
    run("eval", "--ckpt", tmp_path / "clip.pt", "--data", world, "--workers", 0, "--tasks", "G2S",
        "--clip", tmp_path / "moved", "--out", tmp_path / "e")


# ---- several processes --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_setup():
    """A small four-modality model and one fixed global batch of 8."""
    cfg = mml.parse_args(["train", *TINY])[1]
    gen = torch.Generator().manual_seed(1)
    batch = {"G": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen),
             "S": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen),
             "T": torch.randint(0, 300, (8, 16), generator=gen),
             "C": torch.rand(8, 2, generator=gen) * 40 + torch.tensor([25.0, -120.0])}
    torch.manual_seed(0)
    return cfg, mml.MML(cfg), batch


def loss_and_grads(model, emb, scale, kind) -> dict:
    total, parts = mml.contrastive_loss(emb, scale, mml.loss_pairs("GSTC", kind))
    model.zero_grad()
    total.backward()
    return {"loss": torch.stack([total.detach(), *(p.detach() for p in parts.values())]),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def ddp_worker(rank: int, port: int, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    cfg, model, batch = ddp_setup()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    results = {}
    for kind in ("complete", "imagebind"):
        emb, scale = ddp({m: x[4 * rank:4 * rank + 4] for m, x in batch.items()})  # this process's half
        r = loss_and_grads(model, emb, scale, kind)
        dist.all_reduce(r["loss"])
        r["loss"] /= 2  # the mean of the two halves' losses is the global batch's loss
        results[kind] = r
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def spawn_and_wait(fn, args: tuple):
    """fn(rank, *args) in two processes; a stuck process group fails instead of hanging."""
    procs = torch.multiprocessing.spawn(fn, args=args, nprocs=2, join=False)
    for _ in range(60):
        if procs.join(timeout=2):
            return
    for p in procs.processes:
        p.kill()
    pytest.fail("two gloo processes did not finish in 120 s")


def two_process_worker(rank: int, ddp_port: int, port: int, argv: list, out: str):
    ddp_worker(rank, ddp_port, f"{out}/ddp.pt")
    record_as_process(rank, port, argv, out)


@pytest.fixture(scope="session")
def two_processes(world, tmp_path_factory) -> Path:
    """Two gloo processes, spawned once for two tests (each spawn imports torch again): the
    loss and gradients of a fixed batch split in halves (ddp.pt), then a one-epoch `train`
    recording what `augment` received on each process (0.pt, 1.pt)."""
    out, ports = tmp_path_factory.mktemp("two"), [free_port()]
    while len(ports) < 2:
        ports = list({ports[0], free_port()})
    argv = ["train", "--data", world, *TINY, "--epochs", 1]
    spawn_and_wait(two_process_worker, (*ports, argv, str(out)))
    return out


def test_two_processes_give_the_gradients_of_one_big_batch(two_processes):
    ddp = torch.load(two_processes / "ddp.pt")
    _, model, batch = ddp_setup()
    for kind in ("complete", "imagebind"):
        emb, scale = model(batch)
        one = loss_and_grads(model, emb, scale, kind)
        assert torch.allclose(ddp[kind]["loss"], one["loss"], atol=1e-5)
        for name, g in one["grads"].items():
            assert torch.allclose(ddp[kind]["grads"][name], g, atol=1e-5), (kind, name)
        assert one["grads"]["logit_scale"].abs() > 0


def torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE / "mml.py"), *map(str, argv)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_torchrun_eval_equals_one_process(world, trained, tmp_path):
    args = ["--data", world, "--ckpt", trained / "best.pt", "--workers", 0, "--device", "cpu", "--tasks", "G2S,S2G,S2C,T2S-first"]
    run("eval", *args, "--out", tmp_path / "one")
    torchrun("eval", *args, "--out", tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "eval/metrics.json").read_text())["tasks"] for d in ("one", "two"))
    for task in one:
        for protocol in ("official", "strict", "geo"):
            if protocol in one[task]:
                assert one[task][protocol] == pytest.approx(two[task][protocol], abs=1e-9), (task, protocol)
        assert read_rows(tmp_path / f"one/eval/{task}.csv") == read_rows(tmp_path / f"two/eval/{task}.csv")


def test_torchrun_processes_stop_together_on_sigterm(world, tmp_path):
    """Both processes stop after one agreed step, process 0 saves the raw model's weights (no
    "module." prefixes), and one process resumes to the weights of an uninterrupted
    one-process run: two processes train what one does, and a run resumes on another process
    count."""
    args = ["--data", world, *TINY, "--batch-size", 8, "--epochs", 1, "--lr", "1e-3"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    logged, output = train_until_sigterm(
        [*launch, HERE / "mml.py", "train", "--out", tmp_path / "two", *args], 3,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "--resume`" in output, output
    stopped = torch.load(tmp_path / "two/last.pt", weights_only=True)
    assert stopped["step"] >= logged >= 3
    assert set(stopped["model"]) == set(mml.MML(tiny_config(world)).state_dict())
    run("train", "--out", tmp_path / "two", "--resume")
    run("train", "--out", tmp_path / "one", *args)
    a, b = (torch.load(tmp_path / x / "last.pt", weights_only=True) for x in ("one", "two"))
    assert a["step"] == b["step"]
    assert all(torch.allclose(v, b["model"][k], atol=1e-4) for k, v in a["model"].items())


def test_bench_baseline_ranks_exactly_like_the_chunked_counts():
    """The bench's per-query argsort (the authors' way) and rank_queries agree on the bench's
    own embeddings, ties between distractors and positives included, so its speed-up
    compares equal work; and the embeddings put positives high, as a trained model would."""
    q, g, ql, gl = mml.fake_embeddings(60, 12, 24, 400, 16, torch.device("cpu"))
    assert (gl == -1).sum() == 400 and bool((gl[:400] == -1).all())
    g[:24] = g[400:]  # distractors that tie with every labelled item: the tie policy counts
    fast = mml.rank_queries(q, g, ql, gl, map_top=50, chunk=7)
    slow = mml.argsort_ranks(q, g, ql, gl, map_top=50)
    for k in ("first_strict", "first_official"):
        assert torch.equal(fast[k], slow[k]), k
    for k in ("ap_strict", "ap_official"):
        assert torch.allclose(fast[k], slow[k], atol=1e-12), k
    assert float((fast["first_official"] == 0).double().mean()) > 0.5


# ---- GPU (run where one is visible; `python mml.py bench` measures the speed) -------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_gpu_bf16_step_is_close_to_fp32_and_keeps_fourier_features_in_fp32():
    cfg, model, batch = ddp_setup()
    device = torch.device("cuda")
    model = model.to(device)
    batch = mml.batch_to(batch, device)
    enc = model.enc["C"].LocEnc2.capsule[0]  # sigma = 256: phases of thousands of radians
    v = mml.equal_earth(batch["C"])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        in_autocast = enc(v)
    assert in_autocast.dtype == torch.float32 and torch.equal(in_autocast, enc(v))
    losses = {}
    for bf16 in (False, True):
        with mml.autocast_for(device, dataclasses.replace(cfg, bf16=bf16)):
            emb, scale = model(batch)
        loss = mml.contrastive_loss(emb, scale, mml.loss_pairs("GSTC", "complete"))[0]
        model.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        losses[bf16] = loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


@gpu
def test_gpu_ranking_equals_cpu():
    """Small-integer embeddings: every score is exact in float32 on both devices (and ties
    abound), so the counts must agree exactly."""
    gen = torch.Generator().manual_seed(0)
    q, g = (torch.randint(-2, 3, (n, 64), generator=gen).float() for n in (300, 3000))
    ql, gl = torch.randint(0, 50, (300,), generator=gen), torch.randint(-1, 50, (3000,), generator=gen)
    gl[:50] = torch.arange(50)  # every landmark has a positive
    cpu = mml.rank_queries(q, g, ql, gl, map_top=100, chunk=64)
    cuda = mml.rank_queries(q.cuda(), g.cuda(), ql.cuda(), gl.cuda(), map_top=100, chunk=64)
    for k in ("first_strict", "first_official", "ap_strict", "ap_official"):
        assert torch.equal(cpu[k], cuda[k].cpu()), k
    scores = q @ g.T  # top items may differ among ties, their scores may not
    assert torch.equal(scores.gather(1, cpu["top"]), scores.gather(1, cuda["top"].cpu()))


@gpu
def test_gpu_train_and_eval_commands(world, tmp_path):
    gpu_args = [a if a != "cpu" else "cuda" for a in TINY]
    run("train", "--data", world, "--out", tmp_path, *gpu_args, "--epochs", 2, "--workers", 2)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2 * (72 // 16)
    run("eval", "--data", world, "--ckpt", tmp_path / "best.pt", "--device", "cuda", "--workers", 2)
    tasks = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]
    assert len(tasks) == 13 and all(0 <= r["strict"]["R@10"] <= r["official"]["R@10"] <= 100 for r in tasks.values())
