"""Quantization and the artifact: packing, exact and deterministic round-trips, and clear errors on bad files."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import train_gpt as tg

from test_model import FEATURES, tiny_model


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
    # the grid (SPEC 6): k * std(row) / qmax, stored in fp16; with a step of another size every bound above holds
    assert torch.equal(scale, (12.85 * w.std(dim=1, unbiased=False) / 31).clamp_min(tg.MIN_SCALE).half())
    q8, scale8 = tg.quantize_rows(w, 8, 12.85)
    assert torch.equal(scale8, (12.85 * w.std(dim=1, unbiased=False) / 127).half())
    assert torch.equal(q8, torch.round(w / scale8.float()[:, None]).clamp(-127, 127).to(torch.int8))


def export(model, tmp_path, name="a.pgz", **cfg_kw):
    cfg = tg.Config(**cfg_kw)
    frames, records = tg.serialize_state(model.state_dict(), model.mc, cfg)
    path = tmp_path / name
    data = tg.pack_artifact(frames, cfg.compressor)
    tg.write_atomically(path, lambda f: f.write(data))
    assert len(data) == path.stat().st_size
    return path, cfg


def expected_roundtrip(model, cfg):
    expect = {}
    for name, t in model.state_dict().items():
        kind, bits, clip = tg.quant_plan(name, t, cfg)
        expect[name] = (tg.dequantize_rows(*tg.quantize_rows(t, bits, clip)) if kind == "int" else t.half().float())
    return expect


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("compressor,packing", [("brotli", "byte"), ("zstd", "dense")])
def test_artifact_round_trip_is_exact(tmp_path, compressor, packing, features):
    env = FEATURES if features else {}  # BigramHash's table and projection, SmearGate's gate, the skips' weights
    model = tiny_model(**env)
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
    quantized = tiny_model(**env)
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


@pytest.mark.parametrize("field,env", [("mlp_neg_slope", {"MLP_NEG_SLOPE": "0.5"}), ("xsa_last", {"XSA_LAST": "1"}),
                                       ("resid_mix", {"RESID_MIX": "1"}), ("branch_scales", {"BRANCH_SCALES": "1"})])
def test_artifact_records_the_mlp_activation_xsa_and_the_block_scalars(tmp_path, field, env):
    """MLP_NEG_SLOPE, XSA_LAST, RESID_MIX and BRANCH_SCALES change the forward pass: the artifact alone rebuilds the
    model with them."""
    model = tiny_model(layout="GSA", **env)
    path, cfg = export(model, tmp_path)
    mc, state = tg.read_artifact(path)
    assert getattr(mc, field) and mc == model.mc
    fresh = tg.GPT(mc, tg.Backends("torch", "sdpa"))
    tg.load_exported_state(fresh, state, str(path))
    quantized = tiny_model(layout="GSA", **env)
    quantized.load_state_dict(expected_roundtrip(model, cfg))
    plain = tg.GPT(tg.ModelConfig(**{**mc.__dict__, field: type(getattr(mc, field))(0)}), tg.Backends("torch", "sdpa"))
    plain.load_state_dict({k: v for k, v in quantized.state_dict().items() if k in plain.state_dict()})
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))
        assert not torch.allclose(fresh(x), plain(x))  # the setting changes the model: losing it would be visible


def test_artifact_keeps_the_trained_query_gains_not_their_start(tmp_path):
    """QK_GAIN_INIT: the artifact records the setting (the model is rebuilt with gain vectors) and each head's trained
    gain as fp16, not the start value the rebuilt model begins with."""
    model = tiny_model(layout="GSA", QK_GAIN_INIT="1.5")
    trained = {n: p for n, p in model.named_parameters() if n.endswith("q_gain")}
    assert len(trained) == 2
    with torch.no_grad():
        for p in trained.values():
            p.copy_(torch.tensor([0.7, 1.9, 4.2, 5.3]))
    path, _ = export(model, tmp_path)
    mc, state = tg.read_artifact(path)
    assert mc.qk_gain_init == 1.5 and mc == model.mc
    fresh = tg.GPT(mc, tg.Backends("torch", "sdpa"))
    assert all(p.tolist() == [1.5] * 4 for n, p in fresh.named_parameters() if n.endswith("q_gain"))
    tg.load_exported_state(fresh, state, str(path))
    for name, p in trained.items():
        assert torch.equal(fresh.get_parameter(name).data, p.detach().half().float()), name


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
    # the header's own fields, outside the checksum: the frame count and the compressor
    ("frame count", "header's frame count 1677721"), ("one frame more", "frame table does not match"),
    ("compressor", "does not decompress with zstd, the compressor its header names"),
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
    elif damage in ("frame count", "one frame more"):  # bytes 15-18, little-endian
        n_frames = int.from_bytes(data[15:19], "little")
        assert 1 < n_frames < 10 and data[10] == tg.COMPRESSOR_IDS["brotli"]  # what the cases' messages expect
        data[15:19] = (n_frames + (1 << 24 if damage == "frame count" else 1)).to_bytes(4, "little")
    elif damage == "compressor":  # byte 10
        data[10] = tg.COMPRESSOR_IDS["zstd"]
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
        tg.write_atomically(path, lambda f: f.write(tg.pack_artifact(frames, cfg.compressor)))
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


def log_linear_size(c: float) -> int:
    """A stand-in for artifact bytes against the matrix clip: falling in ln(clip), and not exactly linearly."""
    x = math.log(c)
    return int(30_100_000 - 6_000_000 * x + 400_000 * (x - 2.5) ** 2)


def narrowest_fit(size_at, lo, hi, budget):
    """An independent answer: bisection in the clip itself for the smallest one whose size fits."""
    a, b = lo, hi
    for _ in range(60):
        m = (a + b) / 2
        a, b = (a, m) if size_at(m) <= budget else (m, b)
    return b


@pytest.mark.parametrize("start,budget,slope", [(12.85, 15_200_000, 6_000_000), (12.85, 15_200_000, 3_000_000),
                                                (12.85, 15_200_000, 12_000_000), (9.0, 12_000_000, 6_000_000),
                                                (12.85, 15_200_000, 60_000_000)])
def test_clip_fit_finds_the_narrowest_clip_that_fits_within_the_slack(start, budget, slope):
    calls = []
    clip, trials = tg.fit_matrix_clip(lambda c: calls.append(c) or log_linear_size(c), start, 8.0, 24.0, budget, slope,
                                      slack=40_000, max_trials=8)
    size = log_linear_size(clip)
    assert size <= budget and budget - size <= 40_000
    assert narrowest_fit(log_linear_size, 8.0, 24.0, budget) <= clip  # nothing narrower fits ...
    assert log_linear_size(clip * 0.99) > budget - 40_000 - 70_000  # ... and it is within 1% of the edge
    assert trials == [(c, log_linear_size(c)) for c in calls] and trials[0][0] == pytest.approx(start)
    assert clip in calls
    assert len(trials) <= 3  # a guessed slope half or ten times the true one costs one more export, not several


def test_clip_fit_stops_at_its_bounds():
    # everything fits down to the narrowest allowed clip: that one
    clip, trials = tg.fit_matrix_clip(log_linear_size, 12.85, 8.0, 24.0, 30_000_000, 6e6, slack=40_000)
    assert clip == pytest.approx(8.0) and log_linear_size(clip) <= 30_000_000
    # nothing fits even at the widest: the widest, which the caller reports as over the limit
    clip, trials = tg.fit_matrix_clip(log_linear_size, 12.85, 8.0, 24.0, 1_000_000, 6e6, slack=40_000)
    assert clip == pytest.approx(24.0) and trials[-1][0] == clip and log_linear_size(clip) > 1_000_000
    # a size that jumps (no clip lands in the slack): the trial count bounds the search, and what fits is kept
    step = lambda c: 16_000_000 if c < 11.0 else 14_000_000  # noqa: E731
    clip, trials = tg.fit_matrix_clip(step, 12.85, 8.0, 24.0, 15_000_000, 6e6, slack=40_000, max_trials=5)
    assert len(trials) == 5 and step(clip) <= 15_000_000 and 11.0 <= clip < 11.5


def test_export_with_clip_fit_fills_the_limit(tmp_path, monkeypatch):
    """MATRIX_CLIP_FIT on the real export: with the limit set where a clip of 10 sigmas lands, the written artifact
    plus the code fits it to within the slack, and its matrices carry the clip that was chosen."""
    model = tiny_model(seed=5)
    state = model.state_dict()
    at10 = len(tg.pack_artifact(tg.serialize_state(state, model.mc, tg.Config(matrix_clip_sigmas=10.0))[0], "brotli"))
    limit = at10 + tg.code_bytes()
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", limit)
    monkeypatch.setattr(tg, "CLIP_FIT_SLACK_BYTES", 300)
    cfg = tg.Config.from_env({"PRESET": "tiny", "MATRIX_CLIP_FIT": "1"})
    path, log_path = tmp_path / "fit.pgz", tmp_path / "log.txt"
    sizes = tg.export_artifact(model, cfg, tg.Runtime(0, 1, 0, torch.device("cpu"), 1), tg.Logger(log_path), path, None)
    total = path.stat().st_size + tg.code_bytes()
    assert sizes["total_bytes"] == total and limit - 300 <= total <= limit
    assert 9.0 < sizes["matrix_clip_sigmas"] < 11.0
    log = log_path.read_text()
    assert "clip_fit: matrix clip" in log and log.count("clip_fit: MATRIX_CLIP_SIGMAS=") >= 2
    mc, read = tg.read_artifact(path)
    expect = expected_roundtrip(model, dataclasses.replace(cfg, matrix_clip_sigmas=sizes["matrix_clip_sigmas"]))
    for name in expect:
        assert torch.equal(read[name], expect[name]), name


def test_clip_fit_start_must_lie_in_its_range():
    with pytest.raises(ValueError, match="MATRIX_CLIP_FIT starts at MATRIX_CLIP_SIGMAS=30"):
        tg.Config.from_env({"MATRIX_CLIP_FIT": "1", "MATRIX_CLIP_SIGMAS": "30"})
    with pytest.raises(ValueError, match="MATRIX_CLIP_FIT_MIN=0"):
        tg.Config.from_env({"MATRIX_CLIP_FIT": "1", "MATRIX_CLIP_FIT_MIN": "0"})
    no_fit = tg.Config.from_env({"MATRIX_CLIP_FIT": "0", "MATRIX_CLIP_SIGMAS": "30"})
    assert no_fit.matrix_clip_sigmas == 30.0  # no fit: no range to respect


def test_a_clip_set_alone_is_refused_while_the_fit_is_on_by_default():
    """MATRIX_CLIP_SIGMAS alone would only move where the default fit starts, not the clip exported: refused, with
    both ways out named; either way out is accepted, and so is the setting where nothing is exported."""
    assert tg.Config().matrix_clip_fit
    with pytest.raises(ValueError, match="MATRIX_CLIP_SIGMAS=10 is only where the clip fit starts.*MATRIX_CLIP_FIT=0"):
        tg.Config.from_env({"MATRIX_CLIP_SIGMAS": "10"})
    with pytest.raises(ValueError, match="MATRIX_CLIP_SIGMAS=30 is only where the clip fit starts"):
        tg.Config.from_env({"MATRIX_CLIP_SIGMAS": "30"})  # outside the fit's range too: the way out comes first
    assert not tg.Config.from_env({"MATRIX_CLIP_SIGMAS": "10", "MATRIX_CLIP_FIT": "0"}).matrix_clip_fit
    assert tg.Config.from_env({"MATRIX_CLIP_SIGMAS": "10", "MATRIX_CLIP_FIT": "1"}).matrix_clip_sigmas == 10.0
    assert tg.Config.from_env({"MATRIX_CLIP_SIGMAS": "10", "EVAL_ONLY": "1", "ARTIFACT_PATH": "a.pgz"}).eval_only


@pytest.mark.parametrize("settings,label", [
    ({}, "int6_brotli"), ({"matrix_bits": 5, "compressor": "zstd"}, "int5_zstd"), ({"embed_bits": 6}, "int6_brotli"),
])
def test_an_artifacts_label_is_its_matrices_bits_and_its_compressor(tmp_path, settings, label):
    """What an EVAL_ONLY rescoring names its score by: read from the file (the embedding's bits are not the
    matrices')."""
    model = tiny_model()
    path, _ = export(model, tmp_path, **settings)
    mc, got = tg.artifact_model_and_label(path)
    assert got == label and mc == model.mc  # the model from the metadata alone, as read_artifact reads it


def test_artifact_rebuilds_a_parallel_layer_and_a_layer_sharing_its_weights(tmp_path):
    """P (attention and GDN side by side) and a lower-case p sharing its weights: the artifact alone rebuilds them."""
    model = tiny_model(layout="GPAp")
    path, cfg = export(model, tmp_path)
    mc, state = tg.read_artifact(path)
    assert mc == model.mc and any(n.startswith("mixers.1.gdn.") for n in state)
    fresh = tg.GPT(mc, tg.Backends("torch", "sdpa"))
    tg.load_exported_state(fresh, state, str(path))
    quantized = tiny_model(layout="GPAp")
    quantized.load_state_dict(expected_roundtrip(model, cfg))
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))


def test_the_code_counted_is_the_script_as_first_read_though_the_file_changes(tmp_path):
    """A run logs and counts the bytes of the code it runs: the script is read once (the run's header reads it
    first), so an edit to the file while the run trains changes neither."""
    import importlib.util
    import shutil

    copy = tmp_path / "train_copy.py"
    shutil.copy(tg.__file__, copy)
    spec = importlib.util.spec_from_file_location("train_copy", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = copy.read_bytes()
    assert module.script_source() == original and module.code_bytes() == len(original)
    copy.write_bytes(original + b"# edited while the run trains\n")
    assert module.script_source() == original and module.code_bytes() == len(original)
