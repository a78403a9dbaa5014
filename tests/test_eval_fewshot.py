"""The few-shot harness end to end on the synthetic suite: 0 and 4 shots, random and RICES
demonstrations, 2 data-parallel ranks, results JSON and MLflow metrics; the prompt layout."""

import json
import os

import pytest
import torch
from distributed import run_distributed


def _debug_model_and_tokenizer(layout, corpus):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.hf.llama import load_tokenizer
    from flamingo_dist.training.build import build_model

    cfg = load_config(None, [f"parallel.tensor_parallel_size={layout.tp_size}"])
    model = build_model(cfg.model, tp_group(), seed=0).eval()
    return model, load_tokenizer(os.path.join(corpus, "tokenizer"), cfg.model.lm.vocab_size), cfg


def _harness(layout, corpus, tasks_dir, run_dir):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.distributed.groups import dp_group
    from flamingo_dist.eval.fewshot import run
    from flamingo_dist.eval.tasks import (
        load_classification,
        load_hateful_memes,
        load_karpathy,
        load_vqa,
        write_synthetic_tasks,
    )
    from flamingo_dist.training.tracking import Tracker

    model, tok, cfg = _debug_model_and_tokenizer(layout, corpus)
    if layout.rank == 0:
        write_synthetic_tasks(tasks_dir, num_images=24, seed=0)
    torch.distributed.barrier()
    p = {"karpathy": os.path.join(tasks_dir, "dataset_synthetic.json"), "root": tasks_dir,
         "img": os.path.join(tasks_dir, "val2014")}
    caps_test, caps_train = (load_karpathy(p["karpathy"], p["root"], s) for s in ("test", "train"))
    vqa = load_vqa(os.path.join(tasks_dir, "questions.json"), os.path.join(tasks_dir, "annotations.json"),
                   p["img"], "vqav2")
    memes = load_hateful_memes(os.path.join(tasks_dir, "memes.jsonl"), tasks_dir)
    shapes = load_classification(os.path.join(tasks_dir, "shapes.jsonl"), tasks_dir)
    tasks = {"captions": ("captioning", caps_test, caps_train), "vqa": ("vqa", vqa[:8], vqa[8:]),
             "memes": ("hateful_memes", memes[:10], memes[10:]), "shapes": ("classification", shapes[:6], shapes[6:])}
    job = load_config(None, [f"tracking.run_dir={run_dir}", "tracking.run_name=eval"])
    tracker = Tracker(job.tracking, job, layout, run_name="eval")
    out = os.path.join(run_dir, "eval.json")
    results = run(model, tok, tasks, shots=[0, 4], methods=["random", "rices"], trials=2, image_size=32,
                  out_json=out, dp_rank=layout.dp_rank, dp_size=layout.dp_size, dp_group=dp_group(),
                  feature_cache=os.path.join(run_dir, "features"), tracker=tracker, step=7, max_new_tokens=4)
    tracker.close()
    return results, tracker.run_id


def test_synthetic_fewshot_runs_end_to_end_on_two_ranks(synthetic_corpus, tmp_path):
    import mlflow

    run_dir = str(tmp_path / "run")
    r0, r1 = run_distributed(_harness, 2, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "tasks"), run_dir)
    (res, run_id), (res1, _) = r0, r1
    assert res == res1  # every rank holds the gathered scores
    with open(os.path.join(run_dir, "eval.json")) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(res))
    assert written["protocol_version"].startswith("flamingo_dist-fewshot-2")
    for task in ("captions", "vqa", "memes", "shapes"):
        for cfg in ("0shot_random", "0shot_rices", "4shot_random", "4shot_rices"):
            entry = written["tasks"][task][cfg]
            assert len(entry["trials"]) == 2 and entry["std"] >= 0
            assert entry["mean"] == pytest.approx(sum(entry["trials"]) / 2)
    assert 0 <= written["tasks"]["memes"]["4shot_random"]["mean"] <= 100
    shape_preds = written["tasks"]["shapes"]["4shot_rices"]["predictions"][0]
    assert len(shape_preds) == 6 and set(shape_preds.values()) <= {"circle", "square", "triangle"}
    assert os.listdir(os.path.join(run_dir, "features"))  # RICES features cached on disk
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{os.path.join(run_dir, 'mlflow.db')}")
    history = client.get_metric_history(run_id, "eval/vqa/4shot_rices")
    assert [(m.step, m.value) for m in history] == [(7, written["tasks"]["vqa"]["4shot_rices"]["mean"])]


