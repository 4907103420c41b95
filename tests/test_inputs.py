"""Bad and odd input: each image decodes correctly or is refused with a reason; configs fail by field."""

import io
import json
import os
import zlib

import numpy as np
import pyarrow as pa
import pytest
import torch
from camlabel.pipeline.cli import main
from camlabel.pipeline.sources import (
    SourceError,
    image_listing,
    labels_column,
    list_images,
    read_labels,
    relative_paths,
    unmatched_names,
)
from camlabel.schemas.config import ConfigError, load_config
from camlabel.workers.actor import decode_batch
from camlabel.workers.decode import DecodeError, decode
from camlabel.workers.models import imagenet_class_names
from PIL import Image
from torchvision.datasets import Imagenette


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def gradient(width=40, height=30) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], -1).astype(np.uint8)


ODD = {
    "grey": lambda: encode(Image.fromarray(gradient()[..., 0]), "PNG"),
    "palette_alpha": lambda: encode(Image.fromarray(gradient()).convert("P"), "PNG", transparency=0),
    "rgba": lambda: encode(Image.fromarray(gradient()).convert("RGBA"), "PNG"),
    "cmyk_jpeg": lambda: encode(Image.fromarray(gradient()).convert("CMYK"), "JPEG"),
    "png16": lambda: encode(Image.fromarray(gradient()[..., 0].astype(np.uint16) * 257), "PNG"),
    "gif": lambda: encode(Image.fromarray(gradient()).convert("P"), "GIF", save_all=True,
                          append_images=[Image.fromarray(gradient()[::-1]).convert("P")]),
    "bmp": lambda: encode(Image.fromarray(gradient()), "BMP"),
    "tiny": lambda: encode(Image.fromarray(np.zeros((1, 1, 3), np.uint8)), "PNG"),
    "apng": lambda: encode(Image.fromarray(gradient()), "PNG", save_all=True,
                           append_images=[Image.fromarray(gradient()[::-1])]),
    "webp": lambda: encode(Image.fromarray(gradient()), "WEBP", save_all=True,
                           append_images=[Image.fromarray(gradient()[::-1])]),
    "bilevel": lambda: encode(Image.fromarray(gradient()).convert("1"), "PNG"),
    "grey_alpha": lambda: encode(Image.fromarray(gradient()).convert("LA"), "PNG"),
    "tiff": lambda: encode(Image.fromarray(gradient()), "TIFF", save_all=True,
                           append_images=[Image.fromarray(gradient()[::-1])]),
    "avif": lambda: encode(Image.fromarray(gradient()), "AVIF"),
    "jpeg2000": lambda: encode(Image.fromarray(gradient()), "JPEG2000"),
    "ppm": lambda: encode(Image.fromarray(gradient()), "PPM"),
    "mpo": lambda: encode(Image.fromarray(gradient()), "MPO", save_all=True,  # a camera's multi-picture JPEG
                          append_images=[Image.fromarray(gradient()[::-1])]),
}


@pytest.mark.parametrize("kind", ODD)
def test_odd_modes_decode_to_rgb_uint8(kind):
    image = decode(ODD[kind]())
    assert image.dtype.is_floating_point is False and image.shape[0] == 3
    expected = (1, 1) if kind == "tiny" else (30, 40)
    assert tuple(image.shape[1:]) == expected


def test_decoded_colours_are_right():
    image = decode(encode(Image.fromarray(gradient()), "PNG"))
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), gradient())
    grey16 = decode(ODD["png16"]())
    np.testing.assert_array_equal(grey16[0].numpy(), gradient()[..., 0])
    np.testing.assert_array_equal(decode(ODD["tiff"]()).permute(1, 2, 0).numpy(), gradient())  # its first page


@pytest.mark.parametrize("pixels", [np.float32, lambda grey: grey.astype(np.float32) / 255, np.int32])
def test_32_bit_pixels_are_refused_not_made_black(pixels):
    """A 32-bit TIFF holds 0-1, 0-255 or any range; it was read as 16-bit and came out black, unnoticed."""
    tiff = encode(Image.fromarray(pixels(gradient()[..., 0])), "TIFF")
    with pytest.raises(DecodeError, match="32-bit pixels"):
        decode(tiff)


def test_a_16_bit_pgm_which_pil_opens_as_32_bit_integers_is_read():
    pgm = b"P5 40 30 65535\n" + (gradient()[..., 0].astype(">u2") * 257).tobytes()
    np.testing.assert_array_equal(decode(pgm)[0].numpy(), gradient()[..., 0])


