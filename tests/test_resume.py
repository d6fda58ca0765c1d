"""STATE_PATH / RESUME_FROM in one process: what a training state holds, what resuming puts back, and the errors
for a file that does not fit the run. The whole path (a run resumed ends as the uninterrupted run, on one and two
ranks) is in test_end_to_end.py."""

import os
import signal
import types

import pytest
import torch

import train_gpt as tg

CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), grad_accum_steps=1)


def setup(seed=0, **env):
    """(cfg, model, optimizers, averages) of the tiny preset with 97 tokens; EMA_COMPARE=0.5 adds a second average."""
    cfg = tg.Config.from_env({"PRESET": "tiny", "VOCAB_SIZE": "97", "EMA_COMPARE": "0.5", **env})
    torch.manual_seed(seed)
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    if cfg.qat_frac:
        tg.enable_qat(model, cfg)
    opts = tg.build_optimizers(model, cfg, CPU)
    emas = [tg.EMA(model, cfg.ema_decay), tg.EMA(model, 0.5)]
    return cfg, model, opts, emas


def train_a_little(model, opts, emas, steps=3, seed=1):
    """Steps on random gradients, so both optimizers and both averages hold state."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opts.muon.step()
        opts.adam.step()
        for e in emas:
            e.update()


def saved_state(tmp_path, **env):
    cfg, model, opts, emas = setup(**env)
    train_a_little(model, opts, emas)
    stats = tg.TrainStats(steps=3, tokens=3 * cfg.train_batch_tokens, train_ms=1234.5,
                          qat_from_step=2 if cfg.qat_frac else None)
    path = tmp_path / "state" / "run.pt"
    tg.save_train_state(path, model, opts, emas, stats, 777, cfg, CPU, tg.Logger(tmp_path / "save.txt"))
    return path, (cfg, model, opts, emas)


def test_resuming_puts_back_the_weights_optimizer_state_averages_and_the_runs_place(tmp_path):
    path, (_, model, opts, emas) = saved_state(tmp_path)
    assert "state: " + str(path) in (tmp_path / "save.txt").read_text()
    cfg, fresh, fresh_opts, fresh_emas = setup(seed=5)  # other initial weights: all of them must be replaced
    log = tg.Logger(tmp_path / "resume.txt")
    stats, data_tokens = tg.resume_training(path, fresh, fresh_opts, fresh_emas, cfg, CPU, log)
    assert (stats.steps, stats.tokens, stats.train_ms, stats.qat_from_step, data_tokens) == (
        3, 3 * cfg.train_batch_tokens, 1234.5, None, 777)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for e, f in zip(emas, fresh_emas):
        assert e.updates == f.updates == 3 and all(torch.equal(a, b) for a, b in zip(e.shadow, f.shadow))
    for o, f in zip(opts.all(), fresh_opts.all()):
        assert len(o.state) == len(f.state) > 0
        for p, q in zip([p for g in o.param_groups for p in g["params"]],
                        [q for g in f.param_groups for q in g["params"]]):
            assert o.state[p].keys() == f.state[q].keys()
            assert all(torch.equal(o.state[p][k], f.state[q][k]) for k in o.state[p]), p.shape
    assert "the settings are the same as then" in (tmp_path / "resume.txt").read_text()
    # the two go on identically
    train_a_little(model, opts, emas, seed=2)
    train_a_little(fresh, fresh_opts, fresh_emas, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_a_resumed_run_keeps_its_own_learning_rates_and_names_the_settings_that_changed(tmp_path):
    path, _ = saved_state(tmp_path)
    cfg, model, opts, emas = setup(MATRIX_LR="0.01", WARMDOWN_FRAC="0.5")
    tg.resume_training(path, model, opts, emas, cfg, CPU, tg.Logger(tmp_path / "resume.txt"))
    assert {g["base_lr"] for g in opts.muon.param_groups} == {0.01}
    assert {g["base_lr"] for g in opts.adam.param_groups} == {cfg.embed_lr, cfg.scalar_lr}
    text = (tmp_path / "resume.txt").read_text()
    tiny = tg.Config.from_env({"PRESET": "tiny"})
    assert f"MATRIX_LR={tiny.matrix_lr!r}->0.01" in text and f"WARMDOWN_FRAC={tiny.warmdown_frac!r}->0.5" in text


def test_a_state_that_does_not_fit_the_run_is_refused_with_what_differs(tmp_path):
    path, _ = saved_state(tmp_path)
    log = tg.Logger(None)
    with pytest.raises(ValueError, match=r"holds another model: .*'model_dim': \(64, 32\)"):
        tg.resume_training(path, *setup(MODEL_DIM="32")[1:], tg.Config.from_env({"PRESET": "tiny"}), CPU, log)
    cfg, model, opts, emas = setup(EMA_COMPARE="0.7")
    with pytest.raises(ValueError, match=r"averages of decays \[0.9, 0.5\]; this run keeps \[0.9, 0.7\]"):
        tg.resume_training(path, model, opts, [emas[0], tg.EMA(model, 0.7)], cfg, CPU, log)
    cfg, model, opts, emas = setup(MUON_VARIANT="normuon_gdn")  # the GDN matrices in a group of their own
    with pytest.raises(ValueError, match="its optimizer state does not fit this run's"):
        tg.resume_training(path, model, opts, emas, cfg, CPU, log)
    qat_path, _ = saved_state(tmp_path / "qat", QAT_FRAC="0.5")
    cfg, model, opts, emas = setup()
    with pytest.raises(ValueError, match="fake quantization from step 2 on; set QAT_FRAC"):
        tg.resume_training(qat_path, model, opts, emas, cfg, CPU, log)


def test_a_missing_unreadable_or_foreign_file_is_refused_by_name(tmp_path):
    cfg, model, opts, emas = setup()
    args = (model, opts, emas, cfg, CPU, tg.Logger(None))
    with pytest.raises(FileNotFoundError, match="RESUME_FROM=.*nope.pt does not exist"):
        tg.resume_training(tmp_path / "nope.pt", *args)
    path, _ = saved_state(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.pt cannot be read, truncated or not a training state"):
        tg.resume_training(cut, *args)
    ckpt = tmp_path / "final.pt"
    tg.write_checkpoint(ckpt, model, dict(steps=3, train_ms=1.0, ema=True, max_wallclock_seconds=0.0))
    with pytest.raises(ValueError, match="final.pt is not a training state .*EXPORT_FROM reads those"):
        tg.resume_training(ckpt, *args)


def test_a_failed_write_is_a_warning_and_leaves_the_last_state(tmp_path, monkeypatch):
    """An hours-long run does not end because one write failed: the last state stays whole, no temporary file."""
    path, (cfg, model, opts, emas) = saved_state(tmp_path)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tg.torch, "save", disk_full)
    lines = []
    tg.save_train_state(path, model, opts, emas, tg.TrainStats(steps=6), 0, cfg, CPU, lines.append)
    assert lines == [f"WARNING: STATE_PATH={path} was not written after step 6 (OSError: [Errno 28] No space left on "
                     "device); training goes on, and the last state written stays"]
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["run.pt"]


def test_state_settings_are_checked(monkeypatch):
    for env, needle in (({"STATE_PATH": "s.pt"}, "STATE_PATH='s.pt' and STATE_EVERY=0 go together"),
                        ({"STATE_EVERY": "100"}, "STATE_PATH='' and STATE_EVERY=100 go together"),
                        ({"STATE_PATH": "s.pt", "STATE_EVERY": "-1"}, "go together"),
                        ({"RESUME_FROM": "s.pt", "EVAL_ONLY": "1", "ARTIFACT_PATH": "a.pgz"},
                         "STATE_PATH and RESUME_FROM are for training"),
                        ({"STATE_PATH": "s.pt", "STATE_EVERY": "5", "EXPORT_FROM": "c.pt"}, "are for training")):
        with pytest.raises(ValueError, match=needle):
            tg.Config.from_env(env)
    assert tg.Config.from_env({"STATE_PATH": "s.pt", "STATE_EVERY": "5"}).state_every == 5


def test_a_resumed_run_goes_on_from_its_clock_steps_and_qat_switch(monkeypatch):
    """Under a cap a resumed run's schedule and stop read the training time before the resume plus its own; QAT,
    on when the state was written, is on from its first step; the loader starts at the state's stream position."""
    cfg, model, _, _ = setup(QAT_FRAC="0.2", MAX_WALLCLOCK_SECONDS="1", GPTQ_RESERVE_SECONDS="0", ITERATIONS="100000",
                             WARMDOWN_FRAC="0.5", LR_WARMUP_STEPS="0")
    readings = iter(range(10 ** 9))
    monkeypatch.setattr(tg, "time", types.SimpleNamespace(perf_counter=lambda: next(readings) * 0.001))
    seen, skips = [], []
    monkeypatch.setattr(tg, "train_step", lambda *args: seen.append((args[5], args[6], tg.qat_is_on(model)))
                        or torch.tensor(1.0))
    monkeypatch.setattr(tg, "TrainLoader", lambda cfg, rt, skip=0: skips.append(skip)
                        or types.SimpleNamespace(close=lambda: None))
    start = tg.TrainStats(steps=50, tokens=50 * cfg.train_batch_tokens, train_ms=600.0, qat_from_step=45)
    stats = tg.train(model, None, None, [], cfg, CPU, lambda msg: None, None, None, start, 4321)
    assert skips == [4321] and start.steps == 50  # the caller's stats are not changed
    steps, lrs, qat = zip(*seen)
    assert steps[0] == 50 and list(steps) == list(range(50, stats.steps)) and all(qat)
    assert 0.75 < lrs[0] < 0.8  # 60% of the budget gone: 0.2 of the warmdown's half done, and a step more
    assert stats.stopped_by_cap and 950 < stats.train_ms <= 1000 and stats.qat_from_step == 45
    assert stats.tokens == stats.steps * cfg.train_batch_tokens


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test: a job a shell starts in the background inherits SIGINT ignored, and
    Python then installs none, so a plain run would not see the signal at all."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_on_one_process_finishes_the_step_writes_the_state_and_stops(tmp_path, tiny_data, monkeypatch,
                                                                            default_sigint):
    """With STATE_PATH on one process, SIGINT during step 5 lets the step finish, writes the state (STATE_EVERY
    would not have: 100) and stops, the handlers put back; resumed, the run ends with the weights of a run never
    stopped. A second signal stops at once; without STATE_PATH, Ctrl-C is Python's KeyboardInterrupt as always."""
    env = {"PRESET": "tiny", "DATA_PATH": tiny_data["data_path"], "VOCAB_SIZE": str(tiny_data["vocab_size"])}
    path = tmp_path / "state.pt"
    writes, plain = tg.Config.from_env({**env, "STATE_PATH": str(path), "STATE_EVERY": "100"}), tg.Config.from_env(env)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), plain.grad_accum_steps)

    def build():
        torch.manual_seed(0)
        model = tg.GPT(tg.ModelConfig.from_config(plain), tg.Backends("torch", "sdpa"))
        return model, tg.build_optimizers(model, plain, rt), [tg.EMA(model, plain.ema_decay)]

    real_step, handler = tg.train_step, signal.getsignal(signal.SIGINT)

    def interrupted(times):
        def step(*args):
            if args[5] == 4:  # the 5th step, before its work
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
            return real_step(*args)
        return step

    log = tg.Logger(tmp_path / "log.txt")
    model, opts, emas = build()
    monkeypatch.setattr(tg, "train_step", interrupted(1))
    with pytest.raises(SystemExit, match=f"stopped by signal {int(signal.SIGINT)} after step 5: RESUME_FROM=.*state.pt "
                                         "goes on from it"):
        tg.train(model, model, opts, emas, writes, rt, log, None, None)
    assert signal.getsignal(signal.SIGINT) is handler and "after step 5 in" in (tmp_path / "log.txt").read_text()
    monkeypatch.setattr(tg, "train_step", real_step)
    whole, w_opts, w_emas = build()
    tg.train(whole, whole, w_opts, w_emas, plain, rt, log, None, None)
    resumed, r_opts, r_emas = build()
    start, data_tokens = tg.resume_training(path, resumed, r_opts, r_emas, plain, rt, log)
    assert start.steps == 5
    stats = tg.train(resumed, resumed, r_opts, r_emas, plain, rt, log, None, None, start, data_tokens)
    assert stats.steps == plain.iterations
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(w_emas[0].shadow, r_emas[0].shadow))
    before = path.read_bytes()
    for times, cfg, error, needle in ((2, writes, KeyboardInterrupt, "again: stopped without writing the state"),
                                      (1, plain, KeyboardInterrupt, None)):
        model, opts, emas = build()
        monkeypatch.setattr(tg, "train_step", interrupted(times))
        with pytest.raises(error, match=needle):
            tg.train(model, model, opts, emas, cfg, rt, log, None, None)
        assert signal.getsignal(signal.SIGINT) is handler
    assert path.read_bytes() == before  # neither wrote a state


