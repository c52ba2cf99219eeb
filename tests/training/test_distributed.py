"""Several processes on CPU (gloo): one global batch means one run, whatever the process count.

Two processes that split every global batch between them and average their gradients take the
same steps as one process; only the order of floating-point sums differs (each process sums its
half, then the halves are added). The tiny student here is an MLP without dropout or batch norm,
whose outputs are otherwise the same row for row: after 8 steps its weights differ by ~3e-8 and
the logged losses by ~5e-7 relative; the tests allow 1e-5, far below what a missed gradient
average or a misweighted short batch moves them. (Dropout draws other masks per process, and
batch norm on CPU normalises each process's half: such models train alike in distribution, not
to the last digit.)
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import metrics_lines, tiny_lm_recipe
from safetensors.torch import load_file
from test_engine import Items  # a dataset of indices

import distill
from distill.batches import ShuffledBatches, per_process_batch
from distill.errors import RecipeError

WEIGHTS = {"atol": 1e-5, "rtol": 1e-4}


@pytest.mark.parametrize("lengths", [None, [i % 13 for i in range(103)]])
def test_processes_split_each_global_batch(lengths):
    one = [b["index"].tolist() for b in ShuffledBatches(Items(103), 8, 3, lengths=lengths).epoch(0)]
    parts = [list(ShuffledBatches(Items(103), 8, 3, rank=r, world=2, lengths=lengths).epoch(0)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(one) == 13
    for b, batch in enumerate(one):
        first, second = parts[0][b], parts[1][b]
        assert first["index"].tolist() + second["index"].tolist() == batch
        # Each process's mean weighted by its share: their average is the global batch's mean.
        weighted = [part["share"] * part["index"].double().mean() for part in (first, second)]
        assert float(sum(weighted) / 2) == pytest.approx(sum(batch) / len(batch))
    sizes = [[len(p[b]["index"]) for p in parts] for b in range(13)]
    assert sizes.count([4, 4]) == 12 and sizes.count([4, 3]) == 1  # 103 = 12 x 8 + 7


def test_a_process_with_no_example_left_runs_one_at_weight_zero():
    batches = [ShuffledBatches(Items(9), 8, 0, rank=r, world=4) for r in range(4)]
    last = [list(b.epoch(0))[-1] for b in batches]
    assert [x["share"] for x in last] == [4.0, 0.0, 0.0, 0.0]
    assert all(len(x["index"]) == 1 for x in last)


def test_global_batch_must_split_evenly():
    assert per_process_batch(32, 4) == 8
    with pytest.raises(RecipeError, match=r"train.batch_size: 30 is the global batch.*4 processes.*28 or 32"):
        per_process_batch(30, 4)


def test_nproc_under_a_launcher_is_refused(monkeypatch, capsys):
    from distill.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["run", "r.yaml", "--nproc", "2"]) == 2
    assert "already one of 2 started by a launcher" in capsys.readouterr().err


def test_nproc_relaunches_the_same_command(monkeypatch):
    import distill.launch
    from distill.cli import main

    seen = []
    monkeypatch.setattr(distill.launch, "launch", lambda argv, nproc: seen.append((argv, nproc)) or 0)
    assert main(["run", "r.yaml", "--nproc", "3", "--set", "seed=1", "--set", "train.lr=1e-3"]) == 0
    assert main(["cache", "c.yaml", "--top-k", "8", "--nproc", "2"]) == 0
    assert seen == [(["run", "r.yaml", "--set", "seed=1", "--set", "train.lr=1e-3"], 3),
                    (["cache", "c.yaml", "--top-k", "8"], 2)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_missing_device_is_named():
    from distill.config import TrainSpec
    from distill.engine import make_accelerator

    with pytest.raises(RecipeError, match="train.device: 'cuda', but PyTorch sees no CUDA device"):
        make_accelerator(TrainSpec(device="cuda"))


def test_teacher_cache_parts_merge_into_the_one_process_cache(tmp_path):
    from distill.cache import TeacherCache

    x = torch.randn(10, 3)
    args = {"teacher": lambda inputs: {"logits": inputs["x"] @ torch.ones(3, 2), "layer:h": inputs["x"] * 2},
            "batches": lambda idx: {"inputs": {"x": x[idx]}}, "lengths": [7, 1, 4, 4, 9, 2, 2, 8, 5, 3],
            "names": ["logits", "layer:h"], "batch_size": 4}
    one = TeacherCache.build(tmp_path / "one", "t", "d", **args)
    # Three batches among four processes: the last has none and writes an empty part.
    TeacherCache.plan_parts(tmp_path / "four", 4, teacher_id="t", **args)
    for rank in range(4):
        TeacherCache.build_part(tmp_path / "four", rank, 4, **args)
    four = TeacherCache.merge_parts(tmp_path / "four", "t", "d", 4, args["names"], 10)
    assert json.loads((four.folder / "meta.json").read_text()) == json.loads((one.folder / "meta.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["four", "one"]  # the parts are gone


# --- real runs in two processes ---------------------------------------------------------------


def _cli(args, env=None, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    """A recipe (ConvNet teacher, MLP student without dropout, Hinton KD and a FitNets hint through a
    learned projector) and its run in one process."""
    from distill.models.adapters import TorchClassifierAdapter
    from distill.models.zoo import ConvNet

    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    TorchClassifierAdapter(ConvNet(width=4), "convnet", {"width": 4}).save(root / "teacher")
    recipe = {
        "name": "tiny-ddp", "task": "classification",
        "teacher": {"kind": "torch", "source": str(root / "teacher")},
        "student": {"arch": "mlp", "arch_args": {"hidden": 16, "depth": 1, "dropout": 0.0}},
        "data": {"format": "fashion-mnist", "path": str(data_dir / "fashion-mnist"),
                 "train_limit": 237, "eval_limit": 64, "test_limit": 64},
        "losses": [{"name": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
                   {"name": "hint", "weight": 0.1, "layers": {"student": ["net.2"], "teacher": ["features.15"]}}],
        "task_loss_weight": 0.5, "baseline": False,
        # 237 = 7 x 32 + 13: each epoch ends with a short batch, split 7 + 6; 2 batches per step.
        "train": {"max_steps": 8, "batch_size": 32, "grad_accum": 2, "eval_every": 4, "checkpoint_every": 3,
                  "lr": 1e-2, "keep_best": True, "patience": 5},  # patience: asked of both processes at step 4
        "cache": {"dir": str(root / "cache-one")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 16},
        "output_dir": str(root / "one"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    distill.run(recipe)
    return root


def _metrics(folder):
    return [json.loads(line) for line in metrics_lines(folder / "train/student")]


def _same_training(a, b):
    ma, mb = _metrics(a), _metrics(b)
    assert [sorted(r) for r in ma] == [sorted(r) for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        assert rb == {k: pytest.approx(v, rel=1e-5, abs=1e-6) if isinstance(v, float) else v for k, v in ra.items()}
    wa, wb = (load_file(str(f / "student/model.safetensors")) for f in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], **WEIGHTS)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_two_processes_train_as_one_does(tiny):
    two = tiny / "two"
    out = _cli(["-m", "distill.cli", "run", str(tiny / "recipe.yaml"), "--nproc", "2",
                "--set", f"output_dir={two}", "--set", f"cache.dir={tiny / 'cache-two'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    _same_training(tiny / "one", two)
    one_eval, two_eval = (json.loads((f / "eval.json").read_text())["models"]["student"] for f in (tiny / "one", two))
    assert two_eval["accuracy"] == one_eval["accuracy"]
    # The main process alone wrote the run folder: the same files as one process writes.
    assert _files(two) == _files(tiny / "one")
    assert json.loads((two / "train/student/checkpoints/step-00000008/trainer_state.json").read_text())[
        "processes"] == 2
    # The teacher cache, built half by each process and merged, is the one-process cache byte for byte.
    (one_cache,), (two_cache,) = ([p for p in (tiny / c).iterdir() if p.is_dir()] for c in ("cache-one", "cache-two"))
    one_meta, two_meta = (json.loads((c / "meta.json").read_text()) for c in (one_cache, two_cache))
    assert two_meta["outputs"] == one_meta["outputs"] and two_meta["examples"] == 237
    assert set(two_meta["outputs"]) == {"logits", "layer:features.15"}


def test_resume_with_another_process_count(tiny, capsys):
    # Started by torchrun itself (as a user would, on one machine or several), killed after step 5.
    folder = tiny / "resumed"
    killed = _cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "distill.cli",
                   "run", str(tiny / "recipe.yaml"), "--set", f"output_dir={folder}"], {"DISTILL_KILL_AT_STEP": "5"})
    assert killed.returncode != 0
    checkpoints = folder / "train/student/checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000003"]
    assert json.loads((checkpoints / "step-00000003/trainer_state.json").read_text())["processes"] == 2
    assert not (folder / "student").exists()
    # Resumed by one process: the same run as the one that never stopped.
    recipe = yaml.safe_load((tiny / "recipe.yaml").read_text())
    distill.run({**recipe, "output_dir": str(folder)})
    assert "written by 2 processes, now 1" in capsys.readouterr().out
    _same_training(tiny / "one", folder)


def test_logit_cache_of_two_processes_equals_one(tmp_path, data_dir, gpt_pair):
    from distill.runner import build_caches

    teacher, student = gpt_pair
    recipe = tiny_lm_recipe(
        tmp_path, data_dir, teacher, student, name="tiny-lm-ddp", task_loss_weight=0.0, baseline=False,
        output_dir=None, data={"train_limit": 25, "eval_limit": 4, "test_limit": 4},
        losses=[{"name": "token_kd", "params": {"kind": "forward_kl", "temperature": 2.0}}],
        cache={"enabled": True, "top_k": 8, "dir": str(tmp_path / "one"), "shard_size": 10},
    )
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    ((_, one),) = build_caches(recipe)
    out = _cli(["-m", "distill.cli", "cache", str(path), "--nproc", "2", "--set", f"cache.dir={tmp_path / 'two'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("tiny-lm-ddp: logit cache ") == 1  # printed by the main process
    (folder,) = (tmp_path / "two").iterdir()
    two = json.loads((folder / "meta.json").read_text())
    # Rank 0 wrote shards 0 and 2, rank 1 shard 1; the merged list is the one-process cache's.
    assert len(two["shards"]) == 3 and two["shards"] == one.meta["shards"]
    assert two["vocab"] == one.vocab and not list(folder.glob("meta.rank-*"))


def test_sharded_teacher_gives_the_replicated_teachers_run(tmp_path, data_dir, gpt_pair):
    # FSDP splits the frozen teacher's weights between the processes and gathers one block at a
    # time: its outputs, hence the whole run, are those of a full copy in every process.

    recipe = tiny_lm_recipe(tmp_path, data_dir, *gpt_pair, baseline=False)
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = {}
    for name, shard in (("whole", "false"), ("sharded", "true")):
        runs[name] = _cli(["-m", "distill.cli", "run", str(path), "--nproc", "2", "--set",
                           f"output_dir={tmp_path / name}", "--set", f"train.shard_teacher={shard}"])
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    log = runs["sharded"].stdout + runs["sharded"].stderr
    # GPT-2 blocks split in two; the tied embedding and head too: each process keeps half.
    held = [int(x) for x in re.findall(r"this one holds (\d+) of its (\d+) parameters", log)[0]]
    assert held[0] * 2 == pytest.approx(held[1], abs=64)
    _same_training(tmp_path / "whole", tmp_path / "sharded")
    perplexities = [json.loads((tmp_path / n / "eval.json").read_text())["models"] for n in ("whole", "sharded")]
    assert perplexities[0]["teacher"]["perplexity"] == perplexities[1]["teacher"]["perplexity"]
    assert perplexities[0]["student"]["perplexity"] == pytest.approx(perplexities[1]["student"]["perplexity"],
                                                                     rel=1e-5)


def test_sharded_teacher_and_logit_cache_are_refused():
    from distill.config import parse_recipe

    recipe = {"name": "x", "task": "lm", "teacher": {"kind": "hf-causal-lm", "source": "t"},
              "student": {"source": "s"}, "data": {"format": "text", "path": "d"},
              "losses": [{"name": "token_kd"}], "cache": {"top_k": 8}, "train": {"shard_teacher": True}}
    with pytest.raises(RecipeError, match="train.shard_teacher: a sharded teacher runs online"):
        parse_recipe(recipe)


def test_in_batch_relation_losses_see_the_global_batch(tiny):
    """RKD, similarity and contrastive compare the examples of a batch: under two processes each gathers the
    other's rows (with gradients), so the run equals one process's, uneven last batch included."""
    recipe = yaml.safe_load((tiny / "recipe.yaml").read_text())
    recipe["losses"] = [{"name": "rkd_distance", "weight": 1.0, "on": "logits"},
                        {"name": "similarity", "weight": 5.0, "on": "logits"},
                        {"name": "contrastive", "weight": 1.0, "on": "logits"}]
    recipe["cache"] = {"enabled": False}
    one, two = tiny / "relation-one", tiny / "relation-two"
    distill.run({**recipe, "output_dir": str(one)})
    path = tiny / "relation.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(two)}))
    out = _cli(["-m", "distill.cli", "run", str(path), "--nproc", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    _same_training(one, two)
