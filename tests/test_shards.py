"""Shard building and checking: every input kind, img2dataset layout, failures, resume, determinism."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from mmrl.cli import main
from mmrl.data import ImageTextRecord
from mmrl.data.check import check_shards, sizes_from_stats
from mmrl.data.shards import build_shards
from mmrl.data.sources import DataFormatError, read_coco, read_folder, read_karpathy, read_table


def make_image(path: Path, size=(320, 200), color=(200, 30, 30), mode="RGB", **save_kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, color)
    img.save(path, **save_kw)
    return path


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    for i in range(12):
        make_image(root / f"img{i:02d}.png", size=(300 + 10 * i, 200), color=(20 * i, 100, 200 - 10 * i))
    return root


def read_back(out_dir):
    """Samples in shard order through plain webdataset: [(key, caption, json, image size)]."""
    urls = sorted(str(p) for p in Path(out_dir).glob("*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    return [(s["__key__"], s["txt"], s["json"], s["jpg"].size) for s in ds]


def test_table_round_trip_and_layout(tmp_path, image_dir):
    table = tmp_path / "data.csv"
    rows = ["image,caption"] + [f"images/img{i:02d}.png,caption number {i}" for i in range(12)]
    table.write_text("\n".join(rows) + "\n")
    summary = build_shards(read_table(table), tmp_path / "out", shard_size=5, workers=2, progress=False)
    assert summary == {"out": str(tmp_path / "out"), "shards": 3, "reused": 0, "samples": 12, "failures": {}}
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json",
                     "00002.tar", "00002_stats.json", "sizes.json"]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 2}
    samples = read_back(tmp_path / "out")  # crosses two shard boundaries with webdataset 1.x
    assert [s[0] for s in samples] == [f"{i // 5:05d}{i % 5}" for i in range(12)]
    assert [s[1] for s in samples] == [f"caption number {i}" for i in range(12)]
    key, caption, meta, size = samples[11]
    assert meta["original_width"] == 300 + 110 and meta["original_height"] == 200
    assert max(size) == 256 and size == (meta["width"], meta["height"])  # max side 256, aspect kept
    stats = json.loads((tmp_path / "out" / "00002_stats.json").read_text())
    assert stats["count"] == 2 and stats["successes"] == 2 and stats["status_dict"] == {"success": 2}


def test_tsv_parquet_and_custom_columns(tmp_path, image_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.tsv").write_text("path\ttext\n"
                                    + "".join(f"images/img{i:02d}.png\tcap, with comma {i}\n" for i in range(3)))
    records = read_table(tmp_path / "d.tsv", image_col="path", caption_col="text")
    assert [r.caption for r in records] == [f"cap, with comma {i}" for i in range(3)]
    assert records[0].image == str(tmp_path / "images" / "img00.png")
    pq.write_table(pa.table({"image": [str(image_dir / "img01.png")], "caption": ["from parquet"]}),
                   tmp_path / "d.parquet")
    assert read_table(tmp_path / "d.parquet")[0].captions == ["from parquet"]
    with pytest.raises(DataFormatError, match=r"d.tsv: column 'image' not found .*--image-col"):
        read_table(tmp_path / "d.tsv")


def test_folder_round_trip(tmp_path, image_dir):
    for i in range(12):
        if i != 3:
            (image_dir / f"img{i:02d}.txt").write_text(f"folder caption {i}\n")
    summary = build_shards(read_folder(image_dir), tmp_path / "out", shard_size=100, progress=False)
    assert summary["samples"] == 11 and summary["failures"] == {"missing_caption": 1}  # counted, not silent
    assert [s[1] for s in read_back(tmp_path / "out")] == [f"folder caption {i}" for i in range(12) if i != 3]


def coco_fixture(tmp_path, image_dir):
    """captions_train2014.json schema (info, images, licenses, annotations)."""
    data = {
        "info": {"description": "COCO 2014 Dataset", "year": 2014, "version": "1.0"},
        "images": [{"license": 5, "file_name": f"img{i:02d}.png", "coco_url": "", "height": 200, "width": 300,
                    "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": 1000 + i} for i in range(3)],
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 5, "name": "x"}],
        "annotations": [{"image_id": 1000 + (j % 3), "id": 48 + j, "caption": f"coco caption {j}"} for j in range(7)],
    }
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_round_trip(tmp_path, image_dir):
    records = read_coco(coco_fixture(tmp_path, image_dir), image_dir)
    assert [r.captions for r in records] == [["coco caption 0", "coco caption 3", "coco caption 6"],
                                             ["coco caption 1", "coco caption 4"], ["coco caption 2", "coco caption 5"]]
    build_shards(records, tmp_path / "out", progress=False)
    samples = read_back(tmp_path / "out")
    assert [s[1] for s in samples] == ["coco caption 0", "coco caption 1", "coco caption 2"]
    assert samples[0][2]["captions"] == records[0].captions and samples[0][2]["image_id"] == 1000


def karpathy_fixture(tmp_path, with_filepath=True):
    """dataset_coco.json schema (Flickr30k's lacks filepath and cocoid)."""
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "train"]):
        img = {"sentids": [2 * i, 2 * i + 1], "filename": f"img{i:02d}.png", "imgid": i, "split": split,
               "sentences": [{"tokens": ["a", "b"], "raw": f"karpathy {i} sentence {k}", "imgid": i,
                              "sentid": 2 * i + k} for k in range(2)]}
        if with_filepath:
            img.update(filepath="sub", cocoid=5000 + i)
        images.append(img)
    path = tmp_path / ("dataset_coco.json" if with_filepath else "dataset_flickr30k.json")
    path.write_text(json.dumps({"images": images, "dataset": "coco" if with_filepath else "flickr30k"}))
    return path


