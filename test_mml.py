"""Tests for mml.py: pure functions against brute-force references and known values, the data
layer against a hand-written fixture, the real commands on a tiny synthetic world, and the
distributed loss and evaluation against a single process.  Run: python -m pytest -q"""
import contextlib, csv, dataclasses, datetime, hashlib, io, json, math, os, random, re, shutil
import signal, socket, subprocess, sys, time, unittest.mock, urllib.error
from pathlib import Path

import numpy as np, pytest, torch, torchvision
import torch.distributed as dist, torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tokenizers import Tokenizer

import mml

HERE = Path(__file__).resolve().parent
# The gloo tests talk over loopback; left to itself gloo resolves the host's name (a hang without DNS).
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# a model small enough that a CPU trains it in seconds
TINY = ["--img-size", "32", "--img-width", "8", "--embed-dim", "32", "--text-width", "32", "--gps-width", "32", "--vocab-size", "300",
        "--max-len", "16", "--workers", "0", "--batch-size", "16", "--log-every", "1", "--device", "cpu"]
STEPS = 72 // 16  # steps per epoch of TINY on the tiny world: 72 training landmarks (8 held out)

@pytest.fixture(autouse=True)
def in_an_empty_folder(tmp_path, monkeypatch):
    """Each test in its own empty folder: a newcomer's runs/ and data/ neither change a test nor are changed by one."""
    monkeypatch.chdir(tmp_path)

@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A tiny world (80 train, 20 query landmarks; 100 index photos, 60 tiles), shared by tests that only read it."""
    root = tmp_path_factory.mktemp("world") / "w"
    mml.synthesize(root, scale=0.05, seed=0)
    return root

def run(*argv):
    mml.main([str(a) for a in argv])

def fails_in_one_line(capsys, *argv) -> str:
    """`mml.py ARGV` ends in exit status 1 and one line on standard error; that line."""
    with pytest.raises(SystemExit) as e:
        run(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    return err

def tree_bytes(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_bytes().decode(), newline="")))

def article(split: "mml.Split", i: int) -> dict:
    """Landmark i's article, read as plain JSON."""
    return json.loads(mml.shard(split.dir, "text", split.text[i]).read_text())

def pixels(store: "mml.ImageStore", ids: list) -> torch.Tensor:
    """(N, 3, H, H) uint8 of a store's images, as evaluation hands them to an encoder."""
    return torch.stack([torch.from_numpy(store(i)).permute(2, 0, 1) for i in ids])

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
    assert got[4, 0].item() == pytest.approx(1.0, abs=1e-5)  # GeoCLIP's scaling: lon 180 -> x = 1

# ---- metrics ------------------------------------------------------------------------------

def brute_force(q, g, ql, gl, map_top=1000, strict=False):
    """The protocol, one query at a time with a full argsort (no ties in random data)."""
    out = {"first": [], "ap": []}
    for i in range(len(q)):
        labels = gl.numpy()[np.argsort(-(g @ q[i]).numpy(), kind="stable")]
        top = labels[:map_top]
        ranked, top = (labels, top) if strict else (labels[labels != -1], top[top != -1])
        out["first"].append(int(np.flatnonzero(ranked == int(ql[i]))[0]))
        n_good = int((gl == ql[i]).sum())
        ap = 0.0
        for hit, row in enumerate(np.flatnonzero(top == int(ql[i]))[:n_good]):
            ap += ((hit / row if row > 0 else 1) + (hit + 1) / (row + 1)) / 2 / n_good
        out["ap"].append(ap)
    return {**{f"R@{k}": 100 * np.mean(np.array(out["first"]) < k) for k in (1, 5, 10)}, "mAP@1k": 100 * np.mean(out["ap"]), "medR": None}

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

