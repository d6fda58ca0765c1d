"""Quantization and the artifact: packing, exact and deterministic round-trips, and clear errors on bad files."""

import dataclasses

import numpy as np
import pytest
import torch

import train_gpt as tg

from test_model import tiny_model


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_is_exact_for_every_value(bits):
    values = np.tile(np.arange(2 ** bits, dtype=np.uint8), 7)[:-3]  # every value, a length not a multiple of 8
    packed = tg.pack_bits(values, bits)
    assert len(packed) == (values.size * bits + 7) // 8
    assert np.array_equal(tg.unpack_bits(packed, bits, values.size), values)


def test_int6_packs_four_values_in_three_bytes():
    assert len(tg.pack_bits(np.arange(64, dtype=np.uint8), 6)) == 48
    with pytest.raises(ValueError, match="does not fit in 6 bits"):
        tg.pack_bits(np.array([64], dtype=np.uint8), 6)


@pytest.mark.parametrize("packing", ["byte", "dense"])
@pytest.mark.parametrize("bits", [5, 6, 8])
def test_signed_values_round_trip_through_both_packings(packing, bits):
    qmax = 2 ** (bits - 1) - 1
    q = torch.arange(-qmax, qmax + 1, dtype=torch.int8).repeat(3)
    data = tg.encode_ints(q, bits, packing)
    assert len(data) == tg.int_nbytes(bits, q.numel(), packing)
    assert np.array_equal(tg.decode_ints(data, bits, q.numel(), packing), q.numpy())


def test_quantize_rows_respects_range_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    q, scale = tg.quantize_rows(w, 6, 12.85)
    assert q.abs().max() <= 31 and scale.dtype == torch.float16
    err = (tg.dequantize_rows(q, scale) - w).abs()
    assert (err <= scale.float()[:, None] / 2 + 1e-6).all()  # nothing is clipped at 12.85 sigma


def export(model, tmp_path, name="a.pgz", **cfg_kw):
    cfg = tg.Config(**cfg_kw)
    frames, records = tg.serialize_state(model.state_dict(), model.mc, cfg)
    path = tmp_path / name
    size = tg.write_artifact(path, frames, cfg.compressor)
    assert size == path.stat().st_size
    return path, cfg


def expected_roundtrip(model, cfg):
    expect = {}
    for name, t in model.state_dict().items():
        kind, bits, clip = tg.quant_plan(name, t, cfg)
        expect[name] = (tg.dequantize_rows(*tg.quantize_rows(t, bits, clip)) if kind == "int" else t.half().float())
    return expect


@pytest.mark.parametrize("compressor,packing", [("brotli", "byte"), ("zstd", "dense")])
def test_artifact_round_trip_is_exact(tmp_path, compressor, packing):
    model = tiny_model()
    path, cfg = export(model, tmp_path, compressor=compressor, packing=packing)
    mc, state = tg.read_artifact(path)
    assert mc == model.mc
    expect = expected_roundtrip(model, cfg)
    assert set(state) == set(expect)
    for name in expect:
        assert torch.equal(state[name], expect[name]), name
    fresh = tg.GPT(mc, tg.Backends("torch", "sdpa"))
    tg.load_exported_state(fresh, state, str(path))
    x = torch.randint(0, 97, (1, 20))
    quantized = tiny_model()
    quantized.load_state_dict(expect)
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))


def test_artifact_records_the_gdn_beta_range(tmp_path):
    """A model trained with GDN_NEG_EIGVAL is rebuilt with it from the artifact alone (EVAL_ONLY needs no setting)."""
    model = tiny_model(layout="GSG", GDN_NEG_EIGVAL="1")
    path, cfg = export(model, tmp_path)
    mc, state = tg.read_artifact(path)
    assert mc.gdn_neg_eigval and mc == model.mc
    fresh = tg.GPT(mc, tg.Backends("torch", "sdpa"))
    tg.load_exported_state(fresh, state, str(path))
    quantized = tiny_model(layout="GSG", GDN_NEG_EIGVAL="1")
    quantized.load_state_dict(expected_roundtrip(model, cfg))
    plain = tg.GPT(tg.ModelConfig(**{**mc.__dict__, "gdn_neg_eigval": False}), tg.Backends("torch", "sdpa"))
    plain.load_state_dict(quantized.state_dict())
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))
        assert not torch.allclose(fresh(x), plain(x))  # the flag changes the model: losing it would be visible


@pytest.mark.parametrize("field,env", [("mlp_neg_slope", {"MLP_NEG_SLOPE": "0.5"}), ("xsa_last", {"XSA_LAST": "1"})])
def test_artifact_records_the_mlp_activation_and_xsa(tmp_path, field, env):
    """MLP_NEG_SLOPE and XSA_LAST change the forward pass: the artifact alone rebuilds the model with them."""
    model = tiny_model(layout="GSA", **env)
    path, cfg = export(model, tmp_path)
    mc, state = tg.read_artifact(path)
    assert getattr(mc, field) and mc == model.mc
    fresh = tg.GPT(mc, tg.Backends("torch", "sdpa"))
    tg.load_exported_state(fresh, state, str(path))
    quantized = tiny_model(layout="GSA", **env)
    quantized.load_state_dict(expected_roundtrip(model, cfg))
    plain = tg.GPT(tg.ModelConfig(**{**mc.__dict__, field: type(getattr(mc, field))(0)}), tg.Backends("torch", "sdpa"))
    plain.load_state_dict(quantized.state_dict())
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))
        assert not torch.allclose(fresh(x), plain(x))  # the setting changes the model: losing it would be visible