def test_karpathy_splits_and_round_trip(tmp_path, image_dir):
    (tmp_path / "root" / "sub").mkdir(parents=True)
    for i in range(5):
        make_image(tmp_path / "root" / "sub" / f"img{i:02d}.png")
    records = read_karpathy(karpathy_fixture(tmp_path), tmp_path / "root")  # default train + restval
    assert [r.meta["imgid"] for r in records] == [0, 1, 4] and records[0].meta["cocoid"] == 5000
    assert records[0].image == str(tmp_path / "root" / "sub" / "img00.png")
    assert [r.meta["split"] for r in read_karpathy(karpathy_fixture(tmp_path), tmp_path, ["test"])] == ["test"]
    flickr = read_karpathy(karpathy_fixture(tmp_path, with_filepath=False), image_dir, ["test"])
    assert flickr[0].image == str(image_dir / "img03.png")  # no filepath field
    summary = build_shards(records, tmp_path / "out", progress=False)
    assert summary["samples"] == 3
    assert [s[1] for s in read_back(tmp_path / "out")] == ["karpathy 0 sentence 0", "karpathy 1 sentence 0",
                                                           "karpathy 4 sentence 0"]
    with pytest.raises(DataFormatError, match="unknown split"):
        read_karpathy(karpathy_fixture(tmp_path), tmp_path, ["dev"])


def test_malformed_annotations_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(DataFormatError, match="bad.json: not valid JSON"):
        read_coco(bad, tmp_path)
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(DataFormatError, match=r"bad.json: images\[0\] has no field 'file_name'"):
        read_coco(bad, tmp_path)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                               "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(DataFormatError, match=r"annotations\[0\].image_id 2 is not in images"):
        read_coco(bad, tmp_path)
    bad.write_text(json.dumps({"images": [{"split": "train", "filename": "a.jpg", "sentences": "x"}]}))
    with pytest.raises(DataFormatError, match=r"images\[0\].sentences should be list"):
        read_karpathy(bad, tmp_path)


