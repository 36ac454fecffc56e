"""Pretrained-encoder pieces: pooling of resized features, token layouts, safe weights files, fusion."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghist._model._encoder import (
    FeatureEncoder,
    _token_layout,
    encoder_for_load,
    pool_resized,
    prepare_encoder,
    read_weights,
)
from ghist._model._network import GHISTNetwork, segment_pool


class TinyCNN(nn.Module):
    def __init__(self, channels: int = 6):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, stride=4, padding=1), nn.BatchNorm2d(channels), nn.ReLU())

    def forward(self, x):
        return self.body(x)


class TinyViT(nn.Module):
    """Patch embedding + one transformer layer; ``n_prefix`` class/register tokens before the patches."""

    def __init__(self, dim: int = 8, patch: int = 8, n_prefix: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.prefix = nn.Parameter(torch.randn(1, n_prefix, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.block(torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], dim=1))


def _batch_labels(n_tiles: int, size: int, per_tile: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-1, per_tile + 1, (n_tiles, size, size), generator=g)
    offsets = (torch.arange(n_tiles) * per_tile).view(-1, 1, 1)
    labels = torch.where(raw > 0, raw + offsets, raw)
    return labels, torch.arange(n_tiles * per_tile) // per_tile


@pytest.mark.parametrize(("h", "w", "size"), [(4, 5, 32), (16, 16, 16), (7, 7, 20), (40, 40, 32), (1, 1, 8)])
def test_pool_resized_equals_interpolate_then_segment_pool(h, w, size):
    torch.manual_seed(0)
    features = torch.randn(3, 6, h, w)
    labels, cell_batch = _batch_labels(3, size, 8)
    cells, tiles = pool_resized(features, labels, cell_batch, 24)
    resized = F.interpolate(features, size=(size, size), mode="bilinear", align_corners=False)
    expected, _ = segment_pool([resized], labels, 24)
    torch.testing.assert_close(cells, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiles, resized.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)


def test_pool_resized_gradient_reaches_the_features():
    features = torch.randn(2, 4, 4, 4, requires_grad=True)
    labels, cell_batch = _batch_labels(2, 16, 3)
    cells, tiles = pool_resized(features, labels, cell_batch, 6)
    (cells.sum() + tiles.sum()).backward()
    assert features.grad is not None
    assert features.grad.abs().sum() > 0


def test_token_layout_given_inferred_and_refused():
    assert _token_layout(265, None, None) == (9, [16, 16])  # UNI2-h: class + 8 registers + 16 x 16
    assert _token_layout(261, 5, None) == (5, [16, 16])  # Virchow2 / H-optimus-0: class + 4 registers
    assert _token_layout(256, None, None) == (0, [16, 16])
    assert _token_layout(1 + 6 * 4, 1, [6, 4]) == (1, [6, 4])
    with pytest.raises(ValueError, match="not a square grid"):
        _token_layout(1 + 6 * 4, 1, None)
    with pytest.raises(ValueError, match="does not account"):
        _token_layout(30, 2, [5, 5])


def _write_safetensors(path, tensors):
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


def test_read_weights_safetensors_torch_and_wrapped(tmp_path):
    state = TinyCNN().state_dict()
    floats = {k: v.float() for k, v in state.items()}
    _write_safetensors(tmp_path / "w.safetensors", floats)
    got = read_weights(tmp_path / "w.safetensors")
    assert set(got) == set(floats)
    assert all(torch.equal(got[k], floats[k]) for k in floats)
    torch.save({"state_dict": state}, tmp_path / "w.bin")
    got = read_weights(tmp_path / "w.bin")
    assert all(torch.equal(got[k], state[k]) for k in state)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_ENCODER_WEIGHTS",))


def test_read_weights_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.bin", "wb") as fh:
        pickle.dump({"weight": _Exploit()}, fh)
    torch.save({"w": _Exploit()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    for name in ("evil.bin", "evil.pt"):
        with pytest.raises(ValueError, match="cannot be read safely"):
            read_weights(tmp_path / name)
    assert not (tmp_path / "PWNED_BY_ENCODER_WEIGHTS").exists()


def test_read_weights_refuses_garbage_and_non_tensors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError, match=r"not a readable \.safetensors"):
        read_weights(tmp_path / "bad.safetensors")
    torch.save({"a": 1}, tmp_path / "ints.pt")
    with pytest.raises(ValueError, match="expected a dict of tensors"):
        read_weights(tmp_path / "ints.pt")
    with pytest.raises(FileNotFoundError, match="encoder_weights"):
        read_weights(tmp_path / "missing.bin")


def _encoder(module, trainable=False, **options):
    module, config = prepare_encoder(module, trainable=trainable, options=options or None)
    return FeatureEncoder(module, config, tile_mean=[120.0] * 3, tile_std=[40.0] * 3, tile_size=32, out_features=5)


def test_feature_encoder_sees_rgb_in_unit_range_normalised_its_way():
    seen = {}

    class Spy(TinyCNN):
        def forward(self, x):
            seen["x"] = x
            return super().forward(x)

    enc = _encoder(Spy(), input_size=16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    rgb = torch.rand(2, 3, 32, 32) * 255
    standardised = (rgb - 120.0) / 40.0  # what the tile store gives the network
    enc.feature_map(standardised)
    expected = F.interpolate(rgb / 255, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(seen["x"], (expected - 0.5) / 0.25, atol=1e-4, rtol=1e-4)
    assert enc.config["out_dim"] == 6
    assert enc.config["output"] == "map"


def test_frozen_encoder_stays_in_eval_mode_without_gradients():
    enc = _encoder(TinyViT(), trainable=False)
    assert enc.config["num_prefix_tokens"] == 3
    assert enc.config["patch_grid"] == [4, 4]
    enc.train()
    assert not enc.model.training
    assert enc.project.training
    labels, cell_batch = _batch_labels(2, 32, 3)
    enc(torch.randn(2, 3, 32, 32), labels, cell_batch, 6).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.model.parameters())
    assert all(p.grad is not None for p in enc.project.parameters())
    trainable = _encoder(TinyViT(), trainable=True).train()
    assert trainable.model.training
    trainable(torch.randn(2, 3, 32, 32), labels, cell_batch, 6).sum().backward()
    assert all(p.grad is not None for p in trainable.model.parameters())


def test_prepare_encoder_copies_the_module_and_checks_arguments():
    mine = TinyCNN()
    module, _ = prepare_encoder(mine)
    assert module is not mine
    with pytest.raises(ValueError, match="unknown keys"):
        prepare_encoder(mine, options={"mena": [0, 0, 0]})
    with pytest.raises(ValueError, match="std"):
        prepare_encoder(mine, options={"std": [1, 0, 1]})
    with pytest.raises(TypeError, match=r"nn\.Module or a timm model name"):
        prepare_encoder(42)
    with pytest.raises(TypeError, match="encoder_trainable"):
        prepare_encoder(mine, trainable="yes")


def test_encoder_that_pools_is_refused():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="before pooling"):
        _encoder(Pooled())


def test_network_concatenates_encoder_features_and_default_is_unchanged():
    torch.manual_seed(0)
    plain = GHISTNetwork(n_genes=3, n_types=2, width=4, embed_dim=8, hidden=8, n_heads=2)
    torch.manual_seed(0)
    again = GHISTNetwork(n_genes=3, n_types=2, width=4, embed_dim=8, hidden=8, n_heads=2, feature_encoder=None)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values(), strict=True))
    enc = _encoder(TinyCNN())
    net = GHISTNetwork(n_genes=3, n_types=2, width=4, embed_dim=8, hidden=8, n_heads=2, feature_encoder=enc).eval()
    assert net.embed[0].in_features == plain.embed[0].in_features + 5
    labels, cell_batch = _batch_labels(2, 32, 3)
    image = torch.randn(2, 3, 32, 32)
    before = net(image, labels, cell_batch, 6)["embedding"]
    with torch.no_grad():
        enc.model.body[0].weight.mul_(-1)
    assert not torch.allclose(before, net(image, labels, cell_batch, 6)["embedding"])


def test_encoder_for_load_needs_the_same_class():
    _, config = prepare_encoder(TinyCNN())
    with pytest.raises(ValueError, match="pass a module of the same architecture"):
        encoder_for_load(config, None)
    with pytest.raises(ValueError, match="TinyCNN"):
        encoder_for_load(config, TinyViT())