def test_artifact_bytes_are_deterministic(tmp_path):
    a, _ = export(tiny_model(seed=3), tmp_path, "a.pgz")
    b, _ = export(tiny_model(seed=3), tmp_path, "b.pgz")
    c, _ = export(tiny_model(seed=4), tmp_path, "c.pgz")
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_the_int_routing_follows_the_optimizer_table():
    model = tiny_model()
    cfg = tg.Config()
    kinds = {n: tg.quant_plan(n, t, cfg)[:2] for n, t in model.state_dict().items()}
    assert kinds["tok_emb.weight"] == ("int", 8)
    assert kinds["mixers.0.q_proj.weight"] == ("int", 6)
    assert kinds["mixers.0.a_proj.weight"] == ("fp16", 16)
    assert kinds["mixers.0.q_conv.weight"] == ("fp16", 16) and kinds["mixers.0.A_log"] == ("fp16", 16)


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "checksum"), ("flip", "checksum"), ("magic", "expected b'PGOLFGDN'"), ("version", "format version 9"),
    ("tiny", "shorter than its header"), ("missing", "does not exist"),
])
def test_damaged_artifacts_raise_clear_errors(tmp_path, damage, needle):
    path, _ = export(tiny_model(), tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "magic":
        data[:8] = b"NOTMINE!"
    elif damage == "version":
        data[8:10] = (9).to_bytes(2, "little")
    elif damage == "tiny":
        data = data[:10]
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(bytes(data))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        tg.read_artifact(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_tensor_name_or_shape_mismatch_is_a_clear_error(tmp_path):
    path, _ = export(tiny_model("GSGs"), tmp_path)
    _, state = tg.read_artifact(path)
    other = tiny_model("GSGA")  # one more mixer than the artifact holds
    with pytest.raises(ValueError, match="missing .*mixers.3"):
        tg.load_exported_state(other, state, str(path))
    model = tiny_model("GSGs")
    state["mlps.0.fc.weight"] = state["mlps.0.fc.weight"][:, :-1]
    with pytest.raises(ValueError, match="mlps.0.fc.weight has shape"):
        tg.load_exported_state(model, state, str(path))


def test_writing_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous artifact untouched and no temp file behind."""
    path, cfg = export(tiny_model(seed=1), tmp_path)
    before = path.read_bytes()
    frames, _ = tg.serialize_state(tiny_model(seed=2).state_dict(), tiny_model().mc, cfg)

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(tg.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        tg.write_artifact(path, frames, cfg.compressor)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_checkpoint_round_trips_weights_architecture_and_info(tmp_path):
    model = tiny_model("GSGs", seed=3)
    path = tmp_path / "ckpt" / "run.pt"
    size = tg.write_checkpoint(path, model, dict(steps=7, train_ms=1234.5, ema=True, max_wallclock_seconds=600.0))
    assert size == path.stat().st_size > 0
    mc, state, info = tg.read_checkpoint(path)
    assert mc == model.mc and info == dict(steps=7, train_ms=1234.5, ema=True, max_wallclock_seconds=600.0)
    fresh = tiny_model("GSGs", seed=4)
    tg.load_exported_state(fresh, state, str(path), kind="checkpoint")
    for name, t in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    with pytest.raises(ValueError, match="checkpoint info"):
        tg.write_checkpoint(path, model, dict(steps=7))


def test_a_bad_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "run.pt"
    tg.write_checkpoint(path, tiny_model(), dict(steps=1, train_ms=1.0, ema=False, max_wallclock_seconds=0.0))
    data = path.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"checkpoint {bad} cannot be read, truncated or not a checkpoint"):
        tg.read_checkpoint(bad)
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match=f"checkpoint {bad} is not a checkpoint of this script"):
        tg.read_checkpoint(bad)
    payload = torch.load(path, weights_only=True)
    del payload["train_ms"]
    torch.save(payload, bad)
    with pytest.raises(ValueError, match=r"lacks \['train_ms'\]"):
        tg.read_checkpoint(bad)
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["wings"] = 2
    torch.save(payload, bad)
    with pytest.raises(ValueError, match="records an architecture this script cannot build"):
        tg.read_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="checkpoint .*none.pt does not exist"):
        tg.read_checkpoint(tmp_path / "none.pt")
    _, state, _ = tg.read_checkpoint(path)
    with pytest.raises(ValueError, match=f"checkpoint {path} does not fit the model: missing"):
        tg.load_exported_state(tiny_model("GSGsG"), state, str(path), kind="checkpoint")


def test_checkpoint_writing_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    tg.write_checkpoint(path, tiny_model(seed=1), dict(steps=1, train_ms=1.0, ema=False, max_wallclock_seconds=0.0))
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(tg.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        tg.write_checkpoint(path, tiny_model(seed=2), dict(steps=2, train_ms=2.0, ema=False, max_wallclock_seconds=0.0))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_file_of_another_vocabulary_is_refused_even_when_vocab_size_is_not_set(monkeypatch, tmp_path):
    """VOCAB_SIZE left at its default: the tokenizer and shards were checked for 1024 tokens, so an artifact or
    checkpoint of 97 must not score them (it would, without an error)."""
    monkeypatch.delenv("VOCAB_SIZE", raising=False)
    model = tiny_model()  # VOCAB_SIZE=97
    cfg = tg.Config.from_env({})
    for mode, kind in (("EVAL_ONLY", "artifact"), ("EXPORT_FROM", "checkpoint")):
        with pytest.raises(ValueError, match=f"{mode}: the {kind} {tmp_path} has a vocabulary of 97 tokens, and this "
                                             "run's tokenizer and shards are for VOCAB_SIZE=1024"):
            tg.require_model_matches(cfg, model.mc, mode, kind, tmp_path)
    tg.require_model_matches(dataclasses.replace(cfg, vocab_size=97), model.mc, "EVAL_ONLY", "artifact", tmp_path)
