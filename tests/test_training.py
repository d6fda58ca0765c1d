"""The training step (section 11): the learning rate, Muon's momentum and gradient clipping it applies reach the
optimizers, and each optimizer group has its own learning rate. The loop around it (schedule, cap, warmup, resume)
is tested in test_qat.py and test_resume.py; the end-to-end tests compare runs of the same code, so they cannot see
a step that ignores its schedule."""

import pytest
import torch

import train_gpt as tg

from test_model import tiny_model

CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)


class OneBatch:
    """A loader that hands out the same batch every time."""

    def __init__(self, vocab: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (2, 32), generator=gen)
        self.y = torch.randint(0, vocab, (2, 32), generator=gen)

    def next_batch(self):
        return self.x, self.y


def setup(**env):
    """The tiny model (every projection given weight, so every path has a gradient) and its optimizers."""
    env = {"LAYOUT": "GSGs", "GRAD_ACCUM_STEPS": "1", **env}
    cfg = tg.Config.from_env({"PRESET": "tiny", "VOCAB_SIZE": "97", **env})
    model = tiny_model(**env)
    return cfg, model, tg.build_optimizers(model, cfg, CPU)


def spy_steps(model, opts) -> list[dict]:
    """Records, as each optimizer steps, its groups' lr and momentum and the gradients' total norm."""
    seen = []
    for name, opt in (("muon", opts.muon), ("adam", opts.adam)):
        def step(real=opt.step, opt=opt, name=name):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            seen.append(dict(name=name, lr=[g["lr"] for g in opt.param_groups],
                             base=[g["base_lr"] for g in opt.param_groups],
                             momentum=[g.get("momentum") for g in opt.param_groups],
                             grad_norm=float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))))
            return real()
        opt.step = step
    return seen


@pytest.mark.parametrize("step", [0, 40, 10_000])
def test_a_step_gives_the_optimizers_its_learning_rate_and_muons_momentum(step):
    cfg, model, opts = setup(MUON_MOMENTUM_WARMUP_STEPS="100")
    seen = spy_steps(model, opts)
    tg.train_step(model, opts, OneBatch(cfg.vocab_size), cfg, CPU, step, lr_mult=0.37)
    assert [s["name"] for s in seen] == ["muon", "adam"]
    for s in seen:
        assert s["lr"] == pytest.approx([b * 0.37 for b in s["base"]], rel=1e-12)
    frac = min(step / 100, 1.0)  # the warmup from MUON_MOMENTUM_WARMUP_START to MUON_MOMENTUM over 100 steps
    want = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
    assert seen[0]["momentum"] == pytest.approx([want] * len(opts.muon.param_groups), rel=1e-12)
    assert cfg.muon_momentum_warmup_start != cfg.muon_momentum  # (or the warmup would be invisible)


def test_gradient_clipping_bounds_the_norm_the_optimizers_see():
    cfg, model, opts = setup()
    seen = spy_steps(model, opts)
    tg.train_step(model, opts, OneBatch(cfg.vocab_size), cfg, CPU, 0, lr_mult=1.0)
    unclipped = seen[0]["grad_norm"]
    cfg, model, opts = setup(GRAD_CLIP_NORM=str(unclipped / 4))
    seen = spy_steps(model, opts)
    tg.train_step(model, opts, OneBatch(cfg.vocab_size), cfg, CPU, 0, lr_mult=1.0)
    assert seen[0]["grad_norm"] == pytest.approx(unclipped / 4, rel=1e-4)  # the same batch and weights, clipped


def test_each_adam_group_has_its_own_learning_rate():
    """The embedding group (the tied embedding in it) at EMBED_LR, the scalars at SCALAR_LR: a swap would pass a
    comparison of the two as a set."""
    cfg, model, opts = setup(EMBED_LR="0.031", SCALAR_LR="0.017")
    embed, scalar = opts.adam.param_groups
    assert (embed["base_lr"], scalar["base_lr"]) == (0.031, 0.017)
    assert any(p is model.tok_emb.weight for p in embed["params"])
    assert not any(p is model.tok_emb.weight for p in scalar["params"])