def test_medr_is_numpys_median_and_ties_go_against_the_query():
    """Positives at 1, 2, 3, 10: medR 2.5 (numpy's, not torch's 2); ties go against the query; a tied distractor counts strict only."""
    g = torch.eye(10)
    q = torch.stack([g[0], 0.9 * g[0] + 0.5 * g[1], 0.9 * g[0] + 0.8 * g[1] + 0.5 * g[2], torch.linspace(1, 0.1, 10)])  # scores against the identity are q itself
    ranks = mml.rank_queries(F.normalize(q, dim=-1), g, torch.tensor([0, 1, 2, 9]), torch.arange(10))
    assert (ranks["first_strict"] + 1).tolist() == [1, 2, 3, 10]
    assert mml.summarise(ranks)["strict"]["medR"] == 2.5
    e = torch.eye(4)
    g, q = torch.stack([e[0], e[0], e[0], e[1]]), e[0:1]  # three identical items, then another
    # gallery: distractor, negative, positive, all tied at score 1
    r = mml.rank_queries(q, g, torch.tensor([7]), torch.tensor([-1, 3, 7, 5]))
    assert r["first_strict"].item() == 2 and r["first_official"].item() == 1
    # two tied positives and a tied negative: the positives take positions 1 and 2 (0-based)
    r = mml.rank_queries(q, g, torch.tensor([7]), torch.tensor([7, 3, 7, 5]))
    assert r["first_strict"].item() == 1
    assert r["ap_strict"].item() == pytest.approx(((0 / 1 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)

def test_haversine_and_geo_metrics_known_distances():
    assert mml.haversine_km(torch.tensor([0.0, 0.0]), torch.tensor([90.0, 0.0])).item() == pytest.approx(math.pi / 2 * 6371.0, rel=1e-12)
    pairs = torch.tensor([[[40.7128, -74.0060], [34.0522, -118.2437]],   # New York - Los Angeles
                          [[51.5074, -0.1278], [48.8566, 2.3522]],       # London - Paris
                          [[41.8781, -87.6298], [41.8781, -87.6298]]])   # same place
    km = mml.haversine_km(pairs[:, 0], pairs[:, 1])
    assert km[0].item() == pytest.approx(3936, abs=5) and km[1].item() == pytest.approx(343.5, abs=1.5) and km[2].item() == 0
    true = torch.tensor([[40.0, -100.0]] * 4)
    # 0 km, ~11.1 km (0.1 degree of latitude), ~111 km, ~1112 km
    m = mml.geo_metrics(mml.haversine_km(torch.tensor([[40.0, -100.0], [40.1, -100.0], [41.0, -100.0], [50.0, -100.0]]), true))
    assert (m["acc@1km"], m["acc@25km"], m["acc@200km"], m["acc@750km"], m["acc@2500km"]) == (25, 50, 75, 75, 100)
    assert m["median_km"] == pytest.approx((11.1195 + 111.195) / 2, abs=0.01)
    assert mml.geo_metrics(torch.tensor([25.0, 25.001]))["acc@25km"] == 50  # within: an error of at most the threshold

def test_bench_baseline_ranks_exactly_like_the_chunked_counts():
    """The argsort the bench times and rank_queries agree on its embeddings, ties included."""
    q, g, ql, gl = mml.fake_embeddings(60, 24, 400, 16, torch.device("cpu"), n_landmarks=12)
    assert (gl == -1).sum() == 400 and bool((gl[:400] == -1).all()) and set(ql.tolist()) == set(range(12))
    g[:24] = g[400:]  # distractors that tie with every labelled item: the tie policy counts
    fast = mml.rank_queries(q, g, ql, gl, map_top=50, chunk=7)
    slow = mml.argsort_ranks(q, g, ql, gl, map_top=50)
    for k in ("first_strict", "first_official"):
        assert torch.equal(fast[k], slow[k]), k
    for k in ("ap_strict", "ap_official"):
        assert torch.allclose(fast[k], slow[k], atol=1e-12), k
    assert float((fast["first_official"] == 0).double().mean()) > 0.5

# ---- loss and model -----------------------------------------------------------------------

def test_loss_equals_an_explicit_loop():
    gen = torch.Generator().manual_seed(0)
    emb = {m: F.normalize(torch.randn(6, 8, generator=gen), dim=-1) for m in "GSTC"}
    scale, pairs = torch.tensor(10.0), ["GS", "GT", "GC", "ST", "SC", "TC"]
    assert mml.loss_pairs("GSTC") == pairs and mml.loss_pairs("SC") == ["SC"]  # every pair
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
    for p, row in zip(points, enc(torch.tensor(points))):
        v = torch.tensor(equal_earth_by_hand(*p), dtype=torch.float32)
        total = 0
        for k in range(3):
            scale = getattr(enc, f"LocEnc{k}")
            phase = 2 * math.pi * (scale["capsule"][0].b @ v)
            h = torch.cat([torch.cos(phase), torch.sin(phase)])  # all cosines first
            for layer in (1, 3):
                lin = scale["capsule"][layer]
                h = torch.relu(lin.weight @ h + lin.bias)
            total = total + scale["head"][0].weight @ h + scale["head"][0].bias
        assert torch.allclose(row, F.normalize(total, dim=0), atol=1e-4)
    wide = mml.GPSEncoder(width=4, depth=1, dim=4, n_freq=4096)  # each sigma from 8,192 draws
    for k, sigma in enumerate((1, 16, 256)):
        assert getattr(wide, f"LocEnc{k}").capsule[0].b.std().item() == pytest.approx(sigma, rel=0.05)
    geoclip = seeded(location_spec("", "head.0"), 29)  # at GeoCLIP's sizes its keys and shapes load strictly
    enc = mml.GPSEncoder(width=1024, depth=3, dim=512)
    enc.load_state_dict(geoclip, strict=True)
    assert torch.equal(enc.LocEnc2.capsule[0].b, geoclip["LocEnc2.capsule.0.b"])

def test_small_text_reads_the_sentence_not_its_padding():
    """Padding (id 0) is masked out of attention and of the mean: it changes nothing; an empty sentence is finite."""
    torch.manual_seed(0)
    enc, ids = mml.SmallText(vocab=50, max_len=8, width=64, layers=2), torch.tensor([[5, 7, 9, 0, 0, 0, 0, 0], [0] * 8])
    assert torch.allclose(enc(ids)[0], enc(ids[:1, :3])[0], atol=1e-6) and torch.isfinite(enc(ids)[1]).all()

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torchvision cache, and any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    no_network = unittest.mock.Mock(side_effect=urllib.error.URLError("no network in the tests"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home/hub/checkpoints"

@pytest.mark.parametrize("backbone,extra", [
    ("resnet18", ["--freeze", "G,S"]),
    ("convnext_tiny", ["--share-image-trunk", "--freeze", "ground,satellite"]),
    ("vit_b_16", ["--share-image-trunk", "--freeze", "G,S"]),  # 32 px: 2x2 patches, untrained
])
def test_every_backbone_trains_a_step_and_evaluates_from_its_checkpoint(world, tmp_path, offline, backbone, extra):
    run("train", "--data", world, "--out", tmp_path / "run", *TINY, "--image-backbone", backbone, "--modalities", "GSC", "--max-steps", 1, "--batch-size", 4, *extra)
    ckpt = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert ckpt["config"]["image_backbone"] == backbone and ckpt["step"] == 1
    model, rng = mml.MML(mml.Config(**ckpt["config"] | {"freeze": ""})).train(), torch.get_rng_state()  # after its initial draws
    assert model.enc["G"](torch.full((2, 3, 32, 32), 0.5)).isfinite().all() and torch.equal(rng, torch.get_rng_state())  # a training forward draws nothing from torch's generator (convnext's stochastic depth did, alike on every process)
    run("eval", "--ckpt", tmp_path / "run/last.pt", "--tasks", "S2C,G2S", "--workers", 0)
    assert set(json.loads((tmp_path / "run/eval/metrics.json").read_text())["tasks"]) == {"S2C", "G2S"} and not offline.exists()  # nothing was downloaded

def test_pretrained_weights_come_from_torchvisions_cache_and_frozen_backbones_stay(world, tmp_path, offline, capsys):
    """resnet18 from TORCH_HOME, no network; G, S, T frozen: backbones (BatchNorm too) stay bit for bit, heads and GPS move."""
    weights = mml.backbone_weights("resnet18")
    args = ["train", "--data", world, *TINY, "--image-backbone", "resnet18", "--pretrained"]
    err = fails_in_one_line(capsys, *args, "--out", tmp_path / "none")
    assert str(offline / "resnet18-f37072fd.pth") in err and weights.url in err
    assert not (tmp_path / "none").exists()  # a refused train leaves no --out folder
    torch.manual_seed(3)
    imagenet = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "num_batches" not in k}  # as 2017's files
    offline.mkdir(parents=True, exist_ok=True)  # the failed download made it
    torch.save(imagenet, offline / os.path.basename(weights.url))
    run(*args, "--out", tmp_path / "run", "--freeze", "ground,satellite,text", "--max-steps", 3, "--lr", "1e-2")
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
    run(*args, "--out", tmp_path / "run", "--freeze", "g,S,text", "--max-steps", 4, "--lr", "1e-2", "--resume")  # the same, spelt otherwise

def test_parse_args_builds_config_and_names_the_nearest_option(capsys):
    cmd, cfg, given = mml.parse_args(["train", "--batch-size", "7", "--no-bf16", "--modalities", "GS"])
    assert (cmd, cfg.batch_size, cfg.bf16, cfg.modalities, given) == ("train", 7, False, "GS", {"batch_size", "bf16", "modalities"})
    for argv, message in ((["--batchsize", "7"], "did you mean --batch-size"),  # choices: argparse names the valid ones
                          (["--select", "accuracy"], "invalid choice: 'accuracy' (choose from 'recall', 'loss')"),
                          (["--device", "tpu"], "invalid choice: 'tpu' (choose from '', 'cuda', 'cpu')")):
        with pytest.raises(SystemExit):
            mml.parse_args(["train", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(mml.UserError, match="modalities"):
        mml.resolve("train", mml.Config(modalities="G"), set())

@pytest.mark.parametrize("command,shown,hidden", [
    ("train", ["--batch-size", "--image-backbone", "--freeze", "--select", "--resume"], ["--tasks", "--chunk", "--viz", "--phases"]),
    ("eval", ["--ckpt", "--tasks", "--chunk", "--viz", "--data"], ["--batch-size", "--lr", "--embed-dim", "--seed"]),
    ("bench", ["--phases", "--chunk", "--batch-size"], ["--tasks", "--ckpt", "--viz"]),
    ("convert", ["SOURCE", "--out", "--overwrite", "--clip"], ["--tasks", "--lr"]),
])
def test_help_by_command_shows_its_own_options_with_each_default_once(capsys, command, shown, hidden):
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

def copy_world(world: Path, tmp_path: Path) -> Path:
    root = tmp_path / "w"
    shutil.copytree(world, root)
    return root

def write_rows(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

def authors_sentence(article: dict, mode: str, rng: random.Random) -> str:
    """The authors' sentence picking, as they wrote it, one article at a time."""
    if mode == "first":
        return str(next(iter(article.values()))).split("\n")[0].split(". ")[0]
    paragraph = rng.choice(str(rng.choice(list(article.values()))).split("\n"))
    return rng.choice(paragraph.split(". "))

def test_sentence_table_picks_what_the_authors_rule_picks(world):
    """Each article tokenised once: an rng picks the authors' rule's sentence and its tokens; the tokenizer, learnt the same twice, pads with 0."""
    articles, bad = mml.read_articles((q := mml.read_split(world, "query")).dir, q.text)
    tok = mml.train_tokenizer([str(v) for a in articles for v in a.values()], mml.Config())
    table, first = mml.Sentences(articles, tok, "random"), mml.Sentences(articles, tok, "first")
    assert not bad and len(first.texts) == len(articles) < len(table.texts)
    for i, a in enumerate(articles):
        for mode, t in (("first", first), ("random", table), ("first", table)):
            row = t.pick(i, mode, random.Random(f"0/{i}"))
            want = authors_sentence(a, mode, random.Random(f"0/{i}"))
            assert t.texts[row] == want
            assert torch.equal(t.tokens[row], mml.tokenize(tok, [want])[0])
    cfg = mml.Config(vocab_size=120, max_len=12)
    texts = [f"The {w} tower is a red church in Denver, Colorado. It was built." for w in ("old", "grand", "oak")] * 5
    assert mml.train_tokenizer(texts, cfg).to_str() == mml.train_tokenizer(texts, cfg).to_str()
    ids = mml.tokenize(mml.train_tokenizer(texts, cfg), ["red church", ""])
    assert ids.shape == (2, 12) and ids[1].eq(0).all() and ids[0, 0] != 0

@pytest.fixture
def fixture_root(tmp_path) -> Path:
    """Two query landmarks and one index, written by hand in the released layout."""
    r = tmp_path / "mml"
    q = r / "query"
    write(q / "mml_query.csv", "landmark_id,CommonsCategory,lat,lon\n11,Alpha Tower,40.5,-73.25\n22,Beta Dome,-10,120\n")
    write(q / "mml_query_ground.csv", "landmark_id,images\n11,aaa0000000000001 aaa0000000000002\n22,bbb0000000000001\n")
    write(q / "mml_query_satellite.csv", "landmark_id,images\n22,ddd0000000000002\n11,ccc0000000000003\n")
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
    assert s.ids.tolist() == [11, 22] and s.latlon.tolist() == [[40.5, -73.25], [-10.0, 120.0]]
    assert s.ground == [["aaa0000000000001", "aaa0000000000002"], ["bbb0000000000001"]]
    assert s.latest == ["ccc0000000000003", "ddd0000000000002"]  # matched by id, not by row
    assert mml.Protocol(fixture_root).sentences("no_cues") == ["A tall tower", "A dome, white"]
    store = mml.ImageStore(s.dir, "ground", mml.Config(img_size=16))
    assert store.cache is None and store.path("aaa0000000000001") == fixture_root / "query/ground/a/a/a/aaa0000000000001.jpg"
    assert store("aaa0000000000001").shape == (16, 16, 3) and abs(int(store("aaa0000000000001")[8, 8, 0]) - 200) < 4
    articles, bad = mml.read_articles(s.dir, s.text)  # the second article's file is missing: None, and why
    assert articles[0] == article(s, 0) and articles[1] is None and len(bad) == 1 and "fff0000000000001.json" in bad[0]
    tok = mml.train_tokenizer(["Alpha is a tower in Ohio. It is tall."], mml.Config(vocab_size=60))
    assert mml.train_tokenizer(["".join(map(chr, range(0x4E00, 0x5A00)))], mml.Config(vocab_size=60)).get_vocab_size() == 60
    assert torch.equal(mml.tokenize(tok, ["ALPHA Tower"]), mml.tokenize(tok, ["alpha tower"]))  # lower-cased
    for mode in ("first", "random"):
        table = mml.Sentences(articles[:1], tok, mode)
        picks = {table.texts[table.pick(0, mode, random.Random(i))] for i in range(200)}
        assert picks == {authors_sentence(articles[0], mode, random.Random(i)) for i in range(200)}
        assert picks == ({"Alpha is a tower in Ohio"} if mode == "first" else {
            "Alpha is a tower in Ohio", "It is tall.", "Second paragraph.", "Built once", "Then again."})
    index = mml.read_index(fixture_root)
    assert index.ground == ["9990000000000001", "9990000000000002"] and index.sat_latlon.tolist() == [[30.25, -90.5]]
    path = fixture_root / "query/mml_query.csv"  # a byte-order mark, CRLF, blank lines: as if absent
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n\r\n"))
    assert mml.read_split(fixture_root, "query").ids.tolist() == [11, 22]
    many = " ".join(f"b{n:015x}" for n in range(8000))  # a cell past csv's 131,072 characters
    write(fixture_root / "query/mml_query_ground.csv", f"landmark_id,images\n11,aaa0000000000001\n22,{many}\n")
    assert len(mml.read_split(fixture_root, "query").ground[1]) == 8000
    for odd, why in ((Image.new("RGB", (100_000, 1)), "too thin to resize"), (Image.new("I;16", (8, 8), 40_000), "8-bit images only")):
        odd.save(fixture_root / "odd.png")  # a strip CLIP's resize would blow up; 16 bits convert("RGB") would clip
        with pytest.raises(ValueError, match=why):
            mml.load_image(fixture_root / "odd.png", 32, "clip")
    write(fixture_root / "query/mml_query_ground.csv", "landmark_id,images\n11,\n22,bbb0000000000001\n")  # 11: no photo
    write(fixture_root / "query/mml_query_satellite.csv", "landmark_id,images\n11,ccc0000000000003\n22,\n")  # 22: no tile
    with pytest.raises(mml.UserError, match="no query landmark with a photo and a tile"):
        mml.Protocol(fixture_root)

@pytest.mark.parametrize("break_it,message", [
    (lambda r: os.rename(r, r.with_name("gone")), r"mml: dataset root not found"),
    (lambda r: os.rename(r / "query", r / "q2"), r"query: split folder not found"),
    (lambda r: os.remove(r / "query/mml_query_text.csv"), r"mml_query_text.csv: file not found"),
    (lambda r: write(r / "query/mml_query.csv", "landmark_id,CommonsCategory,lat\n11,A,40\n"), r"mml_query.csv: no column 'lon'"),
    (lambda r: write(r / "query/mml_query_ground.csv", "landmark_id,images\n11,aaa0000000000009\n"), r"mml_query_ground.csv: landmark 22 listed in mml_query.csv but missing here"),
    (lambda r: write(r / "query/mml_query_satellite.csv", "landmark_id,images\n22,ddd1 ddd2\n11,ccc3\n"), r"mml_query_satellite.csv: landmark 22 has 2 tiles; expected the latest alone"),
    (lambda r: write(r / "query/mml_query_text.csv", "landmark_id,json\n" + "".join(f"{i},xyz\n" for i in [11, 22, 1, 2, 3, 4, 5, 6, 7])), r"mml_query.csv: landmark 1, 2, 3, 4, 5 and 2 more listed in mml_query_text.csv but missing here"),
    (lambda r: write(r / "query/mml_query.csv", "landmark_id,CommonsCategory,lat,lon\n11,A,-90,180\n22,B,90.01,120\n"), r"mml_query.csv, line 3: lat '90.01': expected a latitude in \[-90, 90\]"),
    (lambda r: write(r / "query/mml_query.csv", "landmark_id,CommonsCategory,lat,lon\n11,A,40,-73\n2x,B,1,120\n"), r"mml_query.csv, line 3: landmark_id '2x': expected an integer"),
    (lambda r: write(r / "query/mml_query.csv", "landmark_id,CommonsCategory,lat,lon\n11,A,40,-73\n-1,B,1,120\n"), r"line 3: landmark_id '-1': expected an integer in \[0, 2\*\*63\)"),  # -1: a distractor's
    (lambda r: write(r / "query/mml_query_ground.csv", "landmark_id,images\n11\n22,bbb0000000000001\n"), r"mml_query_ground.csv, line 2: 1 fields, expected 2"),
    (lambda r: write(r / "query/mml_query.csv", "landmark_id,lat,lat,lon\n11,0,40,-73\n22,0,1,120\n"), r"mml_query.csv: a repeated column 'lat'"),  # pandas: the first
    (lambda r: write(r / "query/mml_query.csv", 'landmark_id,CommonsCategory,lat,lon\n11,"A\n\nB",40,-73\n22,B,nan,120\n'), r"mml_query.csv, line 5: lat 'nan'"),  # the file's line
    (lambda r: write(r / "index/mml_index_satellite.csv", "images,lat,lon,year\n888,30,-180.01,2015\n"), r"mml_index_satellite.csv, line 2: lon '-180.01': expected a longitude in \[-180, 180\]"),
    (lambda r: write(r / "index/mml_index_satellite.csv", "images,lat,lon,year\n,30,-90,2015\n"), r"mml_index_satellite.csv, line 2: expected one image id"),  # its point kept
    (lambda r: write(r / "query/mml_query.csv", "landmark_id,CommonsCategory,lat,lon\n11,A,40,-73\n\n22,B,1,2\n11,C,3,4\n"), r"mml_query.csv, line 5: landmark 11 again \(first on line 2\)"),  # a repeated row would count its queries twice
    (lambda r: write(r / "query/mml_query_text.csv", "landmark_id,json\n11,eee0000000000001\n22,fff0000000000001\n22,fff0000000000002\n"), r"mml_query_text.csv, line 4: landmark 22 again \(first on line 3\)"),
    (lambda r: (r / "query/mml_query.csv").write_bytes((r / "query/mml_query.csv").read_bytes().replace(b"Beta", b"B\xe9ta")), r"mml_query.csv, line 3: not UTF-8 text \(byte 0xe9\)"),  # Latin-1, not UTF-8
])
def test_bad_input_gives_one_clear_line(fixture_root, capsys, break_it, message):
    break_it(fixture_root)  # prepare reads the query split, then the index
    err = fails_in_one_line(capsys, "prepare", "--data", fixture_root, "--splits", "query,index", "--cache", fixture_root.parent / "c")
    assert err.startswith("error: ") and re.search(message, err), err

def test_synthetic_world_reads_back_with_the_generators_counts(world, tmp_path):
    tiny = json.loads((world / mml.SYNTH_MARKER).read_text())  # the sizes the tests count on
    assert (tiny["train"]["landmarks"], tiny["query"]["landmarks"], tiny["index"]) == (80, 20, {"ground": 100, "satellite": 60})
    counts = mml.synthesize(tmp_path / "a", scale=0.03, seed=3)
    for split in ("train", "query"):
        s = mml.read_split(tmp_path / "a", split)
        assert counts[split] == {"landmarks": len(s.ids), "text": len(s.text), "ground": sum(map(len, s.ground)), "satellite": sum(map(len, s.sat))}
        assert all(mml.shard(s.dir, "text", t).is_file() for t in s.text)
        assert all(mml.shard(s.dir, "ground", i).is_file() for g in s.ground for i in g)
        assert all(3 <= len(g) <= 8 for g in s.ground) and all(len(t) in ([1] if split == "query" else [2, 3, 4, 5]) for t in s.sat)
    index = mml.read_index(tmp_path / "a")
    assert counts["index"] == {"ground": len(index.ground), "satellite": len(index.sat)}
    assert counts["index"]["ground"] > counts["query"]["landmarks"] and counts["index"]["satellite"] > counts["query"]["landmarks"]
    # no-cue sentences lose city and state
    q = mml.read_split(tmp_path / "a", "query")
    first = authors_sentence(article(q, 0), "first", None)
    no_cues = mml.Protocol(tmp_path / "a").sentences("no_cues")
    assert first.startswith(no_cues[0]) and len(first) > len(no_cues[0])
    # deterministic for a seed: byte for byte
    mml.synthesize(tmp_path / "b", scale=0.03, seed=3)
    for f in ["train/mml_train.csv", "index/mml_index_satellite.csv", "query/mml_query_ground.csv"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    photo = mml.shard(q.dir, "ground", q.ground[0][0]).relative_to(tmp_path / "a")
    assert (tmp_path / "a" / photo).read_bytes() == (tmp_path / "b" / photo).read_bytes()

def test_squash_is_opencvs_inter_linear_exact_in_prepares_workers_too(world, tmp_path):
    """--resize squash is cv2.resize(interpolation=cv2.INTER_LINEAR_EXACT) bit for bit, in prepare's workers too: opencv_squash.pt
    holds what opencv-python-headless 5.1.0 (in a separate venv) made of images/*.png and a PCG64 noise image at 32 and 75 px."""
    want, noise = torch.load(FIXTURES / "opencv_squash.pt", weights_only=True), np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    images = [Image.open(p).convert("RGB") for p in sorted((FIXTURES / "images").glob("*.png"))] + [Image.fromarray(noise)]
    assert all(np.array_equal(mml.to_square(im, size, "squash"), want[size][k].numpy()) for size in (32, 75) for k, im in enumerate(images))
    run("prepare", "--data", world, "--img-size", 200, "--resize", "squash", "--splits", "query", "--cache", tmp_path, "--workers", 2)
    rows = np.fromfile(tmp_path / "200-squash/query_ground.u8", np.uint8).reshape(-1, 200, 200, 3)
    q, ids = mml.read_split(world, "query"), json.loads((tmp_path / "200-squash/query_ground.json").read_text())["ids"]
    assert len(rows) == len(ids) > 1 and all(np.array_equal(r, mml.load_image(mml.shard(q.dir, "ground", i), 200, "squash")) for r, i in zip(rows, ids))

def test_image_cache_is_used_checked_and_exact(world, tmp_path):
    cache = tmp_path / "cache"
    run("prepare", "--data", world, "--img-size", 24, "--splits", "query", "--cache", cache, "--workers", 1)
    assert sorted(p.name for p in (cache / "24-crop").iterdir()) == ["query_ground.json", "query_ground.u8", "query_satellite.json", "query_satellite.u8"]
    q = mml.read_split(world, "query")
    photos, tiles, cfg = [i for g in q.ground for i in g], q.latest, mml.Config(img_size=24, cache=str(cache))
    assert mml.cache_dir(cfg, world) == cache / "24-crop"
    direct = mml.ImageStore(q.dir, "ground", mml.Config(img_size=24))
    cached = mml.ImageStore(q.dir, "ground", cfg, photos)
    assert direct.cache is None and cached.cache is not None
    for i in photos[:10]:  # the same decode: identical pixels
        assert np.array_equal(cached(i), direct(i))
        # draft() decodes the JPEG at reduced scale: close to a full decode, not identical
        assert np.abs(cached(i).astype(int) - mml.to_square(Image.open(direct.path(i)).convert("RGB"), 24)).mean() < 6
    tile_store = mml.ImageStore(q.dir, "satellite", cfg, tiles)
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
    # another size or resize has a folder of its own: none here, so the files are decoded
    assert mml.ImageStore(q.dir, "ground", dataclasses.replace(cfg, img_size=32), photos).cache is None
    assert mml.ImageStore(q.dir, "ground", dataclasses.replace(cfg, resize="squash"), photos).cache is None
    # refused: a cache moved under another resize's name, or a file list the cache does not cover
    shutil.copytree(cache / "24-crop", cache / "24-squash")
    with pytest.raises(mml.UserError, match="holds 24 px images made by --resize crop, not --img-size 24 --resize squash"):
        mml.ImageStore(q.dir, "ground", dataclasses.replace(cfg, resize="squash"), photos)
    with pytest.raises(mml.UserError, match="lacks 1 images"):
        mml.ImageStore(q.dir, "ground", cfg, photos + ["0000000000000000"])

# ---- training -----------------------------------------------------------------------------

def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

def tiny_config(world: Path, *argv) -> mml.Config:
    """The Config `train` would run with on the tiny world and TINY's sizes."""
    return mml.resolve("train", mml.parse_args(["train", "--data", str(world), *TINY, *argv])[1], {"data"})

def image_stores(cfg: mml.Config, split: mml.Split) -> dict:
    return {m: mml.ImageStore(split.dir, mml.MODALITY[m], cfg) for m in "GS"}

def fixed_batch(n: int = 8) -> dict:
    """One fixed global batch of n for TINY's four-modality model."""
    gen = torch.Generator().manual_seed(1)
    return {"G": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            "S": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            "T": torch.randint(0, 300, (n, 16), generator=gen),
            "C": torch.rand(n, 2, generator=gen) * 40 + torch.tensor([25.0, -120.0])}

def same_weights(a: Path, b: Path, names=("last.pt",)):
    """Two runs' checkpoints: the same step and best value, bit-identical weights."""
    for name in names:
        x, y = (torch.load(p / name, weights_only=True) for p in (a, b))
        assert x["step"] == y["step"] and x["best"] == y["best"], name
        assert all(torch.equal(v, y["model"][k]) for k, v in x["model"].items()), name

@pytest.mark.parametrize("crash_after", ["last.pt", "best.pt"])
def test_resume_is_exact(world, tmp_path, monkeypatch, crash_after):
    """3 epochs == 2, a crash (right after last.pt, or between best.pt and last.pt), --resume, 1 more: bit-identical, best.pt too."""
    args = ["--data", world, *TINY, "--train-text", "random", "--select", "loss"]
    run("train", "--out", tmp_path / "a", *args, "--epochs", 3)
    real_save = mml.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        if state["epoch"] == 1 and path.name == crash_after:
            raise KeyboardInterrupt  # as if the machine went down right after the save
    monkeypatch.setattr(mml, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run("train", "--out", tmp_path / "b", *args, "--max-steps", 3 * STEPS)  # 3 epochs, in steps
    monkeypatch.setattr(mml, "save_checkpoint", real_save)
    shutil.move(tmp_path / "b", tmp_path / "runs/mml")  # moved: resumed where it is, the default --out
    run("train", "--resume")  # the run's own settings come from last.pt
    same_weights(tmp_path / "a", tmp_path / "runs/mml", ("last.pt", "best.pt"))
    run("train", "--resume", "--epochs", 4)  # --epochs alone: the run's new length
    assert torch.load(tmp_path / "runs/mml/last.pt", weights_only=True)["step"] == 4 * STEPS

def train_until_sigterm(cmd: list, after_step: int, env=None) -> tuple[int, str]:
    """Run cmd, SIGTERM its process group (as a scheduler does) once it logs after_step: (last step logged, output)."""
    proc = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.PIPE, text=True, env=env, stderr=subprocess.STDOUT, start_new_session=True)
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
    """SIGTERM mid-run (a loader worker too): last.pt at the last step logged or later; --resume ends bit for bit as one run."""
    args = ["--data", world, *TINY, "--batch-size", 8, "--epochs", 1, "--workers", 1]
    run("train", "--out", tmp_path / "a", *args)
    logged, output = train_until_sigterm([sys.executable, HERE / "mml.py", "train", "--out", tmp_path / "b", *args], 3)
    assert "Traceback" not in output and "--resume`" in output, output
    assert (last := torch.load(tmp_path / "b/last.pt", weights_only=True))["step"] >= logged >= 3
    groups = [g | {"betas": "ab", "amsgrad": True, "weight_decay": "x"} for g in last["optimizer"]["param_groups"]]  # the file's settings: not used
    torch.save(last | {"optimizer": last["optimizer"] | {"param_groups": groups}}, tmp_path / "b/last.pt")
    run("train", "--out", tmp_path / "b", "--resume")
    same_weights(tmp_path / "a", tmp_path / "b")
    assert torch.load(tmp_path / "b/last.pt", weights_only=True)["step"] == 72 // 8

def test_best_pt_is_the_epoch_of_best_validation_recall_or_loss(world, tmp_path):
    """best.pt: the highest mean validation R@1 (mml's default), or lowest loss (--select loss: the authors', the preset's)."""
    run("train", "--data", world, "--out", tmp_path / "r", *TINY, "--epochs", 3)
    epochs = [r for r in log_records(tmp_path / "r") if "val_R@1" in r]
    for r in epochs:  # the mean over the trained pairs
        assert r["val_R@1"] == pytest.approx(np.mean([r[f"val_{p[0]}2{p[1]}_R@1"] for p in mml.loss_pairs("GSTC")]))
    best = torch.load(tmp_path / "r/best.pt", weights_only=True)
    want = max(epochs, key=lambda r: r["val_R@1"])  # the first of equals, as training keeps it
    assert best["epoch"] == want["epoch"] and best["best"] == want["val_R@1"]
    # --resume keeps the best value so far: past an unbeatable one, best.pt stays as it was
    last, before = torch.load(tmp_path / "r/last.pt", weights_only=True), (tmp_path / "r/best.pt").read_bytes()
    torch.save(last | {"best": 100.0}, tmp_path / "r/last.pt")
    run("train", "--out", tmp_path / "r", "--resume", "--epochs", 4)
    assert (tmp_path / "r/best.pt").read_bytes() == before
    assert torch.load(tmp_path / "r/last.pt", weights_only=True)["best"] == 100.0 and [r["epoch"] for r in log_records(tmp_path / "r") if "val_R@1" in r] == [0, 1, 2, 3]  # log.jsonl goes on
    run("train", "--data", world, "--out", tmp_path / "l", *TINY, "--epochs", 3, "--select", "loss")
    epochs = [r for r in log_records(tmp_path / "l") if "val_loss" in r]
    best = torch.load(tmp_path / "l/best.pt", weights_only=True)
    want = min(epochs, key=lambda r: r["val_loss"])
    assert best["epoch"] == want["epoch"] and best["best"] == want["val_loss"]

@pytest.mark.parametrize("modalities", ["GS", "GT", "SC", "TC", "GSC", "GSTC"])
def test_every_modality_set_trains(world, modalities):
    """One optimiser step on a real batch: finite loss over every pair, every encoder's weights move."""
    cfg = tiny_config(world, "--modalities", modalities)
    tr, _ = mml.read_train(cfg, world)
    tok = mml.train_tokenizer(["a tower in a city", "a red dome"], cfg)
    data = mml.LandmarkSet(tr, image_stores(cfg, tr), mml.Sentences(mml.read_articles(tr.dir, tr.text)[0], tok, "first"), cfg, train=True)
    batch = mml.jitter(data[[(0, i) for i in range(8)]], mml.augment_params(0, 0, 0, 8))
    torch.manual_seed(0)
    model = mml.MML(cfg)
    before = {m: [p.clone() for p in e.parameters()] for m, e in model.enc.items()}
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)  # CLIP's temperature
    emb, scale = model(mml.batch_to(batch, torch.device("cpu")))
    total, parts = mml.contrastive_loss(emb, scale, mml.loss_pairs(cfg.modalities))
    assert math.isfinite(total.item()) and len(parts) == math.comb(len(modalities), 2)
    total.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for m, e in model.enc.items():
        assert any(not torch.equal(p, q) for p, q in zip(e.parameters(), before[m])), m

def test_each_recipes_schedule_optimiser_clipping_and_scale_cap(world, monkeypatch):
    """mml: 5% linear warmup, cosine; AdamW, CLIP's betas, decay on matrices; norm clipped at 1; scale capped at CLIP's ln(100)
    (train_step: the loop's and the bench's). paper, the authors': constant lr, plain AdamW, values clipped at 100, no cap."""
    cfg, clipped = tiny_config(world), []
    batch, pairs = fixed_batch() | {"bad": [""] * 8}, mml.loss_pairs(cfg.modalities)
    for name in ("clip_grad_norm_", "clip_grad_value_"):
        monkeypatch.setattr(torch.nn.utils, name, lambda params, limit, name=name: clipped.append((name, limit)))
    assert [mml.lr_at(step, 105, cfg) / cfg.lr for step in (0, 4, 5, 55)] == pytest.approx([0.2, 1, 1, 0.5])
    for recipe in ("mml", "paper"):
        raw, run_cfg = mml.MML(cfg), dataclasses.replace(cfg, recipe=recipe)
        with torch.no_grad():
            raw.logit_scale.fill_(math.log(400))
        optimizer = mml.make_optimizer(raw, run_cfg)
        mml.train_step(raw, raw, optimizer, batch, run_cfg, pairs, 0, 0, 1e-3)
        groups = [(g["betas"], g["weight_decay"], {p.dim() > 1 for p in g["params"]}) for g in optimizer.param_groups]
        if recipe == "mml":
            assert raw.logit_scale.item() == torch.tensor(math.log(100)).item()
            assert groups == [((0.9, 0.98), cfg.weight_decay, {True}), ((0.9, 0.98), 0.0, {False})]
        else:
            assert raw.logit_scale.item() > math.log(390) and mml.lr_at(55, 105, run_cfg) == cfg.lr
            assert groups == [((0.9, 0.999), cfg.weight_decay, {True, False})]
    assert clipped == [("clip_grad_norm_", 1.0), ("clip_grad_value_", 100.0)]

def test_validation_sees_each_landmarks_first_photo_latest_tile_and_first_sentence(world):
    """Validation: each held-out landmark's first photo, latest tile, first sentence in any epoch: best.pt on one fixed set."""
    cfg = tiny_config(world)
    train, val, tok = mml.training_sets(cfg, None)
    s, rows = val.split, list(range(len(val)))
    assert not torch.equal(train[[(0, i) for i in rows]]["G"], train[[(1, i) for i in rows]]["G"])  # training: another photo
    first, later = val[[(0, i) for i in rows]], val[[(7, i) for i in rows]]
    assert max(len(g) for g in s.ground) > 1 and max(len(t) for t in s.sat) > 1  # there is a choice
    for i in rows:
        assert np.array_equal(first["G"][i].permute(1, 2, 0).numpy(), val.stores["G"](s.ground[i][0]))
        assert np.array_equal(first["S"][i].permute(1, 2, 0).numpy(), val.stores["S"](s.latest[i]))
        assert torch.equal(first["T"][i], mml.tokenize(tok, [authors_sentence(article(s, i), "first", None)])[0])
    assert all(torch.equal(first[m], later[m]) for m in "GSTC") and torch.equal(first["C"], torch.tensor(s.latlon, dtype=torch.float32))
    # what validation embeds: these very pixels, unaugmented, however the jitter is called
    seen, model = [], mml.MML(cfg)
    model.forward = lambda batch: seen.append(batch) or mml.MML.forward(model, batch)
    mml.validate(model, val, cfg, mml.loss_pairs(cfg.modalities), torch.device("cpu"))
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
    assert "step 3: loss is nan, step skipped" in out and "2 skipped" in out  # the 2nd and 3rd, as log lines count
    good = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    monkeypatch.setattr(mml, "contrastive_loss", lambda e, s, p, gather=True: (real(e, s, p, gather)[0] * float("inf"), {}))
    monkeypatch.setattr(mml, "MAX_BAD_STEPS", 3)
    with pytest.raises(SystemExit):
        run("train", "--out", tmp_path, "--resume", "--epochs", 2)
    assert "3 non-finite losses in a row" in capsys.readouterr().err
    kept = torch.load(tmp_path / "last.pt", weights_only=True)["model"]  # the good checkpoint survives
    assert all(torch.equal(v, good["model"][k]) for k, v in kept.items())

def test_unreadable_images_are_skipped_in_training_and_fatal_in_eval(world, tmp_path, capsys):
    root = copy_world(world, tmp_path)
    cfg = tiny_config(root)
    tr, _ = mml.read_train(cfg, root)
    for photo in tr.ground[0][:-1]:  # landmark 0 keeps one good photo
        mml.shard(tr.dir, "ground", photo).write_bytes(b"not a jpeg")
    for tile in tr.sat[1]:  # landmark 1 has no readable aerial image at all
        os.remove(mml.shard(tr.dir, "satellite", tile))
    sentences = mml.Sentences(mml.read_articles(tr.dir, tr.text)[0], mml.train_tokenizer(["a b"], cfg), "first")
    batch = mml.LandmarkSet(tr, image_stores(cfg, tr), sentences, cfg, train=True)[[(0, 0), (0, 1)]]
    assert batch["G"][0].float().mean() > 10  # another view of the same landmark stood in
    assert all(line.split(":")[0].endswith(".jpg") for line in batch["bad"][0].splitlines())
    assert len(batch["bad"][1].splitlines()) == len(tr.sat[1])
    assert batch["S"][1].eq(0).all()  # no readable aerial view at all: a black image
    run("prepare", "--data", root, "--splits", "train", "--img-size", 32, "--workers", 1)  # cached, the broken rows too
    run("train", "--data", root, "--out", tmp_path / "run", *TINY, "--epochs", 2)
    assert "unreadable files skipped for other views" in capsys.readouterr().out
    counts = [r["unreadable"] for r in log_records(tmp_path / "run") if "unreadable" in r]
    assert len(counts) == 2 and all(c >= len(tr.sat[1]) for c in counts)  # counted each epoch
    q = mml.read_split(root, "query")
    mml.shard(q.dir, "ground", q.ground[3][1]).write_bytes(b"")
    assert re.search(f"{q.ground[3][1]}.*evaluation needs every file", fails_in_one_line(capsys, "eval", "--data", root, "--ckpt", tmp_path / "run/last.pt", "--tasks", "G2S", "--workers", 0))

@pytest.mark.parametrize("content,why", [("{not json", "JSONDecodeError"), ("[" * 100_000, "RecursionError"), ('["a list"]', "expected a JSON object"), (json.dumps({"a": "\n" * 100_001}), "over 100,000 paragraphs"), (" " * (1 << 24) + "{}", "over the 16,777,216 allowed"), (json.dumps({"a": "\ud800"}), "surrogates not allowed")])
def test_an_unreadable_article_is_skipped_in_training_and_fatal_in_eval(world, trained, tmp_path, capsys, content, why):
    """An article not JSON, 100,000 deep, not an object, too long or not UTF-8: training counts it, empty; eval refuses it first."""
    root = copy_world(world, tmp_path)
    for split in ("train", "query"):
        s = mml.read_split(root, split)
        mml.shard(s.dir, "text", s.text[0]).write_text(content)
    run("train", "--data", root, "--out", tmp_path / "run", *TINY, "--max-steps", 1)
    assert "1 unreadable articles" in capsys.readouterr().out  # skipped and counted
    err = fails_in_one_line(capsys, "eval", "--ckpt", trained / "best.pt", "--data", root, "--out", tmp_path, "--tasks", "G2S,T2S-first", "--workers", 0)
    assert why in err and "evaluation needs every file" in err
    assert not (tmp_path / "eval").exists()

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
    """Each transformation alone, then all drawn: torchvision's per-image pixels to 1e-6; `jitter` turns aerial views only."""
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
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
            assert (got - torch.stack([torchvision_jitter(im, p, True) for im in x])).abs().max() < 1e-6, (k, v)
    params = mml.augment_params(3, 1, 7, 6)[:, 1]  # (6, 7): all kinds of draws
    assert params[:, 5].unique().numel() > 1 and (params[:, 3] < 0.4).any()
    got = mml.augment(images, params, rotate=True)
    assert (got - torch.stack([torchvision_jitter(im, p.tolist(), True) for im, p in zip(x, params)])).abs().max() < 1e-6
    # a batch's views under an identity jitter of one quarter turn: the aerial ones turned, the ground photos not
    out = mml.jitter({"G": images, "S": images.flip(0)}, torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 0.0]]).expand(6, 2, 7))
    assert torch.equal(out["G"], x) and torch.equal(out["S"], torch.rot90(x.flip(0), 1, dims=(2, 3)))

def test_the_papers_augmentation_strengths_and_hue_rotation():
    """--recipe paper: the authors' albumentations, drawn after mml's (unchanged); hue turns about grey: red to green."""
    mine, theirs = mml.augment_params(5, 2, 3, 4000), mml.augment_params(5, 2, 3, 4000, "paper")
    assert torch.equal(mine[..., :6], mml.augment_params(5, 2, 3, 4000)[..., :6]) and not mine[..., 6].any()
    jittered = (theirs[..., :3] != 1).all(-1)
    assert 0.47 < jittered.float().mean() < 0.53  # ColorJitter(p=0.5)
    assert all(0.149 < x.abs().max() <= 0.15 + 1e-6 for x in (theirs[..., :3] - 1, theirs[..., 6]))  # [0.85, 1.15]; hue +-0.15
    assert (theirs[..., 6][~jittered] == 0).all() and (theirs[..., 6][jittered] != 0).all()
    r = theirs[..., 3]
    assert 0.13 < (r < 0.2).float().mean() < 0.17 and 0.13 < ((r >= 0.2) & (r < 0.4)).float().mean() < 0.17
    # through augment, with the hue turn the only entry that is not the identity's
    hue = lambda turns: torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.5, 0.0, t] for t in turns])
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mml.augment(x, hue([1 / 3, 1 / 3]), rotate=False, hue=True), x[:, [2, 0, 1]].float() / 255, atol=1e-6)
    grey = x[:, :1].expand(2, 3, 5, 5)
    assert torch.allclose(mml.augment(grey, hue([0.1, -0.13]), rotate=False, hue=True), grey.float() / 255, atol=1e-6)

