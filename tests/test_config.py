"""Configuration: environment parsing, validation and the layout string."""

import pytest
import torch

import train_gpt as tg


def test_defaults_are_valid_and_env_overrides_them():
    cfg = tg.Config.from_env({})
    assert cfg == tg.Config()
    cfg = tg.Config.from_env({"MODEL_DIM": "288", "EMA_DECAY": "0.99", "KERNEL_CHECK": "false", "LAYOUT": "GGA"})
    assert (cfg.model_dim, cfg.ema_decay, cfg.kernel_check, cfg.layout) == (288, 0.99, False, "GGA")


def test_preset_sets_values_and_env_still_wins():
    cfg = tg.Config.from_env({"PRESET": "tiny", "ITERATIONS": "3"})
    assert cfg.model_dim == tg.PRESETS["tiny"]["model_dim"] and cfg.iterations == 3


@pytest.mark.parametrize("env,needle", [
    ({"PRESET": "huge"}, "PRESET='huge'"),
    ({"MODEL_DIM": "5x"}, "MODEL_DIM='5x'"),
    ({"KERNEL_CHECK": "maybe"}, "KERNEL_CHECK"),
    ({"NUM_HEADS": "7"}, f"MODEL_DIM={tg.Config().model_dim} not divisible by NUM_HEADS=7"),
    ({"NUM_KV_HEADS": "2"}, f"NUM_HEADS={tg.Config().num_heads} not divisible by NUM_KV_HEADS=2"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE=4096"),
    ({"EVAL_STRIDE": "64", "EVAL_MODE": "stream", "LAYOUT": "GGSGs"}, "add EVAL_MODE=window"),  # no stride to apply
    ({"EVAL_MODE": "stream"}, f"LAYOUT={tg.Config().layout} has full attention"),  # refused before training, not after it
    ({"COMPRESSOR": "zip"}, "COMPRESSOR='zip'"),
    ({"ATTN_BACKEND": "flash"}, "ATTN_BACKEND='flash'"),
    ({"COMPILE_MODE": "max-autotune"}, "COMPILE_MODE='max-autotune' must be one of"),
    ({"GDN_BACKEND": "tilelang"}, "GDN_BACKEND='tilelang'"),
    ({"BIGRAM_BUCKETS": "1"}, "BIGRAM_BUCKETS=1"),
    ({"BOS_ID": "1024"}, "BOS_ID=1024"),
    ({"LAYOUT": "GGXG"}, "layer 2 is 'X'"),
    ({"EVAL_ONLY": "1"}, "ARTIFACT_PATH"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE=70000"),
    ({"WARMDOWN_SHAPE": "exp"}, "WARMDOWN_SHAPE='exp' must be one of linear, cosine, sqrt"),
    ({"MUON_VARIANT": "adamuon"}, "MUON_VARIANT='adamuon'"),
    ({"MUON_BETA2": "1"}, "MUON_BETA2=1.0"),
    ({"LAYOUT": "AA(GA"}, "never closed"),
    ({"LAYOUT": "GGa"}, "no earlier 'A' exists"),
    ({"LAYOUT": "AGn"}, "no earlier 'N' exists"),  # N layers share only with N layers
    ({"EVAL_MODE": "stream", "LAYOUT": "GSNs"}, "has full attention (A or N)"),
    ({"MLP_NEG_SLOPE": "-0.5"}, "MLP_NEG_SLOPE=-0.5 must be in [0, 1]"),
    ({"XSA_LAST": "-1"}, "XSA_LAST=-1 must be >= 0"),
    ({"XSA_LAST": "2", "LAYOUT": "GGGG"}, "XSA_LAST=2 acts on attention layers (A, N, S or P), and LAYOUT=GGGG has none"),
    ({"QK_GAIN_INIT": "-1"}, "QK_GAIN_INIT=-1.0 must be 0 (off) or a positive gain"),
    ({"QK_GAIN_INIT": "nan"}, "QK_GAIN_INIT=nan must be 0 (off) or a positive gain"),
    ({"QK_GAIN_INIT": "4", "LAYOUT": "GGgG"}, "QK_GAIN_INIT=4.0 acts on attention layers (A, N, S or P), and LAYOUT=GGgG"),
    ({"ATTN_HEAD_GATE": "1", "LAYOUT": "GG"}, "ATTN_HEAD_GATE=1 acts on attention layers (A, N, S or P), and LAYOUT=GG"),
    ({"GDN_NEG_EIGVAL": "1", "LAYOUT": "AAS"}, "GDN_NEG_EIGVAL=1 acts on Gated DeltaNet layers (G or P), and LAYOUT=AAS"),
    ({"TTT_PARAMS": "gdn", "LAYOUT": "AAS"},
     "TTT_PARAMS=gdn adapts Gated DeltaNet layers (G or P), and LAYOUT=AAS has none"),
    ({"GRAD_ACCUM_STEPS": "-1"}, "GRAD_ACCUM_STEPS=-1 must be >= 0"),
    ({"TRAIN_LOG_EVERY": "0"}, "TRAIN_LOG_EVERY=0 must be positive"),  # was a ZeroDivisionError after step 1
    ({"GPTQ_BLOCK": "0"}, "GPTQ_BLOCK=0 must be positive"),  # was an error at export, after the whole training
    ({"GPTQ_DAMP": "0"}, "GPTQ_DAMP=0.0 must be positive"),  # likewise: Cholesky of a singular H
    ({"GPTQ_DAMP": "-0.5"}, "GPTQ_DAMP=-0.5 must be positive"),
    ({"KERNEL_CHECK_TOL": "1"}, "KERNEL_CHECK_TOL=1.0 must be in (0, 0.1]"),  # a kernel returning zeros passed
    ({"KERNEL_CHECK_TOL": "0"}, "KERNEL_CHECK_TOL=0.0 must be in (0, 0.1]"),
    ({"TTT_SEQ_LEN": "-8"}, "TTT_SEQ_LEN=-8 must be >= 0"),  # TTT took no steps, silently
    ({"EVAL_MAX_SECONDS": "-1"}, "EVAL_MAX_SECONDS=-1.0 must be >= 0"),  # TTT adapted on no chunk, silently
    ({"GDN_EXPAND_V": "0"}, "GDN_HEAD_DIM*GDN_EXPAND_V=0.0 must be a positive integer"),  # GDN layers output zeros
    ({"LOGIT_SOFTCAP": "0"}, "LOGIT_SOFTCAP=0.0 must be positive"),  # every logit 0, every gradient NaN
    ({"EVAL_STRIDE": "5000"}, "EVAL_STRIDE=5000 must be in 0..EVAL_SEQ_LEN=2048"),
    # in stream mode a stride means nothing, whatever its value: that is the problem to name
    ({"EVAL_MODE": "stream", "LAYOUT": "GSGs", "EVAL_STRIDE": "5000"}, "EVAL_STRIDE=5000 applies to sliding windows"),
])
def test_bad_settings_raise_with_the_name(env, needle):
    with pytest.raises(ValueError, match=None) as err:
        tg.Config.from_env(env)
    assert needle in str(err.value)


def test_layout_parsing_and_sharing():
    specs = tg.parse_layout("GGGGGSGGGGGs")
    assert [s.kind for s in specs] == ["gdn"] * 5 + ["swa"] + ["gdn"] * 5 + ["swa"]
    assert specs[11].shared and specs[11].mixer == specs[5].mixer
    assert len({s.mixer for s in specs}) == 11
    specs = tg.parse_layout("GGG S | GGG S-GG")  # separators are ignored
    assert len(specs) == 10 and not any(s.shared for s in specs)
    specs = tg.parse_layout("SGsGg")
    assert specs[2].mixer == specs[0].mixer and specs[4].mixer == specs[3].mixer
    assert [s.mlp for s in specs] == [0, 1, 2, 3, 4]  # a shared mixer keeps its own MLP
    specs = tg.parse_layout("ANGna")
    assert [s.kind for s in specs] == ["attn", "nope", "gdn", "nope", "attn"]
    assert (specs[3].mixer, specs[4].mixer) == (specs[1].mixer, specs[0].mixer)


def test_layout_repeated_group_reuses_mixers_and_mlps():
    specs = tg.parse_layout("AA(GAa)2A")
    assert "".join(s.kind[0] for s in specs) == "aagaagaaa"
    assert [s.mixer for s in specs] == [0, 1, 2, 3, 3, 2, 3, 3, 4]  # 'a' shares layer 3's mixer
    assert [s.mlp for s in specs] == [0, 1, 2, 3, 4, 2, 3, 4, 5]
    assert [s.repeat for s in specs] == [False] * 5 + [True] * 3 + [False]
    assert all(s.shared for s in specs[5:8])
    specs = tg.parse_layout("(GS)3 | A")
    assert [s.mlp for s in specs] == [0, 1, 0, 1, 0, 1, 2] and [s.mixer for s in specs] == [0, 1, 0, 1, 0, 1, 2]


@pytest.mark.parametrize("layout,needle", [("", "no layers"), ("sG", "no earlier 'S'"), ("GGQ", "'Q'"),
                                           ("A(GA", "never closed"), ("AG)2", "closes no group"),
                                           ("A(GA)", "pass count of at least 2"), ("A(GA)1", "pass count"),
                                           ("A()2", "needs layers"), ("((GA)2)2", "cannot nest"), ("A2", "'2'")])
def test_invalid_layouts_name_the_problem(layout, needle):
    with pytest.raises(ValueError) as err:
        tg.parse_layout(layout)
    assert needle in str(err.value)


def test_a_world_size_that_cannot_split_the_batch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="over 3 ranks x 1 accumulation steps"):
        tg.init_runtime(tg.Config())


def test_default_accumulation_keeps_micro_batches_of_64_sequences():
    for batch, world, accum in ((262_144, 1, 2), (262_144, 2, 1), (262_144, 8, 1), (524_288, 1, 4), (524_288, 2, 2),
                                (524_288, 8, 1), (393_216, 1, 3), (1024, 1, 1),
                                (409_600, 1, 4)):  # 200 sequences: 3 micro-batches would not split them, 4 do
        assert tg.default_accum(tg.Config(train_batch_tokens=batch), world) == accum


def test_a_rescoring_needs_no_training_batch_split(monkeypatch):
    """EVAL_ONLY reads no training batch: 3 ranks, which cannot split the default batch, may rescore an artifact;
    training on them is refused, naming GRAD_ACCUM_STEPS when it was set."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(tg.dist, "init_process_group", lambda *args, **kwargs: None)
    rt = tg.init_runtime(tg.Config.from_env({"EVAL_ONLY": "1", "ARTIFACT_PATH": "a.pgz"}))
    assert rt.world_size == 3 and rt.grad_accum_steps == 1
    with pytest.raises(ValueError, match=r"over 3 ranks x 2 accumulation steps \(GRAD_ACCUM_STEPS\)"):
        tg.init_runtime(tg.Config.from_env({"GRAD_ACCUM_STEPS": "2"}))


def test_batch_must_split_into_whole_sequences(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="TRAIN_BATCH_TOKENS=1000"):
        tg.init_runtime(tg.Config(train_batch_tokens=1000))


def test_fast_gdn_backends_refuse_a_machine_or_model_they_cannot_run():
    """On the CPU, fla and qla are clear errors; qla names why it cannot run (package, head dims, GPU)."""
    rt = tg.Runtime(0, 1, 0, tg.torch.device("cpu"), 1)
    log = tg.Logger(None)
    for backend in ("fla", "qla"):
        cfg = tg.Config.from_env({"GDN_BACKEND": backend})
        with pytest.raises(ValueError, match=f"GDN_BACKEND={backend} needs a CUDA GPU"):
            tg.resolve_backends(cfg, rt, tg.ModelConfig.from_config(cfg), log, check=False)
    auto = tg.Config.from_env({})
    assert tg.resolve_backends(auto, rt, tg.ModelConfig.from_config(auto), log, check=False) == \
        tg.Backends("torch", "sdpa", "torch")
    conv = tg.Config.from_env({"GDN_CONV": "fla"})
    with pytest.raises(ValueError, match="GDN_CONV=fla needs a CUDA GPU"):
        tg.resolve_backends(conv, rt, tg.ModelConfig.from_config(conv), log, check=False)
    with pytest.raises(ValueError, match="GDN_CONV='triton' must be auto, fla or torch"):
        tg.Config.from_env({"GDN_CONV": "triton"})
    small = tg.ModelConfig.from_config(tg.Config.from_env({"GDN_HEADS": "8", "GDN_HEAD_DIM": "64"}))
    reason = tg.qla_unavailable(small)
    assert reason and ("flash_qla is not installed" in reason or "GDN_HEAD_DIM=128" in reason)


@pytest.mark.parametrize("layout,expected", [
    ("AAAGAAAAAAGAAA", "gdn:fla conv:fla full attention:sdpa"),
    ("GGGGGSGGGGGs", "gdn:fla conv:fla swa:varlen (window 512)"),
    ("AAAAAAAAAAAAAA", "full attention:sdpa"),
    ("SSSNNN", "full attention:sdpa swa:varlen (window 512)"),
    ("AAGA(AA)2AAGAA", "gdn:fla conv:fla full attention:sdpa"),
    ("AAPA", "gdn:fla conv:fla full attention:sdpa"),  # P: full attention and a GDN
])
def test_backends_line_names_only_the_layer_kinds_the_layout_has(layout, expected, capsys, tmp_path):
    """Full attention always runs SDPA's causal kernel; ATTN_BACKEND applies to the window only, so a layout without
    S layers must not log it, and one without G layers must not log the GDN kernels."""
    assert tg.describe_backends(layout, tg.Backends("fla", "varlen", "fla"), 512) == expected
    cfg = tg.Config.from_env({"LAYOUT": layout})
    tg.resolve_backends(cfg, tg.Runtime(0, 1, 0, tg.torch.device("cpu"), 1), tg.ModelConfig.from_config(cfg),
                        tg.Logger(tmp_path / "log.txt"), check=False)
    line = capsys.readouterr().out.strip()  # on the CPU: the torch GDN reference and SDPA
    assert line == "backends: " + expected.replace("fla", "torch").replace("varlen", "sdpa")


def test_stream_reset_alone_works_with_a_shorter_default_segment():
    """STREAM_RESET=1 builds a dense mask per segment, which the general default segment is too long for: set alone,
    it gets its own default; a segment given explicitly is kept, and one over the limit is refused."""
    base = {"EVAL_MODE": "stream", "LAYOUT": "GSGs"}
    assert tg.Config.from_env(base).stream_segment == tg.Config().stream_segment > tg.STREAM_RESET_MAX_SEGMENT
    assert tg.Config.from_env({**base, "STREAM_RESET": "1"}).stream_segment == tg.STREAM_RESET_SEGMENT
    assert tg.Config.from_env({**base, "STREAM_RESET": "1", "STREAM_SEGMENT": "4096"}).stream_segment == 4096
    with pytest.raises(ValueError, match="STREAM_SEGMENT=16384 must be <= 8192"):
        tg.Config.from_env({**base, "STREAM_RESET": "1", "STREAM_SEGMENT": "16384"})


def test_default_stride_slides_and_is_capped_at_the_window():
    d = tg.Config()
    assert 256 < d.eval_stride < d.train_seq_len and not d.eval_seq_len  # the defaults slide, over training's length
    assert tg.Config.from_env({}).stride == d.eval_stride and tg.Config.from_env({}).eval_len == d.train_seq_len
    assert tg.Config.from_env({"EVAL_SEQ_LEN": "256"}).stride == 256  # the default stride: plain windows of 256
    assert tg.Config.from_env({"EVAL_STRIDE": "0"}).stride == d.train_seq_len  # 0: plain windows
    stream = tg.Config.from_env({"EVAL_MODE": "stream", "LAYOUT": "GGGGGSGGGGGs"})
    assert stream.eval_mode == "stream"  # the default stride is not in the way
    assert tg.Config.from_env({"EVAL_MODE": "stream", "EVAL_ONLY": "1", "ARTIFACT_PATH": "a.pgz"}).eval_only  # the
    # artifact's layout decides, when it is read


def test_ttt_compile_modes_and_what_runs_ttt():
    with pytest.raises(ValueError, match="TTT_COMPILE='2' must be 0, 1 or graphs"):
        tg.Config.from_env({"TTT_COMPILE": "2"})
    with pytest.raises(ValueError, match="COMPILE=0"):
        tg.Config.from_env({"TTT_COMPILE": "graphs", "COMPILE": "0"})
    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model)
    cpu = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
    pick = lambda mode, c: tg.ttt_module(model, c, tg.Config(ttt_compile=mode), cpu)  # noqa: E731
    assert pick("0", compiled) == (None, "eager")
    assert pick("1", model) == (None, "eager")  # the model is not compiled at all (COMPILE=auto on a CPU)
    assert pick("1", compiled) == (compiled, "compiled")
    assert pick("graphs", compiled) == (compiled, "compiled")  # CUDA graphs need CUDA: compiled without them


def test_a_kernel_check_logs_its_errors_and_refuses_above_the_tolerance():
    lines = []
    tg.require_close(lines.append, "conv_silu(fla) vs float64 reference", {"y": 1e-3, "dx": 2e-2}, 2e-2, "kernel")
    assert lines == ["kernel_check conv_silu(fla) vs float64 reference: y:1.00e-03 dx:2.00e-02"]
    with pytest.raises(RuntimeError, match=r"^backend X disagrees with the reference: \{'dx': 0.03\}; set Y$"):
        tg.require_close(lines.append, "x", {"dx": 0.03}, 2e-2, "backend X", "set Y")
    with pytest.raises(RuntimeError, match=r"^path Z disagrees with the reference: \{'o': nan\}$"):
        tg.require_close(lines.append, "z", {"o": float("nan")}, 2e-2, "path Z")  # NaN is never within tolerance


@pytest.mark.parametrize("impl", ["fla", "qla"])
@pytest.mark.parametrize("lifted", [False, True])
def test_the_gdn_kernel_check_refuses_errors_above_the_tolerance_and_never_lifts_the_guard_then(
        monkeypatch, impl, lifted):
    """check_gdn_kernel's own refusal (apart from require_close's): errors as a GPU would measure them."""
    errors = {"o": 4e-3, "dq": 5e-3, "dk": 4e-3, "dv": 3e-3, "dg": 0.05, "dbeta": 4e-3}   # dg off
    measured = (errors, lifted and impl == "fla")
    monkeypatch.setattr(tg, "guarded_gdn_kernel_errors", lambda mc, T: measured)
    monkeypatch.setattr(tg, "gdn_kernel_errors", lambda mc, T, device, impl: errors)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    cfg = tg.Config.from_env({"PRESET": "tiny"})
    mc, lines = tg.ModelConfig.from_config(cfg), []
    with pytest.raises(RuntimeError, match=r"GDN kernel check \(%s\) failed on a GPU: \{'dg': 0.05\} exceed 0.02; "
                                           r"refusing to train" % impl):
        tg.check_gdn_kernel(mc, cfg, lines.append, impl)
    assert not any("guard is lifted" in line for line in lines)
    assert f"kernel_check gdn({impl}) vs float64 reference: o:4.00e-03" in lines[-1]
    errors["dg"] = float("nan")  # NaN is never within tolerance
    with pytest.raises(RuntimeError, match="'dg': nan"):
        tg.check_gdn_kernel(mc, cfg, lines.append, impl)
    if not measured[1]:  # (a passing check that lifted the guard would import fla to lift it for the run)
        errors["dg"] = 6e-3
        tg.check_gdn_kernel(mc, cfg, lines.append, impl)  # all within the tolerance: no refusal


@pytest.mark.parametrize("value", ["1.0", "0.9,-0.1", "0.9;0.99", "x"])
def test_ema_compare_rejects_what_is_not_a_list_of_decays(value):
    with pytest.raises(ValueError, match="EMA_COMPARE"):
        tg.Config.from_env({"EMA_COMPARE": value})


def test_ema_compare_drops_repeats_and_the_main_decay():
    cfg = tg.Config.from_env({"EMA_DECAY": "0.997", "EMA_COMPARE": "0, 0.99,0.997,0.99,"})
    assert cfg.ema_compare_decays == (0.0, 0.99)


@pytest.mark.parametrize("mode", [{"EVAL_ONLY": "1", "ARTIFACT_PATH": "a.pgz"}, {"EXPORT_FROM": "c.pt"}])
def test_ema_compare_is_refused_without_training(mode):
    with pytest.raises(ValueError, match="EMA_COMPARE averages weights while training; EVAL_ONLY and EXPORT_FROM"):
        tg.Config.from_env({**mode, "EMA_COMPARE": "0"})


@pytest.mark.parametrize("env,message", [
    ({"EXPORT_FROM": "c.pt", "EVAL_ONLY": "1", "ARTIFACT_PATH": "a.pgz"},
     "EVAL_ONLY=1 scores an artifact and EXPORT_FROM exports a checkpoint: set one of them"),
    ({"EXPORT_FROM": "c.pt", "CHECKPOINT_PATH": "d.pt"},
     "EXPORT_FROM reads a checkpoint and does not train; CHECKPOINT_PATH is where a training run writes one"),
])
def test_export_from_refuses_settings_that_make_no_sense_with_it(env, message):
    with pytest.raises(ValueError, match=message):
        tg.Config.from_env(env)


def test_export_from_takes_the_model_from_the_checkpoint_not_the_layout():
    """The layout checks are for the model to be trained; with EXPORT_FROM (as with EVAL_ONLY) LAYOUT is not it."""
    with pytest.raises(ValueError, match="XSA_LAST=2 acts on attention layers"):
        tg.Config.from_env({"XSA_LAST": "2", "LAYOUT": "GGGG"})
    assert tg.Config.from_env({"XSA_LAST": "2", "LAYOUT": "GGGG", "EXPORT_FROM": "c.pt"}).model_from_file
    assert tg.Config.from_env({"QK_GAIN_INIT": "4", "LAYOUT": "GGGG", "EVAL_ONLY": "1", "ARTIFACT_PATH": "a.pgz"})


def test_ttt_params_that_select_nothing_raise_with_the_name():
    """TTT_PARAMS=gdn on a layout without G is refused by Config before training; an artifact's model (EVAL_ONLY),
    whose layout Config never saw, by `ttt_parameters` (torch's own error named neither), which
    `require_ttt_selection` runs as soon as a model is built (test_end_to_end)."""
    assert not tg.Config.from_env({"TTT_PARAMS": "gdn", "LAYOUT": "AAS", "TTT_ENABLED": "0"}).ttt_enabled
    assert tg.Config.from_env({"TTT_PARAMS": "gdn", "LAYOUT": "AAS", "EVAL_ONLY": "1", "ARTIFACT_PATH": "a.pgz"})
    cfg = tg.Config.from_env({"PRESET": "tiny", "LAYOUT": "AS"})
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    with pytest.raises(ValueError, match=r"TTT_PARAMS=gdn selects no parameters of this model \(layout AS\)"):
        tg.ttt_parameters(model, "gdn")
    assert tg.ttt_parameters(model, "mlp") and tg.ttt_parameters(model, "scalar")
    gdn = tg.GPT(tg.ModelConfig.from_config(tg.Config.from_env({"PRESET": "tiny", "LAYOUT": "GA"})),
                 tg.Backends("torch", "sdpa"))
    assert tg.ttt_parameters(gdn, "gdn")


@pytest.mark.parametrize("env,expected", [
    ({}, [("", 2048, 0)]),  # the default window 512 at the training length
    ({"SWA_WINDOW": "2048"}, []),  # every forward is shorter than the window: plain causal attention only
    ({"SWA_WINDOW": "2048", "EVAL_SEQ_LEN": "4096"}, [(" at 4096", 4096, 0)]),  # longer evaluation windows
    ({"SWA_WINDOW": "2048", "TTT_SEQ_LEN": "3072"}, [(" at 3072", 3072, 0)]),
    ({"SWA_WINDOW": "2048", "EVAL_MODE": "stream", "STREAM_SEGMENT": "1024"}, [(" streaming", 1024, 2047)]),
    ({"EVAL_MODE": "stream"}, [("", 2048, 0), (" streaming", 4096, 511)]),
    ({"EVAL_MODE": "stream", "STREAM_RESET": "1"}, [("", 2048, 0)]),
])
def test_the_attention_kernel_is_checked_in_every_shape_it_runs_windowed(env, expected):
    """The windowed kernel runs wherever keys outnumber the window: a check only at the training length missed
    SWA_WINDOW >= TRAIN_SEQ_LEN with longer evaluation windows or streaming, whose cached keys make every segment
    longer than the window."""
    cfg = tg.Config.from_env({"LAYOUT": "GSGs", **env})
    cases = tg.attention_check_cases(cfg, cfg.swa_window)
    assert cases == expected
    for T in {cfg.train_seq_len, cfg.eval_len, cfg.ttt_seq_len or cfg.eval_len}:
        assert (T > cfg.swa_window) == any(c[1] == T and c[2] == 0 for c in cases)


def test_the_conv_check_covers_every_channel_count_a_gdn_layer_convolves():
    """q and k are convolved at heads x head dim channels, v at heads x head dim x GDN_EXPAND_V: with expand_v the
    kernel check runs at both counts (it ran at q's only)."""
    for expand_v, counts in (("1", [32]), ("2", [32, 64]), ("0.5", [16, 32])):
        cfg = tg.Config.from_env({"PRESET": "tiny", "LAYOUT": "GA", "GDN_HEADS": "2", "GDN_HEAD_DIM": "16",
                                  "GDN_EXPAND_V": expand_v})
        mc = tg.ModelConfig.from_config(cfg)
        gdn = tg.GPT(mc, tg.Backends("torch", "sdpa")).mixers[0]
        convolved = {c.weight.shape[0] for c in (gdn.q_conv, gdn.k_conv, gdn.v_conv)}  # what the model convolves
        assert tg.gdn_conv_channels(mc) == sorted(convolved) == counts
    two = tg.ModelConfig.from_config(tg.Config.from_env({"GDN_HEADS": "2", "GDN_HEAD_DIM": "16", "GDN_EXPAND_V": "2"}))
    errs = tg.conv_kernel_errors(two, 24, tg.torch.device("cpu"), impl="torch", channels=64)
    assert set(errs) == {"y", "dx", "dw"} and all(v < 2e-2 for v in errs.values())  # bf16 inputs against float64


@pytest.mark.parametrize("backend", ["auto", "fla"])
def test_a_gpu_without_fla_is_told_to_install_it_or_choose_the_reference(backend, monkeypatch):
    """On a CUDA device (faked: nothing runs on it here) fla's kernels are what auto chooses without FlashQLA; with
    fla missing that is a clear error naming both ways out, not a ModuleNotFoundError from inside the first forward.
    A layout without GDN layers needs no fla."""
    real_find_spec = tg.importlib.util.find_spec
    monkeypatch.setattr(tg.importlib.util, "find_spec", lambda name: None if name == "fla" else real_find_spec(name))
    monkeypatch.setattr(tg, "qla_unavailable", lambda mc: "flash_qla is not installed")
    rt = tg.Runtime(0, 1, 0, tg.torch.device("cuda", 0), 1)
    cfg = tg.Config.from_env({"GDN_BACKEND": backend})
    with pytest.raises(ValueError, match=f"GDN_BACKEND={backend} chose fla's kernels, and fla is not installed"):
        tg.resolve_backends(cfg, rt, tg.ModelConfig.from_config(cfg), tg.Logger(None), check=False)
    cfg = tg.Config.from_env({"GDN_BACKEND": backend, "LAYOUT": "AAAA"})
    assert tg.resolve_backends(cfg, rt, tg.ModelConfig.from_config(cfg), tg.Logger(None), check=False).gdn == "fla"
