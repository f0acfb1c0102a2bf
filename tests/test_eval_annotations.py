"""Retrieval annotation formats, each parsed from a fixture in the exact real schema."""
import json

import pytest

from mmrl.evaluation.annotations import AnnotationError, check_counts, read_annotations, resolve_images

# --- fixtures in the real schemas ---------------------------------------------------------------

KARPATHY_COCO = {  # dataset_coco.json (Karpathy): filepath, filename, split, sentences[raw/tokens/imgid/sentid], cocoid
    "dataset": "coco",
    "images": [
        {"filepath": "val2014", "sentids": [770337, 771687], "filename": "COCO_val2014_000000391895.jpg",
         "imgid": 0, "split": "test", "cocoid": 391895,
         "sentences": [{"tokens": ["a", "man", "with", "a", "red", "helmet"], "raw": "A man with a red helmet.",
                        "imgid": 0, "sentid": 770337},
                       {"tokens": ["a", "man", "riding", "a", "bike"], "raw": "A man riding a bike.", "imgid": 0,
                        "sentid": 771687}]},
        {"filepath": "train2014", "sentids": [1], "filename": "COCO_train2014_000000057870.jpg", "imgid": 1,
         "split": "train", "cocoid": 57870,
         "sentences": [{"tokens": ["a", "table"], "raw": "A table.", "imgid": 1, "sentid": 1}]},
        {"filepath": "val2014", "sentids": [2, 3, 4], "filename": "COCO_val2014_000000522418.jpg", "imgid": 2,
         "split": "test", "cocoid": 522418,
         "sentences": [{"tokens": ["a", "woman"], "raw": "A woman.", "imgid": 2, "sentid": 2},
                       {"tokens": ["a", "cake"], "raw": "A cake.", "imgid": 2, "sentid": 3},
                       {"tokens": ["a", "knife"], "raw": "A knife.", "imgid": 2, "sentid": 4}]},
        {"filepath": "val2014", "sentids": [5], "filename": "COCO_val2014_000000184613.jpg", "imgid": 3,
         "split": "restval", "cocoid": 184613,
         "sentences": [{"tokens": ["a", "cow"], "raw": "A cow.", "imgid": 3, "sentid": 5}]},
    ],
}

KARPATHY_FLICKR = {  # dataset_flickr30k.json: no filepath / cocoid
    "dataset": "flickr30k",
    "images": [{"sentids": [0, 1], "imgid": 0, "split": "test", "filename": "1000092795.jpg",
                "sentences": [{"tokens": ["two", "men"], "raw": "Two men.", "imgid": 0, "sentid": 0},
                              {"tokens": ["a", "dog"], "raw": "A dog.", "imgid": 0, "sentid": 1}]}],
}

COCO_CAPTIONS = {  # coco_test_karpathy.json (CLIP_benchmark): captions_val2014.json filtered
    "info": {"description": "COCO 2014 Dataset"}, "licenses": [],
    "images": [{"license": 3, "file_name": "COCO_val2014_000000391895.jpg", "height": 360, "width": 640,
                "date_captured": "2013-11-14 11:18:45", "id": 391895,
                "coco_url": "http://images.cocodataset.org/val2014/COCO_val2014_000000391895.jpg"},
               {"license": 4, "file_name": "COCO_val2014_000000522418.jpg", "height": 480, "width": 640,
                "date_captured": "2013-11-14 11:38:44", "id": 522418}],
    "annotations": [{"image_id": 522418, "id": 775, "caption": "A woman wearing a net on her head."},
                    {"image_id": 391895, "id": 770337, "caption": "A man with a red helmet."},
                    {"image_id": 522418, "id": 781, "caption": "A woman cutting a cake."}],
}

FLICKR_CSV = (  # flickr30k_test_karpathy.txt: pandas to_csv(sep=",", index=False)
    "image,caption\n"
    "1007129816.jpg,The man with pierced ears is wearing glasses and an orange hat .\n"
    '1007129816.jpg,"A man, with glasses, wearing a beer can crocheted hat ."\n'
    "1009434119.jpg,A black and white dog is running in a grassy garden surrounded by a white fence .\n"
)