def record_training_inputs(argv: list, out: Path):
    """Train with argv, saving every (pixels, jitter params) that `augment` receives."""
    seen, real = [], mml.augment

    def recording(images, params, rotate, hue=False):
        seen.append((images.clone(), params.clone()))
        return real(images, params, rotate, hue)
    with unittest.mock.patch.object(mml, "augment", recording):
        run(*argv)
    torch.save(seen, out)

def test_a_samples_pixels_and_jitter_do_not_depend_on_workers_or_processes(world, tmp_path, two_processes, monkeypatch):
    argv, ignore = ["train", "--data", world, *TINY, "--epochs", 1], mml.ignore_stop_signals
    # each worker signalled at its birth (a scheduler's SIGTERM may come then): none dies of it
    monkeypatch.setattr(mml, "ignore_stop_signals", lambda i: os.kill(os.getpid(), signal.SIGTERM) or ignore(i))
    for workers in (0, 2):
        record_training_inputs([*argv, "--workers", workers, "--out", tmp_path / f"w{workers}"], tmp_path / f"w{workers}.pt")
    one = torch.load(tmp_path / "w0.pt")
    assert len(one) == 2 * STEPS  # two image views a step
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(one, torch.load(tmp_path / "w2.pt")))
    halves = [torch.load(two_processes / f"{rank}.pt") for rank in (0, 1)]
    for (pixels, params), (p0, j0), (p1, j1) in zip(one, *halves):  # rows split in two halves
        assert torch.equal(pixels, torch.cat([p0, p1])) and torch.equal(params, torch.cat([j0, j1]))