def test_bad_images_skipped_and_counted(tmp_path, image_dir):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = io.BytesIO()
    Image.new("RGB", (400, 400), (1, 2, 3)).save(truncated, "JPEG")
    (tmp_path / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    records = [
        ImageTextRecord(str(image_dir / "img00.png"), ["good"]),
        ImageTextRecord(str(tmp_path / "corrupt.jpg"), ["corrupt"]),
        ImageTextRecord(str(tmp_path / "nope.jpg"), ["missing file"]),
        ImageTextRecord(str(image_dir / "img01.png"), []),
        ImageTextRecord(str(tmp_path / "truncated.png"), ["truncated"]),
        ImageTextRecord(str(image_dir / "img02.png"), ["good too"]),
    ]
    summary = build_shards(records, tmp_path / "out", progress=False)
    assert summary["samples"] == 2
    assert summary["failures"] == {"failed_to_decode": 2, "failed_to_read": 1, "missing_caption": 1}
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert {f["key"]: f["reason"] for f in stats["failures"]} == {
        "000000001": "failed_to_decode", "000000002": "failed_to_read", "000000003": "missing_caption",
        "000000004": "failed_to_decode"}
    assert [s[0] for s in read_back(tmp_path / "out")] == ["000000000", "000000005"]


def test_alpha_flattened_and_exif_orientation_applied(tmp_path):
    make_image(tmp_path / "alpha.png", size=(64, 32), color=(0, 0, 0, 0), mode="RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img = Image.new("RGB", (400, 100), (0, 200, 0))
    img.paste((255, 0, 0), (0, 0, 40, 100))  # red strip on the left
    img.save(tmp_path / "rotated.jpg", exif=exif)
    records = [ImageTextRecord(str(tmp_path / "alpha.png"), ["alpha"]),
               ImageTextRecord(str(tmp_path / "rotated.jpg"), ["rot"])]
    build_shards(records, tmp_path / "out", max_size=200, progress=False)
    urls = [str(tmp_path / "out" / "00000.tar")]
    alpha, rotated = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert alpha["jpg"].getpixel((10, 10)) == pytest.approx((255, 255, 255), abs=3)
    assert rotated["jpg"].size == (50, 200)  # portrait after EXIF rotation, longer side 200
    assert (rotated["json"]["original_width"], rotated["json"]["original_height"]) == (100, 400)
    r, g, b = rotated["jpg"].getpixel((25, 5))  # the red strip is now at the top
    assert r > 200 and g < 60


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}


def test_deterministic(tmp_path, image_dir):
    records = read_folder(image_dir)
    for r in records:
        r.captions = [Path(r.image).stem]
    build_shards(records, tmp_path / "a", shard_size=4, workers=2, progress=False)
    build_shards(records, tmp_path / "b", shard_size=4, workers=1, progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "sizes.json").read_text() == (tmp_path / "b" / "sizes.json").read_text()


BUILD_SCRIPT = """
import sys, time
from pathlib import Path
import mmrl.data.shards as shards
from mmrl.data import ImageTextRecord
records = [ImageTextRecord(p, [Path(p).stem]) for p in sys.argv[2:]]
original = shards.encode_image
def slow(*a, **k):
    time.sleep(0.15)
    return original(*a, **k)
shards.encode_image = slow
shards.build_shards(records, sys.argv[1], shard_size=3, workers=1, progress=False)
"""


@pytest.mark.slow
def test_interrupted_build_resumes_to_the_same_result(tmp_path, image_dir):
    paths = [str(p) for p in sorted(image_dir.glob("*.png"))]
    records = [ImageTextRecord(p, [Path(p).stem]) for p in paths]
    build_shards(records, tmp_path / "whole", shard_size=3, workers=1, progress=False)

    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(out), *paths])
    deadline = time.time() + 120
    while not (out / "00001_stats.json").exists():  # two shards finished, the third in progress
        assert time.time() < deadline and proc.poll() is None, "build did not progress"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "00003_stats.json").exists()
    summary = build_shards(records, out, shard_size=3, workers=2, progress=False)
    assert summary["reused"] >= 2 and summary["samples"] == 12
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temp files cleaned up
    # a changed input redoes only the shards whose records changed
    records[7].captions = ["changed"]
    summary = build_shards(records, out, shard_size=3, progress=False)
    assert summary["reused"] == 3


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def jpeg_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, "JPEG")
    return buf.getvalue()


