"""The training loop (tritnet.train): exact resume, the run folder, metrics, faults."""

import dataclasses
import json
import os

import numpy as np
import pytest

from tests.helpers import code_text, poison_loss, small_config
from tritnet import backend, data
from tritnet.checkpoint import load_checkpoint
from tritnet.config import Config, ConfigError, ModelConfig, RunConfig
from tritnet.models import CodeMemoryLM
from tritnet.train import (LossNotFinite, TrainError, evaluate_checkpoint, steps_for_tokens,
                           train)

# A model small enough that a step takes milliseconds: every code path of the tiny one.
SMALL = small_config(steps=6, eval_every=2, eval_batches=2, save_every=3)
TEXT = code_text(400).encode()


@pytest.fixture(autouse=True)
def _cpu():
    backend.set_device("cpu")


@pytest.fixture
def corpus():
    return data._split_tail(np.frombuffer(TEXT, np.uint8), 256, "synthetic code")


def small(**values):
    return Config().override(**{**SMALL, **values})


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def losses(run):
    return [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]


def ternary_state(path):
    """The weights and their integer training state (what an optimiser step changes)."""
    arrays = load_checkpoint(path).arrays
    return {k: v for k, v in arrays.items()
            if k.rsplit(".", 1)[-1] in ("T_packed", "E", "T_accum", "E_accum")}


def quiet(*_):
    pass


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, corpus):
    """Losses and final state of 3 + 3 resumed steps equal those of 6 steps in one go (with
    evaluations in between, which must not disturb anything); metrics past the checkpoint
    (from a crashed run) are redone, not duplicated."""
    full, split = tmp_path / "full", tmp_path / "split"
    train(small(steps=6), data=corpus, out_dir=full, log=quiet)
    train(small(steps=3), data=corpus, out_dir=split, log=quiet)
    assert load_checkpoint(split / "ckpt.h5").step == 3
    with open(split / "metrics.jsonl", "a") as fh:   # a crash after step 4, mid-line
        fh.write('{"step": 4, "loss": 9.0}\n{"step": 5, "lo')
    train(small(steps=6), data=corpus, out_dir=split, resume=True, log=quiet)
    assert losses(split) == losses(full)
    assert [r["step"] for r in metrics(split)] == [r["step"] for r in metrics(full)]
    a, b = load_checkpoint(full / "ckpt.h5"), load_checkpoint(split / "ckpt.h5")
    assert list(a.arrays) == list(b.arrays)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)
    assert a.train_state["data"] == b.train_state["data"]


def test_the_checkpoint_written_during_the_run_is_the_step_it_was_taken_at(tmp_path, corpus,
                                                                          monkeypatch):
    """Checkpoints between the first step and the last are written in the background while
    training goes on: the one taken at step 3 of 6 holds step 3, as a run of 3 steps ends."""
    import shutil
    from tritnet import checkpoint as ck
    copies, write = [], ck._write

    def keep_a_copy(snapshot):
        path = write(snapshot)
        copies.append(shutil.copy(path, tmp_path / f"written{len(copies)}.h5"))
        return path

    monkeypatch.setattr(ck, "_write", keep_a_copy)
    train(small(steps=6), data=corpus, out_dir=tmp_path / "six", log=quiet)
    train(small(steps=3), data=corpus, out_dir=tmp_path / "three", log=quiet)
    assert len(copies) == 3   # step 3 of six, step 6 of six, step 3 of three
    during, three = load_checkpoint(copies[0]), load_checkpoint(copies[2])
    assert during.step == three.step == 3
    assert list(during.arrays) == list(three.arrays)
    for k in three.arrays:
        np.testing.assert_array_equal(during.arrays[k], three.arrays[k], err_msg=k)
    for k in ("data", "tritnet_rng"):
        assert during.train_state[k] == three.train_state[k], k
    assert {**during.train_state["optimizer"], "total_steps": 3} == \
        three.train_state["optimizer"]   # the runs' lengths differ, nothing else