# ---- evaluation ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def trained(world, tmp_path_factory) -> Path:
    """A tiny model trained for three epochs on the tiny world."""
    out = tmp_path_factory.mktemp("run")
    run("train", "--data", world, "--out", out, *TINY, "--epochs", 3)
    return out

def restored(ckpt: Path) -> mml.MML:
    """A checkpoint's model, as `eval` and `load` rebuild it."""
    saved = torch.load(ckpt, weights_only=True)
    return mml.restore(ckpt, saved, mml.checkpoint_config(ckpt, saved)).eval()

@pytest.fixture(scope="session")
def evaluated(trained, tmp_path_factory) -> tuple[Path, str]:
    """`eval` of the tiny best.pt on every task from an empty folder, no --data (the checkpoint's): (folder, output)."""
    here, printed, before = tmp_path_factory.mktemp("elsewhere"), io.StringIO(), os.getcwd()
    os.chdir(here)  # (contextlib.chdir needs Python 3.11; a failure leaves it to the test's own)
    with contextlib.redirect_stdout(printed):
        run("eval", "--ckpt", trained / "best.pt", "--out", here / "e", "--workers", 0)
    os.chdir(before)
    return here / "e", printed.getvalue()

def test_eval_runs_every_task_with_the_protocols_galleries(world, trained, tmp_path):
    run("eval", "--data", world, "--ckpt", trained / "best.pt", "--out", tmp_path, "--workers", 0, "--device", "cpu", "--chunk", 7)
    tasks = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]
    assert list(tasks) == ["G2S", "S2G", "G2C", "S2C"] + [f"{t}-{m}" for t in ("T2G", "T2S", "T2C") for m in ("first", "random", "no_cues")]
    q, index = mml.read_split(world, "query"), mml.read_index(world)
    photos = sum(map(len, q.ground))
    gallery = {"S": (len(index.sat) + len(q.ids), len(index.sat)), "G": (len(index.ground) + photos, len(index.ground)),
               "C": (len(index.sat) + len(q.ids), len(index.sat))}
    for name, r in tasks.items():
        assert (r["gallery"], r["distractors"]) == gallery[name[2]], name
        rows = read_rows(tmp_path / f"eval/{name}.csv")
        assert r["queries"] == len(rows) == (photos if name[0] == "G" else len(q.ids))
        ranks = np.array([int(x["rank_strict"]) for x in rows])
        official = np.array([int(x["rank_official"]) for x in rows])
        # the summary is the per-query file, summarised
        for k in (1, 5, 10):
            assert r["strict"][f"R@{k}"] == pytest.approx(100 * np.mean(ranks <= k))
            assert r["official"][f"R@{k}"] == pytest.approx(100 * np.mean(official <= k))
        assert r["strict"]["medR"] == r["official"]["medR"] == np.median(ranks) and (official <= ranks).all()
        if name[2] == "C":
            true = torch.tensor(q.latlon, dtype=torch.float64)[torch.tensor([list(q.ids).index(int(x["landmark_id"])) for x in rows])]
            pred = torch.tensor([[float(x["pred_lat"]), float(x["pred_lon"])] for x in rows], dtype=torch.float64)
            km = mml.haversine_km(pred, true).numpy()
            assert np.allclose(km, [float(x["error_km"]) for x in rows], atol=2e-3)
            assert r["geo"]["acc@750km"] == pytest.approx(100 * np.mean(km <= 750), abs=1e-6)
    # a later evaluation of some tasks (any case, spaces after commas) keeps the others
    run("eval", "--data", world, "--ckpt", trained / "last.pt", "--out", tmp_path, "--workers", 0, "--device", "cpu", "--tasks", "t2c, g2s")
    again = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]
    assert list(again) == list(tasks) and {n: r["checkpoint"] for n, r in again.items()} == {n: str(trained / ("last.pt" if n[:3] in ("T2C", "G2S") else "best.pt")) for n in tasks}
    # a sentence query carries its landmark id and its sentence; a photo query its own id
    sentences = mml.Protocol(world).side("query_text_random")
    rows = read_rows(tmp_path / "eval/T2S-random.csv")
    assert [r["query_id"] for r in rows] == sentences.ids == [str(i) for i in q.ids.tolist()]
    assert [r["query_text"] for r in rows] == sentences.show == mml.Protocol(world).sentences("random")
    assert read_rows(tmp_path / "eval/G2S.csv")[0]["query_id"] == q.ground[0][0]

def test_eval_recomputes_g2s_exactly(world, trained, evaluated):
    """G2S from the command equals the brute force on embeddings made by hand."""
    got = json.loads((evaluated[0] / "eval/metrics.json").read_text())["tasks"]["G2S"]
    model, cfg = restored(trained / "best.pt"), mml.Config(img_size=32)
    q, index = mml.read_split(world, "query"), mml.read_index(world)
    emb = lambda split_dir, kind, ids, m: model.enc[m](pixels(mml.ImageStore(split_dir, kind, cfg), ids))
    with torch.no_grad():
        qe = emb(q.dir, "ground", [i for g in q.ground for i in g], "G")
        ge = torch.cat([emb(index.dir, "satellite", index.sat, "S"), emb(q.dir, "satellite", q.latest, "S")])
    ql = torch.tensor(np.repeat(q.ids, [len(g) for g in q.ground]))
    gl = torch.cat([torch.full((len(index.sat),), -1), torch.tensor(q.ids)])
    for protocol in ("official", "strict"):
        want = brute_force(qe, ge, ql, gl, strict=protocol == "strict")
        for k in ("R@1", "R@5", "R@10", "mAP@1k"):
            assert got[protocol][k] == pytest.approx(want[k], abs=1e-6), (protocol, k)

def test_geolocalisation_is_the_top_1_point_of_the_protocols_gps_gallery(world, trained, evaluated):
    """GPS gallery: index tiles' centres, then query points; the guess is the top-1 point, right or wrong: S2C by hand."""
    q, model = mml.read_split(world, "query"), restored(trained / "best.pt")
    gallery = torch.cat([torch.tensor(mml.read_index(world).sat_latlon), torch.tensor(q.latlon)])
    assert torch.equal(mml.Protocol(world).side("gallery_gps").latlon, gallery)
    with torch.no_grad():
        tiles = model.enc["S"](pixels(mml.ImageStore(q.dir, "satellite", mml.Config(img_size=32)), q.latest))
        pred = gallery[(tiles @ model.enc["C"](gallery.float()).T).argmax(1)]  # float64 degrees, as eval keeps them
    want = mml.geo_metrics(mml.haversine_km(pred, torch.tensor(q.latlon)))
    assert json.loads((evaluated[0] / "eval/metrics.json").read_text())["tasks"]["S2C"]["geo"] == pytest.approx(want, abs=1e-9) and want["acc@1km"] < 100
    assert np.allclose([[float(r["pred_lat"]), float(r["pred_lon"])] for r in read_rows(evaluated[0] / "eval/S2C.csv")], pred, rtol=0, atol=1e-5)

def test_eval_bad_input(world, trained, tmp_path, capsys):
    def fails(*argv) -> str:
        return fails_in_one_line(capsys, "eval", "--workers", 0, "--device", "cpu", *argv)
    assert "no checkpoint there" in fails("--data", world, "--ckpt", tmp_path / "nope.pt")  # (a bad one: test_a_checkpoint_is_checked_before_use)
    root = copy_world(world, tmp_path)  # the no_cues sentences are read for their tasks alone
    os.remove(root / "query/mml_query_text_sentences.csv")
    run("eval", "--data", root, "--ckpt", trained / "best.pt", "--out", tmp_path, "--tasks", "G2S", "--workers", 0, "--device", "cpu")
    assert "mml_query_text_sentences.csv: file not found" in fails("--data", root, "--ckpt", trained / "best.pt", "--tasks", "T2C-no_cues")
    os.remove(root / "index/mml_index_ground.csv")  # a file every task needs
    assert "mml_index_ground.csv: file not found" in fails("--data", root, "--ckpt", trained / "best.pt", "--tasks", "G2S")
    # a model without an encoder of a task: the task is skipped by name, or fails when asked for
    run("train", "--data", world, "--out", tmp_path / "gs", *TINY, "--modalities", "GS", "--max-steps", 1)
    assert "task T2G-first: no text encoder" in fails("--data", world, "--ckpt", tmp_path / "gs/last.pt", "--tasks", "T2G")
    run("eval", "--ckpt", tmp_path / "gs/last.pt", "--workers", 0, "--device", "cpu")
    assert "skipping G2C: no gps encoder" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "gs/eval/metrics.json").read_text())["tasks"]) == ["G2S", "S2G"]

def test_pictures_show_what_the_csv_says(world, trained, tmp_path):
    write(tmp_path / "eval/metrics.json", "[" * 100_000)  # unreadable: started afresh; links where eval writes: replaced, not written through
    [(tmp_path / "eval" / name).symlink_to(tmp_path / "victim") for name in ("G2S.png", "G2S.csv.tmp", "metrics.json.tmp")]
    run("eval", "--ckpt", trained / "best.pt", "--out", tmp_path, "--tasks", "G2S,T2S-first,G2C", "--workers", 0, "--viz")
    assert not (tmp_path / "victim").exists() and list(json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]) == ["G2S", "T2S-first", "G2C"]
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

def test_eval_reads_the_checkpoints_data_from_anywhere_and_records_the_evaluation(world, trained, evaluated, capsys, tmp_path):
    folder, printed = evaluated
    assert f"on {world}" in printed.splitlines()[0] and sorted(os.listdir(folder.parent)) == ["e"]  # nothing generated
    metrics = json.loads((folder / "eval/metrics.json").read_text())
    saved = torch.load(trained / "best.pt", weights_only=True)
    assert metrics["data"] == str(world) and metrics["config"]["embed_dim"] == 32 and metrics["config"]["seed"] == 0
    assert (metrics["step"], metrics["epoch"]) == (saved["step"], saved["epoch"])
    assert metrics["tasks"]["S2C"]["checkpoint"] == str(trained / "best.pt") and metrics["tasks"]["S2C"]["config"] == metrics["config"]
    assert metrics["eval"] == {"tasks": "", "chunk": 512, "eval_batch": 256, "img_size": 32, "resize": "crop"} and metrics["device"] == "cpu"
    assert metrics["code"]["mml_sha256"] == hashlib.sha256((HERE / "mml.py").read_bytes()).hexdigest()
    assert metrics["torch"] == torch.__version__ and metrics["date"][:4].isdigit()
    torch.save(saved | {"config": saved["config"] | {"device": "cuda"}}, tmp_path / "gpu.pt")  # trained on a GPU
    run("eval", "--ckpt", tmp_path / "gpu.pt", "--tasks", "G2S", "--workers", 0, "--device", "cpu")  # evaluated here
    # the model is the checkpoint's: eval takes no model option
    with pytest.raises(SystemExit):
        run("eval", "--ckpt", trained / "best.pt", "--embed-dim", 64)
    assert "eval: --embed-dim is the checkpoint's" in capsys.readouterr().err

def test_the_random_sentences_are_the_authors_draw(world, tmp_path):
    """Their eval_dataset.py: Random(42), per mml_query_text.csv row in file order a section, paragraph, piece; in query order."""
    def theirs(root: Path) -> dict:
        random.seed(42)
        out = {}
        for row in read_rows(root / "query/mml_query_text.csv"):
            j = row["json"]
            sections = json.loads((root / f"query/text/{j[0]}/{j[1]}/{j[2]}/{j}.json").read_text())
            section = sections[random.choice(list(sections.keys()))]
            out[row["landmark_id"]] = random.choice(random.choice(section.split("\n")).split(". "))
        return out
    root = copy_world(world, tmp_path)  # a landmark without photos: skipped, yet drawn for, as theirs draw for every row
    write_rows(root / "query/mml_query_ground.csv", [r | ({"images": ""} if n == 0 else {}) for n, r in enumerate(read_rows(root / "query/mml_query_ground.csv"))])
    ids = [str(i) for i in mml.read_split(root, "query").ids.tolist()]
    for attempt in range(2):
        assert dict(zip(ids, mml.Protocol(root).sentences("random"))) == {i: s for i, s in theirs(root).items() if i in ids} != theirs(root)  # not all: one skipped
        rows = read_rows(root / "query/mml_query_text.csv")  # the same rows, another order
        random.Random(attempt).shuffle(rows)
        write_rows(root / "query/mml_query_text.csv", rows)