def test_check_reports_bad_samples_and_unreadable_shards(tmp_path, capsys):
    good = jpeg_bytes()
    write_tar(tmp_path / "00000.tar", [("a.jpg", good), ("a.txt", b"fine"), ("b.jpg", b"garbage"),
                                       ("b.txt", b"bad image"), ("c.jpg", good), ("d.txt", b"no image"),
                                       ("e.jpg", good), ("e.txt", b"  ")])
    write_tar(tmp_path / "00001.tar", [(f"k{i}.jpg", good) for i in range(20)]
                                      + [(f"k{i}.txt", b"x") for i in range(20)])
    data = (tmp_path / "00001.tar").read_bytes()
    for cut in (512 * 7, 512 * 7 + 100):  # at a member boundary, and inside a member's data
        (tmp_path / "00001.tar").write_bytes(data[:cut])
        assert "unreadable" in (check_shards(str(tmp_path / "00001.tar"), progress=False)[0].error or "")
    reports = {Path(r.path).name: r for r in check_shards(str(tmp_path), progress=False)}
    assert reports["00000.tar"].samples == 1 and reports["00000.tar"].ok
    assert {b["key"].split("/")[-1]: b["reason"] for b in reports["00000.tar"].bad} == {
        "b": "undecodable_image", "c": "missing_caption", "d": "missing_image", "e": "empty_caption"}
    assert not reports["00001.tar"].ok and "unreadable" in reports["00001.tar"].error
    assert json.loads((tmp_path / "sizes.json").read_text())["00000.tar"] == 1
    assert main(["shard", "check", str(tmp_path), "--no-progress"]) == 1  # non-zero: a shard is unreadable
    out = capsys.readouterr().out
    assert "bad sample" in out and "1 unreadable shards" in out


def test_sizes_from_img2dataset_stats(tmp_path):
    for i, successes in enumerate([9, 7]):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")  # never opened
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps({
            "count": 10, "successes": successes, "failed_to_download": 10 - successes, "failed_to_resize": 0,
            "duration": 1.5, "status_dict": {"success": successes}}))
    assert sizes_from_stats(tmp_path) == {"00000.tar": 9, "00001.tar": 7}
    assert main(["shard", "check", str(tmp_path), "--from-stats"]) == 0
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 9, "00001.tar": 7}