@pytest.mark.parametrize("variant", ["normuon", "muon"])
def test_warmup_steps_are_undone_before_the_timed_run(tiny_data, variant):
    """WARMUP_STEPS real steps (for compilation) then the weights, the optimizer state (momentum, NorMuon's second
    moments, Adam's moments and step counts) and the data position put back: the run then ends exactly as one that
    had no warmup. The end-to-end tests cannot show this, since every run there warms up the same way."""
    env = {"PRESET": "tiny", "DATA_PATH": tiny_data["data_path"], "VOCAB_SIZE": str(tiny_data["vocab_size"]),
           "MUON_VARIANT": variant}
    finals = {}
    for warmup in (0, 3):
        cfg = tg.Config.from_env({**env, "WARMUP_STEPS": str(warmup)})
        rt = tg.Runtime(0, 1, 0, torch.device("cpu"), cfg.grad_accum_steps)
        torch.manual_seed(0)
        model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
        opts = tg.build_optimizers(model, cfg, rt)
        start = [p.detach().clone() for p in model.parameters()]
        moved, real_step = [], tg.train_step

        def step(*args):  # the warmup's steps, each seen to change the weights it is then to undo
            loss = real_step(*args)
            moved.append(not all(torch.equal(a, b) for a, b in zip(start, model.parameters())))
            return loss

        tg.train_step = step
        try:
            tg.warmup_then_restore(model, model, opts, cfg, rt, lambda msg: None)
        finally:
            tg.train_step = real_step
        assert moved == [True] * warmup  # it ran WARMUP_STEPS real steps
        assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
        emas = [tg.EMA(model, cfg.ema_decay)]
        tg.train(model, model, opts, emas, cfg, rt, lambda msg: None, None, None)
        finals[warmup] = ([p.detach().clone() for p in model.parameters()], emas[0].shadow)
    (w0, e0), (w3, e3) = finals[0], finals[3]
    assert all(torch.equal(a, b) for a, b in zip(w0, w3)) and all(torch.equal(a, b) for a, b in zip(e0, e3))
    assert not all(torch.equal(a, b) for a, b in zip(start, w3))  # the run itself trained