# ---- any model on the benchmark: the Python API ------------------------------------------

def task_results(folder: Path) -> dict:
    """metrics.json's per-task results, without what names their source."""
    tasks = json.loads((folder / "eval/metrics.json").read_text())["tasks"]
    source = ("checkpoint", "step", "epoch", "encoders", "config", "data")
    return {t: {k: v for k, v in r.items() if k not in source} for t, r in tasks.items()}

def test_the_api_composes_and_any_encoders_give_evals_metrics(world, trained, evaluated, tmp_path):
    """load(ckpt) to evaluate_encoders, as embed_* functions, or its bare encoders: eval's very metrics and CSVs; absent tasks named."""
    want = task_results(evaluated[0])
    csvs = lambda folder: {p.name: p.read_bytes() for p in (folder / "eval").glob("*.csv")}
    model = mml.load(trained / "best.pt", device="cpu")
    got = mml.evaluate_encoders(model, data=world, out=tmp_path / "itself", batch=7)  # its own size, resize and batch (load's)
    assert task_results(tmp_path / "itself") == want and set(got) == set(want) and json.loads((tmp_path / "itself/eval/metrics.json").read_text())["eval"]["eval_batch"] == 256
    assert csvs(tmp_path / "itself") == csvs(evaluated[0])
    mml.evaluate_encoders({"G": model.embed_images, "T": model.embed_text, "C": model.embed_gps,
                           "S": lambda x: model.embed_images(x, "satellite")}, data=world, out=tmp_path / "api", img_size=32)
    assert task_results(tmp_path / "api") == want and csvs(tmp_path / "api") == csvs(evaluated[0])
    enc = model.model.enc  # the bare encoders, tokenising the sentences as the checkpoint does
    mml.evaluate_encoders({"G": enc["G"], "S": enc["S"], "C": enc["C"], "T": lambda texts: enc["T"](mml.tokenize(model.tok, texts))},
                          data=world, out=tmp_path / "fns", img_size=32)
    assert task_results(tmp_path / "fns") == want
    assert set(mml.evaluate_encoders({"G": enc["G"], "S": enc["S"]}, data=world, out=tmp_path / "gs", img_size=32)) == {"G2S", "S2G"}
    # an image as a path (a list of them, or one), an (H, W, 3) array or a (1, 3, H, H) tensor
    photo = mml.shard((q := mml.read_split(world, "query")).dir, "ground", q.ground[0][0])
    by_path = model.embed_images([photo])  # decoded at reduced scale (JPEG draft)
    assert by_path.shape == (1, 32) and torch.equal(model.embed_images(str(photo)), by_path)
    assert torch.allclose(by_path, model.embed_images(torch.from_numpy(mml.load_image(photo, 32)).permute(2, 0, 1)[None]), atol=1e-6)
    full = np.asarray(Image.open(photo).convert("RGB"))  # decoded in full
    assert torch.allclose(model.embed_images([full]), model.embed_images(torch.from_numpy(mml.to_square(Image.fromarray(full), 32)).permute(2, 0, 1)[None]), atol=1e-6)
    assert model.embed_images([full, full[::2]]).shape == (2, 32) and model.embed_images(full).shape == (1, 32)  # arrays of any size, or one
    # a batch of another size is resized to the checkpoint's own (antialiased bilinear)
    big = torch.from_numpy(mml.load_image(photo, 64)).permute(2, 0, 1)[None]
    small = F.interpolate(big.float(), (32, 32), mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
    assert torch.allclose(model.embed_images(big), model.embed_images(small), atol=1e-6)
    # a sentence is one sentence; a point is one point
    assert torch.equal(model.embed_text("a red tower"), model.embed_text(["a red tower"])) and model.embed_text("hello").shape == (1, 32)
    assert torch.equal(model.embed_gps([40.7, -74.0]), model.embed_gps([[40.7, -74.0]])) and model.embed_gps([40.7, -74.0]).shape == (1, 32)

def test_the_readme_section_runs_as_written(world, trained, evaluated, tmp_path):
    """README's "Evaluate your own model" as written, on the tiny world where data/synthetic and runs/mml would be: eval's numbers."""
    code = (HERE / "README.md").read_text().split("## Evaluate your own model", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    for link, target in (("data/synthetic", world), ("runs/mml", trained)):
        (tmp_path / link).parent.mkdir(exist_ok=True)
        (tmp_path / link).symlink_to(target)
    exec(compile(code, "README.md", "exec"), {})
    results = task_results(tmp_path / "runs/mine")
    assert {"G2S", "S2G"} <= set(results) and results["G2S"]["official"]["R@1"] >= 0
    assert task_results(tmp_path / "runs/again") == task_results(evaluated[0])

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_python_api_refuses_what_it_cannot_embed_in_one_line(trained, tmp_path):
    """Odd images, files, points, bytes, kinds, batches, devices: a UserError naming them; no input: (0, D); old options dropped."""
    model = mml.load(trained / "best.pt", device="cpu")
    for bad in ([np.full((50, 60, 3), 0.5)], [np.full((50, 60, 3), 300)], [np.zeros((50, 60))], [np.zeros((0, 0, 3), np.uint8)]):
        with pytest.raises(mml.UserError, match=r"expected \(H, W, 3\) uint8"):
            model.embed_images(bad)
    for bad in (torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 16, dtype=torch.uint8), torch.zeros(3, 32, 32, dtype=torch.uint8), torch.zeros(2, 3, 0, 0, dtype=torch.uint8)):
        with pytest.raises(mml.UserError, match=r"expected \(B, 3, H, H\) uint8"):
            model.embed_images(bad)
    fifo, big = tmp_path / "pipe.jpg", tmp_path / "big.png"
    os.mkfifo(fifo)
    Image.new("1", (12000, 12000)).save(big)  # 144 megapixels, under PIL's own bomb limit
    for path, message in ((fifo, "not a regular file"), (big, "12000x12000 px, over the 50,000,000-pixel limit"),
                          (tmp_path / "missing.jpg", "not found"), (trained / "log.jsonl", "cannot read it as an image")):
        with within(30), pytest.raises(mml.UserError) as e:
            model.embed_images(str(path))
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    for bad in ([[91.0, 0.0]], [[0.0, -180.5]], [1.0, 2.0, 3.0], [[[1.0, 2.0]]], [[float("nan"), 0.0]]):
        with pytest.raises(mml.UserError, match=r"embed_gps: .*expected \(N, 2\) of latitudes in \[-90, 90\] and longitudes in \[-180, 180\]"):
            model.embed_gps(bad)
    for call, message in ((lambda: model.embed_gps([[1.0, 2.0], [3.0]]), "embed_gps: not an array of numbers"),
                          (lambda: model.embed_gps(torch.zeros(1, 2, requires_grad=True)), "embed_gps: not an array"),
                          (lambda: model.embed_gps([[10**400, 0]]), "embed_gps: not an array of numbers"),
                          (lambda: mml.load(trained / "best.pt", batch=-5), "batch -5: expected an integer of at least 1"),
                          (lambda: mml.load(trained / "best.pt", device="cuda:99"), "device 'cuda:99': not usable"),
                          (lambda: model.embed_images(np.zeros((1, 8, 8, 3), np.uint8), kind="text"), "kind 'text'; expected ground or satellite"),
                          (lambda: model.embed_text(b"abc"), r"embed_text: expected a sentence \(str\)")):  # bytes: not "97", "98", "99"
        with pytest.raises(mml.UserError, match=message):
            call()
    assert model.embed_text([]).shape == model.embed_images([]).shape == model.embed_gps([]).shape == (0, 32)
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    torch.save(ckpt | {"config": ckpt["config"] | {"loss": "imagebind", "outdoor_only": True, "last_sat_only": False}}, tmp_path / "old.pt")
    assert mml.load(tmp_path / "old.pt", device="cpu").cfg == model.cfg
    ckpt["model"]["enc.C.LocEnc0.head.0.bias"][:] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(mml.UserError, match="points: the embedding of row 0 is not finite"):
        mml.load(tmp_path / "nan.pt", device="cpu").embed_gps([[40.7, -74.0]])

def test_rows_of_any_norm_are_normalised_and_a_zero_row_is_one_line(world, trained, tmp_path):
    """Embeddings scaled by 3 or 1e20 (float32 norms overflow), in one buffer, or not finite on a flat image (the width probe is not flat): the unit vectors' metrics; a zero row: one line."""
    enc = mml.load(trained / "best.pt", device="cpu").model.enc
    want = mml.evaluate_encoders({m: lambda x, m=m: enc[m](x).numpy() for m in "GS"}, data=world, out=tmp_path / "u", img_size=32)  # no grad, the probe too
    buffer = {m: torch.empty(16, 32) for m in "GS"}
    for n, f in enumerate((lambda m, x: 3 * enc[m](x), lambda m, x: 1e20 * enc[m](x), lambda m, x: buffer[m][:len(x)].copy_(enc[m](x)),
                           lambda m, x: enc[m](x) / (x.float().std((1, 2, 3)) > 0)[:, None])):
        got = mml.evaluate_encoders({m: lambda x, m=m: f(m, x) for m in "GS"}, data=world, out=tmp_path / f"x{n}", img_size=32, batch=16)
        assert {t: r["official"] for t, r in got.items()} == {t: r["official"] for t, r in want.items()}
    near = F.normalize(torch.randn(4, 8)) * torch.tensor([[1.0009], [0.9992], [1.0001], [1]])  # within the warning's 1e-3: normalised too
    assert torch.allclose(mml.unit_rows(near, None), F.normalize(near), atol=1e-7, rtol=0)
    with pytest.raises(mml.UserError, match="query_ground: the embedding of row 3 is zero"):
        mml.evaluate_encoders({"G": lambda x: enc["G"](x) * (torch.arange(len(x)) != 3)[:, None], "S": enc["S"]}, data=world, out=tmp_path / "z", img_size=32)

def wider_after(calls: int):
    """An encoder whose width changes from 8 to 9 after its first `calls` batches."""
    seen = []
    return lambda x: seen.append(1) or torch.randn(len(x), 8 if len(seen) <= calls else 9)

@pytest.mark.parametrize("encoder,message", [
    # the first batch is the probe of one blank image that learns the width
    (lambda x: torch.zeros(len(x) - 1, 8), "ground encoder: the encoder returned (0, 8) torch.float32 for a batch of 1; expected (1, D) floats"),
    (lambda x: torch.zeros(len(x), 8, dtype=torch.int64), "returned (1, 8) torch.int64 for a batch of 1; expected (1, D) floats"),
    (lambda x: None, "for a batch of 1; expected (1, D) floats"),  # not a raw TypeError
    (lambda x: "an embedding", "for a batch of 1; expected (1, D) floats"),
    (lambda x: torch.randn(len(x), 8) * torch.where(torch.arange(len(x))[:, None] == 1, float("nan"), 1.0), "ground encoder on query_ground: the embedding of row 1 is not finite"),
    (wider_after(2), "ground encoder on query_ground: the encoder returned (2, 9) torch.float32 for a batch of 2; expected (2, 8) floats"),
])
def test_what_an_encoder_returns_is_checked_batch_by_batch(world, tmp_path, encoder, message):
    with pytest.raises(mml.UserError) as e:
        mml.evaluate_encoders({"G": encoder, "S": lambda x: torch.randn(len(x), 8)}, data=world, out=tmp_path, img_size=32, batch=2, tasks="G2S")
    assert str(e.value).startswith("ground encoder") and message in str(e.value) and "\n" not in str(e.value)

def test_a_width_mismatch_is_named_before_any_gallery_is_embedded(world, trained, tmp_path, capsys):
    """Text 16-d, images 32-d: T2G and T2S named before anything is embedded, the others run and are written, then one line."""
    enc, seen = mml.load(trained / "best.pt", device="cpu").model.enc, []
    record = lambda m, fn: lambda x: seen.append(m) or fn(x)
    fns = {"G": record("G", enc["G"]), "S": record("S", enc["S"]), "T": record("T", lambda s: torch.randn(len(s), 16))}
    with pytest.raises(mml.UserError, match=r"T2G-first: text embeddings are 16-d, ground 32-d; a task's two sides"):
        mml.evaluate_encoders(fns, data=world, out=tmp_path, img_size=32)
    out = capsys.readouterr().out
    assert out.index("skipping T2S-no_cues: text embeddings are 16-d") < out.index("G2S: ")
    assert set(task_results(tmp_path)) == {"G2S", "S2G"}
    assert seen[:3] == ["G", "S", "T"] and seen.count("T") == 1  # one blank probe each, first

# ---- untrusted input: nothing replaced, nothing half-made, one line each -----------------

def test_synth_never_replaces_what_mml_did_not_write(fixture_root, tmp_path, capsys):
    with unittest.mock.patch.dict(os.environ, RANK="0"):  # under torchrun every process would write the same files
        assert "synth: run it once, without torchrun" in fails_in_one_line(capsys, "synth", "--out", tmp_path / "t", "--scale", 0.01)
    before = tree_bytes(fixture_root)  # a folder in the released layout, with mmlandmarks.csv
    assert "not a synthetic world written by mml" in fails_in_one_line(capsys, "synth", "--out", fixture_root, "--scale", 0.01)
    assert tree_bytes(fixture_root) == before
    (tmp_path / "fresh.tmp").mkdir()  # nor a foreign folder where it would stage its work
    (tmp_path / "fresh.tmp/notes.txt").write_text("mine")
    assert "fresh.tmp: not empty" in fails_in_one_line(capsys, "synth", "--out", tmp_path / "fresh", "--scale", 0.01)
    assert (tmp_path / "fresh.tmp/notes.txt").read_text() == "mine"
    # a world mml wrote is regenerated in place
    run("synth", "--out", tmp_path / "own", "--scale", 0.01, "--seed", 1)
    run("train", "--data", tmp_path / "own", "--out", tmp_path / "r", *TINY, "--max-steps", 1)
    run("synth", "--out", tmp_path / "own", "--scale", 0.01, "--seed", 2)
    assert json.loads((tmp_path / f"own/{mml.SYNTH_MARKER}").read_text())["seed"] == 2
    assert "own: not the landmarks" in fails_in_one_line(capsys, "train", "--out", tmp_path / "r", "--resume")  # a world written over
    (tmp_path / "own/run").mkdir()  # what else a world holds is not mml's to replace; nor is "." (the test's folder)
    assert "own: holds run, which mml did not write" in fails_in_one_line(capsys, "synth", "--out", tmp_path / "own", "--scale", 0.01)
    assert "not empty and not a synthetic world" in fails_in_one_line(capsys, "synth", "--out", ".", "--scale", 0.01)
    # synth writes where train reads, whatever the scale
    assert all(Path(mml.resolve("synth", mml.Config(scale=s), {"scale"}).out) == mml.synthetic_root(s) for s in (1.0, 0.5))
    # nor does prepare replace a file it did not make
    (tmp_path / "c/64-crop").mkdir(parents=True)
    (tmp_path / "c/64-crop/query_satellite.u8").write_bytes(b"someone's")
    assert "not made by `mml.py prepare`" in fails_in_one_line(capsys, "prepare", "--data", fixture_root, "--splits", "query", "--cache", tmp_path / "c")
    assert (tmp_path / "c/64-crop/query_satellite.u8").read_bytes() == b"someone's"  # refused before any array is built
    assert sorted(p.name for p in (tmp_path / "c/64-crop").iterdir()) == ["query_satellite.u8"]

def test_overwrite_starts_over(world, trained, tmp_path, capsys):
    crash = "import sys, mml; mml.train_step = lambda *a: 1 / 0; mml.main(sys.argv[1:])"  # a first step that fails (out of memory, say): no run yet
    done = subprocess.run([sys.executable, "-c", crash, *map(str, ["train", "--data", world, "--out", tmp_path / "oom", *TINY, "--workers", 1])], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().endswith("ZeroDivisionError: division by zero")  # and it ends: its traceback does not keep the loader's workers (they ignore SIGTERM)
    run("train", "--data", world, "--out", tmp_path / "oom", *TINY, "--max-steps", 1)  # again, without --overwrite
    (tmp_path / "oom/best.pt").unlink() or (tmp_path / "oom/best.pt").mkdir()  # a folder where mml writes a file
    assert "oom/best.pt: a folder, where mml writes a file" in fails_in_one_line(capsys, "train", "--data", world, "--out", tmp_path / "oom", *TINY, "--overwrite") and (tmp_path / "oom/last.pt").exists()  # nothing removed
    shutil.copytree(trained, tmp_path / "run")  # --overwrite removes what mml wrote there, nothing else
    [write(tmp_path / "run" / name, text) for name, text in (("eval/metrics.json", "{}"), ("eval/G2S.csv", "an earlier model's"), ("notes.txt", "mine"))]
    run("train", "--data", world, "--out", tmp_path / "run", *TINY, "--epochs", 1, "--overwrite")
    assert [r["epoch"] for r in log_records(tmp_path / "run") if "val_loss" in r] == [0]
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] == STEPS
    assert not (tmp_path / "run/eval/metrics.json").exists() and not (tmp_path / "run/eval/G2S.csv").exists() and (tmp_path / "run/notes.txt").read_text() == "mine"

@pytest.mark.parametrize("argv,message", [
    (["--batch-size", 0], "--batch-size 0: expected an integer in [2, "),
    (["--epochs", 0], "--epochs 0: expected an integer >= 1"),
    (["--scale", 0], "--scale 0.0: expected a number in [0.01, 100]"),
    (["--lr", "nan"], "--lr nan: expected a finite number"),
    (["--img-width", 12], "--img-width 12: expected a multiple of 8"),
    (["--image-backbone", "convnext_tiny", "--img-size", 16], "--img-size 16: expected at least 32 for convnext_tiny"),
    (["--modalities", "TC", "--share-image-trunk"], "--share-image-trunk True: expected both G and S in --modalities"),
    (["--image-backbone", "vit_b_16", "--pretrained", "--img-size", 32], "--img-size 32: vit_b_16 takes 224 px images with --pretrained"),
    (["--pretrained"], "--pretrained True: expected a torchvision --image-backbone"),  # the small CNN has no weights to load
    (["--resume"], "no run to resume there (--resume continues the run in --out"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible to PyTorch"),  # (none is, in this test)
    # issue 30: seeds are bounded; a preset's values are checked like any other, first
    (["--seed", -1], "--seed -1: expected an integer in [0, 9223372036854775807]"),
    (["--seed", 2**64], "--seed 18446744073709551616: expected an integer in [0, 9223372036854775807]"),
    (["--preset", "paper", "--modalities", "STC"], "--share-image-trunk True: expected both G and S in --modalities"),
    (["--preset", "paper", "--modalities", "TC"], "--share-image-trunk True: expected both G and S in --modalities"),
    (["--text-width", 16384], "the model of these options: a model of "),  # sizes each within bounds, not their product
    (["--data", "{tmp}/missing"], "missing: dataset root not found"),
    (["--data", "{tmp}/loop"], "loop: not a usable path"),
    # into the run in {run}: a second train, or a resume with settings that change what "best" means
    (["--out", "{run}", "--data", "{world}", *TINY], "holds a run already (last.pt, best.pt, log.jsonl): continue it with --resume, or start over with --overwrite"),
    (["--out", "{run}", "--resume", "--overwrite"], "--resume continues the run in --out, --overwrite replaces it: give one of them"),
    (["--out", "{run}", "--resume", "--seed", 1], "--seed 1: {run}/last.pt was trained with 0; leave it out to resume"),
    (["--out", "{run}", "--resume", "--n-val", 4], "--n-val 4: {run}/last.pt was trained with 1024; leave it out to resume"),
    (["--out", "{run}", "--resume", "--holdout", "authors"], "--holdout authors: {run}/last.pt was trained with seeded; leave it out to resume"),
    (["--out", "{run}", "--resume", "--data", "{tmp}/other"], "--data {tmp}/other: {run}/last.pt was trained with {world}; leave it out to resume"),
    (["--out", "{run}", "--resume", "--scale", 2], "--scale 2.0: {run}/last.pt was trained with 1.0; leave it out to resume"),
    (["--out", "{run}", "--resume", "--embed-dim", 64], "--embed-dim 64: {run}/last.pt was trained with 32; leave it out to resume"),
    (["--out", "{run}", "--resume", "--select", "loss"], "--select loss: {run}/last.pt was trained with recall; leave it out to resume"),
    (["--out", "{run}", "--resume", "--recipe", "paper"], "--recipe paper: {run}/last.pt was trained with mml; leave it out to resume"),
    (["--out", "{run}", "--resume", "--batch-size", 8], "--batch-size 8: {run}/last.pt was trained with 16; leave it out to resume"),
    (["--out", "{run}", "--resume", "--weight-decay", 0.3], "--weight-decay 0.3: {run}/last.pt was trained with 0.05; leave"),  # the optimizer's own
])
def test_a_refused_train_is_one_line_and_leaves_nothing(world, trained, tmp_path, monkeypatch, capsys, argv, message):
    """Refused in seconds, before any work: no --out made (default {tmp}/new/run), no data generated, a run as it was."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a symbolic link to itself
    shutil.copytree(trained, tmp_path / "run")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before, fill, t0 = tree_bytes(tmp_path / "run"), dict(tmp=tmp_path, run=tmp_path / "run", world=world), time.time()
    err = fails_in_one_line(capsys, "train", "--out", tmp_path / "new/run", *[str(a).format(**fill) for a in argv])
    assert message.format(**fill) in err, err
    assert not (tmp_path / "new").exists() and not (tmp_path / "data").exists() and time.time() - t0 < 30
    assert tree_bytes(tmp_path / "run") == before

def test_out_and_cache_are_checked_before_any_data_is_read(world, trained, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for argv, option in ((["train", "--out", tmp_path / "a_file", "--data", tmp_path / "no_data"], "--out"),
                         (["prepare", "--cache", tmp_path / "a_file", "--data", world], "--cache"),
                         (["eval", "--ckpt", trained / "best.pt", "--out", tmp_path / "a_file", "--data", tmp_path / "no_data"], "--out")):
        err = fails_in_one_line(capsys, *argv)
        assert f"{option} {tmp_path / 'a_file'}" in err and f": not a writable folder ({tmp_path / 'a_file'} is not one)" in err
    link = tmp_path / "link"
    (tmp_path / "elsewhere").mkdir()
    link.symlink_to(tmp_path / "elsewhere")
    assert "link: a symbolic link" in fails_in_one_line(capsys, "synth", "--out", link, "--scale", 0.01)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "elsewhere", "link"] and not os.listdir(tmp_path / "elsewhere")

def test_messages_say_what_the_user_most_likely_meant(world, trained, tmp_path, capsys):
    assert "a folder; name a checkpoint in it (it holds best.pt, last.pt)" in fails_in_one_line(capsys, "eval", "--ckpt", trained)
    err = fails_in_one_line(capsys, "eval", "--ckpt", trained / "log.jsonl")
    assert "log.jsonl: not a checkpoint (not a file torch.save writes)" in err and "code" not in err
    assert f"the root is {world}" in fails_in_one_line(capsys, "train", "--data", world / "train", "--out", tmp_path / "r", *TINY)
    assert "--phases steps,rnak: expected some of steps, loader, rank" in fails_in_one_line(capsys, "bench", "--phases", "steps,rnak")
    folder = clip_folder(tmp_path)
    run("convert", folder, "--out", tmp_path / "clip.pt")
    shutil.move(folder, tmp_path / "moved")
    assert "is not there (moved?); name it with --clip" in fails_in_one_line(capsys, "eval", "--ckpt", tmp_path / "clip.pt", "--data", world, "--workers", 0)
    empty = copy_world(world, tmp_path)  # an index without distractors: the frozen towers embed no images there
    for kind in ("ground", "satellite"):
        write(empty / f"index/mml_index_{kind}.csv", "images,lat,lon\n")
    run("eval", "--ckpt", tmp_path / "clip.pt", "--data", empty, "--workers", 0, "--tasks", "G2S", "--clip", tmp_path / "moved", "--out", tmp_path / "e")

class Trap:
    """A pickle that creates a file ("sprung", in the test's folder) when loaded: what a crafted checkpoint could do."""

    def __reduce__(self):
        return (Path.touch, (Path("sprung"),))

def corrupt(ckpt: dict, where: str, value) -> dict:
    """A checkpoint with config.FIELD or a part replaced (None: removed; a function: of it)."""
    ckpt = {**ckpt, "config": dict(ckpt["config"])}
    if where.startswith("config."):
        ckpt["config"][where[7:]] = value
    elif value is None:
        del ckpt[where]
    else:
        ckpt[where] = value(ckpt) if callable(value) else value
    return ckpt

def retokenized(ckpt: dict, edit) -> str:
    """The checkpoint's tokenizer after edit(tok)."""
    tok = Tokenizer.from_str(ckpt["tokenizer"])
    edit(tok)
    return tok.to_str()

RESUME_ONLY = ("optimizer", "torch_rng", "best")  # what eval does not read

@pytest.mark.parametrize("where,value,message", [
    ("config.img_size", 100000, "config field img_size 100000: expected an integer in [16, 1024]"),
    ("config.image_backbone", "resnet9000", "config field image_backbone 'resnet9000': expected one of"),
    ("config.embed_dim", "32", "config field embed_dim '32': expected a int"),
    ("config.epochs", True, "config field epochs True: expected a int"),  # True is an int to Python, not here
    ("config.lr", float("nan"), "config field lr nan: expected a finite number"),
    ("config.modalities", "GX", "config field modalities GX: expected two or more"),
    ("config.seed", -1, "config field seed -1: expected an integer in [0, 9223372036854775807]"),
    ("config", lambda c: c["config"] | {1: "x", "zzz": 2}, "its config does not fit this mml.py (unknown options: 1, zzz)"),
    ("config.text_width", 16384, "parameters, over the 3,000,000,000 allowed"),  # each size within bounds, not their product
    ("step", "20", "(step is a str)"),
    ("step", -1, "its step -1 is not what mml saves"),
    ("epoch", -3, "its epoch -3 is not what mml saves"),
    ("model", [1, 2], "(model is a list)"),
    ("model", lambda c: c["model"] | {"logit_scale": torch.tensor(1 + 2j)}, "its model entry 'logit_scale' is not what mml saves"),
    ("model", lambda c: c["model"] | {3: torch.zeros(1)}, "its model entry 3 is not what mml saves"),
    ("model", lambda c: c["model"] | {"enc.G.head.bias": c["model"]["enc.G.head.bias"].to_sparse()}, "its model entry 'enc.G.head.bias' is not"),
    ("tokenizer", "{garbage", "its tokenizer does not load"),
    ("tokenizer", lambda c: retokenized(c, lambda t: t.add_tokens(["zzz"])), "its tokenizer's ids reach 300, its text encoder's 299"),
    ("tokenizer", lambda c: c["tokenizer"].replace('"[UNK]":1,', '"[UNK]":100000,'), "its tokenizer's ids reach 100000"),  # 300 ids, not 0-299
    ("tokenizer", lambda c: retokenized(c, lambda t: t.enable_truncation(16, stride=4)), "does not pad and cut on the right to 16 tokens"),
    ("tokenizer", lambda c: retokenized(c, lambda t: t.enable_padding(length=16, direction="left")), "does not pad and cut on the right to 16 tokens"),
    ("optimizer", None, "not an mml checkpoint to resume (optimizer is missing)"),
    ("optimizer", lambda c: c["optimizer"] | {"state": c["optimizer"]["state"] | {0: c["optimizer"]["state"][0] | {"exp_avg": torch.tensor(0.0)}}},
     "its optimizer state does not fit the model (a ("),
    ("torch_rng", None, "not an mml checkpoint to resume (torch_rng is missing)"),
    ("torch_rng", lambda c: c["torch_rng"][:100], "its RNG state is not what mml saves"),
    ("best", float("nan"), "its best nan is not what mml saves"),
    ("extra", Trap(), "may contain code, so it is not unpickled"),
    ("model", lambda c: {k: v for k, v in c["model"].items() if k != "enc.T.head.weight"}, "enc.T.head.weight is absent in the file and (32, 32) in the model"),
])
def test_a_checkpoint_is_checked_before_use(trained, tmp_path, capsys, where, value, message):
    """Each part of a checkpoint (--resume: its training state too) is checked: one line naming file and part, run unchanged."""
    (tmp_path / "run").mkdir()
    torch.save(corrupt(torch.load(trained / "last.pt", weights_only=True), where, value), tmp_path / "run/last.pt")
    before = tree_bytes(tmp_path / "run")
    commands = [["train", "--out", tmp_path / "run", "--resume"]]
    if where not in RESUME_ONLY:
        commands += [["eval", "--ckpt", tmp_path / "run/last.pt", "--workers", 0]]
    for argv in commands:
        err = fails_in_one_line(capsys, *argv)
        assert str(tmp_path / "run/last.pt") in err and message in err, (argv, err)
        assert tree_bytes(tmp_path / "run") == before
    if where not in RESUME_ONLY:
        with pytest.raises(mml.UserError, match=re.escape(message)):
            mml.load(tmp_path / "run/last.pt")
    assert not Path("sprung").exists()  # nothing was unpickled

OPENED = []  # files opened while a test records them (an audit hook sees every open)
sys.addaudithook(lambda event, args: OPENED.append(str(args[0])) if event == "open" and OPENED and isinstance(args[0], (str, bytes, os.PathLike)) else None)

@pytest.mark.parametrize("csv_name,column,value", [
    ("query/mml_query_text.csv", "json", "{secret}"),
    ("index/mml_index_ground.csv", "images", "../../../../{secret}"),
    ("query/mml_query_ground.csv", "images", "ab"),
])
def test_ids_never_lead_outside_the_dataset(world, trained, tmp_path, capsys, csv_name, column, value):
    root = copy_world(world, tmp_path)
    secret = tmp_path / "outside" / "secret"
    image(secret.with_suffix(".jpg"), (1, 2, 3))  # planted where a path built from the id would lead
    write(secret.with_suffix(".json"), '{"a": "b"}')
    rows = read_rows(root / csv_name)
    rows[0][column] = value.format(secret=str(secret).lstrip("/"))
    write_rows(root / csv_name, rows)
    OPENED[:] = ["recording"]
    try:
        err = fails_in_one_line(capsys, "eval", "--ckpt", trained / "best.pt", "--data", root, "--out", tmp_path / "e", "--workers", 0, "--viz")
        assert f"{root / csv_name}, line 2: {column} " in err and ": expected " in err and "plain id" in err
        assert "plain id" in fails_in_one_line(capsys, "prepare", "--data", root, "--cache", tmp_path / "c")
    finally:
        opened, OPENED[:] = OPENED[1:], []
    assert opened and not [p for p in opened if p.startswith(str(secret.parent))]

def test_a_truncated_image_cache_is_refused(world, trained, tmp_path, capsys):
    cache = tmp_path / "cache"
    run("prepare", "--data", world, "--img-size", 32, "--splits", "query", "--cache", cache, "--workers", 1)
    argv = ["eval", "--ckpt", trained / "best.pt", "--out", tmp_path, "--tasks", "G2S", "--workers", 0, "--cache", cache]
    run(*argv)
    whole = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]["G2S"]["official"]
    array, manifest = cache / "32-crop/query_ground.u8", cache / "32-crop/query_ground.json"
    data = array.read_bytes()
    array.write_bytes(data[:len(data) // 2])
    assert f"{array}: {len(data) // 2} bytes where its manifest promises {len(data)}" in fails_in_one_line(capsys, *argv)
    array.write_bytes(data)
    for text, why in (('{"generator": "mml.py prepare", "size": 32, "ids": ', "not a readable cache manifest (JSONDecodeError"),
                      ('{"generator": "mml.py prepare", "size": 32, "resize": "crop"}', "not a cache manifest mml wrote (no ids list)"),
                      ('{"size": 32, "resize": "crop", "ids": [[1]], "broken": []}', "not a cache manifest mml wrote (no ids list)"),
                      ('["a", "list"]', "not a cache manifest mml wrote (no size int)")):
        manifest.write_text(text)
        assert f"{manifest}: {why}" in fails_in_one_line(capsys, *argv)
    shutil.rmtree(cache)
    run(*argv)  # the metrics of the whole data are unchanged
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]["G2S"]["official"] == whole

def run_limited(max_bytes: int, *argv) -> tuple[int, str]:
    """`mml.py ARGV` whose files stop at max_bytes, a full disk (Python ignores SIGXFSZ: a write past it fails with EFBIG):
    (status, stderr). A new process, not a fork of this one, whose threads could leave a lock held in the child."""
    limit = f"import resource, sys, mml; resource.setrlimit(resource.RLIMIT_FSIZE, ({max_bytes}, {max_bytes})); mml.main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", limit, *map(str, argv)], cwd=HERE, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr

def test_a_full_disk_is_one_line_and_leaves_no_tmp(world, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    prepare = ("prepare", "--data", world, "--img-size", 64, "--splits", "query", "--cache", cache, "--workers", 1)
    run(*prepare)  # a whole cache, then a rebuild the disk stops, then a rerun that finishes it
    code, err = run_limited(200_000, *prepare)
    assert code == 1 and err.count("\n") == 1 and "64-crop/query_ground.u8: could not be written" in err, err
    assert not list(cache.rglob("*.tmp")) and b'"ids"' not in (cache / "64-crop/query_ground.json").read_bytes()
    run(*prepare)
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

# ---- the field's models: CLIP and the authors' MmlCLIP, against their own code ------------

FIXTURES = HERE / "assets/fixtures"
# Sentences the tokenizer must split as CLIP's does: plain, long (cut at 77), accented, emoji, empty, odd whitespace, capitals.
SENTENCES = ["a red church in Denver", " ".join(["the old harbor lighthouse"] * 40),
             "Café Noël à São Paulo: naïve façade", "🏛️ museum 🗽 & 🌉!", "",
             "Mixed   whitespace\tand\nnewlines", "THE GRAND CAPITOL"]

LATLON = torch.tensor([[40.71, -74.01], [34.05, -118.24], [47.61, -122.33], [25.76, -80.19]])

def seeded(spec: dict, seed: int) -> dict:
    """Random weights the fixtures' maker and the tests both draw (PCG64, sorted keys, normal x scale), not committed: 4.7M numbers."""
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
    """The authors' MmlCLIP state dict on the tiny CLIP: two CLIP copies, drawn heads and GPS, old transformers' position_ids."""
    spec = location_spec("location_encoder.", "head")
    for head in ("ground_projector", "satellite_projector", "text_projector"):
        spec |= {f"{head}.0.weight": ((512, 32), 32 ** -0.5), f"{head}.0.bias": ((512,), 0.02),
                 f"{head}.2.weight": ((512, 512), 512 ** -0.5), f"{head}.2.bias": ((512,), 0.02)}
    state = seeded(spec, 17) | {"logit_scale": torch.tensor(2.5)}
    for copy in ("image_encoder.clip_model.", "text_encoder.clip_model."):
        state |= {copy + k: v for k, v in clip_state.items()}
        state[copy + "vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        state[copy + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state

def fixture_pixels(resize: str) -> torch.Tensor:
    """assets/fixtures/images/*.png, decoded by --resize at 32 px: (N, 3, 32, 32) uint8."""
    return torch.stack([torch.from_numpy(mml.load_image(p, 32, resize)).permute(2, 0, 1) for p in sorted((FIXTURES / "images").glob("*.png"))])

def references() -> dict:
    """What transformers 4.57.6 and the authors' MmlCLIP computed, in a separate virtual environment (never in
    requirements.txt), from assets/fixtures:
    - clip-tiny: CLIPModel(CLIPConfig(vision 32 wide, 2 layers, 2 heads, patch 8, 32 px; text 32 wide, 2 layers, vocabulary
      664, 77 positions, eos_token_id 2 as openai's configs; projection 32)) with torch.manual_seed(0), saved by
      save_pretrained in both formats; its tokenizer.json from CLIPTokenizerFast on a CLIP-style byte-level BPE (vocab.json,
      merges.txt) of 150 merges learnt from synthetic-world sentences. "pixels": a standard normal (2, 3, 32, 32), "image":
      normalize(get_image_features(pixels)); "ids": CLIPTokenizer (the slow, python one the authors used, without ftfy) of
      SENTENCES with padding="max_length", truncation=True, max_length=77, which the fast one matched; "text":
      normalize(get_text_features(ids, attention_mask)); "processor_pixels" and "processor_image": CLIPImageProcessor
      (shortest_edge 32, crop 32) on images/*.png.
    - "authors": their MmlCLIP(model_name=clip-tiny, output_dim=512) loaded with authors_weights(clip-tiny's state dict)
      (strict=False, as their train.py), on images/*.png through their get_transforms(..., "val") (albumentations Resize with
      cv2.INTER_LINEAR_EXACT, CLIP's Normalize), CLIPTokenizer.from_pretrained(clip-tiny) on SENTENCES and LATLON: each of
      the four outputs, normalised."""
    return torch.load(FIXTURES / "references.pt", weights_only=True)

def clip_folder(tmp_path: Path, name: str = "clip-tiny", drop=()) -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    for f in drop:
        (folder / f).unlink()
    return folder

def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)

@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_converted_clip_equals_transformers(tmp_path, weights):
    ref, other = references(), {"model.safetensors": "pytorch_model.bin"}.get(weights, "model.safetensors")
    folder = clip_folder(tmp_path, drop=[other])  # one weights format at a time
    if weights == "pytorch_model.bin":  # an older transformers' files: 2022's config (null ids; *_config_dict, which replaces *_config), position_ids
        (c := json.loads((folder / "config.json").read_text()))["vision_config"] |= dict.fromkeys(["bos_token_id", "eos_token_id"])
        c["text_config_dict"], c["text_config"]["layer_norm_eps"] = {k: v for k, v in c["text_config"].items() if k != "layer_norm_eps"}, 0.5  # the dict's absent eps: the default
        (folder / "config.json").write_text(json.dumps(c))
        torch.save(torch.load(folder / weights, weights_only=True) | {"text_model.embeddings.position_ids": torch.arange(4)[None]}, folder / weights)
    run("convert", folder, "--out", tmp_path / "clip.pt")
    model = restored(tmp_path / "clip.pt")
    saved = torch.load(tmp_path / "clip.pt", weights_only=True)
    assert list(saved["model"]) == ["logit_scale"] and model.towers == ("enc.G.trunk.", "enc.S.trunk.", "enc.T.trunk.")  # the frozen towers are named, not copied
    assert torch.equal(saved["model"]["logit_scale"], mml.load_clip_weights(str(folder))[0]["logit_scale"])  # CLIP's own
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in (mml.CLIP_MEAN, mml.CLIP_STD))
    with torch.no_grad():  # the encoders normalise pixels in [0, 1] by CLIP's statistics
        image = model.enc["G"](ref["pixels"] * std + mean)
        ids = mml.tokenize(Tokenizer.from_str(saved["tokenizer"]), SENTENCES)
        text = model.enc["T"](ids)
    assert torch.equal(ids, ref["ids"])  # long, accented, emoji, empty: CLIPTokenizer's ids
    assert (image - ref["image"]).abs().max() < 1e-5 and (text - ref["text"]).abs().max() < 1e-5
    assert torch.equal(model.enc["S"].trunk.embeddings.patch_embedding.weight, model.enc["G"].trunk.embeddings.patch_embedding.weight)  # one tower
    # its image processor's resizing (bicubic short side, centre crop), exactly: float rounding aside
    assert (fixture_pixels("clip").float() - (ref["processor_pixels"] * std + mean) * 255).abs().max() < 1e-3
    with torch.no_grad():
        assert cosines(model.enc["G"](fixture_pixels("clip")), ref["processor_image"]).min() > 0.9999

def test_the_authors_released_model_converts_to_their_embeddings(tmp_path, capsys):
    ref, folder = references()["authors"], clip_folder(tmp_path)
    clip_state = mml.read_safetensors(folder / "model.safetensors")
    torch.save(authors_weights(clip_state), tmp_path / "weights_best.pth")
    run("convert", tmp_path / "weights_best.pth", "--clip", folder, "--out", tmp_path / "authors.pt")
    model, saved = restored(tmp_path / "authors.pt"), torch.load(tmp_path / "authors.pt", weights_only=True)
    assert mml.Config(**saved["config"]).preset == "" and saved["config"]["gps_scaling"] is False
    images = fixture_pixels("squash")
    with torch.no_grad():
        ours = {"G": model.enc["G"](images), "S": model.enc["S"](images), "C": model.enc["C"](LATLON),
                "T": model.enc["T"](mml.tokenize(Tokenizer.from_str(saved["tokenizer"]), SENTENCES))}
    for m in "GSTC":
        assert cosines(ours[m], ref[m]).min() > 0.9999, m
    # their file with another CLIP in it, a key missing, or of the wrong form: one line, nothing written
    wrong = authors_weights({k: v + 1e-3 if k.startswith("vision_model.") else v for k, v in clip_state.items()})
    partial = authors_weights(clip_state)
    del partial["text_projector.2.bias"]
    state = authors_weights(clip_state)
    for broken, message in ((wrong, "its image_encoder.clip_model is not the CLIP of"),
                            (partial, "enc.T.head.2.bias is absent in the file and (512,) in the model"),
                            (state | {"logit_scale": 2.5}, "entry 'logit_scale' is not a named real tensor"),
                            (state | {"logit_scale": "2.5"}, "entry 'logit_scale' is not a named real tensor"),
                            (state | {"logit_scale": torch.tensor(2.5 + 0j)}, "entry 'logit_scale' is not a named real tensor"),
                            (state | {7: torch.zeros(1)}, "entry 7 is not a named real tensor"),
                            (state | {(1, 2): torch.zeros(1)}, "entry (1, 2) is not a named real tensor")):
        torch.save(broken, tmp_path / "w.pth")
        assert message in fails_in_one_line(capsys, "convert", tmp_path / "w.pth", "--clip", folder, "--out", tmp_path / "x.pt")
        assert not (tmp_path / "x.pt").exists()
    assert "weights_best.pth" in fails_in_one_line(capsys, "convert", tmp_path / "nothing", "--out", tmp_path / "x.pt")

def test_the_paper_preset_trains_on_frozen_towers_and_evaluates(world, tmp_path, capsys):
    folder = clip_folder(tmp_path)
    run("train", "--preset", "paper", "--clip", os.path.relpath(folder), "--data", world, "--out", tmp_path / "run",
        "--epochs", 2, "--batch-size", 16, "--workers", 0, "--device", "cpu", "--log-every", 1)
    first = capsys.readouterr().out.splitlines()[0]  # the first line names every setting the preset chose
    for setting in ("--image-backbone clip", "--head mlp", "--gps-scaling False", "--resize squash", "--lr 0.0001",
                    "--recipe paper", "--select loss", "--holdout authors", "--batch-size 16"):  # and what the command line overrode
        assert setting in first, (setting, first)
    saved = torch.load(tmp_path / "run/last.pt", weights_only=True)
    cfg = mml.Config(**saved["config"])
    assert (cfg.img_size, cfg.max_len, cfg.embed_dim, cfg.gps_width, cfg.freeze, cfg.clip) == (32, 77, 512, 1024, "GST", str(folder))
    run("bench", "--preset", "paper", "--clip", folder, "--data", world, "--phases", "steps", "--batch-size", 4, "--workers", 0)
    assert "H 32" in capsys.readouterr().out  # the preset's towers, fed ids of their vocabulary
    assert tiny_config(world, "--clip", str(folder), "--image-backbone", "resnet18", "--text-backbone", "clip").img_size == 224  # torchvision's
    assert not [k for k in saved["model"] if ".trunk." in k]  # what trains, not the towers
    assert saved["towers"]["digest"] == mml.load_clip_weights(str(folder))[1]
    assert {r["lr"] for r in log_records(tmp_path / "run") if "lr" in r} == {1e-4}  # no schedule
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
    assert re.search("are not the CLIP towers .*--clip", fails_in_one_line(capsys, "eval", "--ckpt", tmp_path / "run/best.pt", "--clip", other, "--workers", 0))
    # --resume with another preset is the checkpoint's option, differing
    err = fails_in_one_line(capsys, "train", "--out", tmp_path / "run", "--resume", "--preset", "")
    assert "--preset : " in err and "was trained with paper" in err
    # its CLIP folder moved: --clip names where, the towers' digest says whether they are the same
    run("train", "--out", tmp_path / "run", "--resume", "--epochs", 3, "--clip", clip_folder(tmp_path / "moved"))

def test_frozen_towers_run_once_per_image_in_evaluation(world, tmp_path, monkeypatch):
    """Tower outputs cached in CACHE/SIZE-RESIZE/towers/: a second eval runs heads only; a damaged or mistyped one is rebuilt."""
    run("convert", clip_folder(tmp_path), "--out", tmp_path / "clip.pt")
    calls, real = [], mml.Encoder.features
    monkeypatch.setattr(mml.Encoder, "features", lambda self, x: calls.append(len(x)) or real(self, x))
    argv = ["eval", "--ckpt", tmp_path / "clip.pt", "--data", world, "--tasks", "G2S,S2G", "--workers", 0, "--cache", tmp_path / "cache"]
    run(*argv, "--out", tmp_path / "a")
    images = sum(calls)
    run(*argv, "--out", tmp_path / "b")
    assert images > 0 and sum(calls) == images  # the second: heads only
    tasks = [json.loads((tmp_path / f"{d}/eval/metrics.json").read_text())["tasks"] for d in "ab"]
    assert tasks[0]["G2S"]["official"] == tasks[1]["G2S"]["official"]
    files = sorted((tmp_path / "cache/32-clip/towers").iterdir())
    assert len(files) == 4  # the query's and the index's photos and tiles
    for n, f in enumerate(files):  # half cut short, half of another dtype
        if n % 2:
            f.write_bytes(f.read_bytes()[:100])
        else:
            cached = torch.load(f, weights_only=True)
            torch.save(cached | {"tensor": cached["tensor"].double()}, f)
    run(*argv, "--out", tmp_path / "c")
    assert sum(calls) == 2 * images
    assert json.loads((tmp_path / "c/eval/metrics.json").read_text())["tasks"]["S2G"] == tasks[0]["S2G"]

def test_the_towers_digest_covers_their_config_and_dtypes(world, tmp_path, capsys):
    """Same bytes under another config.json (4 heads, gelu) or dtype are other towers: refused; too big ones unallocated."""
    folder = clip_folder(tmp_path)
    run("convert", folder, "--out", tmp_path / "clip.pt")
    digest = mml.load_clip_weights(str(folder))[1]
    argv = ["eval", "--ckpt", tmp_path / "clip.pt", "--data", world, "--tasks", "G2S", "--workers", 0, "--clip"]
    for part, key, value in (("vision_config", "num_attention_heads", 4), ("text_config", "hidden_act", "gelu")):
        other = clip_folder(tmp_path / key)
        edit(lambda c: c[part].update({key: value}))(other)
        assert mml.load_clip_weights(str(other))[1] != digest
        assert re.search("are not the CLIP towers .*--clip", fails_in_one_line(capsys, *argv, other))
    relabelled = clip_folder(tmp_path / "dtype", drop=["pytorch_model.bin"])
    data = (relabelled / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"F32"', b'"I32"', 1)  # one tensor's bytes read as int32
    (relabelled / "model.safetensors").write_bytes(data[:8] + header + data[8 + n:])
    assert mml.load_clip_weights(str(relabelled))[1] != digest
    huge = clip_folder(tmp_path / "huge")
    edit(lambda c: c["text_config"].update(HUGE_TEXT))(huge)
    t0 = time.time()
    assert "parameters, over the 3,000,000,000 allowed" in fails_in_one_line(capsys, *argv, huge)
    assert time.time() - t0 < 30

def fifo_or_zero(path: Path, kind: str):
    path.unlink()
    if kind == "nested":
        path.write_text("[" * 100_000)
    else:
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

# a text tower whose sizes are each within CLIP_BOUNDS: 200 billion parameters together
HUGE_TEXT = {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 64, "num_attention_heads": 256}

def edit(change):
    """A function of a CLIP folder that applies change(config) to its parsed config.json."""
    def apply(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return apply

@pytest.mark.parametrize("break_it,message", [
    (lambda f: (f / "config.json").unlink(), ("config.json: not a readable CLIP config", "not a model `convert` knows: a Hugging Face CLIP folder (config.json)")),
    (lambda f: [(f / w).unlink() for w in ("model.safetensors", "pytorch_model.bin")], "no model.safetensors or pytorch_model.bin"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json: not a readable tokenizer"),
    (lambda f: (f / "config.json").write_text('{"model_type": "siglip"}'), "model_type 'siglip'; supported: Hugging Face CLIPModel"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]), "not a readable safetensors file"),
    # only bounded regular files are read: a FIFO or /dev/zero never hangs; nor does JSON nested 100,000 deep
    (lambda f: fifo_or_zero(f / "config.json", "fifo"), "config.json: not a readable CLIP config (ValueError: not a regular file"),
    (lambda f: fifo_or_zero(f / "config.json", "zero"), "config.json: not a readable CLIP config (ValueError: not a regular file"),
    (lambda f: fifo_or_zero(f / "tokenizer.json", "fifo"), "tokenizer.json: not a readable tokenizer (not a regular file"),
    (lambda f: fifo_or_zero(f / "tokenizer.json", "zero"), "tokenizer.json: not a readable tokenizer (not a regular file"),
    (lambda f: fifo_or_zero(f / "config.json", "nested"), "config.json: not a readable CLIP config (RecursionError"),
    # sizes past the bounds far above every CLIP, types and settings the towers do not implement
    (edit(lambda c: c["vision_config"].update(num_hidden_layers=10**6)), "vision_config num_hidden_layers 1000000: expected an integer in [1, 64]"),
    (edit(lambda c: c["text_config"].update(hidden_size=10**9)), "text_config hidden_size 1000000000: expected an integer in [1, 16,384]"),
    (edit(lambda c: c["text_config"].update(vocab_size=10**9)), "vocab_size 1000000000"),
    (edit(lambda c: c["text_config"].update(max_position_embeddings=10**9)), "max_position_embeddings 1000000000"),
    (edit(lambda c: c.update(projection_dim=10**9)), "projection_dim 1000000000: expected an integer in [1, 16,384]"),
    (edit(lambda c: c["vision_config"].update(image_size=10**9)), "image_size 1000000000"),
    (edit(lambda c: c.update(projection_dim=True)), "projection_dim True: expected an integer"),
    (edit(lambda c: c.update(vision_config=[1, 2])), "vision_config is not an object of sizes"),
    (edit(lambda c: c.update(vision_config="big")), "vision_config is not an object of sizes"),
    (edit(lambda c: c["vision_config"].update(hidden_act="silu")), "vision_config hidden_act 'silu'"),
    (edit(lambda c: c["text_config"].update(layer_norm_eps=float("nan"))), "text_config hidden_act 'quick_gelu', heads 2, layer_norm_eps nan: not what these towers implement"),
    (edit(lambda c: c["vision_config"].update(layer_norm_eps=-1e-5)), "layer_norm_eps -1e-05: not what these towers implement"),
    (edit(lambda c: c["text_config"].update(vocab_size=100)), "tokenizer.json: ids up to 663, end-of-text 663: not CLIP's tokenizer for a text tower of 100"),
    (lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text().replace('"!": 0,', '"!": 100000,')), "tokenizer.json: ids up to 100000"),  # 664 ids
    (edit(lambda c: c["text_config"].update(HUGE_TEXT)), "parameters, over the 3,000,000,000 allowed"),  # sized before it is built
])
def test_a_bad_clip_folder_is_one_line_within_seconds_and_leaves_nothing(world, tmp_path, capsys, break_it, message):
    """convert of the folder and train --preset paper on it: one line naming file and expectation, in seconds, nothing made."""
    folder = clip_folder(tmp_path)
    break_it(folder)
    for argv, made in ((["convert", folder, "--out", tmp_path / "x.pt"], tmp_path / "x.pt"),
                       (["train", "--preset", "paper", "--clip", folder, "--data", world, "--out", tmp_path / "run", "--workers", 0], tmp_path / "run")):
        t0 = time.time()
        with within(30):
            err = fails_in_one_line(capsys, *argv)
        assert (message if isinstance(message, str) else message[argv[0] == "convert"]) in err and time.time() - t0 < 30, (argv, err)
        assert not made.exists()

def write_safetensors(path: Path, header, data: bytes = b"\0" * 64, n: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if n is None else n).to_bytes(8, "little") + raw + data)

@pytest.mark.parametrize("header,n,message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 10**12, "a header of 1,000,000,000,000 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 2**63 - 1, "a header of 9,223,372,036,854,775,807 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, None, "a: its dtype, shape or bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, None, "a: its dtype, shape or bytes"),  # 8 bytes needed
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, None, "overlaps another tensor's bytes"),
    ({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, None, "a: its dtype, shape or bytes"),
    (b"[" * 100_000, None, "RecursionError"),
    ([1, 2], None, "its header is not an object"),
])
def test_safetensors_byte_ranges_are_checked(tmp_path, header, n, message):
    write_safetensors(tmp_path / "w.safetensors", header, n=n)
    with pytest.raises(mml.UserError, match="not a readable safetensors file") as e:
        mml.read_safetensors(tmp_path / "w.safetensors")
    assert message in str(e.value) and "\n" not in str(e.value)

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
    assert "convert: name what to convert (SOURCE)" in fails_in_one_line(capsys, "convert", "--out", tmp_path / "y.pt")
    assert not (tmp_path / "y.pt").exists()