def test_metrics_config_and_baseline(tmp_path, corpus):
    lines = []
    result = train(small(), data=corpus, out_dir=tmp_path / "run", log=lines.append)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(7))
    for r in rows[1:]:
        assert {"step", "tokens", "loss", "train_bpb", "tokens_per_s", "elapsed"} <= set(r)
        assert r["tokens"] == r["step"] * 2 * 16
    evals = [r for r in rows if "val_bpb" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    bigram = data.bigram_bpb(corpus.train, corpus.val, 256)
    assert all(r["bigram_bpb"] == pytest.approx(bigram) for r in evals)
    assert any(line.startswith("bigram baseline: ") for line in lines)
    assert any("held-out" in line and "bigram baseline" in line for line in lines)
    assert result["val_bpb"] == evals[-1]["val_bpb"] and result["step"] == 6
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved == small().to_dict()
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.h5")
    assert ckpt.step == 6 and ckpt.metrics["val_bpb"] == result["val_bpb"]
    assert ckpt.config == small().to_dict()


def test_tokens_become_steps(tmp_path, corpus):
    assert steps_for_tokens(100, 2, 16) == 4 and steps_for_tokens(96, 2, 16) == 3
    result = train(small(eval_every=0), data=corpus, out_dir=tmp_path, tokens=100, log=quiet)
    assert result["step"] == 4 and "val_bpb" in result   # eval_every 0: evaluated at the end
    with pytest.raises(ConfigError, match="tokens = 0"):
        train(small(), data=corpus, out_dir=tmp_path / "x", tokens=0, log=quiet)


def test_run_folder_is_refused_then_overwritten_aside(tmp_path, corpus):
    run = tmp_path / "run"
    train(small(steps=2), data=corpus, out_dir=run, log=quiet)
    old = (run / "ckpt.h5").read_bytes()
    with pytest.raises(TrainError, match=r"already holds a run \(config.json, ckpt.h5, "
                                         r"metrics.jsonl\); continue it with --resume"):
        train(small(), data=corpus, out_dir=run, log=quiet)
    assert (run / "ckpt.h5").read_bytes() == old
    with pytest.raises(TrainError, match="exclude each other"):
        train(small(), data=corpus, out_dir=run, resume=True, overwrite=True, log=quiet)
    train(small(steps=3), data=corpus, out_dir=run, overwrite=True, log=quiet)
    previous = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    assert (previous[0] / "ckpt.h5").read_bytes() == old        # moved aside, never deleted
    assert sorted(p.name for p in previous[0].iterdir()) == ["ckpt.h5", "config.json",
                                                             "metrics.jsonl"]
    assert load_checkpoint(run / "ckpt.h5").step == 3
    with pytest.raises(TrainError, match="nothing to resume"):
        train(small(), data=corpus, out_dir=tmp_path / "empty", resume=True, log=quiet)


def test_resume_refuses_another_model(tmp_path, corpus):
    run = tmp_path / "run"
    train(small(steps=2), data=corpus, out_dir=run, log=quiet)
    with pytest.raises(TrainError, match=r"d_model = 64 \(checkpoint: 32\)"):
        train(small(d_model=64), data=corpus, out_dir=run, resume=True, log=quiet)
    other = data._split_tail(np.frombuffer(TEXT[::-1], np.uint8), 256, "other text")
    other.train = other.train[:-7]
    with pytest.raises(TrainError, match="trained on other data"):
        train(small(steps=4), data=other, out_dir=run, resume=True, log=quiet)
    # Run-length and optimiser fields may change on resume.
    train(small(steps=4, flip_threshold=100), data=corpus, out_dir=run, resume=True, log=quiet)
    assert load_checkpoint(run / "ckpt.h5").step == 4


def test_what_may_change_on_resume_is_the_run_config():
    """The model's fields (ModelConfig) are the checkpoint's; every field of the run's part
    (RunConfig) may change on resume; together they are the one flat Config users write."""
    model, run = ({f.name for f in dataclasses.fields(c)} for c in (ModelConfig, RunConfig))
    assert not model & run and model | run == set(Config().to_dict())
    names = list(Config().to_dict())   # the model's fields first, as configs were written
    assert names[:len(model)] == [f.name for f in dataclasses.fields(ModelConfig)]
    assert Config().model == ModelConfig() and isinstance(Config(), (ModelConfig, RunConfig))
    assert {"d_model", "vq_beta", "quiet_memory"} <= model
    assert {"steps", "seed", "flip_threshold", "recompute", "matmul_precision"} <= run


def test_evaluate_checkpoint_scores_what_the_run_scored(tmp_path, corpus):
    """The library's evaluation of a checkpoint (what `tritnet eval` prints) scores the run's
    own held-out windows by default, so it gives the run's last held-out score."""
    run = train(small(steps=2), data=corpus, out_dir=tmp_path / "run", log=quiet)
    score = evaluate_checkpoint(tmp_path / "run" / "ckpt.h5", data=corpus)
    assert score["val"] == run["val_bpb"] and score["bigram"] == run["bigram_bpb"]
    assert (score["unit"], score["source"], score["trained_on"]) == ("bpb", "synthetic code",
                                                                     None)
    assert score["tokens"] == 2 * 2 * 16   # eval_batches x batch_size x seq_len
    one = evaluate_checkpoint(tmp_path / "run" / "ckpt.h5", data=corpus, batches=1, seq_len=8)
    assert one["tokens"] == 2 * 8
    with pytest.raises(ConfigError, match="--seq-len 64 exceeds the model's context = 32"):
        evaluate_checkpoint(tmp_path / "run" / "ckpt.h5", data=corpus, seq_len=64)


def test_blocks_get_the_model_config():
    model = CodeMemoryLM(small(recompute=True, recompute_keep=1))
    assert type(model.config) is ModelConfig and model.config == small().model
    assert [b.recompute for b in model.blocks] == [False]   # the last block keeps its own
    assert [b.recompute for b in CodeMemoryLM(small().model, recompute=True).blocks] == [True]


def test_nan_loss_saves_the_last_good_step(tmp_path, corpus, monkeypatch):
    clean = tmp_path / "clean"
    train(small(steps=3, eval_every=0, save_every=0), data=corpus, out_dir=clean, log=quiet)

    poison_loss(monkeypatch, call=4, factor=float("nan"))
    run = tmp_path / "run"
    with pytest.raises(LossNotFinite, match=r"step 4: the loss is nan; stopped and saved the "
                                            r"last good step \(3\)"):
        train(small(steps=6, eval_every=0, save_every=0), data=corpus, out_dir=run, log=quiet)
    ckpt = load_checkpoint(run / "ckpt.h5")
    assert ckpt.step == 3 and ckpt.train_state["optimizer"]["step"] == 3
    assert ckpt.train_state["data"] == load_checkpoint(clean / "ckpt.h5").train_state["data"]
    good, saved = ternary_state(clean / "ckpt.h5"), ternary_state(run / "ckpt.h5")
    for k in good:
        np.testing.assert_array_equal(good[k], saved[k], err_msg=k)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


def test_cosine_schedule_run_stopped_by_ctrl_c_resumes_exactly(tmp_path, corpus, monkeypatch):
    """The gain's schedule depends on the step and the run's length only, so a cosine run cut
    by Ctrl-C after step 3 and resumed equals the uncut run, losses and trits."""
    import signal
    config = small(steps=6, eval_every=0, save_every=0, schedule="cosine",
                   final_grad_rms_units=0.5)
    train(config, data=corpus, out_dir=tmp_path / "full", log=quiet)
    original, calls = CodeMemoryLM.loss, []

    def interrupted(self, tokens, targets):
        if self.training:
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C during step 3: saved after it
        return original(self, tokens, targets)

    monkeypatch.setattr(CodeMemoryLM, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config, data=corpus, out_dir=tmp_path / "split", log=quiet)
    assert load_checkpoint(tmp_path / "split" / "ckpt.h5").step == 3
    monkeypatch.setattr(CodeMemoryLM, "loss", original)
    train(config, data=corpus, out_dir=tmp_path / "split", resume=True, log=quiet)
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    a, b = ternary_state(tmp_path / "full" / "ckpt.h5"), ternary_state(tmp_path / "split" / "ckpt.h5")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_cosine_schedule_changes_training_and_recompute_does_not(tmp_path, corpus,
                                                                 micro_batches):
    runs = {}
    for name, values in (("constant", {}), ("cosine", {"schedule": "cosine"}),
                         ("recompute", {"recompute": True})):
        values = dict(values, micro_batches=micro_batches)
        # without the shared VQ no table is read twice a step: recompute is then exact (a
        # table read by several blocks quantises each read with the seed of its place in
        # backward's order, which recompute changes; tests/models/test_models.py)
        train(small(steps=4, eval_every=0, n_layers=2, use_shared_vq=False, **values),
              data=corpus, out_dir=tmp_path / name, log=quiet)
        runs[name] = ternary_state(tmp_path / name / "ckpt.h5")
    for k in runs["constant"]:
        np.testing.assert_array_equal(runs["constant"][k], runs["recompute"][k], err_msg=k)
    assert any(not np.array_equal(runs["constant"][k], runs["cosine"][k]) for k in runs["cosine"])


def test_training_loop_runs_with_the_long_lived_objects_frozen(tmp_path, corpus, monkeypatch):
    """The model, libraries and kernels outlive the loop: train() runs it inside frozen_heap
    (gc.freeze), so the cyclic collector's full passes stop rescanning them; afterwards the
    process has its usual collector back."""
    import gc
    from tritnet import train as T
    counts = []
    step = T.TritFlip.step
    monkeypatch.setattr(T.TritFlip, "step", lambda self: counts.append(gc.get_freeze_count())
                        or step(self))
    gc.unfreeze()
    train(small(steps=2), data=corpus, out_dir=str(tmp_path / "run"), log=quiet)
    assert len(counts) == 2 and min(counts) > 0
    assert gc.get_freeze_count() == 0


def test_each_row_carries_the_optimisers_view_of_its_own_update(tmp_path, corpus):
    """`opt` in every step's row: per model component, the share of trits the step's update
    flipped, of accumulators at ±127 after it and of row exponents it stepped; the flips equal
    the change of the trits between two checkpoints."""
    run = tmp_path / "run"
    train(small(steps=3, save_every=2, flip_threshold=2, grad_rms_units=4, grad_clip_units=4),
          data=corpus, out_dir=run, log=quiet)
    rows = [r for r in metrics(run) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2, 3]
    model = CodeMemoryLM(small())
    for r in rows:
        assert set(r["opt"]) <= set(model.components())
        assert {"attention", "moe_experts", "head", "embedding"} <= set(r["opt"])
        for name, view in r["opt"].items():
            # tables (embedding, code books) count no saturation: their step stays sparse
            sparse = name in ("embedding", "moe_router", "shared_vq", "kgvq")
            assert set(view) == ({"flip", "scale"} if sparse else {"flip", "sat", "scale"})
            assert all(0.0 <= v <= 1.0 for v in view.values())
    assert any(v["flip"] > 0 for r in rows for v in r["opt"].values())
    # step 3's attention flips = trits that differ between the checkpoints of step 2 and 3
    train(small(steps=2, save_every=2, flip_threshold=2, grad_rms_units=4, grad_clip_units=4),
          data=corpus, out_dir=tmp_path / "two", log=quiet)
    a, b = (load_checkpoint(p / "ckpt.h5").arrays for p in (tmp_path / "two", run))
    from tritnet_kernels.packing import unpack_trits
    changed = trits = 0
    for key in a:
        if ".attn." in key and key.endswith("T_packed"):
            cols = 32
            changed += int((unpack_trits(a[key], cols) != unpack_trits(b[key], cols)).sum())
            trits += a[key].shape[0] * cols
    assert rows[2]["opt"]["attention"]["flip"] == pytest.approx(changed / trits, rel=1e-3)


@pytest.mark.parametrize("options", [dict(accum_init="spread", flip_carry=True),
                                     dict(grad_norm="factored"), dict(grad_norm="row")])
def test_optimiser_options_learn_and_resume_exactly(tmp_path, corpus, options):
    full, split = tmp_path / "full", tmp_path / "split"
    train(small(steps=6, **options), data=corpus, out_dir=full, log=quiet)
    train(small(steps=3, **options), data=corpus, out_dir=split, log=quiet)
    train(small(steps=6, **options), data=corpus, out_dir=split, resume=True, log=quiet)
    assert losses(split) == losses(full)
    plain = tmp_path / "plain"
    train(small(steps=6), data=corpus, out_dir=plain, log=quiet)
    assert losses(plain) != losses(full)   # the option changes training