def test_prompt_layout_demos_then_query(synthetic_corpus, tmp_path):
    from flamingo_dist.eval.fewshot import Prompter, choose_demos
    from flamingo_dist.eval.tasks import load_vqa, write_synthetic_tasks
    from flamingo_dist.hf.llama import load_tokenizer

    d = write_synthetic_tasks(str(tmp_path / "t"), num_images=6)
    exs = load_vqa(d["vqa_questions"], d["vqa_annotations"], d["image_dir"], "vqav2")
    tok = load_tokenizer(os.path.join(synthetic_corpus, "tokenizer"), 512)
    ids, pixels, mask = Prompter(tok, 32).inputs("vqa", [(exs[1], "red"), (exs[2], "circle")], exs[0], True)
    assert pixels.shape == (1, 3, 3, 32, 32) and mask.shape == (1, ids.shape[1], 3)
    assert (ids == 513).sum() == 3 and ids[0, 0] == tok.bos_token_id and (ids != tok.eos_token_id).all()
    assert mask[0, -1].tolist() == [0, 0, 1]  # the query text sees its own image only
    zero, pixels0, mask0 = Prompter(tok, 32).inputs("vqa", [(exs[1], "red"), (exs[2], "circle")], exs[0], False)
    assert (zero == 513).sum() == 1 and pixels0.shape[1] == 1  # 0-shot: text-only demonstrations ...
    assert tok.unk_token_id not in zero[0].tolist()  # ... each of whose words is a word
    import random

    feats = torch.eye(5, 8)  # orthogonal features: similarity = the query's weight on each
    q = 0.7 * feats[0] + 0.6 * feats[3] + 0.4 * feats[1]
    picked = choose_demos(2, "rices", random.Random(0), exs[:5], q, feats, exclude=exs[0].id)
    assert picked == [exs[1], exs[3]]  # the query itself excluded; the most similar placed last


def _train_with_eval(layout, corpus, run_dir):
    from test_trainer import make_trainer

    from flamingo_dist.training.tracking import Tracker

    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=4", "eval.every_steps=2", "eval.synthetic=true",
                           "eval.max_queries=4", "eval.max_new_tokens=3", "eval.shots=[0,4]")
    trainer.cfg.tracking.mlflow = True  # make_trainer builds without tracking: add it as train.py does
    trainer.tracker = Tracker(trainer.cfg.tracking, trainer.cfg, layout, run_name="eval-during-training")
    trainer.train()
    trainer.close()
    return trainer.tracker.run_id


def test_evaluation_during_training_lands_in_the_mlflow_run(synthetic_corpus, tmp_path):
    import mlflow

    run_dir = str(tmp_path / "run")
    run_id = run_distributed(_train_with_eval, 2, 1, tmp_path / "out", synthetic_corpus, run_dir)[0]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{os.path.join(run_dir, 'mlflow.db')}")
    for name in ("eval/synthetic_captions/4shot_random", "eval/synthetic_vqa_color/0shot_random",
                 "eval/synthetic_memes/4shot_random"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [2, 4], name
    assert len(client.get_metric_history(run_id, "loss")) == 4  # beside the training loss, in one run
    with open(os.path.join(run_dir, "eval", "step_00000004.json")) as f:
        assert json.load(f)["step"] == 4


def _zero3_eval(layout, corpus, run_dir):
    from test_trainer import make_trainer

    make_trainer(layout, corpus, run_dir, 3, "eval.every_steps=2", "eval.synthetic=true")


def test_evaluation_during_training_under_zero3_with_data_parallelism_is_refused(synthetic_corpus, tmp_path):
    with pytest.raises(Exception, match="does not run under ZeRO-3 with data parallelism"):
        run_distributed(_zero3_eval, 2, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"))