# ---- several processes --------------------------------------------------------------------

def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]

def ddp_setup():
    """A small four-modality model and one fixed global batch of 8."""
    cfg = mml.parse_args(["train", *TINY])[1]
    torch.manual_seed(0)
    return cfg, mml.MML(cfg), fixed_batch()

def loss_and_grads(model, emb, scale) -> dict:
    total, parts = mml.contrastive_loss(emb, scale, mml.loss_pairs("GSTC"))
    model.zero_grad()
    total.backward()
    return {"loss": torch.stack([total.detach(), *(p.detach() for p in parts.values())]), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}

def two_process_worker(rank: int, ddp_port: int, port: int, argv: list, out: str):
    """The loss and gradients of a fixed batch's half (ddp.pt), then `train` recording `augment`'s input ({rank}.pt)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ddp_port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    cfg, model, batch = ddp_setup()
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # kept alive: its hooks all-reduce in backward
    emb, scale = ddp({m: x[4 * rank:4 * rank + 4] for m, x in batch.items()})  # this process's half
    r = loss_and_grads(model, emb, scale)
    dist.all_reduce(r["loss"])
    r["loss"] /= 2  # the mean of the two halves' losses is the global batch's loss
    # a side of fewer items than processes: process 0 embeds none of it
    assert mml.embed(lambda x: 2 * x, torch.ones(1, 2), "x", cfg, torch.device("cpu")).tolist() == [[2.0, 2.0]]
    if rank == 0:
        torch.save(r, f"{out}/ddp.pt")
    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    record_training_inputs([*argv, "--out", f"{out}/run{rank}"], Path(f"{out}/{rank}.pt"))

@pytest.fixture(scope="session")
def two_processes(world, tmp_path_factory) -> Path:
    """Two gloo processes spawned once for two tests: a halved batch's loss and gradients (ddp.pt), then `train` (0.pt, 1.pt)."""
    out, ports = tmp_path_factory.mktemp("two"), [free_port()]
    while len(ports) < 2:
        ports = list({ports[0], free_port()})
    procs = torch.multiprocessing.spawn(two_process_worker, args=(*ports, ["train", "--data", world, *TINY, "--epochs", 1], str(out)), nprocs=2, join=False)
    for _ in range(60):  # a stuck process group fails instead of hanging
        if procs.join(timeout=2):
            return out
    for p in procs.processes:
        p.kill()
    pytest.fail("two gloo processes did not finish in 120 s")