def test_cli_build_and_errors(tmp_path, image_dir, capsys):
    (tmp_path / "d.csv").write_text("image,caption\nimages/img00.png,hello\nimages/img01.png,world\n")
    assert main(["shard", "build", "--csv", str(tmp_path / "d.csv"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert "2 samples written, 0 skipped" in capsys.readouterr().out
    assert main(["shard", "build", "--coco", str(tmp_path / "d.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "--images ROOT is required" in capsys.readouterr().err
    assert main(["shard", "build", "--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.csv: no such file" in err[0]


def test_shard_captions_lists_every_caption_once(tmp_path, image_dir):
    from mmrl.data import ImageTextRecord
    from mmrl.data.caption_index import shard_captions

    images = sorted(image_dir.glob("*.png"))[:3]
    records = [ImageTextRecord(str(images[0]), ["a red square", "red", "a square"], "t"),
               ImageTextRecord(str(images[1]), ["a blue circle", "red"], "t"),
               ImageTextRecord(str(images[2]), ["a red square"], "t")]
    build_shards(records, tmp_path / "a", shard_size=2, progress=False)
    build_shards(records[1:], tmp_path / "b", shard_size=2, progress=False)
    train = f"{tmp_path / 'a'}::{tmp_path / 'b'}"
    multi = shard_captions(train, multi_caption=True, max_samples=100)
    assert sorted(multi) == sorted({"a red square", "red", "a square", "a blue circle"}) and len(multi) == 4
    assert sorted(shard_captions(train, multi_caption=False, max_samples=100)) == ["a blue circle", "a red square"]
    assert shard_captions(train, multi_caption=True, max_samples=4) is None  # 5 samples: too many to read first
    (tmp_path / "b" / "sizes.json").unlink()
    assert shard_captions(train, multi_caption=True, max_samples=100) is None  # unsized: not read up front


def test_csv_unquoted_delimiter_is_an_error_or_joined(tmp_path, image_dir, capsys):
    table = tmp_path / "pairs.csv"
    rows = ["image,caption"] + [f"images/img{i:02d}.png,caption {i}" for i in range(5)]
    rows.insert(6, "images/img05.png,A frog, sitting on a log")  # line 7 of the file
    table.write_text("\n".join(rows) + "\n")
    message = (f"{table}: row 7 has 3 fields, the header has 2 (image, caption); quote captions that contain "
               "the delimiter, or pass --join-extra-fields to join them into the caption")
    with pytest.raises(DataFormatError) as err:
        read_table(table)
    assert str(err.value) == message
    out = tmp_path / "out"
    assert main(["shard", "build", "--csv", str(table), "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"mmrl shard: error: {message}"]
    assert not out.exists()

    assert main(["shard", "build", "--csv", str(table), "--out", str(out), "--no-progress",
                 "--join-extra-fields"]) == 0
    captions = [s[1] for s in read_back(out)]
    assert captions == [f"caption {i}" for i in range(5)] + ["A frog, sitting on a log"]
    assert read_back(out)[-1][2]["caption"] == "A frog, sitting on a log"

    tsv = tmp_path / "pairs.tsv"  # TSV the same; a quoted caption is fine either way
    tsv.write_text("caption\timage\nA frog\tsitting\timages/img00.png\n\"quoted\ttab\"\timages/img01.png\n")
    with pytest.raises(DataFormatError, match=r"pairs.tsv: row 2 has 3 fields, the header has 2 \(caption, image\)"):
        read_table(tsv)
    with pytest.raises(DataFormatError, match="--join-extra-fields needs the caption column last"):
        read_table(tsv, join_extra_fields=True)
    tsv.write_text("image\tcaption\nimages/img00.png\tA frog\tsitting\n\"images/img01.png\"\t\"quoted\ttab\"\n")
    assert [r.caption for r in read_table(tsv, join_extra_fields=True)] == ["A frog\tsitting", "quoted\ttab"]
    assert main(["shard", "build", "--folder", str(image_dir), "--out", str(tmp_path / "f"),
                 "--join-extra-fields"]) == 2
    assert "--join-extra-fields applies to --csv" in capsys.readouterr().err


def test_csv_byte_order_mark_and_undecodable_bytes(tmp_path, image_dir):
    table = tmp_path / "pairs.csv"
    table.write_bytes(b"\xef\xbb\xbfimage,caption\r\nimages/img00.png,caf\xc3\xa9\r\nimages/img01.png,two\r\n")
    records = read_table(table)  # the BOM is not part of the first column's name
    assert [r.caption for r in records] == ["caf\u00e9", "two"]
    assert records[0].image == str(image_dir / "img00.png")
    lines = [b"image,caption"] + [b"images/img%02d.png,caption %d" % (i, i) for i in range(11)]
    lines[11] = b"img,caf\xe9"  # Latin-1, line 12
    table.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFormatError) as err:
        read_table(table)
    assert str(err.value) == f"{table}: row 12: not UTF-8 (byte 0xe9 at column 8)"


def test_replaced_image_rebuilds_its_shard_and_force_rebuilds_all(tmp_path, image_dir):
    records = [ImageTextRecord(str(p), [p.stem]) for p in sorted(image_dir.glob("*.png"))]
    out = tmp_path / "out"
    build_shards(records, out, shard_size=4, workers=1, progress=False)
    before = shard_bytes(out)
    stats_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    # same path and caption, new pixels (same size on disk would still differ in mtime)
    replaced = Path(records[5].image)
    make_image(replaced, size=(300, 200), color=(0, 255, 0))
    os.utime(replaced, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    summary = build_shards(records, out, shard_size=4, workers=1, progress=False)
    assert summary["reused"] == 2 and summary["samples"] == 12
    after = shard_bytes(out)
    assert after["00000.tar"] == before["00000.tar"] and after["00002.tar"] == before["00002.tar"]
    assert after["00001.tar"] != before["00001.tar"]
    samples = {s[0]: s for s in read_back(out)}
    assert samples["000011"][1] == replaced.stem
    with wds.WebDataset([str(out / "00001.tar")], shardshuffle=False, empty_check=False).decode("pil") as ds:
        pixel = [s["jpg"].getpixel((5, 5)) for s in ds][1]
    assert pixel == pytest.approx((0, 255, 0), abs=8)  # the new pixels
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}["00000_stats.json"] == \
        stats_before["00000_stats.json"]
    # a fresh build of the same input gives the same bytes (determinism kept)
    build_shards(records, tmp_path / "fresh", shard_size=4, workers=1, progress=False)
    assert shard_bytes(tmp_path / "fresh") == after

    assert build_shards(records, out, shard_size=4, progress=False)["reused"] == 3  # nothing changed
    summary = build_shards(records, out, shard_size=4, progress=False, force=True)
    assert summary["reused"] == 0 and summary["samples"] == 12
    assert all(p.stat().st_mtime_ns > stats_before["00000_stats.json"] for p in out.glob("*_stats.json"))
    assert shard_bytes(out) == after
    table = tmp_path / "d.csv"
    table.write_text("image,caption\n" + "".join(f"{r.image},{r.caption}\n" for r in records))
    args = ["shard", "build", "--csv", str(table), "--out", str(tmp_path / "cli"), "--shard-size", "4",
            "--no-progress", "--workers", "1"]
    assert main(args) == 0
    assert main(args) == 0 and json.loads((tmp_path / "cli" / "00000_stats.json").read_text())
    marker = (tmp_path / "cli" / "00002_stats.json").stat().st_mtime_ns
    assert main([*args, "--force"]) == 0
    assert (tmp_path / "cli" / "00002_stats.json").stat().st_mtime_ns > marker


def test_check_on_missing_folder_writes_nothing_and_out_on_a_file(tmp_path, image_dir, capsys):
    missing = tmp_path / "shards" / "mine"
    assert main(["shard", "check", str(missing), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"mmrl shard: error: {missing}: no shards found (expected *.tar files)"]
    assert not (tmp_path / "shards").exists() and not (tmp_path / "sizes.json").exists()
    # an empty folder next to real sizes.json: nothing overwritten
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sizes.json").write_text('{"00000.tar": 5}\n')
    for spec in (str(tmp_path / "empty"), str(tmp_path / "empty" / "{00000..00001}.tar"),
                 str(tmp_path / "empty" / "*.tar")):
        assert main(["shard", "check", spec, "--no-progress"]) == 2
        assert "no shards found (expected *.tar files)" in capsys.readouterr().err
    assert (tmp_path / "empty" / "sizes.json").read_text() == '{"00000.tar": 5}\n'

    target = tmp_path / "a_file"
    target.write_text("not a folder")
    (tmp_path / "d.csv").write_text("image,caption\nimages/img00.png,hello\n")
    assert main(["shard", "build", "--csv", str(tmp_path / "d.csv"), "--out", str(target), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mmrl shard: error: --out {target}: is a file, not a folder"]
    assert target.read_text() == "not a folder"
    with pytest.raises(ValueError, match="exists and is not a folder"):
        build_shards(read_table(tmp_path / "d.csv"), target, progress=False)
    with pytest.raises(ValueError, match="cannot create the output folder"):
        build_shards(read_table(tmp_path / "d.csv"), target / "sub", progress=False)