@pytest.mark.parametrize("kind", ["PNG", "WEBP", "TIFF", "LA", "palette", "GIF"])
def test_transparent_pixels_decode_over_white_whatever_colour_the_file_holds_under_them(kind):
    """A cut-out's hidden colour is anything (black, white, its old background); a viewer shows white."""
    pixels = np.zeros((4, 6, 4), np.uint8)
    pixels[..., :3] = (200, 0, 0)  # red, hidden where transparent
    pixels[:, 3:, 3] = 255  # the right half opaque
    pixels[0, 5, 3] = 128  # one pixel half transparent
    rgba = Image.fromarray(pixels, "RGBA")
    data = {"PNG": lambda: encode(rgba, "PNG"), "WEBP": lambda: encode(rgba, "WEBP", lossless=True),
            "TIFF": lambda: encode(rgba, "TIFF"), "LA": lambda: encode(rgba.convert("LA"), "PNG"),
            "palette": lambda: encode(rgba.convert("P"), "PNG", transparency=0),
            "GIF": lambda: encode(rgba.convert("P"), "GIF", transparency=0)}[kind]()
    image = decode(data).permute(1, 2, 0).numpy()
    opaque = 60 if kind == "LA" else (200, 0, 0)  # LA: red's luminance
    assert (image[:, :3] == 255).all() and (image[:, 3:5] == opaque).all()
    if kind not in ("palette", "GIF"):  # a palette's transparency is all or nothing
        np.testing.assert_array_equal(image[0, 5], np.round(np.array(opaque) * 128 / 255 + 255 * 127 / 255))
    colours = Image.new("P", (2, 1))
    colours.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    colours.putpixel((1, 0), 1)  # a palette without transparency keeps its colours exactly
    assert decode(encode(colours, "PNG")).permute(1, 2, 0).numpy()[0].tolist() == [[0, 0, 0], [10, 20, 30]]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image(orientation, fmt):
    upright = gradient(40, 30)
    stored = Image.fromarray(upright)
    # store the pixels so that applying `orientation` brings them back upright
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
               7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}[orientation]
    if inverse is not None:
        stored = stored.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"lossless": True} if fmt == "WEBP" else {}
    image = decode(encode(stored, fmt, exif=exif, **extra))
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), upright)


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_jpeg_decodes_straight_to_about_the_size_needed_keeping_its_original_size(orientation):
    from camlabel.workers.decode import decode_reduced

    upright = Image.fromarray(gradient(40, 30)).resize((2000, 1500))
    stored = upright.transpose(Image.Transpose.ROTATE_90) if orientation == 6 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", exif=exif, quality=95)
    image, size = decode_reduced(data, shortest=300)
    assert size == (2000, 1500)  # upright (width, height) of the original
    assert tuple(image.shape) == (3, 375, 500)  # libjpeg's 1/4: the smallest scale still >= 300 px
    full = decode(data)
    small = torch.nn.functional.interpolate(full[None].float(), size=(375, 500), mode="area")[0]
    assert (image.float() - small).abs().mean() < 3  # the same picture, upright
    same, size = decode_reduced(data, shortest=800)  # 1500 < 2 x 800: whole
    assert tuple(same.shape) == (3, 1500, 2000) and size == (2000, 1500)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"\x00\x01garbage" * 100, "not a readable image"),
    (b"<html><body>hello</body></html>", "not a readable image"),
])
def test_non_images_are_refused_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason) as refused:
        decode(data)
    assert " at 0x" not in str(refused.value)  # the errors table says why, not where PIL's buffer lived