def test_two_processes_give_the_gradients_of_one_big_batch(two_processes):
    ddp = torch.load(two_processes / "ddp.pt")
    _, model, batch = ddp_setup()
    one = loss_and_grads(model, *model(batch))
    assert torch.allclose(ddp["loss"], one["loss"], atol=1e-5)
    for name, g in one["grads"].items():
        assert torch.allclose(ddp["grads"][name], g, atol=1e-5), name
    assert one["grads"]["logit_scale"].abs() > 0

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", HERE / "mml.py"]

def test_torchrun_eval_equals_one_process(world, trained, evaluated, tmp_path):
    argv = ["eval", "--data", world, "--ckpt", trained / "best.pt", "--workers", 0, "--device", "cpu", "--tasks", "G2S,S2G,S2C,T2S-first", "--out", tmp_path]
    done = subprocess.run([str(a) for a in TORCHRUN + argv], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((d / "eval/metrics.json").read_text())["tasks"] for d in (evaluated[0], tmp_path))
    for task in two:
        for protocol in ("official", "strict", "geo"):
            if protocol in one[task]:
                assert one[task][protocol] == pytest.approx(two[task][protocol], abs=1e-9), (task, protocol)
        assert read_rows(evaluated[0] / f"eval/{task}.csv") == read_rows(tmp_path / f"eval/{task}.csv")
    assert list(two) == ["G2S", "S2G", "S2C", "T2S-first"]

