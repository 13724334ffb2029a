"""Media loading: NVILA-Lite tiling with thumbnail, images, videos (file, folder, frame list)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from nvila_quant.errors import MediaError
from nvila_quant.model.media import Image, Video, dynamic_preprocess, load_image, load_video_frames


def _write_video(path, n_frames: int = 24, size=(64, 48)):
    import av  # a hard dependency: missing is a failure, not a skip

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            arr = np.full((size[1], size[0], 3), i * 10, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _level(im: PIL.Image.Image) -> float:
    return float(np.asarray(im).mean())


@pytest.mark.parametrize(
    ("size", "n_tiles"),
    [((448, 448), 1), ((800, 400), 3), ((1792, 896), 9), ((400, 1200), 4)],
)
def test_dynamic_tiling_with_thumbnail(size, n_tiles):
    image = PIL.Image.new("RGB", size, (1, 2, 3))
    tiles = dynamic_preprocess(image, min_num=1, max_num=12, image_size=448)
    assert len(tiles) == n_tiles  # grid tiles + one thumbnail when the grid has more than one tile
    assert all(t.size == (448, 448) for t in tiles)


def test_thumbnail_is_whole_image():
    image = PIL.Image.new("RGB", (1792, 896), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 896, 896))  # left half white
    tiles = dynamic_preprocess(image, 1, 12, 448)
    thumb = np.asarray(tiles[-1].convert("L"))
    assert thumb[:, :200].mean() > 200 and thumb[:, -200:].mean() < 50


def test_video_file_uniform_sampling(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, 24)
    frames = load_video_frames(Video(path), num_frames=8)
    assert len(frames) == 8
    expected = np.round(np.linspace(0, 23, 8)).astype(int) * 10
    levels = [_level(f) for f in frames]
    assert np.allclose(levels, expected, atol=6), levels


def test_video_frame_list_and_folder(tmp_path):
    frames = [np.full((20, 30, 3), i * 20, dtype=np.uint8) for i in range(10)]
    out = load_video_frames(Video(frames=frames), num_frames=4)
    assert [round(_level(f)) for f in out] == [0, 60, 120, 180]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        PIL.Image.fromarray(f).save(folder / f"{i:03d}.png")
    out = load_video_frames(Video(folder), num_frames=4)
    assert [round(_level(f)) for f in out] == [0, 60, 120, 180]


def test_bad_media(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(MediaError, match="cannot read image .*broken.jpg"):
        load_image(Image(bad))
    with pytest.raises(MediaError, match="image file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="video file not found"):
        load_video_frames(Video(tmp_path / "missing.mp4"), 8)
    notvideo = tmp_path / "x.mp4"
    notvideo.write_bytes(b"\x00" * 100)
    with pytest.raises(MediaError, match="x.mp4"):
        load_video_frames(Video(notvideo), 8)
    with pytest.raises(MediaError, match="exactly one"):
        Video()
