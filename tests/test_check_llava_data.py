"""data_prep/check_llava_data.py on a layout holding each of LLaVA's traps."""
import io
import json

from PIL import Image

from conftest import run_script


def answer(question="<image>\nWhat is this?"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "A square."}]


def write_image(path, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path, format=fmt)


def test_checker_finds_each_trap_and_writes_the_usable_records(tmp_path):
    data = tmp_path / "data"
    write_image(data / "coco/train2017/1.jpg")
    write_image(data / "ocr_vqa/images/gif.gif", "GIF")  # the JSON names gif.jpg: OCR-VQA's download
    write_image(data / "ocr_vqa/images/png.jpg", "PNG")  # PNG data under a .jpg name: loads
    (data / "vg/VG_100K").mkdir(parents=True)
    (data / "vg/VG_100K/garbage.jpg").write_bytes(b"not an image at all")
    whole = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(whole, format="JPEG")
    (data / "vg/VG_100K/cut.jpg").write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])  # header intact, data cut off
    records = [
        {"id": "good", "image": "coco/train2017/1.jpg", "conversations": answer()},
        {"id": "same-image", "image": "coco/train2017/1.jpg", "conversations": answer()},
        {"id": "lost", "image": "coco/train2017/2.jpg", "conversations": answer()},
        {"id": "gif", "image": "ocr_vqa/images/gif.jpg", "conversations": answer()},
        {"id": "png", "image": "ocr_vqa/images/png.jpg", "conversations": answer()},
        {"id": "garbage", "image": "vg/VG_100K/garbage.jpg", "conversations": answer()},
        {"id": "cut", "image": "vg/VG_100K/cut.jpg", "conversations": answer()},
        {"id": "text", "conversations": answer("Hello?")},
        {"id": "tag-no-image", "conversations": answer()},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "Hi"}]},
    ]
    path = data / "mix.json"
    path.write_text(json.dumps(records))
    clean = tmp_path / "clean.json"
    args = ["data_prep/check_llava_data.py", "--data", str(path), "--image-folder", str(data)]
    result = run_script(*args, "--write-clean", str(clean), check=False)
    out = result.stdout
    assert result.returncode == 1 and "problems found" in out
    assert f"{path}: 10 records, 5 usable" in out
    # folder, records, distinct images, missing, not .jpg, unreadable, not JPEG
    assert [line.split() for line in out.splitlines() if line.strip().split()[:1] == ["coco"]] == \
        [["coco", "3", "2", "1", "0", "0", "0"]]
    assert f"{path}: record 2 (id lost): image not found: {data}/coco/train2017/2.jpg" in out
    assert any(all(part in line for part in ("record 3 (id gif)", "gif.jpg", "missing", "gif.gif exists"))
               for line in out.splitlines())
    assert any(all(part in line for part in ("record 4 (id png)", "png.jpg", "PNG data")) for line in out.splitlines())
    assert "record 5 (id garbage): unreadable image" in out
    assert "record 8 (id tag-no-image): '<image>' in a sample that has no image" in out
    assert "record 9 (id no-answer): no gpt turn with an answer" in out
    assert "id cut" not in out  # its header is fine: only decoding finds it
    assert [r["id"] for r in json.load(open(clean))] == ["good", "same-image", "png", "cut", "text"]

    result = run_script(*args, "--decode", "--write-clean", str(clean), check=False)
    assert result.returncode == 1 and "record 6 (id cut): unreadable image" in result.stdout
    assert [r["id"] for r in json.load(open(clean))] == ["good", "same-image", "png", "text"]
    # the clean file passes: the PNG-as-.jpg is reported, and is not wrong
    result = run_script("data_prep/check_llava_data.py", "--data", str(clean), "--image-folder", str(data), "--decode")
    assert result.returncode == 0 and "all good" in result.stdout and "not JPEG: 1 records" in result.stdout


def test_checker_defaults_to_both_stages_files(tmp_path):
    result = run_script("data_prep/check_llava_data.py", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json: not found" in result.stdout
    assert "data/llava_v1_5_mix665k.json: not found" in result.stdout


def test_checker_refuses_what_training_refuses_with_its_check(tmp_path):
    """The same check_record as 01/02 (and with --llm the same tokenize): turns that do not
    alternate; a leading gpt turn, dropped, is reported; an answer --max-length cuts away."""
    data = tmp_path / "data"
    write_image(data / "1.jpg")
    records = [{"id": "good", "image": "1.jpg", "conversations": answer()},
               {"id": "lead", "image": "1.jpg", "conversations": [{"from": "gpt", "value": "Hi!"}] + answer()},
               {"id": "two-humans", "conversations": [{"from": "human", "value": "Hi"}] + answer("Hello?")},
               {"id": "long", "image": "1.jpg", "conversations": answer("<image>\n" + "Why? " * 80)}]
    path = data / "mix.json"
    path.write_text(json.dumps(records))
    args = ["data_prep/check_llava_data.py", "--data", str(path), "--image-folder", str(data)]
    out = run_script(*args, check=False).stdout
    assert f"{path}: 4 records, 3 usable" in out
    assert "record 2 (id two-humans): turns must alternate human, gpt" in out
    assert "record 1 (id lead): its first turn is gpt's" in out and "leading gpt turn: 1 records" in out
    result = run_script(*args, "--llm", "toy", "--max-length", "64", check=False)
    assert result.returncode == 1 and f"{path}: 4 records, 2 usable" in result.stdout
    assert "record 3 (id long): --max-length 64 cuts every answer token" in result.stdout