def test_torchrun_processes_stop_together_on_sigterm(world, tmp_path):
    """Both stop after one agreed step, 0 saves the raw model (no "module."); a resume on 1 process matches an uninterrupted run."""
    args = ["--data", world, *TINY, "--batch-size", 8, "--epochs", 1, "--lr", "1e-3"]
    logged, output = train_until_sigterm([*TORCHRUN, "train", "--out", tmp_path / "two", *args], 3, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "--resume`" in output, output
    stopped = torch.load(tmp_path / "two/last.pt", weights_only=True)
    assert stopped["step"] >= logged >= 3
    assert set(stopped["model"]) == set(mml.MML(tiny_config(world)).state_dict())
    run("train", "--out", tmp_path / "two", "--resume")
    run("train", "--out", tmp_path / "one", *args)
    a, b = (torch.load(tmp_path / x / "last.pt", weights_only=True) for x in ("one", "two"))
    assert a["step"] == b["step"]
    assert all(torch.allclose(v, b["model"][k], atol=1e-4) for k, v in a["model"].items())

# ---- GPU (run where one is visible; `python mml.py bench` measures the speed) -------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

@gpu
def test_gpu_bf16_step_is_close_to_fp32_and_keeps_fourier_features_in_fp32():
    cfg, model, batch = ddp_setup()
    device = torch.device("cuda")
    model, batch = model.to(device), mml.batch_to(batch, device)
    enc = model.enc["C"].LocEnc2.capsule[0]  # sigma = 256: phases of thousands of radians
    v = mml.equal_earth(batch["C"])
    with torch.autocast("cuda", dtype=torch.bfloat16), mml.matmul_precision("high"):  # as in training
        in_autocast = enc(v)
    assert in_autocast.dtype == torch.float32 and torch.equal(in_autocast, enc(v))  # not TF32's phases either
    losses = {}
    for bf16 in (False, True):
        with mml.autocast_for(device, dataclasses.replace(cfg, bf16=bf16)):
            emb, scale = model(batch)
        loss = mml.contrastive_loss(emb, scale, mml.loss_pairs("GSTC"))[0]
        model.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        losses[bf16] = loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=0.02)

@gpu
def test_gpu_ranking_equals_cpu():
    """Small-integer embeddings: scores exact in float32 on both devices (ties abound): the counts must agree exactly."""
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
    run("train", "--data", world, "--out", tmp_path, *["cuda" if a == "cpu" else a for a in TINY], "--epochs", 2, "--workers", 2)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2 * STEPS
    run("eval", "--data", world, "--ckpt", tmp_path / "best.pt", "--device", "cuda", "--workers", 2)
    tasks = json.loads((tmp_path / "eval/metrics.json").read_text())["tasks"]
    assert len(tasks) == 13 and all(0 <= r["strict"]["R@10"] <= r["official"]["R@10"] <= 100 for r in tasks.values())
