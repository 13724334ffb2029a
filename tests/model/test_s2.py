"""Dynamic-S2 numerics: tiling, chessboard split/merge, multi-scale merge, and the full shape walk."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from nvila_quant.model.media import dynamic_s2_preprocess, find_closest_aspect_ratio, target_ratios
from nvila_quant.model.vision import merge_chessboard, merge_features_for_dynamic_s2, split_chessboard

SCALES = [448, 896, 1344]


@pytest.mark.parametrize(
    ("size", "block", "tiles"),
    [((1024, 1024), (3, 3), 14), ((1920, 1080), (3, 4), 17), ((1080, 1920), (5, 2), 15), ((448, 448), (3, 3), 14)],
)
def test_s2_tile_selection_reference_examples(size, block, tiles):
    image = PIL.Image.new("RGB", size, (120, 30, 200))
    crops, block_size = dynamic_s2_preprocess(image, SCALES, max_num=12, image_size=448)
    assert block_size == block
    assert len(crops) == tiles == 5 + block[0] * block[1]
    assert all(c.size == (448, 448) for c in crops)


def test_grid_tie_prefers_larger_grid_only_for_large_images():
    ratios = target_ratios(1, 12)
    assert find_closest_aspect_ratio(2.0, ratios, 800, 400, 448) == (2, 1)
    assert find_closest_aspect_ratio(2.0, ratios, 1792, 896, 448) == (4, 2)


def test_s2_crops_are_row_major():
    # a 2x1 image whose left half is black and right half white -> last-scale tiles alternate by column
    image = PIL.Image.new("RGB", (1344 * 2, 1344))
    image.paste((255, 255, 255), (1344, 0, 2688, 1344))
    crops, (rows, cols) = dynamic_s2_preprocess(image, SCALES, 12, 448)
    last = crops[5:]
    assert rows * cols == len(last)
    for r in range(rows):
        for c in range(cols):
            mean = sum(last[r * cols + c].convert("L").getdata()) / 448**2
            assert (mean > 128) == (c >= cols / 2)


@pytest.mark.parametrize(("nh", "nw"), [(1, 1), (2, 3), (3, 3), (5, 2)])
def test_merge_chessboard_inverts_split(nh, nw):
    x = torch.randn(2, 7, 4 * nh, 6 * nw)
    parts = split_chessboard(x, nh, nw)
    assert parts.shape == (2 * nh * nw, 7, 4, 6)
    assert torch.equal(merge_chessboard(parts, nh, nw), x)
    # tile (i, j) of image b sits at index (i * nw + j) * B + b
    assert torch.equal(parts[(nh - 1) * nw * 2 + 1], x[1, :, -4:, :6])


def test_merge_chessboard_accepts_token_sequences():
    x = torch.randn(6, 16, 5)  # 6 tiles of a 4x4 token grid
    as_maps = x.transpose(1, 2).reshape(6, 5, 4, 4)
    assert torch.equal(merge_chessboard(x, 2, 3), merge_chessboard(as_maps, 2, 3))


def _reference_merge(features, block, c):
    """Independent re-statement of the reference merge for one image."""
    def board(tiles, nh, nw):
        maps = tiles.transpose(1, 2).reshape(-1, c, 32, 32)
        rows = [torch.cat(list(maps[i * nw:(i + 1) * nw]), dim=-1) for i in range(nh)]
        return torch.cat(rows, dim=-2)[None]
    s0 = board(features[0:1], 1, 1)
    s1 = board(features[1:5], 2, 2)
    s2 = board(features[5:], *block)
    size = s2.shape[-2:]
    return torch.cat([F.interpolate(m, size=size, mode="area") for m in (s0, s1, s2)], dim=1)


def test_merge_features_for_dynamic_s2_matches_reference():
    c = 8
    feats = torch.randn(5 + 12 + 1, 1024, c)
    merged, blocks = merge_features_for_dynamic_s2(feats, [(3, 4), None], SCALES, -1)
    assert blocks == [(3, 4), (1, 1)]
    assert merged[0].shape == (1, 3 * c, 96, 128)
    torch.testing.assert_close(merged[0], _reference_merge(feats[:17], (3, 4), c))
    # a single-tile image repeats its 448 map over every scale
    single = feats[17:].transpose(1, 2).reshape(1, c, 32, 32)
    assert torch.equal(merged[1], single.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="account for"):
        merge_features_for_dynamic_s2(feats, [(3, 4)], SCALES, -1)


def test_s2_shape_walk_on_tiny_model(tiny_model):
    """1024x1024 -> 14 tiles, block (3,3) -> 2304 LLM tokens + one "\\n"."""
    image = PIL.Image.new("RGB", (1024, 1024), (10, 200, 30))
    conversation = [{"from": "human", "value": [image, "Describe."]}]
    media, media_config = tiny_model.prepare_media(conversation)
    assert conversation[0]["value"] == "<image>Describe."
    assert len(media["image"]) == 14 and media["image"][0].shape == (3, 448, 448)
    assert media_config["image"]["block_sizes"] == [(3, 3)]
    tiles = torch.stack(media["image"])
    vt = tiny_model.get_vision_tower()
    feats = vt(tiles)
    assert feats.shape == (14, 1024, vt.config.hidden_size)
    encoded = tiny_model.encode_images(tiles, block_sizes=[(3, 3)])
    assert encoded.shape == (1, 2304, tiny_model.config.hidden_size)
    blocks = tiny_model.encoders["image"](media["image"], media_config["image"])
    assert blocks[0].shape == (2305, tiny_model.config.hidden_size)
    newline = tiny_model.get_llm().get_input_embeddings()(
        torch.tensor(tiny_model.tokenizer("\n", add_special_tokens=False).input_ids)
    )
    assert torch.equal(blocks[0][-1:], newline)


def test_vision_features_equal_hidden_states_select_layer(tiny_model):
    vt = tiny_model.get_vision_tower()
    tiles = torch.randn(2, 3, 448, 448)
    ours = vt(tiles)
    full = vt.vision_tower(pixel_values=tiles, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