BLIP = [  # coco_karpathy_test.json (BLIP / ALBEF)
    {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["A man with a red helmet.", "A man riding."]},
    {"image": "val2014/COCO_val2014_000000522418.jpg", "caption": ["A woman."]},
]


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def touch_images(root, names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_karpathy_coco_test_split(tmp_path):
    ann = read_annotations(write(tmp_path, "dataset_coco.json", KARPATHY_COCO))
    assert ann.format == "karpathy" and ann.split == "test" and ann.benchmark == "coco-5k"
    assert ann.name == "mscoco_captions"
    assert ann.images == ["val2014/COCO_val2014_000000391895.jpg", "val2014/COCO_val2014_000000522418.jpg"]
    assert ann.captions == ["A man with a red helmet.", "A man riding a bike.", "A woman.", "A cake.", "A knife."]
    assert ann.caption_image == [0, 0, 1, 1, 1]
    assert ann.image_ids == [391895, 522418] and not ann.coco_caption_ids
    assert ann.captions_per_image() == (2, 3)
    other = read_annotations(tmp_path / "dataset_coco.json", split="restval")
    assert other.images == ["val2014/COCO_val2014_000000184613.jpg"] and other.benchmark is None
    assert read_annotations(tmp_path / "dataset_coco.json", split="all").n_images == 4


def test_karpathy_flickr(tmp_path):
    ann = read_annotations(write(tmp_path, "dataset_flickr30k.json", KARPATHY_FLICKR))
    assert ann.images == ["1000092795.jpg"] and ann.captions == ["Two men.", "A dog."]
    assert ann.benchmark == "flickr30k-1k" and ann.name == "flickr30k"


def test_coco_captions_format(tmp_path):
    ann = read_annotations(write(tmp_path, "coco_test_karpathy.json", COCO_CAPTIONS))
    assert ann.format == "coco" and ann.benchmark == "coco-5k" and ann.split == "test"
    assert ann.images == ["COCO_val2014_000000391895.jpg", "COCO_val2014_000000522418.jpg"]
    # captions grouped by image in file order, annotation order within an image
    assert ann.captions == ["A man with a red helmet.", "A woman wearing a net on her head.", "A woman cutting a cake."]
    assert ann.caption_image == [0, 1, 1] and ann.caption_ids == [770337, 775, 781] and ann.coco_caption_ids
    # CLIP_benchmark lays the images out as ROOT/val2014/FILE
    touch_images(tmp_path / "coco" / "val2014", ann.images)
    paths = resolve_images(ann, tmp_path / "coco")
    assert paths[1] == tmp_path / "coco" / "val2014" / "COCO_val2014_000000522418.jpg"


def test_flickr_csv_with_quoted_commas(tmp_path):
    ann = read_annotations(write(tmp_path, "flickr30k_test_karpathy.txt", FLICKR_CSV))
    assert ann.format == "csv" and ann.benchmark == "flickr30k-1k" and ann.name == "flickr30k"
    assert ann.images == ["1007129816.jpg", "1009434119.jpg"]
    assert ann.captions[1] == "A man, with glasses, wearing a beer can crocheted hat ."
    assert ann.caption_image == [0, 0, 1]


def test_blip_list(tmp_path):
    ann = read_annotations(write(tmp_path, "coco_karpathy_test.json", BLIP))
    assert ann.format == "blip" and ann.benchmark == "coco-5k"
    assert ann.caption_image == [0, 0, 1] and ann.images[1] == "val2014/COCO_val2014_000000522418.jpg"


def test_counts_asserted_for_recognised_test_sets(tmp_path):
    ann = read_annotations(write(tmp_path, "dataset_flickr30k.json", KARPATHY_FLICKR))
    with pytest.raises(AnnotationError, match=r"flickr30k-1k test set, which has 1,000 images and 5,000 captions"):
        check_counts(ann)
    full = {"dataset": "flickr30k", "images": [
        {"filename": f"{i}.jpg", "split": "test", "imgid": i,
         "sentences": [{"raw": f"c{i}-{k}", "tokens": [], "sentid": 5 * i + k} for k in range(5)]}
        for i in range(1000)]}
    ok = read_annotations(write(tmp_path, "full.json", full))
    assert "asserted" in check_counts(ok)
    assert check_counts(read_annotations(write(tmp_path, "mine.json", {**full, "dataset": "mine"}))) is None


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ({"images": [{"id": 1}]}, "neither Karpathy 'sentences' nor COCO 'annotations'"),
    ({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"tokens": 3}]}]}, "has no 'raw' caption"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "id": 1, "caption": "x"}]},
     "refers to image id 2"),
    ({"images": [{"filename": "a.jpg", "split": "train", "sentences": []}]}, "no images in split 'test'"),
    ("path,text\na.jpg,b\n", "not the CSV header 'image,caption'"),
    ("image,caption\nno image here\n", "line 2"),
    ([{"image": "a.jpg"}], "lacks field 'caption'"),
])
def test_malformed_files_name_the_file_and_the_problem(tmp_path, content, problem):
    path = write(tmp_path, "ann.json", content)
    with pytest.raises(ValueError) as err:
        read_annotations(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_missing_images_are_reported(tmp_path):
    ann = read_annotations(write(tmp_path, "dataset_flickr30k.json", KARPATHY_FLICKR))
    with pytest.raises(FileNotFoundError, match=r"1 of 1 images not found .*1000092795.jpg"):
        resolve_images(ann)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        read_annotations(tmp_path / "nope.json")