@pytest.mark.parametrize("fmt", ["EPS", "TGA", "ICO"])
def test_only_photo_formats_are_opened_so_postscript_named_jpg_is_never_rendered(fmt):
    """PIL has Ghostscript render EPS, a PostScript interpreter run on an untrusted file; other plugins are
    attack surface that no photo collection needs. Each is refused by its bytes, whatever its name."""
    data = encode(Image.fromarray(gradient()), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # PIL itself would open it
    with pytest.raises(DecodeError, match="not a readable image"):
        decode(data)


def test_an_animated_gif_decodes_its_first_frame_only(monkeypatch):
    """torchvision decodes every frame of a GIF: thousands of cheap frames are gigabytes of pixels."""
    import camlabel.workers.decode as decode_module

    frames = [Image.fromarray(gradient(40, 30) // (i + 1)).convert("P") for i in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    monkeypatch.setattr(decode_module, "decode_image", lambda *a, **k: pytest.fail("all frames decoded"))
    image = decode(buf.getvalue())
    assert torch.equal(image, torch.from_numpy(np.array(frames[0].convert("RGB"))).permute(2, 0, 1))


def test_truncated_jpeg_and_decompression_bomb_are_refused():
    whole = encode(Image.fromarray(gradient(200, 200)), "JPEG")
    with pytest.raises(DecodeError):
        decode(whole[: len(whole) // 3])
    # PNG headers that claim 30000 x 30000 and 10000 x 10000 pixels: refused from the header, never decoded,
    # naming our limit (the first is over Pillow's own error limit, the second over its warning's)
    for side in (30000, 10000):
        with pytest.raises(DecodeError, match=f"refused: {side * side:,} pixels is over the 64,000,000-pixel limit"):
            decode(encode(Image.new("1", (side, side)), "PNG"))


def with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """png with a chunk of that kind and body inserted before its pixels (IDAT)."""
    at = png.index(b"IDAT") - 4
    return png[:at] + len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big") + png[at:]


def test_a_png_whose_metadata_pil_refuses_is_decoded_and_a_bomb_in_it_is_skipped():
    """PIL will not open a PNG whose compressed text (or ICC profile) inflates past 1 MB, its guard against a
    bomb in the metadata; real PNGs carry that much (Pillow#8363). Its pixels are the photo: libpng, through
    torchvision, skips such a chunk, and a bomb in it costs nothing. One that may be transparent is still
    refused: torchvision would drop its transparency."""
    opaque = encode(Image.fromarray(gradient()), "PNG")
    text = zlib.compress(" ".join(str(i) for i in range(400_000)).encode())  # 2.6 MB inflated: metadata, not a bomb
    deflate = zlib.compressobj(9)
    bomb = b"".join(deflate.compress(bytes(1 << 20)) for _ in range(256)) + deflate.flush()  # 256 MB of zeros
    for body in (b"Comment\0\0" + text, b"Comment\0\0" + bomb):
        with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):
            Image.open(io.BytesIO(with_chunk(opaque, b"zTXt", body)))  # PIL's own refusal
        assert torch.equal(decode(with_chunk(opaque, b"zTXt", body)), decode(opaque))
    transparent = encode(Image.fromarray(gradient()).convert("RGBA"), "PNG")
    with pytest.raises(DecodeError, match="MAX_TEXT_CHUNK"):
        decode(with_chunk(transparent, b"zTXt", b"Comment\0\0" + text))


def test_decode_stage_turns_every_failure_into_a_row(tmp_path):
    (tmp_path / "ok.png").write_bytes(encode(Image.fromarray(gradient()), "PNG"))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    locked = tmp_path / "locked.png"
    locked.write_bytes(encode(Image.fromarray(gradient()), "PNG"))
    locked.chmod(0)
    os.symlink("self.jpg", tmp_path / "self.jpg")
    os.symlink(tmp_path / "ok.png", tmp_path / "linked.png")
    paths = [str(tmp_path / n) for n in ("ok.png", "bad.jpg", "missing.png", "locked.png", "self.jpg", "linked.png")]
    out = decode_batch({"path": np.array(paths), "labels": np.array(["-"] * 6)}, shortest=448)
    assert out["error"][0] == "" and out["image"][0].shape == (30, 40, 3)
    assert out["error_stage"][4] == "read" and "symbolic links" in out["error"][4]  # a link to itself
    assert out["error"][5] == "" and (out["image"][5] == out["image"][0]).all()  # a link is read where it points
    assert out["error_stage"][1] == "decode" and "not a readable image" in out["error"][1]
    assert out["error_stage"][2] == "read" and "FileNotFoundError" in out["error"][2]
    if os.geteuid() != 0:  # root reads anything
        assert out["error_stage"][3] == "read"


def test_fifos_devices_and_huge_files_are_refused_without_reading_them(tmp_path):
    """A FIFO named like a photo would block its worker for ever, /dev/zero in a manifest would fill it:
    each becomes a read error row at once."""
    import threading

    os.mkfifo(tmp_path / "pipe.jpg")
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(600 * 2**20)  # sparse: nothing is written, the size alone must refuse it
    paths = [str(tmp_path / "pipe.jpg"), "/dev/zero", str(tmp_path / "huge.png"), str(tmp_path)]
    out = {}
    reader = threading.Thread(target=lambda: out.update(decode_batch(
        {"path": np.array(paths), "labels": np.array(["-"] * 4)}, shortest=448)), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "a read blocked"
    assert out["error_stage"] == ["read"] * 4
    assert [e.split(":")[0] for e in out["error"]] == ["OSError"] * 3 + ["IsADirectoryError"]
    assert "not a regular file" in out["error"][0] and "not a regular file" in out["error"][1]
    assert "byte limit" in out["error"][2]


def test_a_file_name_that_is_not_utf8_is_an_error_row_not_a_failed_job(tmp_path):
    """Arrow strings cannot hold such a name (it failed the whole run's planning): it is settled as an
    error row, escaped, and counted among the inputs; the other images are planned as usual."""
    import pyarrow.parquet as pq
    from camlabel.pipeline.worklist import WORK_LIST, plan_work
    from camlabel.schemas.config import JobConfig

    photo = encode(Image.fromarray(gradient()), "PNG")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ok.png").write_bytes(photo)
    with open(os.path.join(os.fsencode(tmp_path / "src"), b"bad\xff.png"), "wb") as f:
        f.write(photo)
    config = JobConfig(source=str(tmp_path / "src"), out=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    assert plan_work(config, ["a"], tmp_path / "run", []) == (2, 1, 0, {})
    assert pq.read_table(tmp_path / "run" / WORK_LIST).column("path").to_pylist() == [str(tmp_path / "src" / "ok.png")]
    errors = pq.read_table(tmp_path / "run" / "errors").to_pylist()
    assert [(e["path"], e["stage"]) for e in errors] == [(str(tmp_path / "src" / "bad\\xff.png"), "list")]
    assert "not valid UTF-8" in errors[0]["reason"]


def test_listing_skips_symlink_loops_keeps_duplicates_by_name_and_counts_the_other_files(tmp_path):
    (tmp_path / "a").mkdir()
    data = encode(Image.fromarray(gradient()), "PNG")
    (tmp_path / "a" / "one.png").write_bytes(data)
    (tmp_path / "a" / "copy.PNG").write_bytes(data)
    for name in ("notes.txt", "phone.HEIC", "phone2.heic", "README"):
        (tmp_path / "a" / name).write_text("x")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert [p.rsplit("/", 1)[1] for p in list_images(str(tmp_path))] == ["copy.PNG", "one.png"]
    assert image_listing(str(tmp_path)).left_out == {".txt": 1, ".heic": 2, "": 1}
    assert len(list_images(str(tmp_path / "a" / "*.png"))) == 1
    assert len(list_images(str(tmp_path / "a" / "*"))) == 6 and image_listing(str(tmp_path / "a" / "*")).left_out == {}


def test_every_suffix_a_folder_is_listed_for_names_a_format_the_decoder_opens():
    from camlabel.pipeline.sources import IMAGE_SUFFIXES
    from camlabel.workers.decode import FORMATS

    formats = Image.registered_extensions()
    assert {suffix: formats.get(suffix) for suffix in IMAGE_SUFFIXES if formats.get(suffix) not in FORMATS} == {}


def test_a_folder_whose_name_holds_glob_characters_is_a_folder(tmp_path):
    """`shoot[2024]` was read as a pattern matching `shoot2`..., so its images were never listed: 0 inputs, exit 0."""
    folder = tmp_path / "shoot[2024]" / "day?"
    folder.mkdir(parents=True)
    (folder / "a*.png").write_bytes(encode(Image.fromarray(gradient()), "PNG"))
    (tmp_path / "shoot2").mkdir()
    (tmp_path / "shoot2" / "decoy.png").write_bytes(encode(Image.fromarray(gradient()), "PNG"))
    assert list_images(str(tmp_path / "shoot[2024]")) == [str(folder / "a*.png")]
    assert relative_path(str(folder / "a*.png"), str(tmp_path / "shoot[2024]")) == "day?/a*.png"
    # a pattern still matches as one
    assert list_images(str(tmp_path / "shoot[0-9]" / "*.png")) == [str(tmp_path / "shoot2" / "decoy.png")]


def test_manifest_rejects_paths_that_climb_out(tmp_path):
    (tmp_path / "m.csv").write_text("path\nimg/a.png\n../etc/passwd\n")
    with pytest.raises(SourceError, match=r"m.csv:3: path '../etc/passwd' climbs out"):
        list_images(str(tmp_path / "m.csv"))
    (tmp_path / "n.csv").write_text("file\nx.png\n")
    with pytest.raises(SourceError, match="no 'path' column"):
        list_images(str(tmp_path / "n.csv"))


def test_a_parquet_manifest_is_joined_to_its_folder_sorted_and_deduplicated(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["b/x.jpg", "/abs/y.jpg", "s3://bucket/z.jpg", "a.jpg", "b/x.jpg"],
                             "other": [1, 2, 3, 4, 5]}), manifest)
    assert list_images(str(manifest)) == ["/abs/y.jpg", f"{tmp_path}/a.jpg", f"{tmp_path}/b/x.jpg", "s3://bucket/z.jpg"]
    pq.write_table(pa.table({"path": ["a.jpg", ""]}), manifest)
    with pytest.raises(SourceError, match=r"list.parquet:3: empty path"):
        list_images(str(manifest))


def test_a_manifest_made_by_find_names_the_images_a_folder_listing_names(tmp_path):
    """`find . -name '*.jpg' > list.csv` writes `./shoot/a.jpg`: its images were stored as `.../list/./shoot/a.jpg`,
    labels given as `shoot/a.jpg` matched none of them (each fell back to predicted classes), and `./a.jpg` beside
    `a.jpg` was annotated twice. A key of an object store is kept as written."""
    (tmp_path / "list.csv").write_text("path\n./shoot/a.jpg\nshoot/a.jpg\nshoot//./b.jpg\n.//c.jpg\n"
                                      f"{tmp_path}/./shoot/./a.jpg\ns3://bucket/./k.jpg\n")
    paths = image_listing(str(tmp_path / "list.csv")).paths
    assert paths.to_pylist() == [f"{tmp_path}/c.jpg", f"{tmp_path}/shoot/a.jpg", f"{tmp_path}/shoot/b.jpg",
                                 "s3://bucket/./k.jpg"]
    (tmp_path / "labels.csv").write_text("file_name,labels\n./shoot/a.jpg,0\nshoot/b.jpg,1\n./c.jpg,2\n")
    labels = read_labels(str(tmp_path / "labels.csv"), ["cat", "dog", "cow"], str(tmp_path / "list.csv"))
    assert labels_column(paths, str(tmp_path / "list.csv"), labels).to_pylist() == [[2], [0], [1], None]
    assert unmatched_names(paths, str(tmp_path / "list.csv"), labels) == 0


def relative_path(path: str, source: str) -> str:
    return relative_paths(pa.array([path]), source)[0].as_py()


def test_one_image_is_a_source_and_a_missing_one_is_named(tmp_path):
    (tmp_path / "photo.heic").write_bytes(b"")  # named by the user: listed, whatever its suffix
    assert image_listing(str(tmp_path / "photo.heic")).paths.to_pylist() == [str(tmp_path / "photo.heic")]
    assert relative_paths(pa.array([str(tmp_path / "photo.heic")]), str(tmp_path / "photo.heic"))[0].as_py() == \
        "photo.heic"
    with pytest.raises(SourceError, match="photo.jpg' does not exist"):
        list_images(str(tmp_path / "photo.jpg"))
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(SourceError, match="is not a regular file or a directory"):
        list_images(str(tmp_path / "pipe.jpg"))


def test_relative_paths_stay_below_their_source_and_keep_folders(tmp_path):
    (tmp_path / "a").mkdir()
    image = str(tmp_path / "a" / "x.jpg")
    assert relative_path(image, str(tmp_path)) == "a/x.jpg"
    assert relative_path(image, str(tmp_path / "*" / "*.jpg")) == "a/x.jpg"
    assert relative_path(image, str(tmp_path / "a" / "x*.jpg")) == "x.jpg"
    assert relative_path(image, str(tmp_path / "list.parquet")) == "a/x.jpg"  # below the manifest's folder
    assert relative_path("/elsewhere/b/x.jpg", str(tmp_path / "list.csv")) == "elsewhere/b/x.jpg"
    assert relative_path("s3://bucket/b/x.jpg", "s3://bucket/list.csv") == "bucket/b/x.jpg"
    assert relative_path("s3://key:secret@bucket/b/x.jpg", "s3://key:secret@bucket/b") == "bucket/b/x.jpg"
    # an object store's key may hold '..': an output named after it (export-masks' PNG) must not climb out
    assert relative_path("s3://b/../../../x/..y/../z.jpg", "s3://b") == "b/%2E%2E/%2E%2E/%2E%2E/x/..y/%2E%2E/z.jpg"
    # nor name another's ('.' and its escape, '%2E', each keep a name of their own)
    keys = ["s3://b/i/a.png", "s3://b/i/./a.png", "s3://b/i/././a.png", "s3://b/i/%2E/a.png", "s3://b/i/../a.png",
            "s3://b/i/%2E%2E/a.png", "s3://b/i/.../a.png"]
    names = relative_paths(pa.chunked_array([keys[:3], keys[3:]]), "s3://b").to_pylist()
    assert names == ["b/i/a.png", "b/i/%2E/a.png", "b/i/%2E/%2E/a.png", "b/i/%252E/a.png", "b/i/%2E%2E/a.png",
                     "b/i/%252E%252E/a.png", "b/i/.../a.png"]
    (tmp_path / "é").mkdir()
    listing = [str(tmp_path / "é" / "ü.jpg"), "/elsewhere/b/x.jpg", "gs://b/c/x.jpg", str(tmp_path / "a" / "x.jpg")]
    assert relative_paths(pa.array(listing), str(tmp_path / "é")).to_pylist() == [
        "ü.jpg", "elsewhere/b/x.jpg", "b/c/x.jpg", str(tmp_path / "a" / "x.jpg").lstrip("/")]


def test_labels_by_name_or_index_and_errors_name_the_line(tmp_path):
    names = ["cat", "great white shark", "dog"]
    good = tmp_path / "good.csv"
    good.write_text("file_name,labels\na/x.jpg,cat 2 CAT 002\ny.jpg,great_white_shark\nz.jpg,\nw.jpg,0\nw.jpg,dog\n")
    labels = read_labels(str(good), names, str(tmp_path))
    assert sorted(zip(*labels.to_pydict().values(), strict=True)) == [
        ("a/x.jpg", [0, 2]), ("w.jpg", [0]), ("w.jpg", [2]), ("y.jpg", [1]), ("z.jpg", [])]
    paths = [str(tmp_path / "a" / "x.jpg"), "/elsewhere/y.jpg", str(tmp_path / "x.jpg"), "s3://b/z.jpg",
             str(tmp_path / "b" / "w.jpg"), str(tmp_path / "q.jpg")]
    found = labels_column(pa.array(paths), str(tmp_path), labels).to_pylist()
    # by the path below the source, else the bare name (x.jpg at the top is not a/x.jpg); w.jpg's last row
    assert found == [[0, 2], [1], None, [], [2], None]
    bad = tmp_path / "bad.csv"
    for text, says in [("file_name,labels\nx.jpg,cat\ny.jpg,unicorn\n", r"bad.csv:3: unknown class 'unicorn'"),
                       ("file_name,labels\n../x.jpg,cat\n", r"bad.csv:2: file_name '../x.jpg'"),
                       # the two mistakes a spreadsheet makes: a name's spaces, semicolons (a European locale's CSV)
                       ("file_name,labels\nx.jpg,great white shark\n",
                        r"bad.csv:2: unknown class 'great' .* written as underscores"),
                       ("file_name;labels\nx.jpg;cat\n", r"labels; its header holds \['file_name;labels'\]")]:
        bad.write_text(text)
        with pytest.raises(SourceError, match=says):
            read_labels(str(bad), names, str(tmp_path))
    # a name two classes share but for case (ImageNet's Cardigan, the dog, and cardigan, the sweater) is taken as
    # written, and refused in any other case
    names = ["Cardigan", "cat", "cardigan"]
    good.write_text("file_name,labels\na.jpg,cardigan\nb.jpg,Cardigan\nc.jpg,CAT\n")
    taken = read_labels(str(good), names, str(tmp_path)).to_pydict()
    assert dict(zip(taken["file_name"], taken["labels"], strict=True)) == {"a.jpg": [2], "b.jpg": [0], "c.jpg": [1]}
    bad.write_text("file_name,labels\nx.jpg,cat\ny.jpg,CARDIGAN\n")
    with pytest.raises(SourceError, match=r"bad.csv:3: 'CARDIGAN' names two classes"):
        read_labels(str(bad), names, str(tmp_path))


def test_labels_may_name_images_by_absolute_path_or_uri(tmp_path):
    """A script that lists a folder writes absolute paths (`/data/photos/a/x.jpg`), which were refused ("must be
    a relative path"): each now names the image whose path below the source it gives, as a relative name does."""
    (tmp_path / "labels.csv").write_text(f"file_name,labels\n{tmp_path}/a/x.jpg,0\n{tmp_path}//./b.jpg,1\n"
                                         "/elsewhere/c.jpg,2\ns3://bucket/k/d.jpg,0\n")
    paths = pa.array([f"{tmp_path}/a/x.jpg", f"{tmp_path}/b.jpg", f"{tmp_path}/c.jpg", "s3://bucket/k/d.jpg"])
    labels = read_labels(str(tmp_path / "labels.csv"), ["cat", "dog", "cow"], str(tmp_path))
    assert labels.column("file_name").to_pylist() == ["bucket/k/d.jpg", "elsewhere/c.jpg", "b.jpg", "a/x.jpg"]
    assert labels_column(paths, str(tmp_path), labels).to_pylist() == [[0], [1], None, [0]]
    assert unmatched_names(paths, str(tmp_path), labels) == 1  # outside the source: not c.jpg by its bare name
    # a manifest's folder is its source's: an absolute path outside it names what the manifest lists
    manifest = str(tmp_path / "lists" / "m.csv")
    assert labels_column(paths, manifest, read_labels(str(tmp_path / "labels.csv"), ["cat", "dog", "cow"],
                                                      manifest)).to_pylist() == [[0], [1], None, [0]]


def test_imagenet_classes_are_named_by_their_wordnet_ids_too(tmp_path):
    """ImageNet's folders are named by WordNet id (`train/n02123045/`): a labels file written from them names
    the classes so. The ids agree with torchvision's own names for Imagenette's ten; a model of other classes
    has no such ids."""
    names = imagenet_class_names()
    labels = tmp_path / "labels.csv"
    labels.write_text("file_name,labels\n" + "".join(f"{wnid}.jpg,{wnid}\n" for wnid in Imagenette._WNID_TO_CLASS))
    taken = read_labels(str(labels), names, str(tmp_path)).to_pydict()
    assert {f: names[i] for f, (i,) in zip(taken["file_name"], taken["labels"], strict=True)} == {
        f"{wnid}.jpg": synonyms[0] for wnid, synonyms in Imagenette._WNID_TO_CLASS.items()}
    labels.write_text("file_name,labels\na.jpg,n02123045 N07920052 tabby\n")
    assert read_labels(str(labels), names, str(tmp_path)).column("labels").to_pylist() == [[281, 967]]
    with pytest.raises(SourceError, match="unknown class 'n02123045'"):
        read_labels(str(labels), ["tabby", "espresso"], str(tmp_path))


@pytest.mark.parametrize("overrides, field", [
    ({"method": "magic"}, "method"),
    ({"input_size": 5}, "input_size"),
    ({"threshold": 1.5}, "threshold"),
    ({"actors": 0}, "actors"),
    ({"batch_size": "big"}, "batch_size"),
    ({"colour": "red"}, "colour"),
    ({"source": ""}, "source"),
    ({"scales": []}, "scales"),
    ({"scales": [1.0, 9.0]}, "scales"),
    ({"scales": [1.0, 1.5, 1]}, "scales"),  # a scale twice: its second pass found the first one's graph taken
    ({"precision": "float16"}, "precision"),
    ({"out": "ftp://host/runs"}, "out"),
    ({"top_k": 0}, "top_k"),
    ({"class_names": "/no/such/names.txt"}, "class_names"),
    ({"labels": "/no/such/labels.csv"}, "labels"),
    ({"weights": "/no/such/weights.pt"}, "weights"),
    ({"model": ["resnet50"]}, "model"),  # a list where a name goes: a TypeError traceback before
    ({"source": {"path": "x"}}, "source"),
    ({"scales": [[1.0], [1.5]]}, "scales"),
])
def test_bad_config_values_fail_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        load_config(None, {"source": "x", "out": "y", **overrides})


def test_a_yaml_alias_bomb_is_refused_in_a_short_line(tmp_path):
    """Nine levels of nine aliases are 387 million items in one line: shared by the parser, but a full repr in
    the error message took 30 s and 1.6 GB at eight levels."""
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    for field in ("model", "scales", "top_k", "flip"):
        bomb.write_text(f"{field}: [{', '.join(levels)}]\n")
        with pytest.raises(ConfigError, match=rf"^{field}: ") as refused:
            load_config(bomb, {"source": "x", "out": "y"})
        assert len(str(refused.value)) < 300


def test_bad_flag_exits_2_with_one_line(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(f"source: {tmp_path}\nout: {tmp_path / 'o'}\nrule: fancy\n")
    assert main(["annotate", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("camlabel annotate: rule: 'fancy' is not allowed") and "\n" not in err


def test_errors_quoting_a_hostile_file_print_one_plain_line(tmp_path, capsys):
    """A binary given as --config, and a labels CSV whose bad row holds a terminal escape sequence and a NUL,
    quoted by pyarrow's parse error: one line, control characters escaped, not a traceback or raw escapes."""
    (tmp_path / "job.yaml").write_bytes(b"source: x\n\xd0\xff\x00")
    assert main(["annotate", "--config", str(tmp_path / "job.yaml")]) == 2
    assert capsys.readouterr().err.startswith("camlabel annotate: config: cannot read")
    (tmp_path / "labels.csv").write_bytes(b"file_name,labels\nx.jpg,cat,\x1b[2J\x00oops\n")
    labels = str(tmp_path / "labels.csv")
    assert main(["annotate", str(tmp_path), "--out", str(tmp_path / "o"), "--labels", labels]) == 2
    err = capsys.readouterr().err
    assert "cannot read labels" in err and "\\x1b[2J\\x00oops" in err
    assert err.count("\n") == 1 and "\x1b" not in err and "\x00" not in err
    assert not (tmp_path / "o").exists()  # refused as it planned: the output's folder goes with its lease


def test_files_nested_past_the_parsers_limit_or_binary_are_one_line(tmp_path, capsys):
    """`[[[...]]]` 200,000 deep raised RecursionError inside json and yaml, and binary predictions a
    UnicodeDecodeError: tracebacks from eval, every command reading a manifest, and --config."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    (tmp_path / "deep.yaml").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(deep.read_text())
    (tmp_path / "binary.json").write_bytes(b"\xd0\xff\x00" * 10)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    cases = ((["eval", "--gt", str(gt), "--pred", str(deep)], f"cannot read predictions {deep}: Recursion"),
             (["eval", "--gt", str(deep), "--pred", str(gt)], f"cannot read ground truth {deep}: Recursion"),
             (["eval", "--gt", str(gt), "--pred", str(tmp_path / "binary.json")], "UnicodeDecodeError"),
             (["export-coco", str(tmp_path / "run"), "--out", str(tmp_path / "c.json")],
              "manifest.json cannot be read as a camlabel manifest: RecursionError"),
             (["annotate", "--config", str(tmp_path / "deep.yaml")], "config: cannot read"))
    for command, line in cases:
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert line in err and err.count("\n") == 1, err[-300:]


def test_an_object_store_that_cannot_be_opened_or_listed_is_one_line(tmp_path, capsys, monkeypatch):
    """A URI pyarrow refuses, and a store that does not answer (a closed port: no network, no such bucket):
    each names the URI and exits 2, where pyarrow's OSError was a traceback."""
    assert main(["export-coco", "s3://bucket/run?nonsense=1", "--out", str(tmp_path / "c.json")]) == 2
    assert "cannot open s3://bucket/run?nonsense=1: Unexpected query parameter" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(SourceError, match="^cannot list s3://bucket/images"):
        image_listing("s3://bucket/images")


def test_a_method_the_model_cannot_run_exits_2_before_anything_starts(tmp_path, capsys):
    # convnext's head normalises after pooling: not GAP + linear, so CAM cannot run on it
    config = tmp_path / "job.yaml"
    config.write_text(f"source: {tmp_path}\nout: {tmp_path / 'o'}\nmodel: convnext_tiny\nweights: null\nmethod: cam\n")
    assert main(["annotate", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("camlabel annotate: method: CAM needs a global-average-pooling") and "\n" not in err
    assert not (tmp_path / "o").exists()  # nothing written, no Ray started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_actors_that_want_a_gpu_on_a_machine_without_one_are_refused_at_once(tmp_path, capsys, monkeypatch):
    """--gpus-per-actor on a machine where Ray sees no GPU: the private local Ray's actors waited for ever (Ray's
    autoscaler said so after 80 s, and waited on)."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    Image.fromarray(gradient()).save(tmp_path / "a.png")
    assert main(["annotate", str(tmp_path), "--out", str(tmp_path / "o"), "--gpus-per-actor", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("camlabel annotate: gpus_per_actor: 1.0 GPU an actor, but Ray sees no GPU")
    assert "\n" not in err
    assert not ray.cluster_resources().get("GPU") and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["export-coco", "{x}", "--out", "{tmp}/c.json"], ["report", "{x}"],
                                     ["export-masks", "{x}", "--out", "{tmp}/m"], ["runs", "{x}"],
                                     ["eval", "--gt", "{x}/gt.json", "--pred", "{x}/pred.json"]])
def test_a_mistyped_run_or_file_exits_2_with_one_line_naming_it(tmp_path, capsys, command):
    missing = str(tmp_path / "no_such_run")
    assert main([c.format(x=missing, tmp=tmp_path) for c in command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"camlabel {command[0]}: ") and missing in err and "\n" not in err


@pytest.mark.parametrize("command", [["export-coco", "{run}", "--out", "{file}/coco.json"],
                                     ["export-masks", "{run}", "--out", "{file}"],
                                     ["report", "{run}", "--out", "{file}"],
                                     ["calibrate", "{tmp}", "--gt", "{tmp}/gt.json", "--out", "{file}/t.yaml"],
                                     ["train", "{tmp}", "--out", "{file}/model"], ["demo", "--out", "{file}"]])
def test_an_output_that_cannot_be_written_exits_2_before_any_work(tmp_path, capsys, command):
    """A file where the output's folder should be: one line naming it, before any run is read or model trained."""
    (tmp_path / "a_file").write_text("")
    args = [c.format(run=tmp_path / "no_run_either", file=tmp_path / "a_file", tmp=tmp_path) for c in command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"camlabel {command[0]}: out: cannot write in {tmp_path / 'a_file'}") and "\n" not in err


@pytest.mark.parametrize("command", [["export-coco", "{run}", "--out", "{new}/coco.json"],
                                     ["export-masks", "{run}", "--out", "{new}"], ["report", "{run}", "--out", "{new}"],
                                     ["calibrate", "{tmp}", "--gt", "{tmp}/gt.json", "--out", "{new}/t.yaml"],
                                     ["train", "{tmp}", "--out", "{new}/model"]])
def test_a_command_refused_after_its_output_was_checked_leaves_no_folder_behind(tmp_path, capsys, command):
    """The output's folders are made to check that they can be written, then removed: a command refused after
    (no run there, no ground truth, no images) leaves no empty folder."""
    args = [c.format(run=tmp_path / "no_run", new=tmp_path / "new" / "out", tmp=tmp_path) for c in command]
    assert main(args) == 2
    assert "cannot write" not in capsys.readouterr().err  # refused after the check, not by it
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("incremental", [True, False])
def test_a_plain_run_and_an_incremental_root_never_share_a_folder(tmp_path, capsys, incremental):
    """Neither would see the other's images, and an export of the folder would leave the plain run out."""
    out = tmp_path / "out"
    (out / "runs" / "r1").mkdir(parents=True)
    (out / ("manifest.json" if incremental else "runs/r1/manifest.json")).write_text("{}")
    assert main(["annotate", str(tmp_path), "--out", str(out), *(["--incremental"] if incremental else [])]) == 2
    err = capsys.readouterr().err.strip()
    expected = "holds a run made without --incremental" if incremental else "is an incremental root"
    assert err.startswith(f"camlabel annotate: out: {out} ") and expected in err and "\n" not in err


def test_a_plain_run_is_resumed_only_from_its_own_source(tmp_path, capsys, monkeypatch):
    """Another folder into the same --out would mix two collections under one manifest naming one of them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"source": "/somewhere/else", "model": {"class_names": ["a"]}}))
    monkeypatch.chdir(tmp_path)
    assert main(["annotate", ".", "--out", "out"]) == 2  # the source is compared as an absolute path
    err = capsys.readouterr().err.strip()
    assert err == (f"camlabel annotate: source: {out} holds a run of '/somewhere/else', not '{tmp_path}'; resume it "
                   "with the same source, or write to another --out")
